"""TensorRT engines for the exported components: profiles, plan names, building, parity.

Pure parts, importable and tested without TensorRT or a GPU:

- `SizeBucket`s: the static image sizes an engine serves, per architecture
  (`default_buckets`: SD 1.5 512², 768², 768x512, 512x768; SDXL 1024² and its common
  aspect ratios), converted to latent sizes with the VAE scale factor. The pipeline snaps
  each request to the smallest bucket containing it (its `size_buckets` parameter, written
  by `gpu_repository` from the same buckets), so any request size is served;
- `derive_profiles`: one optimisation profile per bucket, derived from a `ComponentSpec`
  (batch ranges from `spec.trt_batch`, in units of 2 for the CFG-batched UNet; spatial dims
  min = opt = max per bucket; fixed dims such as the text sequence length from the
  checkpoint);
- `EngineKey`: the plan file name, carrying component, TensorRT version, GPU compute
  capability, precision, batch range, buckets and a digest of the ONNX source, e.g.
  `unet.trt10.5.0.sm90.fp16.b2-8.512x512_768x768.onnx-1a2b3c4d5e6f.plan`, plus its parser;
  `find_engine` accepts exact matches only, so a stale engine is never loaded.

GPU parts (need the `tensorrt` package and a CUDA device; without them they raise
`TensorRTUnavailable`): `build_engine` (TensorRT Python API, fp16 with fp32 kept where
needed, a timing cache, one profile per bucket) and `check_engine_parity` (engine vs ONNX
Runtime on CPU). On the CPU only `build_engine`'s calls are tested, against a stand-in for
the `tensorrt` module; neither has run with real TensorRT on a GPU yet (the `gpu` tests of
`tests/test_gpu_path.py` do that, and skip without one).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdserve_pipeline.components import ComponentSpec, TensorSpec

try:  # TensorRT exists on GPU machines only; everything above `build_engine` works without it
    import tensorrt as _tensorrt
except ImportError:  # pragma: no cover - depends on the machine
    _tensorrt = None
trt: Any = _tensorrt

# Symbolic dims set by the size bucket; every other non-batch dim is fixed by the checkpoint.
PIXEL_DIMS = {"height": "height", "width": "width"}
LATENT_DIMS = {"latent_height": "height", "latent_width": "width"}
BATCH_DIM = "batch"

# Batch unit per component: the UNet always runs [uncond, cond] pairs under CFG.
BATCH_UNITS: Mapping[str, int] = {"unet": 2}

PLAN_SUFFIX = ".plan"
STATIC_PROFILE = "static"  # profile tag of a component without spatial dims (text encoder)
PRECISIONS = ("fp16", "fp32")
CLIP_VOCAB_SIZE = 49408
SDXL_VAE_SCALING_FACTOR = 0.13025  # the SDXL VAE overflows in fp16: keep it fp32
DEFAULT_FP32_LAYER_TYPES = ("NORMALIZATION",)  # LayerNorm after attention overflows in fp16
DIGEST_CHARS = 12


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine."""


class TensorRTUnavailable(RuntimeError):
    """The `tensorrt` package (or a CUDA device) is missing on this machine."""


# --------------------------------------------------------------------------- size buckets


@dataclass(frozen=True, order=True)
class SizeBucket:
    """A static image size that engines are built for.

    Args:
        width: image width in pixels.
        height: image height in pixels.
    """

    width: int
    height: int

    @property
    def name(self) -> str:
        """`WIDTHxHEIGHT`, as in plan names and on the command line."""
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, text: str) -> SizeBucket:
        """`"1152x896"` → SizeBucket(width=1152, height=896)."""
        match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
        if not match:
            raise ValueError(f"size bucket {text!r} is not WIDTHxHEIGHT, e.g. '512x512'")
        return cls(int(match.group(1)), int(match.group(2)))

    def latent(self, vae_scale_factor: int) -> tuple[int, int]:
        """(latent_height, latent_width) for a VAE that downsamples by `vae_scale_factor`."""
        if self.width % vae_scale_factor or self.height % vae_scale_factor:
            raise ValueError(
                f"size bucket {self.name!r} is not a multiple of the VAE scale factor "
                f"{vae_scale_factor}"
            )
        return self.height // vae_scale_factor, self.width // vae_scale_factor


