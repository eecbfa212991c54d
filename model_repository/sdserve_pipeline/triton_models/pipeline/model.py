"""Triton Python-backend model: the inpainting pipeline, calling its components via BLS.

A thin adapter: validation, the loop and the composite live in `sdserve_pipeline`; the
step-level (continuous) batching in `sdserve_pipeline.batcher`. `execute` hands each request
to the batcher and returns None; the batcher's worker answers it through the request's
response sender (one final response, as a non-decoupled model must) when it is done, so a
request arriving mid-run joins the running batch at the next step.
"""

import json
import threading
from functools import partial
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sdserve_client.rules import config_parameters
from sdserve_client.webui.server_info import PENDING_METRIC, QUEUE_DURATION_METRIC
from sdserve_pipeline.assets import ASSETS_DIR
from sdserve_pipeline.batcher import ContinuousBatcher, Overloaded, QueueTimeout
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
        self.metrics = QueueMetrics(args["model_name"])
        self.batcher = ContinuousBatcher(
            self.service,
            max_active=int(params.get("max_active_requests", 8)),
            max_queued=int(params.get("max_queue_size", 16)),
            queue_timeout_s=float(params.get("queue_timeout_s", 120)),
            # absent from repositories exported before it existed: no wait, as then
            join_wait_s=float(params.get("join_wait_ms", 0)) / 1e3,
            on_callback_error=lambda err: pb_utils.Logger.log_error(f"response not sent: {err}"),
            on_dequeue=self._dequeued,
        )

    def execute(self, requests):
        """Queue each request for the running batch (never blocks); answer later."""
        for request in requests:
            send = partial(self._send, request.get_response_sender())
            try:
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                inputs = unbatch(inputs) if self.batched else inputs
            except RequestError as err:
                send(err)
                continue
            timeout_s = request.timeout() / 1e6  # the client's own queue timeout; 0: none
            self.batcher.submit(inputs, send, request.is_cancelled, timeout_s)
        self.metrics.set_pending(self.batcher.pending)
        return None

    def _dequeued(self, waited_s):
        self.metrics.waited_us.increment(waited_s * 1e6)
        self.metrics.set_pending(self.batcher.pending)

    def finalize(self):
        """Unloading (or shutdown): finish the requests already taken, then stop."""
        self.batcher.close()

    def _send(self, sender, outcome):
        sender.send(self._response(outcome), flags=FINAL)

    def _response(self, outcome):
        if isinstance(outcome, RequestError):
            return _error(str(outcome), pb_utils.TritonError.INVALID_ARG)
        if isinstance(outcome, Overloaded | QueueTimeout):
            return _error(str(outcome), pb_utils.TritonError.UNAVAILABLE)
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


class QueueMetrics:
    """The pipeline's queue on Triton's metrics endpoint (its own batcher holds the queue, so
    Triton's nv_inference_queue_* metrics stay near zero for this model)."""

    def __init__(self, model_name):
        labels = {"model": model_name}
        self.families = (  # kept alive: a family's metrics go when it does
            pb_utils.MetricFamily(
                name=PENDING_METRIC,
                description="Requests waiting in the pipeline's queue to start",
                kind=pb_utils.MetricFamily.GAUGE,
            ),
            pb_utils.MetricFamily(
                name=QUEUE_DURATION_METRIC,
                description="Cumulative microseconds requests waited in the pipeline's queue "
                "before starting",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
        )
        self.pending, self.waited_us = (f.Metric(labels=labels) for f in self.families)
        self._reported = 0  # this instance's share of the gauge (instances share one series)
        self._lock = threading.Lock()

    def set_pending(self, count):
        with self._lock:
            self.pending.increment(count - self._reported)
            self._reported = count


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
