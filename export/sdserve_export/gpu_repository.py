"""GPU variants of a built model repository: components on Triton's native backends.

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
their configs gain two parameters taken from the plans: `max_unet_batch` (the UNet
engine's largest batch) and `size_buckets` (the sizes every spatial engine of that
pipeline has a profile for; the pipeline generates each request at the smallest bucket
containing it, so any request size is served).

A repository may hold several pipelines, e.g. SD 1.5 `inpaint` and SDXL `inpaint_xl` (built
with `--name inpaint_xl --component-prefix xl_`): each pipeline's components get the specs
of its architecture (`pipeline.json`), the size buckets of its architecture
(`tensorrt_engines.default_buckets`, or `--buckets` / `--xl-buckets`) and, for SDXL, fp32
VAE engines.

Usage:
    python -m sdserve_export.gpu_repository --repository build/model_repository \\
        --platform onnxruntime_onnx|tensorrt_plan --out build/model_repository_gpu

With `tensorrt_plan`, engines are looked up in `--engines` by exact name (TensorRT version,
GPU, precision, batch range, size buckets, ONNX digest) and built when missing, which needs
the `tensorrt` package and a GPU (see `tensorrt_engines`).

The pipeline's BLS calls (`sdserve_pipeline.triton_bls.BlsRunner`) pass numpy arrays, so
tensors go through host memory between component calls even when the components run on
the GPU. Keeping them on the GPU (DLPack) is not implemented.

None of this has run on a GPU yet: `tests/test_gpu_path.py` checks the written configs on
the CPU (with stand-in plan files); its `gpu` tests skip without TensorRT and a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from sdserve_export.tensorrt_engines import (
    BatchRange,
    BuildOptions,
    EngineBuildError,
    EngineKey,
    Profile,
    SizeBucket,
    TensorRTUnavailable,
    batch_range,
    build_engine,
    check_engine_parity,
    default_buckets,
    default_fp32_components,
    derive_profiles,
    find_engine,
    gpu_compute_capability,
    is_spatial,
    normalize_trt_version,
    onnx_digest,
    parse_buckets,
    sizes_from_config,
    stale_engines,
    tensorrt_version,
    timing_cache_path,
)
from sdserve_export.triton_configs import ONNX_FILE, component_config, parse_pbtxt, to_pbtxt
from sdserve_pipeline.components import (
    COMPONENTS_BY_ARCHITECTURE,
    SD15_COMPONENTS,
    ComponentSpec,
    components_for,
)
from sdserve_pipeline.images import format_size_buckets

ONNXRUNTIME = "onnxruntime_onnx"
TENSORRT = "tensorrt_plan"
PLATFORMS = (ONNXRUNTIME, TENSORRT)
MODEL_FILES = {ONNXRUNTIME: ONNX_FILE, TENSORRT: "model.plan"}  # Triton's default file names
CONFIG_FILE = "config.pbtxt"
VERSION = "1"  # as written by `repository.build_repository`
ASSETS_DIR = "assets"  # `sdserve_pipeline.assets.ASSETS_DIR`
PIPELINE_JSON = "pipeline.json"  # `sdserve_pipeline.assets.PIPELINE_JSON`
# Component roles of every architecture (`text_encoder_2` is SDXL's); a pipeline model is
# recognised by the roles all architectures share.
ROLES = frozenset(s.name for specs in COMPONENTS_BY_ARCHITECTURE.values() for s in specs)
SHARED_ROLES = tuple(s.name for s in SD15_COMPONENTS)
# Parity of a new plan vs ONNX Runtime (fp32, CPU), relative to the largest reference value:
# fp16 kernels, and TF32 kernels in "fp32" plans on Ampere and later.
PARITY_RTOL = {"fp16": 5e-2, "fp32": 1e-2}
# Where the Triton image keeps TensorRT's libraries (the TensorRT backend links them).
TRITON_TRT_LIB_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/local/tensorrt/lib"))


class RepositoryError(RuntimeError):
    """The input repository is not one `build_repository` wrote, or a variant cannot be made."""


# --------------------------------------------------------------------- reading a repository


@dataclass(frozen=True)
class ComponentModel:
    """A component model of a built repository.

    Args:
        name: Triton model name (`unet`, or `base_unet` with a component prefix).
        spec: the component declaration (by its role in the pipeline config).
        sizes: values of the checkpoint-fixed dims, read from its config.
        directory: the model's folder in the input repository.
    """

    name: str
    spec: ComponentSpec
    sizes: Mapping[str, int]
    directory: Path

    @property
    def onnx_file(self) -> Path:
        return self.directory / VERSION / ONNX_FILE


@dataclass(frozen=True)
class PipelineModel:
    """A pipeline model of a built repository.

    Args:
        name: Triton model name (`inpaint`).
        components: role (`unet`, ...) → component model name, from its `<role>_model` parameters.
        parameters: all its config parameters.
        vae_scale_factor: pixels per latent, from its assets.
        vae_scaling_factor: the VAE's latent scaling factor, from its assets.
        default_size: the checkpoint's native image size, from its assets.
        max_batch_size: requests per `execute` call, from its config (the continuous batcher
            denoises up to its `max_active_requests` together, whatever this is).
        architecture: `sd15` or `sdxl`, from its assets; decides the component specs.
    """

    name: str
    components: Mapping[str, str]
    parameters: Mapping[str, str]
    vae_scale_factor: int
    vae_scaling_factor: float
    default_size: int
    max_batch_size: int = 0
    architecture: str = "sd15"

    def spec(self, role: str) -> ComponentSpec:
        """The declaration of one of its components, for its architecture."""
        return next(s for s in components_for(self.architecture) if s.name == role)


@dataclass(frozen=True)
class Repository:
    """What a built repository holds: pipelines, their components, and any other models."""

    root: Path
    pipelines: tuple[PipelineModel, ...]
    components: tuple[ComponentModel, ...]
    others: tuple[str, ...]

    def pipeline_of(self, component: str) -> PipelineModel:
        return next(p for p in self.pipelines if component in p.components.values())


def read_configs(root: Path) -> dict[str, mc.ModelConfig]:
    """Model name (folder) → parsed config.pbtxt, for every model of a repository."""
    configs = {}
    for path in sorted(Path(root).glob(f"*/{CONFIG_FILE}")):
        configs[path.parent.name] = parse_pbtxt(path.read_text())
    if not configs:
        raise RepositoryError(f"{root} holds no model (no */{CONFIG_FILE})")
    return configs


def read_repository(root: Path) -> Repository:
    """Find the pipelines (by their `<role>_model` parameters) and their components."""
    root = Path(root)
    configs = read_configs(root)
    pipelines = tuple(
        _pipeline_model(root, name, config)
        for name, config in configs.items()
        if _is_pipeline(config)
    )
    if not pipelines:
        raise RepositoryError(f"{root} has no pipeline model (no config with *_model parameters)")
    components: dict[str, ComponentModel] = {}
    for pipeline in pipelines:
        for role, model in pipeline.components.items():
            if model not in configs:
                raise RepositoryError(f"{pipeline.name} calls {model!r}, which {root} lacks")
            spec = pipeline.spec(role)
            components.setdefault(model, _component_model(root, model, spec, configs[model]))
    used = {p.name for p in pipelines} | set(components)
    others = tuple(name for name in configs if name not in used)
    return Repository(root, pipelines, tuple(components.values()), others)


def _is_pipeline(config: mc.ModelConfig) -> bool:
    return all(f"{role}_model" in config.parameters for role in SHARED_ROLES)


def _pipeline_model(root: Path, name: str, config: mc.ModelConfig) -> PipelineModel:
    params = {key: value.string_value for key, value in config.parameters.items()}
    facts_file = root / name / VERSION / ASSETS_DIR / PIPELINE_JSON
    try:
        facts = json.loads(facts_file.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"pipeline {name!r} has no {facts_file}") from None
    architecture = str(facts.get("architecture", "sd15"))
    try:
        roles = [spec.name for spec in components_for(architecture)]
    except ValueError as err:
        raise RepositoryError(f"pipeline {name!r}: {err}") from None
    missing = [f"{role}_model" for role in roles if f"{role}_model" not in params]
    if missing:
        raise RepositoryError(f"{architecture} pipeline {name!r} lacks parameters {missing}")
    return PipelineModel(
        name=name,
        components={role: params[f"{role}_model"] for role in roles},
        parameters=params,
        vae_scale_factor=int(facts["vae_scale_factor"]),
        vae_scaling_factor=float(facts["vae_scaling_factor"]),
        default_size=int(facts["default_size"]),
        max_batch_size=config.max_batch_size,
        architecture=architecture,
    )


def _component_model(
    root: Path, name: str, spec: ComponentSpec, config: mc.ModelConfig
) -> ComponentModel:
    dims = {t.name: list(t.dims) for t in (*config.input, *config.output)}
    extra = set(dims) - {t.name for t in (*spec.inputs, *spec.outputs)}
    if extra:
        raise RepositoryError(f"{name}: tensors {sorted(extra)} are not in the {spec.name} spec")
    try:
        sizes = sizes_from_config(spec, dims)
    except ValueError as err:
        raise RepositoryError(str(err)) from None
    return ComponentModel(name, spec, sizes, root / name)


# ------------------------------------------------------------------------ config variants


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


# ------------------------------------------------------------------------- writing a variant


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
        parameters = {"memory_budget_mb": "0"}
        if platform == TENSORRT:  # requests must fit the engines' profiles
            parameters |= tensorrt_pipeline_parameters(pipeline, plans)
            log(f"[gpu] {pipeline.name}: size_buckets {parameters['size_buckets']}")
        _set_parameters(staging / pipeline.name / CONFIG_FILE, parameters)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log(f"[gpu] repository written to {out}")
    return source


def tensorrt_pipeline_parameters(
    pipeline: PipelineModel, plans: Mapping[str, EnginePlan]
) -> dict[str, str]:
    """Pipeline parameters that keep its calls within its engines' profiles.

    `max_<role>_batch` (every component: `max_unet_batch`, `max_vae_decoder_batch`, ...):
    calls batched across requests are split to that engine's largest batch.
    `size_buckets`: the sizes every spatial engine of the pipeline has a profile for (read
    from the plans, so the pipeline snaps requests to exactly what the engines accept).
    """
    max_batches = {}
    for role, model in pipeline.components.items():
        plan = plans[model]
        max_batches[f"max_{role}_batch"] = str((plan.batch or pipeline.spec(role).trt_batch)[2])
    buckets = served_buckets(pipeline, plans)
    return {
        **max_batches,
        "size_buckets": format_size_buckets((b.height, b.width) for b in buckets),
    }


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
    """`model.onnx` and its external-data files (everything in the folder but Python code)."""
    files = [p for p in sorted(version_dir.iterdir()) if p.is_file() and p.suffix != ".py"]
    if version_dir / ONNX_FILE not in files:
        raise RepositoryError(f"{version_dir} has no {ONNX_FILE}")
    return files


def _place(source: Path, target: Path, link: bool) -> None:
    if link:
        target.symlink_to(os.path.relpath(source.resolve(), target.parent.resolve()))
    else:
        shutil.copy2(source, target)


# --------------------------------------------------------------------- engines for a variant


@dataclass(frozen=True)
class EngineTarget:
    """What one component's engine must be: profiles, batch range, precision.

    Args:
        component: the component model.
        profiles: one per size bucket (one `static` profile without spatial dims).
        batch: batch range.
        precision: `fp16` or `fp32`.
    """

    component: ComponentModel
    profiles: tuple[Profile, ...]
    batch: BatchRange
    precision: str

    def key(self, trt_version: str, compute_capability: tuple[int, int], digest: str) -> EngineKey:
        return EngineKey(
            component=self.component.name,
            trt_version=trt_version,
            compute_capability=compute_capability,
            precision=self.precision,
            batch=self.batch.as_tuple(),
            profiles=tuple(p.name for p in self.profiles),
            onnx_digest=digest,
        )


def serving_buckets(
    pipeline: PipelineModel,
    requested: Iterable[SizeBucket] | None = None,
    xl_requested: Iterable[SizeBucket] | None = None,
) -> tuple[SizeBucket, ...]:
    """The buckets a pipeline's engines serve, plus the checkpoint's own square size (e.g.
    128² for the demo; the default outpainting band).

    Args:
        pipeline: the pipeline model.
        requested: buckets for every pipeline; None: its architecture's `default_buckets`.
        xl_requested: buckets for SDXL pipelines, overriding `requested` for them.
    """
    chosen = xl_requested if pipeline.architecture == "sdxl" else None
    if chosen is None:
        chosen = requested
    if chosen is None:
        chosen = default_buckets(pipeline.architecture)
    own = SizeBucket(pipeline.default_size, pipeline.default_size)
    return tuple(sorted({*chosen, own}))


def engine_targets(
    repository: Repository,
    buckets: Iterable[SizeBucket] | None = None,
    fp32_components: Iterable[str] | None = None,
    batch_overrides: Mapping[str, Sequence[int]] | None = None,
    xl_buckets: Iterable[SizeBucket] | None = None,
) -> list[EngineTarget]:
    """The engine each component needs (pure: no TensorRT, no GPU).

    Args:
        repository: the built repository.
        buckets: image sizes to serve, for every pipeline; None: each pipeline's
            architecture's `default_buckets`. The checkpoint's own square size is always
            added.
        fp32_components: spec names (`vae_decoder`, ...) built without fp16; None picks the
            default per pipeline (the SDXL VAE stays fp32, see `default_fp32_components`).
        batch_overrides: spec name → (min, opt, max) replacing `spec.trt_batch`.
        xl_buckets: image sizes for SDXL pipelines, overriding `buckets` for them.
    """
    requested = None if buckets is None else tuple(buckets)
    xl_requested = None if xl_buckets is None else tuple(xl_buckets)
    overrides = batch_overrides or {}
    targets = []
    for component in repository.components:
        pipeline = repository.pipeline_of(component.name)
        spec = component.spec
        fp32 = (
            set(fp32_components)
            if fp32_components is not None
            else default_fp32_components(pipeline.vae_scaling_factor, pipeline.architecture)
        )
        batch = batch_range(spec, overrides.get(spec.name))
        profiles = derive_profiles(
            spec,
            component.sizes,
            serving_buckets(pipeline, requested, xl_requested),
            pipeline.vae_scale_factor,
            batch,
        )
        precision = "fp32" if spec.name in fp32 else "fp16"
        targets.append(EngineTarget(component, profiles, batch, precision))
    return targets


def batch_coverage_problems(repository: Repository, targets: Sequence[EngineTarget]) -> list[str]:
    """Requests the pipeline accepts but the engines' batch ranges would reject.

    Per request, the loop calls the text encoder with 1 or 2 rows, the VAE encoder with 1
    and the VAE decoder with N, N up to `limit_max_images`; the UNet with N (guidance <= 1)
    or 2N rows per step. Calls of several requests are batched together but split at the
    pipeline's `max_<role>_batch` (the TensorRT variant sets each to its engine's max), so
    an engine must take one request's rows alone.
    """
    by_model = {t.component.name: t for t in targets}
    problems = []
    for pipeline in repository.pipelines:
        max_images = int(pipeline.parameters.get("limit_max_images", "1"))
        needs = {
            "text_encoder": (1, 2),
            "text_encoder_2": (1, 2),
            "vae_encoder": (1, 1),
            "unet": (1, 2 * max_images),
            "vae_decoder": (1, max_images),
        }
        for role, (low, high) in needs.items():
            target = by_model.get(pipeline.components.get(role, ""))
            if target is None:
                continue
            batch = target.batch
            if low < batch.min or high > batch.max:
                problems.append(
                    f"{pipeline.name}: {target.component.name} is called with batch {low}..{high} "
                    f"(limit_max_images={max_images}) but its "
                    "engine accepts "
                    f"{batch.min}..{batch.max}"
                )
    return problems


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


# ---------------------------------------------------------- TensorRT runtime version check


def triton_tensorrt_version(lib_dirs: Iterable[Path] = TRITON_TRT_LIB_DIRS) -> str | None:
    """`major.minor.patch` of the libnvinfer that Triton's TensorRT backend loads, if found."""
    pattern = re.compile(r"libnvinfer\.so\.(\d+\.\d+\.\d+)")
    for directory in lib_dirs:
        for path in (
            sorted(Path(directory).glob("libnvinfer.so.*")) if Path(directory).is_dir() else ()
        ):
            match = pattern.fullmatch(path.name)
            if match:
                return match.group(1)
    return None


