"""Parity of a TensorRT plan against ONNX Runtime (needs `tensorrt`, torch and a CUDA device).

`check_engine_parity` runs the plan and ONNX Runtime (CPU, fp32) on the same
`example_inputs` at a profile's opt shapes and compares the outputs relative to the largest
reference value. `compare_outputs` and `EngineParity` are pure and tested on the CPU; the
rest runs only in the `gpu` tests of `tests/test_gpu_path.py`, which skip without TensorRT
and a CUDA device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdserve_export.engine_profiles import STATIC_PROFILE, Profile
from sdserve_export.tensorrt_build import EngineBuildError, TensorRTUnavailable, require_tensorrt
from sdserve_pipeline.components import CLIP_VOCAB_SIZE, ComponentSpec, example_inputs
from sdserve_protocol.sizes import SizeBucket


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


def profile_inputs(
    spec: ComponentSpec, profile: Profile, seed: int = 0, vocab_size: int = CLIP_VOCAB_SIZE
) -> dict[str, np.ndarray]:
    """`example_inputs` at a profile's opt shapes (and its bucket's pixel size)."""
    dims: dict[str, int] = {}
    for tensor in spec.inputs:
        dims |= dict(zip(tensor.dims, profile.shapes[tensor.name].opt, strict=True))
    if profile.name != STATIC_PROFILE:
        bucket = SizeBucket.parse(profile.name)
        dims |= {"height": bucket.height, "width": bucket.width}
    return example_inputs(spec, dims, np.random.default_rng(seed), vocab_size)


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
    vocab_size: int = CLIP_VOCAB_SIZE,
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
        vocab_size: tokens of the text encoder's vocabulary (for token-id inputs).
    """
    from sdserve_pipeline.onnx_runtime import create_session

    session = create_session(onnx_file, ("CPUExecutionProvider",))
    runner = EngineRunner(plan)
    indices = range(len(profiles)) if profile_indices is None else profile_indices
    results = []
    for index in indices:
        inputs = profile_inputs(spec, profiles[index], seed=index, vocab_size=vocab_size)
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
