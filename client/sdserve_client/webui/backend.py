"""The UI's connection to a Triton server (or replicas of one): SDK clients per model,
server info, LoRA adapters, load."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from sdserve_protocol.auth import GRPC_ADMIN_KEY_HEADER

from ..errors import SdserveError
from ..replicas import FailoverPolicy, ReplicaPool, split_urls
from ..sdk import InpaintClient
from ..tls import SslOption, connect, explain, tls_settings
from .server_info import (
    AdapterListing,
    InfoClient,
    ModelInfo,
    QueueState,
    adapter_listing,
    fetch_model_info,
    fetch_queue_state,
    pipeline_models,
)


@dataclass(frozen=True)
class ServerStatus:
    """What the status line shows: the server's state and this UI's requests in flight.

    Args:
        url (`str`): the server's gRPC address (several comma-separated).
        queue (`QueueState`): readiness and load of the selected model.
        in_flight (`int`): requests this UI has sent and not yet got back.
        replicas (`tuple[int, int]`, *optional*):
            (ready, total) servers, when the page talks to more than one.
    """

    url: str
    queue: QueueState
    in_flight: int = 0
    replicas: tuple[int, int] | None = None

    def markdown(self, recent: dict[str, int] | None = None) -> str:
        """One line of Markdown for the page (`callbacks.status_markdown`)."""
        from .callbacks import status_markdown

        return status_markdown(self.url, self.queue, self.in_flight, recent, self.replicas)


class Backend:
    """SDK clients of one server (or of replicas serving the same repository), made on first
    use and shared by the UI's threads.

    Args:
        url (`str`): Triton's gRPC `host:port`; replicas comma-separated (requests spread
            over them and fail over; info calls go to a ready one).
        timeout (`float`, *optional*): per-generation limit in seconds; `None` waits.
        metrics_url (`str`, *optional*):
            Triton's metrics endpoint, for the pipeline's pending count and mean queue wait.
        info_timeout (`float`, *optional*, defaults to 5.0): limit for the small info calls.
        client_factory (`Callable`, *optional*): `(url, model) -> client`; the SDK by default.
        info_client (`InfoClient`, *optional*): a tritonclient (or fake) for info calls.
        ssl (`bool` or `TlsSettings`, *optional*, defaults to `False`): TLS, as the SDK's.
        retry_started (`bool`, *optional*, defaults to `False`):
            Resend a seeded request whose connection broke mid-way to another replica.
        admin_key (`str`, *optional*):
            The operator's key for Triton's control APIs (the model list and the request
            statistics use them); without it the page offers the model it was started with.
        model (`str`, *optional*, defaults to `"inpaint"`):
            The model the page starts with; the one a re-probed replica must have ready.
        failover (`FailoverPolicy`, *optional*): backoff and probe settings, as the SDK's.
    """

    def __init__(
        self,
        url: str,
        timeout: float | None = None,
        metrics_url: str | None = None,
        info_timeout: float = 5.0,
        client_factory: Callable[[str, str], Any] | None = None,
        info_client: InfoClient | None = None,
        *,
        ssl: SslOption = False,
        retry_started: bool = False,
        admin_key: str | None = None,
        model: str = "inpaint",
        failover: FailoverPolicy | None = None,
    ) -> None:
        self.urls = split_urls(url)
        self.url = ",".join(self.urls)
        self.timeout = timeout
        self.metrics_url = metrics_url
        self.info_timeout = info_timeout
        self.ssl = ssl
        self.retry_started = retry_started
        self.admin_key = admin_key
        self.model = model
        self.failover = failover
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
        """The server's ready pipeline models.

        The list comes from Triton's repository index, a control API: on a server that keeps
        it closed and without `admin_key`, the page offers the model it was started with.
        """
        try:
            return pipeline_models(self._info_client(), timeout=self.info_timeout)
        except SdserveError as exc:
            if self.admin_key or "restricted" not in exc.message:
                raise
        return [self.model]

    def model_info(self, model: str) -> ModelInfo:
        """Schedulers and limits of `model`."""
        return fetch_model_info(self._info_client(), model, timeout=self.info_timeout)

    def adapters(self, model: str) -> AdapterListing:
        """The LoRA adapters `model` serves, as the SDK lists them (re-read from the server's
        folder at each call); a model that lists none, or whose listing fails, gives an empty
        listing that says why."""
        try:
            entries = self.client(model).list_adapters(timeout=self.info_timeout)
        except SdserveError as exc:
            return AdapterListing(unavailable=exc.message)
        return adapter_listing(entries)

    def status(self, model: str) -> ServerStatus:
        """Readiness and load of `model`; never raises for an unreachable server."""
        try:
            client = self._info_client()
        except SdserveError:
            return ServerStatus(self.url, QueueState(model, ready=False), self.in_flight)
        queue = fetch_queue_state(client, model, self.metrics_url, timeout=self.info_timeout)
        return ServerStatus(self.url, queue, self.in_flight, self._replicas_ready(client, model))

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
        return InpaintClient(
            url,
            model,
            timeout=self.timeout,
            ssl=self.ssl,
            retry_started=self.retry_started,
            failover=self.failover,
            admin_key=self.admin_key,
        )

    def _info_client(self) -> InfoClient:
        with self._lock:
            if self._info is None:
                tls = tls_settings(self.ssl)
                pool = ReplicaPool(
                    [(url, connect(url, tls)) for url in self.urls],
                    self.model,
                    self.failover,
                    partial(explain, tls=tls),
                )
                self._info = PoolInfoClient(pool, self.admin_key)
            return self._info

    def _replicas_ready(self, client: InfoClient, model: str) -> tuple[int, int] | None:
        """(ready, total) replicas for the status line; `None` with one server."""
        if len(self.urls) == 1 or not isinstance(client, PoolInfoClient):
            return None
        return client.ready_count(model, self.info_timeout), len(self.urls)


class PoolInfoClient:
    """The `InfoClient` calls of the web UI on replicas: each call goes to a healthy one and
    fails over (they are all idempotent); the operator's key, if any, goes with every call.

    Args:
        pool (`ReplicaPool`): the servers.
        admin_key (`str`, *optional*): sent as the `sdserve-admin-key` header.
    """

    def __init__(self, pool: ReplicaPool, admin_key: str | None = None) -> None:
        self.pool = pool
        self._headers = {GRPC_ADMIN_KEY_HEADER: admin_key} if admin_key else None

    def get_model_config(self, model_name: str, **kwargs: Any) -> Any:
        return self.pool.call(
            lambda c: c.get_model_config(model_name, headers=self._headers, **kwargs)
        )

    def get_model_repository_index(self, **kwargs: Any) -> Any:
        return self.pool.call(
            lambda c: c.get_model_repository_index(headers=self._headers, **kwargs)
        )

    def get_inference_statistics(self, model_name: str = "", **kwargs: Any) -> Any:
        return self.pool.call(
            lambda c: c.get_inference_statistics(model_name, headers=self._headers, **kwargs)
        )

    def is_server_ready(self, **kwargs: Any) -> Any:
        return self.pool.call(lambda c: c.is_server_ready(headers=self._headers, **kwargs))

    def is_model_ready(self, model_name: str, **kwargs: Any) -> Any:
        return self.pool.call(
            lambda c: c.is_model_ready(model_name, headers=self._headers, **kwargs)
        )

    def ready_count(self, model: str, timeout: float | None = None) -> int:
        """How many replicas have the server and `model` ready (probes each)."""
        return sum(self._ready(replica.client, model, timeout) for replica in self.pool.replicas())

    def close(self) -> None:
        self.pool.close()

    @staticmethod
    def _ready(client: Any, model: str, timeout: float | None) -> bool:
        from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

        try:
            return bool(client.is_server_ready(client_timeout=timeout)) and bool(
                client.is_model_ready(model, client_timeout=timeout)
            )
        except InferenceServerException:
            return False