SD_BUCKETS = (
    SizeBucket(512, 512),
    SizeBucket(768, 768),
    SizeBucket(768, 512),
    SizeBucket(512, 768),
)
SDXL_BUCKETS = (
    SizeBucket(1024, 1024),
    SizeBucket(1152, 896),
    SizeBucket(896, 1152),
    SizeBucket(1216, 832),
    SizeBucket(832, 1216),
    SizeBucket(1344, 768),
    SizeBucket(768, 1344),
    SizeBucket(1536, 640),
    SizeBucket(640, 1536),
)
BUCKETS_BY_ARCHITECTURE: Mapping[str, tuple[SizeBucket, ...]] = {
    "sd15": SD_BUCKETS,
    "sdxl": SDXL_BUCKETS,
}
DEFAULT_BUCKETS = SD_BUCKETS + SDXL_BUCKETS  # every architecture's, e.g. for `derive_profiles`


def default_buckets(architecture: str) -> tuple[SizeBucket, ...]:
    """The sizes engines of an architecture (`CheckpointFacts.architecture`) serve by default."""
    if architecture not in BUCKETS_BY_ARCHITECTURE:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(BUCKETS_BY_ARCHITECTURE)}"
        )
    return BUCKETS_BY_ARCHITECTURE[architecture]


def parse_buckets(text: str) -> tuple[SizeBucket, ...]:
    """Comma-separated `WIDTHxHEIGHT` list → sorted unique buckets."""
    buckets = sorted({SizeBucket.parse(part) for part in text.split(",") if part.strip()})
    if not buckets:
        raise ValueError(f"no size bucket in {text!r}")
    return tuple(buckets)


# ------------------------------------------------------------------------------ profiles


@dataclass(frozen=True)
class BatchRange:
    """TensorRT (min, opt, max) of the batch dim, each a multiple of `unit`.

    Args:
        min: smallest batch the engine accepts.
        opt: batch the kernels are tuned for.
        max: largest batch the engine accepts.
        unit: granularity; 2 for the UNet, which runs [uncond, cond] pairs under CFG.
    """

    min: int
    opt: int
    max: int
    unit: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch range needs 1 <= min <= opt <= max, got {self.as_tuple()}")
        if any(value % self.unit for value in self.as_tuple()):
            raise ValueError(
                f"batch range {self.as_tuple()} is not in units of {self.unit} "
                "(the UNet runs [uncond, cond] pairs under classifier-free guidance)"
            )

    def as_tuple(self) -> tuple[int, int, int]:
        return self.min, self.opt, self.max

    @property
    def tag(self) -> str:
        """`b2-8` (opt = min) or `b2-4-8`, as in plan names."""
        if self.opt == self.min:
            return f"b{self.min}-{self.max}"
        return f"b{self.min}-{self.opt}-{self.max}"

    @classmethod
    def parse_tag(cls, tag: str) -> tuple[int, int, int]:
        """`b2-8` → (2, 2, 8); `b2-4-8` → (2, 4, 8)."""
        match = re.fullmatch(r"b(\d+)-(\d+)(?:-(\d+))?", tag)
        if not match:
            raise ValueError(f"batch tag {tag!r} is not bMIN-MAX or bMIN-OPT-MAX")
        low, second, third = match.groups()
        if third is None:
            return int(low), int(low), int(second)
        return int(low), int(second), int(third)

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max


def batch_range(spec: ComponentSpec, override: Sequence[int] | None = None) -> BatchRange:
    """The component's batch range: `spec.trt_batch` (or `override`) in its batch unit."""
    low, opt, high = override or spec.trt_batch
    return BatchRange(low, opt, high, unit=BATCH_UNITS.get(spec.name, 1))


@dataclass(frozen=True)
class ShapeRange:
    """TensorRT (min, opt, max) shapes of one input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: input name → (min, opt, max) shapes.

    Args:
        name: the bucket's `WIDTHxHEIGHT`, or `static` for a component without spatial dims.
        shapes: one `ShapeRange` per input, in the spec's input order.
    """

    name: str
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)

    def opt_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape.opt for name, shape in self.shapes.items()}


