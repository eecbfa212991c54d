"""Building TensorRT plans (needs the `tensorrt` package and a CUDA device).

`build_engine` drives the TensorRT Python API: fp16 with normalisation layers kept fp32,
a timing cache, one optimisation profile per size bucket. Also here: what TensorRT and GPU
this machine has, and whether Triton's TensorRT backend would load plans built here.

Without `tensorrt` (or a GPU) the functions that need it raise `TensorRTUnavailable`. On
the CPU, `build_engine`'s calls are tested against a stand-in for the `tensorrt` module;
the `gpu` tests of `tests/test_gpu_path.py` build real plans and skip without TensorRT and
a CUDA device. Until they have passed on a machine with one, this has not been run with
real TensorRT.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdserve_export.engine_profiles import Profile
from sdserve_export.plan_names import normalize_trt_version

try:  # TensorRT exists on GPU machines only; everything but the builder works without it
    import tensorrt as _tensorrt
except ImportError:  # pragma: no cover - depends on the machine
    _tensorrt = None
trt: Any = _tensorrt

DEFAULT_FP32_LAYER_TYPES = ("NORMALIZATION",)  # LayerNorm after attention overflows in fp16
# Where the Triton image keeps TensorRT's libraries (the TensorRT backend links them).
TRITON_TRT_LIB_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/local/tensorrt/lib"))


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine."""


class TensorRTUnavailable(RuntimeError):
    """The `tensorrt` package (or a CUDA device) is missing on this machine."""


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


# ----------------------------------------------------------------------------- machine facts


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


# ------------------------------------------------------------------------ building


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


# ---------------------------------------------------------- TensorRT of Triton's backend


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
