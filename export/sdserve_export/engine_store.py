"""The engine folder: find each component's plan by its exact name, or build it.

`ensure_engines` derives every component's `EngineTarget`, looks its plan up by name
(`plan_names.find_engine`) and builds the missing ones with `tensorrt_build.build_engine`,
checking each new plan against ONNX Runtime (`engine_parity`). Building needs the
`tensorrt` package and a GPU; the CPU tests replace the builder and the parity check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdserve_export.built_repository import Repository, RepositoryError
from sdserve_export.engine_parity import check_engine_parity
from sdserve_export.engine_targets import EngineTarget, batch_coverage_problems, engine_targets
from sdserve_export.gpu_variant import EnginePlan
from sdserve_export.plan_names import (
    EngineKey,
    find_engine,
    onnx_digest,
    stale_engines,
    timing_cache_path,
)
from sdserve_export.tensorrt_build import (
    BuildOptions,
    build_engine,
    gpu_compute_capability,
    tensorrt_version,
)
from sdserve_protocol.sizes import SizeBucket

# Parity of a new plan vs ONNX Runtime (fp32, CPU), relative to the largest reference value:
# fp16 kernels, and TF32 kernels in "fp32" plans on Ampere and later.
PARITY_RTOL = {"fp16": 5e-2, "fp32": 1e-2}


@dataclass(frozen=True)
class EngineSettings:
    """How `ensure_engines` finds or builds plans.

    Args:
        engine_dir: where plans and the timing cache live (keep it on a persistent volume).
        buckets: image sizes to serve, every pipeline; None: per architecture
            (`default_buckets`).
        xl_buckets: image sizes to serve for SDXL pipelines, overriding `buckets` for them.
        fp32_components: spec names built without fp16 (None: per-checkpoint default).
        batch_overrides: spec name → (min, opt, max) replacing `spec.trt_batch`.
        build_missing: build absent plans (else a missing plan is an error).
        parity: check each newly built plan against ONNX Runtime on its first profile.
        workspace_bytes: TensorRT builder workspace limit (None: TensorRT's default).
    """

    engine_dir: Path
    buckets: tuple[SizeBucket, ...] | None = None
    fp32_components: frozenset[str] | None = None
    batch_overrides: Mapping[str, Sequence[int]] | None = None
    build_missing: bool = True
    parity: bool = True
    workspace_bytes: int | None = None
    xl_buckets: tuple[SizeBucket, ...] | None = None


def ensure_engines(
    repository: Repository, settings: EngineSettings, log: Callable[[str], None] = print
) -> dict[str, EnginePlan]:
    """Find (exact name) or build the plan of every component for this TensorRT and GPU.

    Raises:
        TensorRTUnavailable: no `tensorrt` package or no GPU.
        RepositoryError: a plan is missing and `build_missing` is off, or parity failed.
    """
    trt_version = tensorrt_version()
    capability = gpu_compute_capability()
    Path(settings.engine_dir).mkdir(parents=True, exist_ok=True)
    cache = timing_cache_path(settings.engine_dir, trt_version, capability)
    plans = {}
    targets = engine_targets(
        repository,
        settings.buckets,
        settings.fp32_components,
        settings.batch_overrides,
        settings.xl_buckets,
    )
    for problem in batch_coverage_problems(repository, targets):
        log(f"[trt] WARNING: {problem}")
    for target in targets:
        key = target.key(trt_version, capability, onnx_digest(target.component.onnx_file))
        path = find_engine(settings.engine_dir, key) or _build(target, key, settings, cache, log)
        plans[target.component.name] = EnginePlan(path, key.profiles, key.batch)
    return plans


def _build(
    target: EngineTarget,
    key: EngineKey,
    settings: EngineSettings,
    cache: Path,
    log: Callable[[str], None],
) -> Path:
    for stale in stale_engines(settings.engine_dir, key):
        log(f"[trt] ignoring stale engine {stale.name}")
    if not settings.build_missing:
        raise RepositoryError(f"no engine {key.filename} in {settings.engine_dir}")
    options = BuildOptions(
        fp16=target.precision == "fp16",
        timing_cache=cache,
        workspace_bytes=settings.workspace_bytes,
    )
    path = build_engine(
        target.component.onnx_file,
        target.profiles,
        settings.engine_dir / key.filename,
        options,
        log,
    )
    if settings.parity:
        _require_parity(target, path, log)
    return path


def _require_parity(target: EngineTarget, plan: Path, log: Callable[[str], None]) -> None:
    component = target.component
    for result in check_engine_parity(
        plan, component.onnx_file, component.spec, target.profiles,
        rtol=PARITY_RTOL[target.precision], profile_indices=[0], component=component.name,
    ):  # fmt: skip
        log(f"[trt] parity {result}")
        if not result.ok:
            plan.unlink(missing_ok=True)  # never serve (or find again) a plan that drifted
            raise RepositoryError(f"engine parity failed: {result}")