def is_spatial(spec: ComponentSpec) -> bool:
    """Whether any tensor of the component has a pixel or latent spatial dim."""
    spatial = PIXEL_DIMS.keys() | LATENT_DIMS.keys()
    return any(d in spatial for t in (*spec.inputs, *spec.outputs) for d in t.dims)


def bucket_dims(bucket: SizeBucket, vae_scale_factor: int) -> dict[str, int]:
    """Values of the spatial symbolic dims for one bucket."""
    latent_height, latent_width = bucket.latent(vae_scale_factor)
    return {
        "height": bucket.height,
        "width": bucket.width,
        "latent_height": latent_height,
        "latent_width": latent_width,
    }


def input_range(
    tensor: TensorSpec, sizes: Mapping[str, int], batch: BatchRange, spatial: Mapping[str, int]
) -> ShapeRange:
    """(min, opt, max) of one input: batch from `batch`, every other dim fixed."""
    lows, opts, highs = [], [], []
    for dim in tensor.dims:
        if dim == BATCH_DIM:
            low, opt, high = batch.as_tuple()
        else:
            low = opt = high = _fixed_dim(dim, tensor.name, sizes, spatial)
        lows.append(low)
        opts.append(opt)
        highs.append(high)
    return ShapeRange(tuple(lows), tuple(opts), tuple(highs))


def derive_profiles(
    spec: ComponentSpec,
    sizes: Mapping[str, int],
    buckets: Iterable[SizeBucket] = DEFAULT_BUCKETS,
    vae_scale_factor: int = 8,
    batch: BatchRange | None = None,
) -> tuple[Profile, ...]:
    """Optimisation profiles of a component: one per size bucket (one in all without spatial dims).

    Args:
        spec: the component declaration (tensor names and symbolic dims).
        sizes: values of the checkpoint-fixed dims (`sequence_length`, `hidden_size`, ...).
        buckets: image sizes to serve; latent sizes follow from `vae_scale_factor`.
        vae_scale_factor: pixels per latent (8 for SD 1.5 and SDXL).
        batch: batch range; defaults to `batch_range(spec)`.
    """
    batch = batch or batch_range(spec)
    if not is_spatial(spec):
        shapes = {t.name: input_range(t, sizes, batch, {}) for t in spec.inputs}
        return (Profile(STATIC_PROFILE, shapes),)
    profiles = []
    for bucket in sorted(set(buckets)):
        spatial = bucket_dims(bucket, vae_scale_factor)
        shapes = {t.name: input_range(t, sizes, batch, spatial) for t in spec.inputs}
        profiles.append(Profile(bucket.name, shapes))
    if not profiles:
        raise ValueError(f"{spec.name}: no size bucket given")
    return tuple(profiles)


