"""The GPU variant of a built repository: components on Triton's native backends.

Takes a repository written by `build_repository` (every component a Python-backend ONNX
Runtime runner) and writes a copy in which each component runs on Triton's native
`onnxruntime_onnx` or `tensorrt_plan` platform with a KIND_GPU instance group:

    build/model_repository_gpu/
      text_encoder/  config.pbtxt  1/model.onnx | 1/model.plan   (native platform)
      unet/          ...
      vae_encoder/   ...
      vae_decoder/   ...
      inpaint/       config.pbtxt  1/model.py  1/assets/         (unchanged)

The component configs come from the same generator as the CPU ones
(`triton_configs.component_config` over the `ComponentSpec`s), so tensor names and dims
cannot drift; only the platform, the model file name and the instance group change. The
pipeline models are copied with the same component names; in the `tensorrt_plan` variant
their configs gain parameters taken from the plans: `max_<role>_batch` (each engine's
largest batch) and `size_buckets` (the sizes every spatial engine of that pipeline has a
profile for; the pipeline generates each request at the smallest bucket containing it).

The pipeline's BLS calls (`sdserve_pipeline.triton_bls.BlsRunner`) pass numpy arrays, so
tensors go through host memory between component calls even when the components run on
the GPU.

The written configs are checked on the CPU by `tests/test_gpu_path.py` (with stand-in plan
files); serving a variant needs a GPU, and its `gpu` tests skip without one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from sdserve_export.built_repository import (
    CONFIG_FILE,
    ComponentModel,
    PipelineModel,
    Repository,
    RepositoryError,
    read_repository,
)
from sdserve_export.engine_profiles import is_spatial
from sdserve_export.triton_configs import component_config, parse_pbtxt, to_pbtxt
from sdserve_pipeline.assets import VERSION
from sdserve_pipeline.onnx_runtime import ONNX_FILE
from sdserve_pipeline.weight_map import WEIGHT_MAP_FILE
from sdserve_protocol.settings import PipelineSettings
from sdserve_protocol.sizes import SizeBucket, format_buckets

ONNXRUNTIME = "onnxruntime_onnx"
TENSORRT = "tensorrt_plan"
PLATFORMS = (ONNXRUNTIME, TENSORRT)
MODEL_FILES = {ONNXRUNTIME: ONNX_FILE, TENSORRT: "model.plan"}  # Triton's default file names


def gpu_component_config(
    component: ComponentModel,
    platform: str,
    instances: int = 1,
    gpus: Sequence[int] = (),
    profile_count: int = 1,
) -> mc.ModelConfig:
    """A component's config on a native GPU platform, generated from its spec.

    Args:
        component: the component model (spec, fixed dims, name).
        platform: `onnxruntime_onnx` or `tensorrt_plan`.
        instances: instances per GPU.
        gpus: GPU indices; empty means every visible GPU.
        profile_count: optimisation profiles in the plan; with several, the instance group
            lists them all, so Triton picks one by input shape (by default it uses only
            profile 0).
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} not in {PLATFORMS}")
    config = component_config(component.spec, component.sizes, model_name=component.name)
    for name in ("backend", "parameters", "instance_group"):
        config.ClearField(name)
    config.platform = platform
    config.default_model_filename = MODEL_FILES[platform]
    group = config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances)
    group.gpus.extend(gpus)
    if platform == TENSORRT and profile_count > 1:
        group.profile.extend(str(i) for i in range(profile_count))
    return config


# ------------------------------------------------------------------------ writing a variant


@dataclass(frozen=True)
class EnginePlan:
    """A TensorRT plan for one component model.

    Args:
        path: the plan file.
        profiles: its profile names, in profile-index order (`WIDTHxHEIGHT` size buckets,
            or `static`).
        batch: its (min, opt, max) batch; None: the spec's `trt_batch`.
    """

    path: Path
    profiles: tuple[str, ...]
    batch: tuple[int, int, int] | None = None


