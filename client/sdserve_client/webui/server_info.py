"""What the web UI asks a Triton server: pipeline models, their schedulers and limits, queue state.

Plain functions over a `tritonclient.grpc.InferenceServerClient` (or a fake with the same
methods), so the UI works against any deployment and tests need no server. Every tritonclient
exception becomes the SDK's `SdserveError`.

The queue is the pipeline's own (its batcher holds the waiting requests, not Triton's dynamic
batcher), so Triton's queue statistics stay near zero for it. The pending count and the mean
wait come from the custom metrics the pipeline model publishes on Triton's metrics endpoint
(`sdserve_queue_pending_requests`, `sdserve_queue_duration_us`); a server without them gives
neither, rather than Triton's misleading zeros.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from ..errors import SdserveError
from ..request import PROMPT
from ..rules import Limits, limits_from_parameters

SCHEDULERS_PARAMETER = "schedulers"
"""Pipeline config parameter: comma-separated scheduler names the model accepts."""

T = TypeVar("T")

PENDING_METRIC = "sdserve_queue_pending_requests"
"""Gauge of the pipeline model (label `model`): requests accepted and waiting to start."""
QUEUE_DURATION_METRIC = "sdserve_queue_duration_us"
"""Counter of the pipeline model (label `model`): microseconds requests waited before starting."""
SUCCESS_METRIC = "nv_inference_request_success"
"""Triton's request counter (labels `model`, `version`). The pipeline answers through response
senders, so Triton counts a request when `execute` hands it to the batcher (later error answers
included): every request that entered the queue."""

# A sample of Prometheus text format, e.g. `sdserve_queue_pending_requests{model="inpaint"} 2`,
# with an optional timestamp after the value.
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"(?P<value>(?:[^"\\]|\\.)*)"')


class InfoClient(Protocol):
    """The part of `tritonclient.grpc.InferenceServerClient` used here (protobuf answers)."""

    def get_model_config(self, model_name: str, **kwargs: Any) -> Any: ...
    def get_model_repository_index(self, **kwargs: Any) -> Any: ...
    def get_inference_statistics(self, model_name: str = "", **kwargs: Any) -> Any: ...
    def is_server_ready(self, **kwargs: Any) -> Any: ...
    def is_model_ready(self, model_name: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ModelInfo:
    """One pipeline model as its config describes it.

    Args:
        name (`str`): Triton model name.
        schedulers (`tuple[str, ...]`): accepted scheduler names; empty when not advertised.
        limits (`Limits`, *optional*):
            Its request limits (`limit_*` parameters), read by the parser the server uses;
            a limit the config does not set (or sets to a non-number) keeps the server default.
    """

    name: str
    schedulers: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)

    @property
    def max_steps(self) -> int:
        """Most denoising steps per request."""
        return self.limits.max_steps

    @property
    def max_images(self) -> int:
        """Most images per request."""
        return self.limits.max_images

    @property
    def max_guidance_scale(self) -> float:
        """Largest classifier-free guidance scale."""
        return self.limits.max_guidance_scale

    @property
    def max_pixels(self) -> int:
        """Most pixels of an input image or a text-to-image output."""
        return self.limits.max_pixels


@dataclass(frozen=True)
class QueueState:
    """Load of one model: Triton's request counts plus, when published, the pipeline's queue.

    Args:
        model (`str`): model name.
        ready (`bool`): whether the server and the model are ready.
        succeeded (`int`): requests completed successfully since the server started.
        failed (`int`): requests that failed.
        avg_queue_ms (`float`, *optional*):
            Mean time a request waited in the pipeline's queue before starting;
            `None` when unknown (no metrics endpoint, or a server without the sdserve metrics).
        pending (`int`, *optional*):
            Requests waiting in the pipeline's queue to start; `None` when unknown.
    """

    model: str
    ready: bool
    succeeded: int = 0
    failed: int = 0
    avg_queue_ms: float | None = None
    pending: int | None = None


def config_parameters(config: Any) -> dict[str, str]:
    """`parameters` of a `ModelConfig` protobuf as plain {key: string value}."""
    return {key: param.string_value for key, param in config.parameters.items()}


def schedulers_of(config: Any) -> tuple[str, ...]:
    """Scheduler names from a pipeline `ModelConfig`'s `schedulers` parameter (may be empty)."""
    text = config_parameters(config).get(SCHEDULERS_PARAMETER, "")
    return tuple(name.strip() for name in text.split(",") if name.strip())


def model_info_from_config(config: Any) -> ModelInfo:
    """A `ModelInfo` from a pipeline `ModelConfig` protobuf; missing limits keep defaults."""
    limits = limits_from_parameters(config_parameters(config), strict=False)
    return ModelInfo(name=config.name, schedulers=schedulers_of(config), limits=limits)


