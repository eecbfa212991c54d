"""Triton Python-backend model: the inpainting pipeline, calling its components via BLS.

A thin adapter: validation, the loop and the composite live in `sdserve_pipeline`; the
step-level (continuous) batching in `sdserve_pipeline.batcher`. `execute` hands each request
to the batcher and returns None; the batcher's worker answers it through the request's
response sender (one final response, as a non-decoupled model must) when it is done, so a
request arriving mid-run joins the running batch at the next step.
"""

import json
from functools import partial
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sdserve_client.rules import config_parameters
from sdserve_pipeline.assets import ASSETS_DIR
from sdserve_pipeline.batcher import ContinuousBatcher
from sdserve_pipeline.loop import Cancelled
from sdserve_pipeline.request import RequestError
from sdserve_pipeline.service import PipelineService, batch, unbatch
from sdserve_pipeline.triton_bls import BlsRunner, ComponentError

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        folder = Path(args["model_repository"]) / args["model_version"]
        self.service = PipelineService.from_parameters(
            params,
            folder / ASSETS_DIR,
            lambda spec, model_name: BlsRunner(spec, model_name, pb_utils),
        )
        self.output_names = [t["name"] for t in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0
        self.batcher = ContinuousBatcher(
            self.service,
            max_active=int(params.get("max_active_requests", 8)),
            on_callback_error=lambda err: pb_utils.Logger.log_error(f"response not sent: {err}"),
        )

    def execute(self, requests):
        """Queue each request in the running batch (blocks while it is full); answer later."""
        for request in requests:
            send = partial(self._send, request.get_response_sender())
            try:
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                inputs = unbatch(inputs) if self.batched else inputs
            except RequestError as err:
                send(err)
                continue
            self.batcher.submit(inputs, send, request.is_cancelled)
        return None

    def finalize(self):
        """Unloading (or shutdown): finish the requests already taken, then stop."""
        self.batcher.close()

    def _send(self, sender, outcome):
        sender.send(self._response(outcome), flags=FINAL)

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
