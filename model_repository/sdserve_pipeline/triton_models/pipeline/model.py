"""Triton Python-backend model: the inpainting pipeline, calling its components via BLS.

A thin adapter: validation, the loop and the composite live in `sdserve_pipeline`.
"""

import json
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sdserve_pipeline.loop import Cancelled
from sdserve_pipeline.request import RequestError
from sdserve_pipeline.service import PipelineService, batch, unbatch
from sdserve_pipeline.triton_params import config_parameters
from sdserve_pipeline.triton_bls import BlsRunner, ComponentError

from sdserve_pipeline.assets import ASSETS_DIR


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.service = PipelineService.from_parameters(
            config_parameters(config),
            folder / ASSETS_DIR,
            lambda spec, model_name: BlsRunner(spec, model_name, pb_utils),
        )
        self.output_names = [t["name"] for t in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0

    def execute(self, requests):
        return [self._generate(request) for request in requests]

    def _generate(self, request):
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        try:
            if self.batched:
                inputs = unbatch(inputs)
            outputs = self.service.generate(inputs, is_cancelled=request.is_cancelled)
            if self.batched:
                outputs = batch(outputs)
        except RequestError as err:
            return _error(str(err), pb_utils.TritonError.INVALID_ARG)
        except Cancelled:
            return _error("request cancelled", pb_utils.TritonError.CANCELLED)
        except ComponentError as err:
            return _error(str(err), pb_utils.TritonError.INTERNAL)
        except Exception as err:  # keep serving; report what broke
            pb_utils.Logger.log_error(traceback.format_exc())
            return _error(f"{type(err).__name__}: {err}", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, outputs[name]) for name in self.output_names]
        )


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
