"""What the web UI asks a Triton server: pipeline models, their schedulers and limits, queue state.

Plain functions over a `tritonclient.grpc.InferenceServerClient` (or a fake with the same
methods), so the UI works against any deployment and tests need no server. Every tritonclient
exception becomes the SDK's `SdserveError`.
"""

from __future__ import annotations

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

# Prometheus line of Triton's metrics endpoint, e.g.
# nv_inference_pending_request_count{model="inpaint",version="1"} 2
_PENDING_LINE = re.compile(
    r"^nv_inference_pending_request_count\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)\s*$"
)


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
    """Load of one model: Triton's cumulative statistics plus, optionally, pending requests.

    Args:
        model (`str`): model name.
        ready (`bool`): whether the server and the model are ready.
        succeeded (`int`): requests completed successfully since the server started.
        failed (`int`): requests that failed.
        avg_queue_ms (`float`): mean time a request waited in Triton's queue.
        pending (`int`, *optional*): requests queued or running now (metrics endpoint).
    """

    model: str
    ready: bool
    succeeded: int = 0
    failed: int = 0
    avg_queue_ms: float = 0.0
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
            Triton's Prometheus endpoint (`http://host:8002/metrics`) for the pending count.
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
    pending = fetch_pending(metrics_url, model, timeout) if metrics_url else None
    return queue_state_from_statistics(model, stats, pending)


def queue_state_from_statistics(model: str, stats: Any, pending: int | None = None) -> QueueState:
    """A `QueueState` from a `ModelStatisticsResponse` protobuf (all versions summed)."""
    succeeded = failed = queue_count = queue_ns = 0
    for entry in stats.model_stats:
        if entry.name != model:
            continue
        succeeded += entry.inference_stats.success.count
        failed += entry.inference_stats.fail.count
        queue_count += entry.inference_stats.queue.count
        queue_ns += entry.inference_stats.queue.ns
    avg_queue_ms = queue_ns / queue_count / 1e6 if queue_count else 0.0
    return QueueState(model, True, succeeded, failed, avg_queue_ms, pending)


def pending_from_metrics(text: str, model: str) -> int | None:
    """Sums `nv_inference_pending_request_count` of `model` in Prometheus text; `None` if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        match = _PENDING_LINE.match(line.strip())
        if match and f'model="{model}"' in match["labels"]:
            total += float(match["value"])
            seen = True
    return int(total) if seen else None


def fetch_pending(metrics_url: str, model: str, timeout: float | None = None) -> int | None:
    """Pending requests of `model` from Triton's metrics endpoint; `None` when unreadable."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout or 2.0) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    return pending_from_metrics(text, model)


def _call(method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return method(*args, **kwargs)
    except InferenceServerException as exc:
        raise SdserveError.from_triton(exc) from None
