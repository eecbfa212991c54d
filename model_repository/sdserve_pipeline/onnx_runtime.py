"""ONNX Runtime sessions, shared by Triton's runner model and in-process runs.

Imports no torch: the runner models' backend stubs load only ONNX Runtime and numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def create_session(
    onnx_file: str | Path,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int = 0,
    allow_spinning: bool = True,
) -> ort.InferenceSession:
    """An ORT session on the first available of `providers` (CPU always last resort).

    Args:
        onnx_file: model path (external data is found beside it).
        providers: execution providers in order of preference, e.g. CUDA then CPU.
        intra_op_threads: threads per op; 0 lets ORT choose (one per core).
        allow_spinning: whether idle intra-op threads busy-wait for the next op (ORT's
            default). Off when several sessions (one per component model process) share
            the cores with the pipeline: a spinning idle pool takes CPU from the others.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
    )
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or list(DEFAULT_PROVIDERS)
    return ort.InferenceSession(str(onnx_file), sess_options=options, providers=chosen)
