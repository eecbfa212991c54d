"""Build the weight map of an exported component (`sdserve_pipeline.weight_map`).

Every Linear and Conv weight of the diffusers model is matched by value against the ONNX
initializers, as is and transposed. A weight whose value no initializer holds, or that
several weights share, is left out: it cannot be patched on its own, and an adapter that
targets it is refused when read.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from sdserve_pipeline.weight_map import WeightSlot


def _key(array: np.ndarray) -> tuple[tuple[int, ...], str, str]:
    array = np.ascontiguousarray(array)
    return array.shape, str(array.dtype), hashlib.sha1(array.tobytes()).hexdigest()


def patchable_weights(module: nn.Module) -> dict[str, np.ndarray]:
    """Name → fp32 value of each Linear and Conv weight (what LoRA targets).

    CLIP text encoders are named as transformers >= 5.6 flattened `CLIPTextModel` (no
    `text_model.` prefix; `CLIPTextModelWithProjection` still has it), as
    `sdserve_pipeline.adapters` names the modules of LoRA files.
    """
    weights = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear | nn.Conv1d | nn.Conv2d):
            key = f"{name.removeprefix('text_model.')}.weight"
            weights[key] = child.weight.detach().float().cpu().numpy()
    return weights


def build_weight_map(module: nn.Module, model: onnx.ModelProto) -> dict[str, WeightSlot]:
    """Parameter name (as in `module`, the diffusers model) → its initializer.

    Args:
        module: the diffusers / transformers model that was exported (unwrapped).
        model: the exported ONNX model, its external data loaded.
    """
    by_value: dict[tuple[tuple[int, ...], str, str], list[str]] = defaultdict(list)
    for tensor in model.graph.initializer:
        by_value[_key(numpy_helper.to_array(tensor))].append(tensor.name)
    weights = patchable_weights(module)
    found: dict[str, WeightSlot] = {}
    owners: dict[str, list[str]] = defaultdict(list)
    values: dict[tuple[tuple[int, ...], str, str], list[str]] = defaultdict(list)
    for name, value in weights.items():
        values[_key(value)].append(name)
    for name, value in weights.items():
        if len(values[_key(value)]) > 1:
            continue  # several weights with one value: cannot tell them apart
        candidates = [(n, False) for n in by_value.get(_key(value), [])]
        if value.ndim == 2:
            candidates += [(n, True) for n in by_value.get(_key(value.T), [])]
        if len(candidates) == 1:
            initializer, transposed = candidates[0]
            found[name] = WeightSlot(initializer, transposed)
            owners[initializer].append(name)
    return {n: s for n, s in found.items() if len(owners[s.initializer]) == 1}
