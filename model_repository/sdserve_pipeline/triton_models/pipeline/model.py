"""Triton Python-backend model: the inpainting pipeline, calling its components via BLS.

A thin adapter: validation, the loop and the composite live in `sdserve_pipeline`; the
step-level (continuous) batching in `sdserve_pipeline.batcher`. `execute` hands each request
to the batcher and returns None; the batcher's worker answers it through the request's
response sender (one final response, as a non-decoupled model must) when it is done, so a
request arriving mid-run joins the running batch at the next step. The batcher also
refuses what does not fit (queue, memory budget) and reports every answer, queue wait and
load change; `PipelineMetrics` publishes those reports as custom metrics.

A request that carries a `stream_id` comes from the stream model (`<name>_stream`): its
events go back there through an `EventPublisher` (one BLS call each), then its answer.
Its previews are decoded by the repository's preview decoder model (a tiny VAE, BLS) when
it was exported with one, else by the linear projection (`PipelineService.preview`).

A pipeline exported with `load_on_demand` loads its component models with a request's start
and may have them unloaded when idle (`sdserve_pipeline.checkpoints`: the batcher's lease); one
with `shared_graph` names itself in each component call, whose runner then swaps in its
weights (`sdserve_pipeline.shared_graph`). A streamed request's error starts with its gRPC
status (`events.stream_error_text`): the stream model gets every BLS error as INTERNAL.
"""