def check_tensorrt_match(builder_version: str, server_version: str | None) -> str | None:
    """An error message when plans built by `builder_version` would not load in the server."""
    if server_version is None:
        return None
    if normalize_trt_version(builder_version) != normalize_trt_version(server_version):
        return (
            f"the tensorrt Python package is {builder_version} but Triton's TensorRT backend "
            f"uses {server_version}: plans would not load (install tensorrt=={server_version})"
        )
    return None


# ------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sdserve_export.gpu_repository", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repository", type=Path, required=True, help="built CPU repository")
    parser.add_argument("--platform", choices=PLATFORMS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="GPU repository to write")
    parser.add_argument(
        "--engines", type=Path, default=None,
        help="TensorRT plan folder (default: <repository>/../engines)",
    )  # fmt: skip
    parser.add_argument(
        "--buckets", type=parse_buckets, default=None,
        help="comma-separated WIDTHxHEIGHT image sizes the engines of every pipeline serve "
        "(default per architecture: SD 1.5 512x512,768x768,768x512,512x768; SDXL 1024x1024 "
        "and its aspect ratios; the checkpoint's own square size is always added). The "
        "pipeline generates each request at the smallest size containing it",
    )  # fmt: skip
    parser.add_argument(
        "--xl-buckets", type=parse_buckets, default=None,
        help="WIDTHxHEIGHT sizes for SDXL pipelines, overriding --buckets for them",
    )  # fmt: skip
    parser.add_argument(
        "--fp32-components", default=None,
        help="comma-separated components built without fp16, e.g. vae_encoder,vae_decoder "
        "(default: the SDXL VAE only)",
    )  # fmt: skip
    parser.add_argument("--no-build", action="store_true", help="fail when a plan is missing")
    parser.add_argument("--no-parity", action="store_true", help="skip parity of new plans")
    parser.add_argument("--instances", type=int, default=1, help="instances per GPU")
    parser.add_argument("--copy", action="store_true", help="copy model files, not symlinks")
    parser.add_argument(
        "--triton-trt-version", default="auto",
        help="TensorRT version of Triton's backend: auto (read libnvinfer), none, or X.Y.Z",
    )  # fmt: skip
    return parser.parse_args(argv)


