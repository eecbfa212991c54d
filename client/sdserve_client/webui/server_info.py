"""What the web UI asks a Triton server: pipeline models, their schedulers and limits, their
LoRA adapters, load.

Plain functions over a `tritonclient.grpc.InferenceServerClient` (or a fake with the same
methods), so the UI works against any deployment and tests need no server. Every tritonclient
exception becomes the SDK's `SdserveError`. Readiness, model config and the metrics
endpoint are open; the repository index (the model list) needs the operator's key, which the
caller's client sends (the web UI falls back to its `--model` without it).

The load comes from the custom metrics the pipeline model publishes on Triton's metrics
endpoint (the names below): requests by outcome, queue length and wait, outstanding
denoising steps, memory reserved. Triton's own statistics are no use for this model (its
batcher holds the queue and answers after `execute` returned, so Triton counts every request
taken as a success) and need the operator's key; a server without the sdserve metrics gives
no load figures rather than misleading ones.
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from sdserve_protocol.metrics import (
    MEMORY_BUDGET_METRIC,
    MEMORY_RESERVED_METRIC,
    OUTCOMES,
    OUTSTANDING_STEPS_METRIC,
    PENDING_METRIC,
    QUEUE_DURATION_METRIC,
    QUEUE_WAIT_METRIC,
    REQUESTS_METRIC,
    SUCCESS_METRIC,
)
from sdserve_protocol.rules import Limits
from sdserve_protocol.settings import PipelineSettings, config_parameters, is_pipeline

from ..errors import SdserveError

T = TypeVar("T")

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
    def is_server_ready(self, **kwargs: Any) -> Any: ...
    def is_model_ready(self, model_name: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ModelInfo:
    """One pipeline model as its config describes it.

    Args:
        name (`str`): Triton model name.
        schedulers (`tuple[str, ...]`): accepted scheduler names (`PipelineSettings.schedulers`).
        limits (`Limits`, *optional*):
            Its request limits (`limit_*` parameters), read by `PipelineSettings` as the server
            reads them; a limit the config does not set (or sets to a non-number) keeps the
            default.
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
    def max_clip_skip(self) -> int:
        """Most text-encoder layers a request may skip (`clip_skip`)."""
        return self.limits.max_clip_skip

    @property
    def max_pixels(self) -> int:
        """Most pixels of an input image or a text-to-image output."""
        return self.limits.max_pixels

    @property
    def max_adapters(self) -> int:
        """Most LoRA adapters one request may name (`adapters`)."""
        return self.limits.max_adapters


