"""The UI's connection to one Triton server: SDK clients per model, server info, load."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import SdserveError
from ..sdk import InpaintClient
from .server_info import (
    InfoClient,
    ModelInfo,
    QueueState,
    fetch_model_info,
    fetch_queue_state,
    pipeline_models,
)


@dataclass(frozen=True)
class ServerStatus:
    """What the status line shows: the server's state and this UI's requests in flight.

    Args:
        url (`str`): the server's gRPC address.
        queue (`QueueState`): readiness and load of the selected model.
        in_flight (`int`): requests this UI has sent and not yet got back.
    """

    url: str
    queue: QueueState
    in_flight: int = 0

    def markdown(self) -> str:
        """One line of Markdown for the page."""
        q = self.queue
        if not q.ready:
            return f"**Server not ready** at `{self.url}` (model `{q.model}`): start it or wait."
        parts = [f"**Ready**: `{q.model}` at `{self.url}`"]
        if q.pending is not None:
            plural = "s" if q.pending != 1 else ""
            busy = f"**Busy: {q.pending} request{plural} waiting in the server queue**"
            parts.append(busy if q.pending else "idle")
        if self.in_flight:
            parts.append(f"{self.in_flight} from this page running")
        parts.append(f"{q.succeeded} done, {q.failed} failed")
        if q.avg_queue_ms is not None:
            parts.append(f"mean queue wait {q.avg_queue_ms:.0f} ms")
        return " · ".join(parts)


class Backend:
    """SDK clients of one server, made on first use and shared by the UI's threads.

    Args:
        url (`str`): Triton's gRPC `host:port`.
        timeout (`float`, *optional*): per-generation limit in seconds; `None` waits.
        metrics_url (`str`, *optional*):
            Triton's metrics endpoint, for the pipeline's pending count and mean queue wait.
        info_timeout (`float`, *optional*, defaults to 5.0): limit for the small info calls.
        client_factory (`Callable`, *optional*): `(url, model) -> client`; the SDK by default.
        info_client (`InfoClient`, *optional*): a tritonclient (or fake) for info calls.
    """

    def __init__(
        self,
        url: str,
        timeout: float | None = None,
        metrics_url: str | None = None,
        info_timeout: float = 5.0,
        client_factory: Callable[[str, str], Any] | None = None,
        info_client: InfoClient | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.metrics_url = metrics_url
        self.info_timeout = info_timeout
        self._factory = client_factory or self._sdk_client
        self._info = info_client
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._in_flight = 0

    def client(self, model: str) -> Any:
        """The generation client of `model` (an `InpaintClient` unless a factory was given)."""
        with self._lock:
            if model not in self._clients:
                self._clients[model] = self._factory(self.url, model)
            return self._clients[model]

    def models(self) -> list[str]:
        """The server's ready pipeline models."""
        return pipeline_models(self._info_client(), timeout=self.info_timeout)

    def model_info(self, model: str) -> ModelInfo:
        """Schedulers and limits of `model`."""
        return fetch_model_info(self._info_client(), model, timeout=self.info_timeout)

    def status(self, model: str) -> ServerStatus:
        """Readiness and load of `model`; never raises for an unreachable server."""
        try:
            client = self._info_client()
        except SdserveError:
            return ServerStatus(self.url, QueueState(model, ready=False), self.in_flight)
        queue = fetch_queue_state(client, model, self.metrics_url, timeout=self.info_timeout)
        return ServerStatus(self.url, queue, self.in_flight)

    @property
    def in_flight(self) -> int:
        """Requests sent by this UI and not yet answered."""
        with self._lock:
            return self._in_flight

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Counts one request in flight for the duration of the block."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def close(self) -> None:
        """Closes every client this backend opened."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            info, self._info = self._info, None
        for client in [*clients, info]:
            close = getattr(client, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    def _sdk_client(self, url: str, model: str) -> InpaintClient:
        return InpaintClient(url, model, timeout=self.timeout)

    def _info_client(self) -> InfoClient:
        with self._lock:
            if self._info is None:
                import tritonclient.grpc as grpcclient  # type: ignore[import-untyped]
                from tritonclient.utils import (  # type: ignore[import-untyped]
                    InferenceServerException,
                )

                try:
                    self._info = grpcclient.InferenceServerClient(self.url)
                except InferenceServerException as exc:
                    raise SdserveError.from_triton(exc) from None
            return self._info
