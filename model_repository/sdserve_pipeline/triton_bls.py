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
from sdserve_pipeline.onnx_runtime import (
    ADAPTER_REFUSED,
    ADAPTERS_PARAMETER,
    HELD_PARAMETER,
    AdapterSet,
    encode_adapter_set,
    encode_held_sets,
)
from sdserve_pipeline.shared_graph import CHECKPOINT_PARAMETER
from sdserve_protocol.rules import RequestError


class ComponentError(RuntimeError):
    """A BLS call to a component model failed."""


class BlsRunner:
    """A component as a callable (torch tensors in spec order) backed by a BLS request."""

    def __init__(
        self, spec: ComponentSpec, model_name: str, pb_utils: ModuleType, checkpoint: str = ""
    ) -> None:
        self.spec = spec
        self.model_name = model_name
        self.pb_utils = pb_utils
        self.checkpoint = checkpoint  # named in every call: a shared-graph checkpoint's weights

    def __call__(
        self,
        *inputs: torch.Tensor,
        adapters: Sequence[tuple[str, float]] = (),
        held: Sequence[AdapterSet] = (),
    ) -> tuple[torch.Tensor, ...]:
        """The component's outputs for `inputs`, on the variant of `adapters` (the runner's
        cache keeping the `held` sets' variants).

        Raises:
            RequestError: the runner refused the adapter set (`ADAPTER_REFUSED`: an adapter
                removed or replaced by a bad file since the request was checked).
            ComponentError: any other failure of the call.
        """
        pb = self.pb_utils
        tensors = [
            pb.Tensor(t.name, np.ascontiguousarray(x.detach().cpu().numpy()))
            for t, x in zip(self.spec.inputs, inputs, strict=True)
        ]
        parameters = {CHECKPOINT_PARAMETER: self.checkpoint} if self.checkpoint else {}
        if adapters:  # the runner picks the weight variant, keeping the held ones
            parameters[ADAPTERS_PARAMETER] = encode_adapter_set(adapters)
            if held:
                parameters[HELD_PARAMETER] = encode_held_sets(held)
        extra = {"parameters": parameters} if parameters else {}
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
    """The one check of every BLS response: raise ComponentError naming the model, or the
    `RequestError` a runner's refusal of the adapter set stands for."""
    if response.has_error():
        message = response.error().message()
        refused = message.find(ADAPTER_REFUSED)
        if refused >= 0:
            raise RequestError("adapters", message[refused + len(ADAPTER_REFUSED) :])
        raise ComponentError(f"{model_name}: {message}")
    return response