def _engine_settings(args: argparse.Namespace) -> EngineSettings:
    fp32 = None
    if args.fp32_components is not None:
        fp32 = frozenset(n.strip() for n in args.fp32_components.split(",") if n.strip())
        unknown = fp32 - ROLES
        if unknown:
            raise RepositoryError(f"--fp32-components: {sorted(unknown)} not in {sorted(ROLES)}")
    return EngineSettings(
        engine_dir=args.engines or args.repository.resolve().parent / "engines",
        buckets=args.buckets,
        xl_buckets=args.xl_buckets,
        fp32_components=fp32,
        build_missing=not args.no_build,
        parity=not args.no_parity,
    )


def _server_trt_version(option: str) -> str | None:
    if option == "none":
        return None
    if option == "auto":
        return triton_tensorrt_version()
    return normalize_trt_version(option)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plans = None
        if args.platform == TENSORRT:
            mismatch = check_tensorrt_match(
                tensorrt_version(), _server_trt_version(args.triton_trt_version)
            )
            if mismatch:
                raise RepositoryError(mismatch)
            repository = read_repository(args.repository)
            plans = ensure_engines(repository, _engine_settings(args))
        write_gpu_repository(
            args.repository, args.out, args.platform, plans, args.instances, link=not args.copy
        )
    except (RepositoryError, TensorRTUnavailable, EngineBuildError) as err:
        print(f"gpu_repository: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