import json
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from sdserve_pipeline.admission import MB, budget_bytes, memory_model_for
from sdserve_pipeline.assets import ASSETS_DIR
from sdserve_pipeline.batcher import ContinuousBatcher
from sdserve_pipeline.checkpoints import CheckpointLoadError, pipeline_lease
from sdserve_pipeline.executor import Cancelled
from sdserve_pipeline.outcomes import (
    DURATION_BUCKETS_US,
    QUEUE_WAIT_BUCKETS_US,
    Overloaded,
    QueueTimeout,
)
from sdserve_pipeline.service import PipelineService, batch, unbatch
from sdserve_pipeline.streaming import EventPublisher, StreamEvent
from sdserve_pipeline.triton_bls import BlsRunner, ComponentError
from sdserve_protocol.events import (
    CANCELLED,
    STREAM_ID,
    encode_events,
    stream_error_text,
    stream_model_name,
    text_of,
)
from sdserve_protocol.metrics import (
    DURATION_METRIC,
    MEMORY_BUDGET_METRIC,
    MEMORY_RESERVED_METRIC,
    OUTCOMES,
    OUTSTANDING_STEPS_METRIC,
    PENDING_METRIC,
    QUEUE_DURATION_METRIC,
    QUEUE_WAIT_METRIC,
    REQUESTS_METRIC,
)
from sdserve_protocol.rules import RequestError
from sdserve_protocol.settings import PipelineSettings, config_parameters

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
Outcome = Mapping[str, npt.NDArray[Any]] | Exception  # what the batcher answers a request with


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        settings = PipelineSettings.from_parameters(config_parameters(config))
        folder = Path(args["model_repository"]) / args["model_version"]
        checkpoint = args["model_name"] if settings.shared_graph else ""  # its weights by name
        self.service = PipelineService.from_settings(
            settings,
            folder / ASSETS_DIR,
            lambda spec, model_name: BlsRunner(spec, model_name, pb_utils, checkpoint),
        )
        self.output_names = [t["name"] for t in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0
        budget = budget_bytes(settings.memory.budget_mb)
        pb_utils.Logger.log_info(
            f"{args['model_name']}: memory budget " + (f"{budget / MB:.0f} MB" if budget else "off")
        )
        self.metrics = PipelineMetrics(args["model_name"], budget)
        queue = settings.queue
        self.batcher = ContinuousBatcher(
            self.service,
            max_active=queue.max_active,
            max_queued=queue.max_queue_size,
            queue_timeout_s=queue.timeout_s,
            join_wait_s=queue.join_wait_ms / 1e3,
            on_callback_error=lambda err: pb_utils.Logger.log_error(f"response not sent: {err}"),
            observer=self.metrics,
            memory=memory_model_for(self.service, settings.memory),
            memory_budget=budget,
            preview=self.service.preview,  # its preview_decoder model (BLS), or the linear one
            lease=self._lease(args["model_name"], Path(args["model_repository"]).parent, settings),
        )
        self.stream_model = stream_model_name(args["model_name"])
        self.publisher = EventPublisher(
            self._deliver,
            on_error=lambda err: pb_utils.Logger.log_error(f"stream event not sent: {err}"),
        )

    @staticmethod
    def _lease(name: str, repository: Path, settings: PipelineSettings) -> Any:
        """A checkpoint loaded on demand: its lease on the server's registry (Triton's model
        control, BLS); else None."""
        if not settings.load_on_demand:
            return None
        return pipeline_lease(
            name, repository, list(settings.components.values()),
            settings.queue.timeout_s or float("inf"),  # a request waits for room as in the queue
            load=lambda model: pb_utils.load_model(model_name=model),
            unload=lambda model: pb_utils.unload_model(model_name=model),
        )  # fmt: skip

    def execute(self, requests: list[Any]) -> None:
        """Queue each request for the running batch (never blocks); answer later."""
        for request in requests:
            sender = request.get_response_sender()
            send = partial(self._send, sender)
            is_cancelled, listener = request.is_cancelled, None
            try:
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                inputs = unbatch(inputs) if self.batched else inputs
                stream = inputs.pop(STREAM_ID.name, None)
                if stream is not None:  # from the stream model: events, then the answer
                    stream_id = text_of(stream[0])
                    listener = self.publisher.open(stream_id)
                    send = partial(
                        self._send_after_events, stream_id,
                        partial(self._send, sender, streamed=True),
                    )  # fmt: skip
                    is_cancelled = partial(self._stream_cancelled, stream_id, request)
            except Exception as err:  # noqa: BLE001 (this request fails, not the others)
                self.batcher.refuse(send, err)  # answered and counted like any other
                continue
            timeout_s = request.timeout() / 1e6  # the client's own queue timeout; 0: none
            self.batcher.submit(inputs, send, is_cancelled, timeout_s, listener)
        return None

    def _stream_cancelled(self, stream_id: str, request: Any) -> bool:
        return bool(request.is_cancelled()) or self.publisher.cancelled(stream_id)

    def _send_after_events(self, stream_id: str, send: Any, outcome: Outcome) -> None:
        self.publisher.finish(stream_id, partial(send, outcome))

    def _deliver(self, stream_ids: Sequence[str], events: Sequence[StreamEvent]) -> list[bool]:
        """Events of one kind, one per stream, to the stream model in one BLS call; returns
        per event whether its stream is cancelled."""
        ids = np.asarray([[stream_id.encode()] for stream_id in stream_ids], dtype=np.object_)
        tensors = {STREAM_ID.name: ids} | encode_events(events)
        inputs = [pb_utils.Tensor(name, array[np.newaxis]) for name, array in tensors.items()]
        infer = pb_utils.InferenceRequest(
            model_name=self.stream_model, inputs=inputs, requested_output_names=[CANCELLED.name]
        )
        cancelled = [False] * len(stream_ids)
        for response in infer.exec(decoupled=True):
            if response.has_error():
                raise RuntimeError(response.error().message())
            tensor = pb_utils.get_output_tensor_by_name(response, CANCELLED.name)
            if tensor is not None:
                cancelled = [bool(gone) for gone in tensor.as_numpy().reshape(-1)]
        return cancelled

    def finalize(self) -> None:
        """Unloading (or shutdown): finish the requests already taken, then stop."""
        self.batcher.close()
        self.publisher.close()

    def _send(self, sender: Any, outcome: Outcome, streamed: bool = False) -> None:
        sender.send(self._response(outcome, streamed), flags=FINAL)

    def _response(self, outcome: Outcome, streamed: bool = False) -> Any:
        """The response to `outcome`; a streamed request's error carries its status in its
        message (BLS hands the stream model every error as INTERNAL)."""
        error = partial(_error, streamed=streamed)
        if isinstance(outcome, RequestError):
            return error(str(outcome), "INVALID_ARG")
        if isinstance(outcome, Overloaded | QueueTimeout):
            return error(str(outcome), "UNAVAILABLE")
        if isinstance(outcome, Cancelled):
            return error("request cancelled", "CANCELLED")
        if isinstance(outcome, ComponentError | CheckpointLoadError):
            return error(str(outcome), "INTERNAL")
        if isinstance(outcome, Exception):  # keep serving; report what broke
            pb_utils.Logger.log_error(f"{type(outcome).__name__}: {outcome}")
            return error(f"{type(outcome).__name__}: {outcome}", "INTERNAL")
        outputs = batch(outcome) if self.batched else outcome
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, outputs[name]) for name in self.output_names]
        )