def fetch_model_info(client: InfoClient, model: str, timeout: float | None = None) -> ModelInfo:
    """Reads a pipeline model's schedulers and limits from the server's model config."""
    response = _call(client.get_model_config, model, client_timeout=timeout)
    return model_info_from_config(response.config)


def fetch_schedulers(client: InfoClient, model: str, timeout: float | None = None) -> list[str]:
    """The scheduler names a pipeline model advertises (its `schedulers` config parameter)."""
    response = _call(client.get_model_config, model, client_timeout=timeout)
    return list(schedulers_of(response.config))


def pipeline_models(client: InfoClient, timeout: float | None = None) -> list[str]:
    """Names of the ready models that take a `prompt` input (the pipeline models, not parts)."""
    index = _call(client.get_model_repository_index, client_timeout=timeout)
    names = dict.fromkeys(m.name for m in index.models if m.state == "READY")
    found = []
    for name in names:
        config = _call(client.get_model_config, name, client_timeout=timeout).config
        if any(tensor.name == PROMPT for tensor in config.input):
            found.append(name)
    return found


def fetch_queue_state(
    client: InfoClient,
    model: str,
    metrics_url: str | None = None,
    timeout: float | None = None,
) -> QueueState:
    """The model's readiness and load; an unreachable server gives `ready=False`, no error.

    Args:
        client (`InfoClient`): a gRPC client of the server.
        model (`str`): the pipeline model.
        metrics_url (`str`, *optional*):
            Triton's Prometheus endpoint (`http://host:8002/metrics`), for the pipeline's
            pending count and mean queue wait; without it the state has neither.
        timeout (`float`, *optional*): per-call limit in seconds.
    """
    try:
        ready = bool(client.is_server_ready(client_timeout=timeout)) and bool(
            client.is_model_ready(model, client_timeout=timeout)
        )
        if not ready:
            return QueueState(model, ready=False)
        stats = client.get_inference_statistics(model, client_timeout=timeout)
    except InferenceServerException:
        return QueueState(model, ready=False)
    metrics = fetch_metrics(metrics_url, timeout) if metrics_url else None
    return queue_state_from_statistics(model, stats, metrics)


def queue_state_from_statistics(model: str, stats: Any, metrics: str | None = None) -> QueueState:
    """A `QueueState` from a `ModelStatisticsResponse` protobuf and Triton's metrics text.

    Request counts come from the statistics (all versions summed); the pending count and the
    mean queue wait from `metrics` (see `pipeline_queue_from_metrics`), `None` without it.
    """
    succeeded = failed = 0
    for entry in stats.model_stats:
        if entry.name != model:
            continue
        succeeded += entry.inference_stats.success.count
        failed += entry.inference_stats.fail.count
    pending, avg_queue_ms = (
        pipeline_queue_from_metrics(metrics, model) if metrics is not None else (None, None)
    )
    return QueueState(model, True, succeeded, failed, avg_queue_ms, pending)


def pipeline_queue_from_metrics(text: str, model: str) -> tuple[int | None, float | None]:
    """`(pending, mean queue wait in ms)` of a pipeline model from Triton's metrics text.

    Pending is the gauge `sdserve_queue_pending_requests`; the mean wait is the counter
    `sdserve_queue_duration_us` over the requests taken (`nv_inference_request_success`, all
    versions; see `SUCCESS_METRIC`). Either is `None` when its metrics are absent (an older
    server, whose requests waited in Triton's queue, or metrics turned off).
    """
    pending = metric_value(text, PENDING_METRIC, model)
    waited_us = metric_value(text, QUEUE_DURATION_METRIC, model)
    taken = metric_value(text, SUCCESS_METRIC, model)
    return (
        None if pending is None else round(pending),
        mean_queue_ms(waited_us, taken),
    )


def mean_queue_ms(waited_us: float | None, requests: float | None) -> float | None:
    """Cumulative queue microseconds per request counted, in ms; `None` when unknown.

    No request counted yet gives 0 if nothing waited either, else `None` (no denominator).
    """
    if waited_us is None or requests is None:
        return None
    if requests <= 0:
        return 0.0 if waited_us <= 0 else None
    return waited_us / requests / 1e3


def metric_value(text: str, name: str, model: str) -> float | None:
    """Sum of the samples of metric `name` labelled `model="<model>"`; `None` if there are none.

    Reads Prometheus text format; comments, other metrics and unparsable values are skipped.
    """
    total, seen = 0.0, False
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or match["name"] != name:
            continue
        labels = {m["key"]: m["value"] for m in _LABEL.finditer(match["labels"] or "")}
        if labels.get("model") != model:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if not math.isnan(value):
            total += value
            seen = True
    return total if seen else None


def fetch_metrics(metrics_url: str, timeout: float | None = None) -> str | None:
    """The text of Triton's metrics endpoint; `None` when unreadable."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout or 2.0) as response:
            text: str = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    return text


def _call(method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return method(*args, **kwargs)
    except InferenceServerException as exc:
        raise SdserveError.from_triton(exc) from None