def sizes_from_config(
    spec: ComponentSpec, dims_by_tensor: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """Values of the fixed symbolic dims, read back from a config's (or ONNX file's) dims.

    Args:
        spec: the component declaration.
        dims_by_tensor: tensor name → concrete dims (-1 where dynamic), e.g. from config.pbtxt.

    Raises:
        ValueError: a tensor is missing, has another rank, or a symbolic dim has two values.
    """
    sizes: dict[str, int] = {}
    for tensor in (*spec.inputs, *spec.outputs):
        if tensor.name not in dims_by_tensor:
            raise ValueError(f"{spec.name}: tensor {tensor.name!r} not in {sorted(dims_by_tensor)}")
        dims = list(dims_by_tensor[tensor.name])
        if len(dims) != len(tensor.dims):
            raise ValueError(f"{spec.name}.{tensor.name}: rank {len(dims)}, spec {tensor.dims}")
        for symbol, value in zip(tensor.dims, dims, strict=True):
            if value < 0:
                continue
            if sizes.setdefault(symbol, value) != value:
                raise ValueError(f"{spec.name}: dim {symbol!r} is both {sizes[symbol]} and {value}")
    return sizes


def _fixed_dim(dim: str, tensor: str, sizes: Mapping[str, int], spatial: Mapping[str, int]) -> int:
    if dim in spatial:
        return spatial[dim]
    if dim in sizes:
        return sizes[dim]
    raise ValueError(f"dim {dim!r} of input {tensor!r} has no value (sizes: {dict(sizes)})")


# --------------------------------------------------------------------------- plan naming

_PLAN_NAME = re.compile(
    r"(?P<component>[A-Za-z0-9_\-]+)"
    r"\.trt(?P<trt>\d+\.\d+\.\d+)"
    r"\.sm(?P<sm>\d{2,3})"
    r"\.(?P<precision>fp16|fp32)"
    r"\.(?P<batch>b\d+-\d+(?:-\d+)?)"
    r"\.(?P<profiles>static|\d+x\d+(?:_\d+x\d+)*)"
    r"\.onnx-(?P<digest>[0-9a-f]{12})"
    r"\.plan"
)


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; its file name is the key, so a mismatch is a miss.

    Args:
        component: Triton model name of the component (`unet`, `base_unet`, ...).
        trt_version: TensorRT `major.minor.patch` the plan was built with.
        compute_capability: (major, minor) of the GPU it was built for, e.g. (9, 0).
        precision: `fp16` or `fp32`.
        batch: (min, opt, max) batch.
        profiles: profile names in profile-index order (bucket names, or `static`).
        onnx_digest: first 12 hex digits of the ONNX source's sha256 (`onnx_digest`).
    """

    component: str
    trt_version: str
    compute_capability: tuple[int, int]
    precision: str
    batch: tuple[int, int, int]
    profiles: tuple[str, ...]
    onnx_digest: str

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not in {PRECISIONS}")
        if not re.fullmatch(r"\d+\.\d+\.\d+", self.trt_version):
            raise ValueError(f"TensorRT version {self.trt_version!r} is not major.minor.patch")

    @property
    def filename(self) -> str:
        """E.g. `unet.trt10.5.0.sm90.fp16.b2-8.512x512_768x768.onnx-1a2b3c4d5e6f.plan`."""
        major, minor = self.compute_capability
        batch = BatchRange(*self.batch).tag
        return (
            f"{self.component}.trt{self.trt_version}.sm{major}{minor}.{self.precision}."
            f"{batch}.{'_'.join(self.profiles)}.onnx-{self.onnx_digest}{PLAN_SUFFIX}"
        )

    @classmethod
    def parse(cls, filename: str) -> EngineKey:
        """Inverse of `filename`; raises ValueError on any other name."""
        match = _PLAN_NAME.fullmatch(filename)
        if not match:
            raise ValueError(f"{filename!r} is not an sdserve plan name")
        sm = match["sm"]
        return cls(
            component=match["component"],
            trt_version=match["trt"],
            compute_capability=(int(sm[:-1]), int(sm[-1])),
            precision=match["precision"],
            batch=BatchRange.parse_tag(match["batch"]),
            profiles=tuple(match["profiles"].split("_")),
            onnx_digest=match["digest"],
        )


def find_engine(directory: Path, key: EngineKey) -> Path | None:
    """The plan in `directory` whose name parses to exactly `key`, or None.

    Plans for other TensorRT versions, GPUs, precisions, batch ranges, buckets or ONNX
    sources are never returned (see `stale_engines`).
    """
    for path in sorted(Path(directory).glob(f"*{PLAN_SUFFIX}")):
        if _parse_or_none(path.name) == key and path.stat().st_size > 0:
            return path
    return None


def stale_engines(directory: Path, key: EngineKey) -> list[Path]:
    """Plans of the same component that do not match `key` (for logging or cleanup)."""
    stale = []
    for path in sorted(Path(directory).glob(f"*{PLAN_SUFFIX}")):
        parsed = _parse_or_none(path.name)
        if parsed is not None and parsed.component == key.component and parsed != key:
            stale.append(path)
    return stale


def _parse_or_none(filename: str) -> EngineKey | None:
    try:
        return EngineKey.parse(filename)
    except ValueError:
        return None


def normalize_trt_version(version: str) -> str:
    """`10.5.0.18` or `10.5.0.post1` → `10.5.0`."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return ".".join(match.groups())


def onnx_digest(onnx_file: Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 (first 12 hex digits) of an ONNX file and the external-data files beside it."""
    digest = hashlib.sha256()
    for path in _onnx_source_files(Path(onnx_file)):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            while chunk := stream.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()[:DIGEST_CHARS]


def _onnx_source_files(onnx_file: Path) -> list[Path]:
    """The ONNX file, then every external-data file it references (sorted)."""
    import onnx  # heavy import, only where digests are taken

    model = onnx.load(str(onnx_file), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [onnx_file, *(onnx_file.parent / name for name in sorted(locations))]


# ------------------------------------------------------------------------- precision rules


def default_fp32_components(
    vae_scaling_factor: float, architecture: str = "sd15"
) -> frozenset[str]:
    """Components (spec names) kept fp32 by default: the VAE of SDXL checkpoints (it
    overflows in fp16).

    Args:
        vae_scaling_factor: `vae.config.scaling_factor`; SDXL's VAE has 0.13025 (an SD 1.5
            pipeline carrying an SDXL VAE is caught by it too).
        architecture: `CheckpointFacts.architecture`; `sdxl` keeps its VAE fp32.
    """
    sdxl_vae = abs(vae_scaling_factor - SDXL_VAE_SCALING_FACTOR) < 1e-6
    if sdxl_vae or architecture == "sdxl":
        return frozenset({"vae_encoder", "vae_decoder"})
    return frozenset()


@dataclass(frozen=True)
class BuildOptions:
    """How `build_engine` builds.

    Args:
        fp16: allow fp16 kernels (inputs and outputs stay fp32, as in the ONNX file).
        fp32_layer_types: TensorRT layer types kept fp32 inside an fp16 engine (names of
            `trt.LayerType`, e.g. `NORMALIZATION`); a preference, not a hard constraint.
        timing_cache: file read before and written after the build (per TensorRT version and
            GPU); None builds without one.
        workspace_bytes: builder workspace limit; None lets TensorRT use the device memory.
        optimization_level: builder optimisation level (0-5; TensorRT's default is 3).
    """

    fp16: bool = True
    fp32_layer_types: tuple[str, ...] = DEFAULT_FP32_LAYER_TYPES
    timing_cache: Path | None = None
    workspace_bytes: int | None = None
    optimization_level: int = 3

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"


def timing_cache_path(
    directory: Path, trt_version: str, compute_capability: tuple[int, int]
) -> Path:
    """One timing cache per TensorRT version and GPU architecture."""
    major, minor = compute_capability
    return Path(directory) / f"timing.trt{trt_version}.sm{major}{minor}.cache"


# -------------------------------------------------------------------- machine facts (GPU)


def require_tensorrt() -> Any:
    """The `tensorrt` module, or TensorRTUnavailable with what to install."""
    if trt is None:
        raise TensorRTUnavailable(
            "the `tensorrt` package is not installed; it exists on GPU machines "
            "(the docker/ image installs the version matching Triton's TensorRT backend)"
        )
    return trt


def tensorrt_version() -> str:
    """`major.minor.patch` of the installed TensorRT Python package."""
    return normalize_trt_version(require_tensorrt().__version__)


def gpu_compute_capability(device: int = 0) -> tuple[int, int]:
    """(major, minor) compute capability of GPU `device`, via torch or else nvidia-smi."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return int(major), int(minor)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return _nvidia_smi_capability(device)


def _nvidia_smi_capability(device: int) -> tuple[int, int]:
    command = ["nvidia-smi", f"--id={device}", "--query-gpu=compute_cap", "--format=csv,noheader"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise TensorRTUnavailable(f"no CUDA device visible ({err})") from None
    return parse_compute_capability(result.stdout)


def parse_compute_capability(text: str) -> tuple[int, int]:
    """`"9.0"` → (9, 0)."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    if not match:
        raise ValueError(f"cannot read a compute capability from {text!r}")
    return int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------ engine building (GPU)


def build_engine(
    onnx_file: Path,
    profiles: Sequence[Profile],
    out: Path,
    options: BuildOptions | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Build a TensorRT plan from an ONNX file, one optimisation profile per entry of `profiles`.

    The plan is written atomically (temporary file, then rename), so a concurrent reader or
    an interrupted build never sees half a plan.

    Args:
        onnx_file: exported component (external data is found beside it).
        profiles: optimisation profiles, in the order their indices will have.
        out: plan path (name it with `EngineKey.filename`).
        options: precision, timing cache, workspace (defaults: `BuildOptions()`).
        log: progress sink.

    Raises:
        TensorRTUnavailable: no `tensorrt` package.
        EngineBuildError: the parser or the builder failed (their messages included).
    """
    options = options or BuildOptions()
    trt_module = require_tensorrt()
    logger = trt_module.Logger(trt_module.Logger.WARNING)
    builder = trt_module.Builder(logger)
    network = builder.create_network(_network_flags(trt_module))
    _parse_onnx(trt_module, network, logger, Path(onnx_file))
    _check_profile_inputs(network, profiles)
    config = builder.create_builder_config()
    _configure_precision(trt_module, config, network, options)
    _configure_memory(trt_module, config, options)
    _add_profiles(builder, config, profiles)
    _load_timing_cache(config, options.timing_cache)
    started = time.perf_counter()
    log(f"[trt] building {out.name} ({len(profiles)} profile(s)) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {out.name} (see the log above)")
    _atomic_write(Path(out), memoryview(serialized))
    _save_timing_cache(config, options.timing_cache)
    log(f"[trt] built {out.name} in {time.perf_counter() - started:.0f} s")
    return Path(out)


def _network_flags(trt_module: Any) -> int:
    """Explicit batch: implied from TensorRT 10 on, a flag before."""
    if int(trt_module.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt_module.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _parse_onnx(trt_module: Any, network: Any, logger: Any, onnx_file: Path) -> None:
    parser = trt_module.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_file)):
        return
    errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
    raise EngineBuildError(f"TensorRT could not parse {onnx_file}: {errors}")


def _check_profile_inputs(network: Any, profiles: Sequence[Profile]) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        if set(profile.shapes) != names:
            raise EngineBuildError(
                f"profile {profile.name!r} sets inputs {sorted(profile.shapes)}, "
                f"the network has {sorted(names)}"
            )


def _configure_precision(trt_module: Any, config: Any, network: Any, options: BuildOptions) -> None:
    if not options.fp16:
        return
    if not hasattr(trt_module.BuilderFlag, "FP16"):
        raise EngineBuildError(
            "this TensorRT has no FP16 builder flag (weakly typed networks removed); "
            "build fp32 or export fp16 ONNX for a strongly typed network"
        )
    config.set_flag(trt_module.BuilderFlag.FP16)
    kept = {getattr(trt_module.LayerType, name) for name in options.fp32_layer_types}
    if not kept:
        return
    config.set_flag(trt_module.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in kept:
            layer.precision = trt_module.float32


def _configure_memory(trt_module: Any, config: Any, options: BuildOptions) -> None:
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt_module.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level


def _add_profiles(builder: Any, config: Any, profiles: Sequence[Profile]) -> None:
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, shape in profile.shapes.items():
            optimization_profile.set_shape(name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(optimization_profile)


def _load_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a foreign cache is ignored, not fatal


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    _atomic_write(Path(path), memoryview(config.get_timing_cache().serialize()))


def _atomic_write(path: Path, data: memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------ parity (GPU)


@dataclass(frozen=True)
class EngineParity:
    """Engine vs ONNX Runtime (CPU, fp32) on one profile's opt shapes.

    Args:
        component: component model name.
        profile: profile name.
        max_abs_diff: worst |engine - onnxruntime| over all outputs.
        reference_scale: largest |onnxruntime output|, to judge `max_abs_diff` by.
        tolerance: allowed `max_abs_diff` (atol + rtol * reference_scale).
    """

    component: str
    profile: str
    max_abs_diff: float
    reference_scale: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.component} [{self.profile}]: max |trt - ort| = {self.max_abs_diff:.2e} "
            f"(max |ort| {self.reference_scale:.2e}, tolerance {self.tolerance:.1e}) {verdict}"
        )


def sample_inputs(
    spec: ComponentSpec, shapes: Mapping[str, Sequence[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs at the given shapes: token ids, timesteps in [0, 1000), normals elsewhere."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in spec.inputs:
        shape = tuple(shapes[tensor.name])
        if tensor.dtype == "INT64":
            inputs[tensor.name] = rng.integers(0, CLIP_VOCAB_SIZE, size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            inputs[tensor.name] = rng.uniform(0, 1000, size=shape).astype(np.float32)
        else:
            inputs[tensor.name] = rng.standard_normal(size=shape).astype(np.float32)
    return inputs


def compare_outputs(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]
) -> tuple[float, float]:
    """(max |got - want|, max |want|) over all outputs; NaN/inf in `got` give inf."""
    worst, scale = 0.0, 0.0
    for name, reference in want.items():
        if name not in got or got[name].shape != reference.shape:
            return float("inf"), float(np.abs(reference).max())
        diff = np.abs(got[name].astype(np.float64) - reference.astype(np.float64))
        worst = max(worst, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
        scale = max(scale, float(np.abs(reference).max()))
    return worst, scale


def check_engine_parity(
    plan: Path,
    onnx_file: Path,
    spec: ComponentSpec,
    profiles: Sequence[Profile],
    atol: float | None = None,
    rtol: float = 2e-2,
    profile_indices: Iterable[int] | None = None,
    component: str | None = None,
) -> list[EngineParity]:
    """Run the engine and ONNX Runtime (CPU, fp32) on each profile's opt shapes and compare.

    Args:
        plan: TensorRT plan built with `profiles`.
        onnx_file: the ONNX source of the plan.
        spec: the component declaration.
        profiles: the plan's profiles, in index order.
        atol: absolute tolerance; defaults to the spec's export tolerance.
        rtol: tolerance relative to the largest reference value (fp16 and TF32 kernels).
        profile_indices: which profiles to check (all by default).
        component: name to report (defaults to the spec's).
    """
    from sdserve_pipeline.onnx_runtime import create_session

    session = create_session(onnx_file, ("CPUExecutionProvider",))
    runner = EngineRunner(plan)
    indices = range(len(profiles)) if profile_indices is None else profile_indices
    results = []
    for index in indices:
        inputs = sample_inputs(spec, profiles[index].opt_shapes(), seed=index)
        want = dict(zip(spec.output_names, session.run(spec.output_names, inputs), strict=True))
        got = runner(inputs, profile_index=index)
        worst, scale = compare_outputs(got, want)
        tolerance = (spec.atol if atol is None else atol) + rtol * scale
        results.append(
            EngineParity(component or spec.name, profiles[index].name, worst, scale, tolerance)
        )
    return results


class EngineRunner:
    """Runs a TensorRT plan on the current CUDA device with torch-allocated buffers."""

    def __init__(self, plan: Path) -> None:
        import torch

        trt_module = require_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no CUDA device for running a TensorRT engine")
        self.trt = trt_module
        self.torch = torch
        runtime = trt_module.Runtime(trt_module.Logger(trt_module.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not load {plan} (built by another version?)")
        self.context = self.engine.create_execution_context()

    def __call__(
        self, inputs: Mapping[str, np.ndarray], profile_index: int = 0
    ) -> dict[str, np.ndarray]:
        torch = self.torch
        stream = torch.cuda.Stream()
        self.context.set_optimization_profile_async(profile_index, stream.cuda_stream)
        device_inputs = {
            name: torch.from_numpy(np.ascontiguousarray(a)).cuda() for name, a in inputs.items()
        }
        for name, tensor in device_inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = self._allocate_outputs()
        torch.cuda.synchronize()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("TensorRT execution failed")
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def _allocate_outputs(self) -> dict[str, Any]:
        outputs = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) != self.trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.torch, self.trt, self.engine.get_tensor_dtype(name))
            outputs[name] = self.torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs


def _torch_dtype(torch: Any, trt_module: Any, dtype: Any) -> Any:
    names = {
        "FLOAT": "float32",
        "HALF": "float16",
        "INT32": "int32",
        "INT64": "int64",
        "BOOL": "bool",
    }
    table = {
        getattr(trt_module.DataType, trt_name): getattr(torch, torch_name)
        for trt_name, torch_name in names.items()
        if hasattr(trt_module.DataType, trt_name)
    }
    if dtype not in table:
        raise EngineBuildError(f"engine tensor type {dtype} has no torch equivalent here")
    return table[dtype]