class PipelineMetrics:
    """The batcher's reports (an `outcomes.Observer`) as custom metrics on Triton's endpoint.

    Triton counts a request as a success when `execute` hands it over, and its queue metrics
    stay near zero (the batcher holds the queue), so the pipeline publishes its own. Gauges
    are shared by the model's instances (one series per model): each instance adds its change.
    """

    def __init__(self, model_name: str, memory_budget: int) -> None:
        labels = {"model": model_name}
        self._families = {  # kept alive: a family's metrics go when it does
            name: pb_utils.MetricFamily(
                name=name, description=text, kind=getattr(pb_utils.MetricFamily, kind)
            )
            for name, (text, kind) in _METRICS.items()
        }
        self.requests = {
            outcome: self._families[REQUESTS_METRIC].Metric(labels={**labels, "outcome": outcome})
            for outcome in OUTCOMES
        }
        self.duration = self._histogram(DURATION_METRIC, labels, DURATION_BUCKETS_US)
        self.queue_wait = self._histogram(QUEUE_WAIT_METRIC, labels, QUEUE_WAIT_BUCKETS_US)
        self.waited_us = self._families[QUEUE_DURATION_METRIC].Metric(labels=labels)
        self.pending, self.steps, self.reserved, self.budget = (
            _SharedGauge(self._families[name].Metric(labels=labels))
            for name in (PENDING_METRIC, OUTSTANDING_STEPS_METRIC, MEMORY_RESERVED_METRIC,
                         MEMORY_BUDGET_METRIC)
        )  # fmt: skip
        self.budget.set(memory_budget)

    def _histogram(self, name: str, labels: dict[str, str], buckets: Sequence[float]) -> Any:
        return self._families[name].Metric(labels=labels, buckets=list(buckets))

    def answered(self, outcome: str, duration_s: float) -> None:
        self.requests[outcome].increment(1)
        self.duration.observe(duration_s * 1e6)

    def dequeued(self, waited_s: float) -> None:
        self.waited_us.increment(waited_s * 1e6)
        self.queue_wait.observe(waited_s * 1e6)

    def load(self, pending: int, outstanding_steps: int, reserved_bytes: int) -> None:
        self.pending.set(pending)
        self.steps.set(outstanding_steps)
        self.reserved.set(reserved_bytes)


class _SharedGauge:
    """A gauge series the model's instances share: each adds the change of its own value."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._reported: float = 0
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        with self._lock:
            if value != self._reported:
                self.metric.increment(value - self._reported)
                self._reported = value


# name: (description, kind); kinds by name: pb_utils has MetricFamily only once initialized
_METRICS = {
    REQUESTS_METRIC: ("Requests answered by the pipeline, by outcome", "COUNTER"),
    DURATION_METRIC: ("Microseconds from taking a request to answering it", "HISTOGRAM"),
    QUEUE_WAIT_METRIC: (
        "Microseconds requests waited in the pipeline's queue before starting",
        "HISTOGRAM",
    ),
    QUEUE_DURATION_METRIC: (
        "Cumulative microseconds requests waited in the pipeline's queue before starting",
        "COUNTER",
    ),
    PENDING_METRIC: ("Requests waiting in the pipeline's queue to start", "GAUGE"),
    OUTSTANDING_STEPS_METRIC: (
        "Denoising steps left over the queued and running requests",
        "GAUGE",
    ),
    MEMORY_RESERVED_METRIC: (
        "Estimated peak bytes of the requests taken (queued and running)",
        "GAUGE",
    ),
    MEMORY_BUDGET_METRIC: ("Memory budget for the requests taken, bytes (0: none)", "GAUGE"),
}


def _error(message: str, code: str, streamed: bool = False) -> Any:
    """An error response with `TritonError` code `code` (by name)."""
    text = stream_error_text(code, message) if streamed else message
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(text, getattr(pb_utils.TritonError, code))
    )