def write_gpu_repository(
    repository: Path,
    out: Path,
    platform: str,
    plans: Mapping[str, EnginePlan] | None = None,
    instances: int = 1,
    gpus: Sequence[int] = (),
    link: bool = True,
    log: Callable[[str], None] = print,
) -> Repository:
    """Write the GPU variant of a built repository.

    Components get a native-platform config and their model file (`model.onnx` with any
    external data beside it, or `model.plan`), symlinked (relative links) or copied;
    pipeline models and any other models are copied unchanged. The variant is assembled in
    `<out>.partial` and then moved into place.

    Args:
        repository: a repository written by `build_repository`.
        out: the variant's folder (replaced).
        platform: `onnxruntime_onnx` or `tensorrt_plan`.
        plans: component model name → its plan; required for `tensorrt_plan`.
        instances: instances per GPU of each component.
        gpus: GPU indices for the components; empty means all.
        link: symlink model files instead of copying them.
        log: progress sink.

    Raises:
        RepositoryError: not a built repository, or a plan is missing.
    """
    source = read_repository(repository)
    plans = plans or {}
    if platform == TENSORRT:
        missing = [c.name for c in source.components if c.name not in plans]
        if missing:
            raise RepositoryError(f"no TensorRT plan given for {missing}")
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for component in source.components:
        plan = plans.get(component.name) if platform == TENSORRT else None
        profile_count = len(plan.profiles) if plan else 1
        config = gpu_component_config(component, platform, instances, gpus, profile_count)
        _write_component(staging / component.name, config, _model_files(component, plan), link)
        log(f"[gpu] {component.name}: {platform} ({MODEL_FILES[platform]})")
    for name in (*(p.name for p in source.pipelines), *source.others):
        shutil.copytree(source.root / name, staging / name, symlinks=True)
    for pipeline in source.pipelines:
        # Admission by memory is calibrated on CPU resident memory; on a GPU the activations
        # live in GPU memory, which the budget does not see: off.
        settings = replace(pipeline.settings, memory=replace(pipeline.settings.memory, budget_mb=0))
        if platform == TENSORRT:  # requests must fit the engines' profiles
            settings = tensorrt_pipeline_settings(settings, pipeline, plans)
            log(f"[gpu] {pipeline.name}: size_buckets {format_buckets(settings.size_buckets)}")
        _set_parameters(staging / pipeline.name / CONFIG_FILE, settings.to_parameters())
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log(f"[gpu] repository written to {out}")
    return source


def tensorrt_pipeline_settings(
    settings: PipelineSettings, pipeline: PipelineModel, plans: Mapping[str, EnginePlan]
) -> PipelineSettings:
    """`settings` with what keeps the pipeline's calls within its engines' profiles.

    `max_batch` (every component, parameters `max_unet_batch`, `max_vae_decoder_batch`, ...):
    calls batched across requests are split to that engine's largest batch.
    `size_buckets`: the sizes every spatial engine of the pipeline has a profile for (read
    from the plans, so the pipeline snaps requests to exactly what the engines accept).
    """
    max_batch = {
        role: (plans[model].batch or pipeline.spec(role).trt_batch)[2]
        for role, model in pipeline.components.items()
    }
    return replace(settings, max_batch=max_batch, size_buckets=served_buckets(pipeline, plans))


def served_buckets(
    pipeline: PipelineModel, plans: Mapping[str, EnginePlan]
) -> tuple[SizeBucket, ...]:
    """Size buckets that every spatial engine of the pipeline has a profile for.

    Raises:
        RepositoryError: the engines share no bucket.
    """
    shared: set[SizeBucket] | None = None
    for role, model in pipeline.components.items():
        if not is_spatial(pipeline.spec(role)):
            continue
        buckets = {SizeBucket.parse(name) for name in plans[model].profiles}
        shared = buckets if shared is None else shared & buckets
    if not shared:
        raise RepositoryError(f"{pipeline.name}: its engines share no size bucket")
    return tuple(sorted(shared))


def _set_parameters(config_file: Path, parameters: Mapping[str, str]) -> None:
    config = parse_pbtxt(config_file.read_text())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    config_file.write_text(to_pbtxt(config))


def _write_component(
    model_dir: Path, config: mc.ModelConfig, files: Mapping[str, Path], link: bool
) -> None:
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    (model_dir / CONFIG_FILE).write_text(to_pbtxt(config))
    for name, source in files.items():
        _place(source, version_dir / name, link)


def _model_files(component: ComponentModel, plan: EnginePlan | None) -> dict[str, Path]:
    """File name in the variant → source: the plan, or the ONNX file and its external data."""
    if plan is not None:
        return {MODEL_FILES[TENSORRT]: plan.path}
    return {path.name: path for path in onnx_files(component.directory / VERSION)}


def onnx_files(version_dir: Path) -> list[Path]:
    """`model.onnx` and its external-data files (everything in the folder but Python code and
    the LoRA weight map: Triton's native backends cannot switch weights, so without the map the
    pipeline serves no adapters on them)."""
    files = [
        p
        for p in sorted(version_dir.iterdir())
        if p.is_file() and p.suffix != ".py" and p.name != WEIGHT_MAP_FILE
    ]
    if version_dir / ONNX_FILE not in files:
        raise RepositoryError(f"{version_dir} has no {ONNX_FILE}")
    return files


def _place(source: Path, target: Path, link: bool) -> None:
    if link:
        target.symlink_to(os.path.relpath(source.resolve(), target.parent.resolve()))
    else:
        shutil.copy2(source, target)
