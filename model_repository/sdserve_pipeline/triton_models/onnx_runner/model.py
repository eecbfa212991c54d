"""Triton Python-backend model: one exported component on ONNX Runtime.

Generic: tensor names come from this model's config (generated from the component spec);
the session from `sdserve_pipeline.onnx_runtime.create_session`.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sdserve_client.rules import config_parameters
from sdserve_pipeline.onnx_runtime import create_session
from sdserve_pipeline.triton_params import flag


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        folder = Path(args["model_repository"]) / args["model_version"]
        self.session = create_session(
            folder / params["onnx_file"],
            params["execution_providers"].split(","),
            int(params.get("intra_op_threads", "0")),
            flag(params, "allow_spinning", default=True),
        )
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        try:
            feeds = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            }
            outputs = self.session.run(self.output_names, feeds)
        except Exception as err:  # a bad tensor must not take the instance down
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{type(err).__name__}: {err}")
            )
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(n, o) for n, o in zip(self.output_names, outputs, strict=True)]
        )
