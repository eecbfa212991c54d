"""Component runners over Triton BLS, for the pipeline model running inside tritonserver.

`pb_utils` (triton_python_backend_utils) exists only inside the backend stub, so it is
passed in; tests use a fake.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from sdserve_pipeline.components import ComponentSpec
from sdserve_pipeline.onnx_runtime import ADAPTERS_PARAMETER, encode_adapter_set


class ComponentError(RuntimeError):
    """A BLS call to a component model failed."""


class BlsRunner:
    """A component as a callable (torch tensors in spec order) backed by a BLS request."""

    def __init__(self, spec: ComponentSpec, model_name: str, pb_utils: ModuleType) -> None:
        self.spec = spec
        self.model_name = model_name
        self.pb_utils = pb_utils

    def __call__(
        self, *inputs: torch.Tensor, adapters: Sequence[tuple[str, float]] = ()
    ) -> tuple[torch.Tensor, ...]:
        pb = self.pb_utils
        tensors = [
            pb.Tensor(t.name, np.ascontiguousarray(x.detach().cpu().numpy()))
            for t, x in zip(self.spec.inputs, inputs, strict=True)
        ]
        extra = {}
        if adapters:  # the runner picks the weight variant
            extra["parameters"] = {ADAPTERS_PARAMETER: encode_adapter_set(adapters)}
        request = pb.InferenceRequest(
            model_name=self.model_name,
            inputs=tensors,
            requested_output_names=self.spec.output_names,
            **extra,
        )
        response = check_response(request.exec(), self.model_name)
        return tuple(
            torch.from_numpy(np.array(pb.get_output_tensor_by_name(response, name).as_numpy()))
            for name in self.spec.output_names
        )


def check_response(response: Any, model_name: str) -> Any:  # a pb_utils response
    """The one check of every BLS response: raise ComponentError naming the model."""
    if response.has_error():
        raise ComponentError(f"{model_name}: {response.error().message()}")
    return response
