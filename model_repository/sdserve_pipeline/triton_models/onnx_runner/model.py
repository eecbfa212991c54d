"""Triton Python-backend model: one exported component on ONNX Runtime.

Generic: tensor names come from this model's config (generated from the component spec);
the session from its parameters (`sdserve_pipeline.onnx_runtime.RunnerSettings`).
"""

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from sdserve_pipeline.onnx_runtime import ADAPTERS_PARAMETER, RunnerSettings, decode_adapter_set
from sdserve_protocol.settings import config_parameters


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        settings = RunnerSettings.from_parameters(config_parameters(config))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.session = settings.session(version_dir)
        self.variants = settings.variants(version_dir, self.session)  # LoRA; None: no adapters
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._run(request) for request in requests]

    def _run(self, request: Any) -> Any:
        try:
            feeds = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            }
            adapters = json.loads(request.parameters() or "{}").get(ADAPTERS_PARAMETER)
            if adapters and self.variants is not None:
                with self.variants.session(decode_adapter_set(adapters)) as session:
                    outputs = session.run(self.output_names, feeds)
            elif adapters:
                raise RuntimeError("this component serves no adapters")
            else:
                outputs = self.session.run(self.output_names, feeds)
        except Exception as err:  # a bad tensor must not take the instance down
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{type(err).__name__}: {err}")
            )
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(n, o) for n, o in zip(self.output_names, outputs, strict=True)]
        )
