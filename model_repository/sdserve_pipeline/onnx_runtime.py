"""ONNX Runtime sessions and component runners, shared by Triton's runner model and tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sdserve_pipeline.components import ComponentSpec

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def create_session(
    onnx_file: str | Path, providers: Sequence[str] = DEFAULT_PROVIDERS, intra_op_threads: int = 0
) -> ort.InferenceSession:
    """An ORT session on the first available of `providers` (CPU always last resort).

    Args:
        onnx_file: model path (external data is found beside it).
        providers: execution providers in order of preference, e.g. CUDA then CPU.
        intra_op_threads: threads per op; 0 lets ORT choose (one per core).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or list(DEFAULT_PROVIDERS)
    return ort.InferenceSession(str(onnx_file), sess_options=options, providers=chosen)


class OrtRunner:
    """A component as a callable: torch tensors in spec order → torch tensors in spec order."""

    def __init__(self, spec: ComponentSpec, session: ort.InferenceSession) -> None:
        self.spec = spec
        self.session = session

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {
            t.name: np.ascontiguousarray(x.detach().cpu().numpy())
            for t, x in zip(self.spec.inputs, inputs, strict=True)
        }
        outputs = self.session.run(self.spec.output_names, feeds)
        return tuple(torch.from_numpy(o) for o in outputs)