@dataclass(frozen=True)
class AdapterInfo:
    """One usable LoRA adapter of a pipeline, as its listing model describes it.

    Args:
        name (`str`): what a request names it by (its file's stem).
        architecture (`str`, *optional*): the model family it is for (`sd15`, `sdxl`).
        rank (`int`, *optional*): its largest rank (0: not said).
        targets (`dict[str, int]`, *optional*): modules changed per component.
    """

    name: str
    architecture: str = ""
    rank: int = 0
    targets: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name with what it changes, for a dropdown: `style (rank 4; unet, text_encoder)`."""
        details = [f"rank {self.rank}"] if self.rank else []
        if self.targets:
            details.append(", ".join(self.targets))
        return f"{self.name} ({'; '.join(details)})" if details else self.name


@dataclass(frozen=True)
class AdapterListing:
    """The LoRA adapters a pipeline serves (`InpaintClient.list_adapters`), re-read from its
    folder at each listing.

    Args:
        usable (`tuple[AdapterInfo, ...]`): the adapters a request may name, as listed.
        refused (`tuple[tuple[str, str], ...]`): (name, why) of each file the server refuses.
        unavailable (`str`, *optional*): why the model lists no adapters at all (the listing
            call's error, e.g. a model without a listing model); `""` when it answered.
    """

    usable: tuple[AdapterInfo, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    unavailable: str = ""

    @property
    def names(self) -> list[str]:
        """The usable adapters' names."""
        return [adapter.name for adapter in self.usable]


def adapter_listing(entries: list[dict[str, Any]]) -> AdapterListing:
    """An `AdapterListing` from the listing model's entries (`sdserve_protocol.adapters`): an
    entry with an `error` is refused, every other one usable."""
    usable, refused = [], []
    for entry in entries:
        name = str(entry.get("name", ""))
        if "error" in entry:
            refused.append((name, str(entry["error"])))
            continue
        targets = entry.get("targets") or {}
        usable.append(AdapterInfo(
            name, str(entry.get("architecture", "")), int(entry.get("rank") or 0),
            {str(component): int(count) for component, count in targets.items()},
        ))  # fmt: skip
    return AdapterListing(tuple(usable), tuple(refused))


@dataclass(frozen=True)
class QueueState:
    """Readiness and load of one model, from the pipeline's metrics when the server has them.

    Args:
        model (`str`): model name.
        ready (`bool`): whether the server and the model are ready.
        succeeded (`int`): requests answered with images since the server started (0 unknown).
        failed (`int`): requests answered otherwise (0 unknown).
        avg_queue_ms (`float`, *optional*):
            Mean time a request waited in the pipeline's queue before starting;
            `None` when unknown (no metrics endpoint, or a server without the sdserve metrics).
        pending (`int`, *optional*):
            Requests waiting in the pipeline's queue to start; `None` when unknown.
        outcomes (`dict[str, int]`, *optional*):
            Requests answered since the server started, by outcome (`OUTCOMES`); `None` when
            unknown.
        outstanding_steps (`int`, *optional*):
            Denoising steps left over the queued and running requests; `None` when unknown.
        memory_reserved (`int`, *optional*): estimated bytes held by those; `None` when unknown.
        memory_budget (`int`, *optional*): their memory budget in bytes (0: none).
    """

    model: str
    ready: bool
    succeeded: int = 0
    failed: int = 0
    avg_queue_ms: float | None = None
    pending: int | None = None
    outcomes: dict[str, int] | None = None
    outstanding_steps: int | None = None
    memory_reserved: int | None = None
    memory_budget: int | None = None


def model_info_from_config(config: Any) -> ModelInfo:
    """A `ModelInfo` from a pipeline `ModelConfig` protobuf, read by `PipelineSettings` as
    the server reads it; a parameter absent (or not valid) keeps its default."""
    settings = PipelineSettings.from_parameters(config_parameters(config), strict=False)
    return ModelInfo(name=config.name, schedulers=settings.schedulers, limits=settings.limits)


def fetch_model_info(client: InfoClient, model: str, timeout: float | None = None) -> ModelInfo:
    """Reads a pipeline model's schedulers and limits from the server's model config."""
    response = _call(client.get_model_config, model, client_timeout=timeout)
    return model_info_from_config(response.config)


def pipeline_models(client: InfoClient, timeout: float | None = None) -> list[str]:
    """Names of the ready pipeline models (`is_pipeline`), not their component models."""
    index = _call(client.get_model_repository_index, client_timeout=timeout)
    names = dict.fromkeys(m.name for m in index.models if m.state == "READY")
    found = []
    for name in names:
        config = _call(client.get_model_config, name, client_timeout=timeout).config
        if is_pipeline(config_parameters(config)):
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
            load (see `queue_state_from_metrics`); without it the state has readiness only.
        timeout (`float`, *optional*): per-call limit in seconds.
    """
    try:
        ready = bool(client.is_server_ready(client_timeout=timeout)) and bool(
            client.is_model_ready(model, client_timeout=timeout)
        )
    except InferenceServerException:
        ready = False
    if not ready:
        return QueueState(model, ready=False)
    metrics = fetch_metrics(metrics_url, timeout) if metrics_url else None
    return queue_state_from_metrics(model, metrics or "")


def queue_state_from_metrics(model: str, text: str) -> QueueState:
    """A ready model's `QueueState` from Triton's metrics text (empty: nothing known).

    Outcomes from `sdserve_requests_total` (`succeeded` is the successes, `failed` the rest);
    the pending count, outstanding steps and memory from their gauges; the mean queue wait
    from the `sdserve_queue_wait_us` histogram, or on older servers from
    `pipeline_queue_from_metrics`. A figure whose metric is absent is `None`.
    """
    outcomes = outcome_counts(text, model)
    pending, avg_queue_ms = pipeline_queue_from_metrics(text, model)
    waited = metric_value(text, QUEUE_WAIT_METRIC + "_sum", model)
    waits = metric_value(text, QUEUE_WAIT_METRIC + "_count", model)
    if waited is not None and waits is not None:
        avg_queue_ms = mean_queue_ms(waited, waits)
    return QueueState(
        model,
        True,
        succeeded=(outcomes or {}).get("success", 0),
        failed=sum(n for outcome, n in (outcomes or {}).items() if outcome != "success"),
        avg_queue_ms=avg_queue_ms,
        pending=pending,
        outcomes=outcomes,
        outstanding_steps=_rounded(metric_value(text, OUTSTANDING_STEPS_METRIC, model)),
        memory_reserved=_rounded(metric_value(text, MEMORY_RESERVED_METRIC, model)),
        memory_budget=_rounded(metric_value(text, MEMORY_BUDGET_METRIC, model)),
    )


def outcome_counts(text: str, model: str) -> dict[str, int] | None:
    """Requests answered by outcome (`sdserve_requests_total`), every `OUTCOMES` key present;
    `None` when the server publishes no such counter."""
    counts = {o: metric_value(text, REQUESTS_METRIC, model, outcome=o) for o in OUTCOMES}
    if all(n is None for n in counts.values()):
        return None
    return {outcome: round(n or 0) for outcome, n in counts.items()}


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
    return _rounded(pending), mean_queue_ms(waited_us, taken)


def _rounded(value: float | None) -> int | None:
    return None if value is None else round(value)


def mean_queue_ms(waited_us: float | None, requests: float | None) -> float | None:
    """Cumulative queue microseconds per request counted, in ms; `None` when unknown.

    No request counted yet gives 0 if nothing waited either, else `None` (no denominator).
    """
    if waited_us is None or requests is None:
        return None
    if requests <= 0:
        return 0.0 if waited_us <= 0 else None
    return waited_us / requests / 1e3


def metric_value(text: str, name: str, model: str, **labels: str) -> float | None:
    """Sum of the samples of metric `name` labelled `model="<model>"` (and every other label
    given, e.g. `outcome="failed"`); `None` if there are none.

    Reads Prometheus text format; comments, other metrics and unparsable values are skipped.
    """
    wanted = {"model": model, **labels}
    total, seen = 0.0, False
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or match["name"] != name:
            continue
        found = {m["key"]: m["value"] for m in _LABEL.finditer(match["labels"] or "")}
        if any(found.get(key) != value for key, value in wanted.items()):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if not math.isnan(value):
            total += value
            seen = True
    return total if seen else None


class RecentOutcomes:
    """Requests answered by outcome over the last `window_s` seconds, from successive samples of
    the cumulative counts (the status line polls them).

    Args:
        window_s (`float`, *optional*, defaults to 300): how far back "recent" reaches.
    """

    def __init__(self, window_s: float = 300.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def update(self, counts: dict[str, int] | None, now: float | None = None) -> dict[str, int]:
        """Adds a sample; returns the counts added since the oldest sample in the window (all
        zero on the first). A counter that went down (server restarted) starts over."""
        if counts is None:
            return {}
        now = time.monotonic() if now is None else now
        if self._samples and any(counts[k] < self._samples[-1][1].get(k, 0) for k in counts):
            self._samples.clear()  # a new server: its counters restarted from zero
        self._samples.append((now, dict(counts)))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        oldest = self._samples[0][1]
        return {key: value - oldest.get(key, 0) for key, value in counts.items()}


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
