"""Triton Python-backend model: the inpainting pipeline, calling its components via BLS.

A thin adapter: validation, the loop and the composite live in `sdserve_pipeline`.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sdserve_pipeline.assets import ASSETS_DIR
from sdserve_pipeline.loop import Cancelled
from sdserve_pipeline.request import RequestError
from sdserve_pipeline.service import PipelineService, batch, unbatch
from sdserve_pipeline.triton_bls import BlsRunner, ComponentError
from sdserve_pipeline.triton_params import config_parameters


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
        """All requests handed over together are denoised together (one UNet call per step
        for those of the same latent size); each is answered on its own."""
        responses = [None] * len(requests)
        work = []
        for i, request in enumerate(requests):
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                work.append((i, unbatch(inputs) if self.batched else inputs, request))
            except RequestError as err:
                responses[i] = _error(str(err), pb_utils.TritonError.INVALID_ARG)
        outcomes = self.service.generate_many([(inputs, r.is_cancelled) for _, inputs, r in work])
        for (i, _, _), outcome in zip(work, outcomes, strict=True):
            responses[i] = self._response(outcome)
        return responses

    def _response(self, outcome):
        if isinstance(outcome, RequestError):
            return _error(str(outcome), pb_utils.TritonError.INVALID_ARG)
        if isinstance(outcome, Cancelled):
            return _error("request cancelled", pb_utils.TritonError.CANCELLED)
        if isinstance(outcome, ComponentError):
            return _error(str(outcome), pb_utils.TritonError.INTERNAL)
        if isinstance(outcome, Exception):  # keep serving; report what broke
            pb_utils.Logger.log_error(f"{type(outcome).__name__}: {outcome}")
            return _error(f"{type(outcome).__name__}: {outcome}", pb_utils.TritonError.INTERNAL)
        outputs = batch(outcome) if self.batched else outcome
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, outputs[name]) for name in self.output_names]
        )


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
