"""`InpaintClient`: the gRPC client of the sdserve pipeline model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient  # type: ignore[import-untyped]
from PIL import Image
from tritonclient.utils import (  # type: ignore[import-untyped]
    InferenceServerException,
    np_to_triton_dtype,
)

from sdserve_protocol.adapters import LIST_OUTPUT, LIST_QUERY, adapters_model_name
from sdserve_protocol.auth import GRPC_ADMIN_KEY_HEADER
from sdserve_protocol.checkpoints import CHECKPOINTS_MODEL
from sdserve_protocol.checkpoints import LIST_OUTPUT as CHECKPOINTS_OUTPUT
from sdserve_protocol.checkpoints import LIST_QUERY as CHECKPOINTS_QUERY
from sdserve_protocol.contract import IMAGES, OUTPUTS, SEEDS
from sdserve_protocol.events import Preview, Progress, Queued, stream_model_name
from sdserve_protocol.settings import PipelineSettings, config_parameters

from .errors import InvalidRequestError, SdserveError
from .images import ImageLike, MaskLike
from .replicas import (
    FailoverPolicy,
    Outcome,
    Replica,
    ReplicaError,
    ReplicaPool,
    ReplicaState,
    combine,
    split_urls,
)
from .request import GenerationRequest, add_batch_dim, check_tensors, encode_request
from .streaming import StreamConnections, StreamedGeneration
from .tls import SslOption, TlsSettings, connect, explain, tls_settings

if TYPE_CHECKING:
    from typing_extensions import Self

P = ParamSpec("P")
EventCallback = Callable[[Queued | Progress | Preview], None]
T = TypeVar("T")
Array = npt.NDArray[Any]


class TritonClient(Protocol):
    """The part of `tritonclient.grpc.InferenceServerClient` the SDK uses (inject a fake)."""

    def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> Any: ...
    def async_infer(
        self, model_name: str, inputs: list[Any], callback: Any, **kwargs: Any
    ) -> Any: ...
    def get_model_config(self, model_name: str, **kwargs: Any) -> Any: ...
    def get_model_repository_index(self, **kwargs: Any) -> Any: ...
    def is_server_ready(self, **kwargs: Any) -> Any: ...
    def is_model_ready(self, model_name: str, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """Images returned by the pipeline model.

    Args:
        images (`list[PIL.Image.Image]`): the generated RGB images.
        seeds (`list[int]`): the seed behind each image.
        arrays (`np.ndarray`): the raw uint8 output of shape (N, H, W, 3).
    """

    images: list[Image.Image]
    seeds: list[int]
    arrays: npt.NDArray[np.uint8]

    @classmethod
    def from_outputs(
        cls, images: Array | None, seeds: Array | None, batched: bool = False
    ) -> GenerationResult:
        """Builds a result from the `images` and `seeds` output arrays, checking their shapes.

        Args:
            images (`np.ndarray`): uint8 (N, H, W, 3), or (1, N, H, W, 3) when `batched`.
            seeds (`np.ndarray`): int64 (N,), or (1, N) when `batched`.
            batched (`bool`, *optional*, defaults to `False`): strip a leading batch dimension.
        """
        images = _unbatch(IMAGES.name, images, batched)  # (N, H, W, 3)
        seeds = _unbatch(SEEDS.name, seeds, batched)  # (N,)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise SdserveError(
                f"expected {IMAGES.name!r} as uint8 (N, H, W, 3), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if seeds.shape != images.shape[:1]:
            raise SdserveError(
                f"got {len(images)} images but {SEEDS.name!r} of shape {tuple(seeds.shape)}"
            )
        pil_images = [Image.fromarray(array) for array in images]
        return cls(images=pil_images, seeds=[int(seed) for seed in seeds], arrays=images)


class InpaintClient:
    """Client of the sdserve pipeline model on one or several Triton servers, over gRPC.

    With several servers (replicas serving the same repository), each request goes to the
    healthy one with the fewest requests in flight from this client and moves to another
    when a server cannot take it (unreachable, queue full, model not loaded). A request the
    connection broke off mid-way may already have been generating, so it is sent again only
    when the caller allows it (`retry_started`) and it is deterministic (a `seed` given: the
    retry returns the same images). A failed server is left out for a backoff period and
    probed (server and model ready) before it is used again; see `sdserve_client.replicas`.

    Args:
        url (`str` or `Sequence[str]`, *optional*, defaults to `"127.0.0.1:8001"`):
            Triton's gRPC `host:port`; several as a sequence or comma-separated.
        model (`str`, *optional*, defaults to `"inpaint"`): name of the pipeline model.
        timeout (`float`, *optional*):
            Default per-call limit in seconds (tritonclient's `client_timeout`), retries on
            other replicas included; `None` waits.
        ssl (`bool` or `TlsSettings`, *optional*, defaults to `False`):
            TLS: `True` trusts gRPC's public root certificates; `TlsSettings` names the CA
            file and, for mutual TLS, the client key and certificate.
        retry_started (`bool`, *optional*, defaults to `False`):
            Also resend a request with a seed whose connection broke after it was sent (it
            may have started generating) to another replica.
        failover (`FailoverPolicy`, *optional*): backoff and probe settings for failed servers.
        admin_key (`str`, *optional*):
            The operator's key for Triton's restricted control APIs (sent as the
            `triton-grpc-protocol-sdserve-admin-key` header); only `list_models` needs it.
        client (`TritonClient`, *optional*):
            A ready `tritonclient.grpc.InferenceServerClient` (or a fake for tests) of the one
            server; `url` then only names it.
        connect (`Callable[[str], TritonClient]`, *optional*):
            Makes the client of each address (tests inject fakes); TLS from `ssl` otherwise.
    """

    def __init__(
        self,
        url: str | Sequence[str] = "127.0.0.1:8001",
        model: str = "inpaint",
        timeout: float | None = None,
        *,
        ssl: SslOption = False,
        retry_started: bool = False,
        failover: FailoverPolicy | None = None,
        admin_key: str | None = None,
        client: TritonClient | None = None,
        connect: Callable[[str], TritonClient] | None = None,
    ) -> None:
        try:
            self.urls = split_urls(url)
        except ValueError as exc:
            raise SdserveError(str(exc)) from None
        self.url = ",".join(self.urls)
        self.model = model
        self.timeout = timeout
        self.tls = tls_settings(ssl)
        self.retry_started = retry_started
        self.admin_key = admin_key
        if client is not None and len(self.urls) > 1:
            raise SdserveError("client= stands for one server; use connect= for several")
        make = connect or partial(_connect, tls=self.tls)
        clients: list[tuple[str, TritonClient]] = []
        try:
            for address in self.urls:
                clients.append((address, client if client is not None else make(address)))
        except BaseException:
            for _, made in clients:
                made.close()
            raise
        self._pool = ReplicaPool(clients, model, failover, partial(explain, tls=self.tls))
        self._connect = make
        self._streams = StreamConnections(make)
        self._batched: bool | None = None
        self._settings: PipelineSettings | None = None  # the model's, read with its config

    @property
    def replicas(self) -> list[ReplicaState]:
        """Each server's health and the requests of this client in flight there."""
        return self._pool.states()

    def inpaint(
        self,
        image: ImageLike,
        mask: MaskLike,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Regenerates the masked part of an image.

        Args:
            image (`PIL.Image.Image` or `np.ndarray`): the image, any PIL mode or uint8 (H, W, 3).
            mask (`PIL.Image.Image` or `np.ndarray`): same size; white (255) is regenerated.
            prompt (`str`): the text to guide generation.
            timeout (`float`, *optional*): limit in seconds for this call.
            on_event (`Callable`, *optional*): told the request's progress (see `generate`).
            **options: any other `GenerationRequest` field (`steps`, `seed`, ...).
        """
        request = GenerationRequest(prompt, image=image, mask=mask, **options)
        return self.generate(request, timeout=timeout, on_event=on_event)

    def text_to_image(
        self,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Generates images from text alone.

        Args:
            prompt (`str`): the text to guide generation.
            height (`int`, *optional*): image height in pixels (server default).
            width (`int`, *optional*): image width in pixels (server default).
            timeout (`float`, *optional*): limit in seconds for this call.
            on_event (`Callable`, *optional*): told the request's progress (see `generate`).
            **options: any other `GenerationRequest` field.
        """
        request = GenerationRequest(prompt, height=height, width=width, **options)
        return self.generate(request, timeout=timeout, on_event=on_event)

    def img2img(
        self,
        image: ImageLike,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Redraws a whole image guided by text: `strength` (server default 0.8, diffusers'
        img2img default) is how much of it to destroy first.

        A 4-channel checkpoint runs `StableDiffusionImg2ImgPipeline`'s algorithm; a 9-channel
        inpainting checkpoint inpaints the image under a full mask.

        Args:
            image (`PIL.Image.Image` or `np.ndarray`): the image, any PIL mode or uint8 (H, W, 3).
            prompt (`str`): the text to guide generation.
            timeout (`float`, *optional*): limit in seconds for this call.
            on_event (`Callable`, *optional*): told the request's progress (see `generate`).
            **options: any other `GenerationRequest` field (`strength`, `steps`, `seed`, ...).
        """
        request = GenerationRequest(prompt, image=image, **options)
        return self.generate(request, timeout=timeout, on_event=on_event)

    def outpaint(
        self,
        image: ImageLike,
        prompt: str,
        left: int = 0,
        top: int = 0,
        right: int = 0,
        bottom: int = 0,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Extends an image by the given number of pixels on each side.

        Args:
            image (`PIL.Image.Image` or `np.ndarray`): the image, any PIL mode or uint8 (H, W, 3).
            prompt (`str`): the text to guide generation.
            left, top, right, bottom (`int`, *optional*, default to 0): pixels to add.
            timeout (`float`, *optional*): limit in seconds for this call.
            on_event (`Callable`, *optional*): told the request's progress (see `generate`).
            **options: any other `GenerationRequest` field.
        """
        sides = (left, top, right, bottom)
        if sides == (0, 0, 0, 0):
            raise InvalidRequestError("outpaint needs left, top, right or bottom > 0, got all 0")
        request = GenerationRequest(prompt, image=image, outpaint=sides, **options)
        return self.generate(request, timeout=timeout, on_event=on_event)

    def generate(
        self,
        request: GenerationRequest,
        *,
        timeout: float | None = None,
        retry_started: bool | None = None,
        on_event: EventCallback | None = None,
    ) -> GenerationResult:
        """Sends one request to the pipeline model (to another replica when one cannot take it).

        Args:
            request (`GenerationRequest`): the request; checked before anything is sent.
            timeout (`float`, *optional*): limit in seconds for this call, retries included.
            retry_started (`bool`, *optional*): this call's `retry_started` (the client's).
            on_event (`Callable`, *optional*): stream the request instead (`stream`) and tell
                this its `Queued`, `Progress` and `Preview` events; same images. A server
                without the stream model (a repository exported before it existed) gets the
                plain call, and `on_event` hears nothing.
        """
        if on_event is not None:
            try:
                return self.stream(request, timeout=timeout).result(on_event)
            except SdserveError as exc:
                if stream_model_name(self.model) not in exc.message or "unknown model" not in (
                    exc.message
                ):
                    raise
        inputs, outputs, batched = self._prepare(request, timeout)
        attempts = self._attempts(request, timeout, retry_started)
        while (replica := attempts.next()) is not None:
            try:
                result = replica.client.infer(
                    self.model, inputs, outputs=outputs, client_timeout=attempts.remaining()
                )
            except InferenceServerException as error:
                attempts.failed(replica, error)
                continue
            self._pool.release(replica)
            return _result(result, batched)
        raise attempts.give_up()

    def submit(
        self,
        request: GenerationRequest,
        *,
        timeout: float | None = None,
        retry_started: bool | None = None,
        on_event: EventCallback | None = None,
    ) -> PendingGeneration:
        """Sends one request without waiting; the handle can be awaited or cancelled.

        Cancelling stops the server's denoising loop at its next step. A request a replica
        cannot take moves to another as in `generate`.

        Args:
            request (`GenerationRequest`): the request; checked before anything is sent.
            timeout (`float`, *optional*): deadline in seconds for this call, retries included.
            retry_started (`bool`, *optional*): this call's `retry_started` (the client's).
            on_event (`Callable`, *optional*): stream the request (`stream`, one server, no
                retries) and tell this its events, from a thread of the handle's own.
        """
        if on_event is not None:
            stream = self.stream(request, timeout=timeout)
            future: Future[GenerationResult] = Future()

            def consume() -> None:
                try:
                    future.set_result(stream.result(on_event))
                except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                    future.set_exception(exc)

            threading.Thread(target=consume, name="sdserve-stream", daemon=True).start()
            return PendingGeneration(future, stream)
        inputs, outputs, batched = self._prepare(request, timeout)
        submission = _Submission(
            self, self._attempts(request, timeout, retry_started), inputs, outputs, batched
        )
        submission.send()
        return PendingGeneration(submission.future, submission)

    def stream(
        self, request: GenerationRequest, *, timeout: float | None = None
    ) -> StreamedGeneration:
        """Sends one request to the pipeline's stream model and returns its events as they
        come: `Queued` (its queue position), `Progress` after each denoising step, `Preview`
        every `request.preview_every` steps (`sdserve_protocol.events`), then the
        `GenerationResult` (equal to `generate`'s for the same request)::

            for event in client.stream(request):
                ...

        `async for` works too. Leaving the loop early or calling `cancel()` cancels the
        request on the server. A stream goes to one server (no failover once it started).

        Args:
            request (`GenerationRequest`): the request; checked before anything is sent.
            timeout (`float`, *optional*): limit in seconds for the whole stream.
        """
        inputs, _, batched = self._prepare(request, timeout)
        replica = self._attempts(request, timeout, False).next()
        if replica is None:
            raise SdserveError(f"no healthy server among {self.url}")
        self._pool.release(replica)
        return StreamedGeneration(
            _call(self._streams.take, replica.url), stream_model_name(self.model), inputs,
            batched, partial(GenerationResult.from_outputs, batched=False),
            self._timeout(timeout), partial(self._streams.give_back, replica.url),
        )  # fmt: skip

    def _attempts(
        self, request: GenerationRequest, timeout: float | None, retry_started: bool | None
    ) -> _Attempts:
        allowed = self.retry_started if retry_started is None else retry_started
        return _Attempts(self._pool, self._timeout(timeout), allowed and request.seed is not None)

    def _prepare(
        self, request: GenerationRequest, timeout: float | None
    ) -> tuple[list[Any], list[Any], bool]:
        tensors = encode_request(request)  # the rules every model shares, before any call
        batched = self._is_batched(timeout)
        # and this model's own limits and schedulers
        settings = self._settings or PipelineSettings()
        check_tensors(tensors, settings.limits, settings.schedulers)
        if batched:
            tensors = add_batch_dim(tensors)
        inputs = _call(infer_inputs, tensors)
        outputs = [grpcclient.InferRequestedOutput(name) for name in (t.name for t in OUTPUTS)]
        return inputs, outputs, batched

    def list_adapters(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The LoRA adapters the pipeline model serves, as its `<model>_adapters` model lists
        them: `name`, `architecture`, `rank`, `targets` (component → modules) each, or `name`
        and `error` for a file the server refuses (`sdserve_protocol.adapters`)."""
        query = grpcclient.InferInput(LIST_QUERY, [1, 1], "BYTES")
        query.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
        result = self._on_replica(
            lambda c: c.infer(
                adapters_model_name(self.model), [query],
                client_timeout=self._timeout(timeout),
            )
        )  # fmt: skip
        listing: list[dict[str, Any]] = json.loads(result.as_numpy(LIST_OUTPUT).reshape(-1)[0])
        return listing

    def list_checkpoints(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's checkpoints, as its `checkpoints` model lists them
        (`sdserve_protocol.checkpoints`): `budget_mb`, and per pipeline model `name`,
        `architecture`, `on_demand`, `state` (`loaded`, `loading`, `unloading`, `on disk`),
        `requests`, `size_mb` and its `components` (`size_mb`, `rss_mb`, LoRA `variants`).
        Open without the admin key.

        Raises:
            SdserveError: the server has no checkpoint listing (a repository exported before
                it), or the call failed.
        """
        query = grpcclient.InferInput(CHECKPOINTS_QUERY, [1, 1], "BYTES")
        query.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
        result = self._on_replica(
            lambda c: c.infer(
                CHECKPOINTS_MODEL, [query], client_timeout=self._timeout(timeout)
            )
        )  # fmt: skip
        text = result.as_numpy(CHECKPOINTS_OUTPUT)
        if text is None:
            raise SdserveError(f"{self.url}: {CHECKPOINTS_MODEL} gave no {CHECKPOINTS_OUTPUT}")
        listing: dict[str, Any] = json.loads(text.reshape(-1)[0])
        return listing

    def list_models(self, *, timeout: float | None = None) -> list[str]:
        """Returns the names of the ready models in the server's repository index.

        The index is one of Triton's control APIs, which an sdserve server keeps closed
        without the operator's key (`admin_key`); without it this raises `SdserveError`
        saying so. Generating needs no key.
        """
        headers = {GRPC_ADMIN_KEY_HEADER: self.admin_key} if self.admin_key else None
        try:
            index = self._on_replica(
                lambda c: c.get_model_repository_index(
                    headers=headers, as_json=True, client_timeout=self._timeout(timeout)
                )
            )
        except SdserveError as exc:
            if "restricted" not in exc.message:
                raise
            raise SdserveError(
                f"{self.url} keeps its model-repository API closed without the operator's key "
                f"({exc.message}); pass admin_key (the CLI's --admin-key-file or "
                f"{ADMIN_KEY_ENV}) to list models, or name the model directly",
                exc.status,
            ) from None
        names = [m["name"] for m in index.get("models", []) if m.get("state") == "READY"]
        return list(dict.fromkeys(names))

    def is_ready(self, *, timeout: float | None = None) -> bool:
        """Whether a server (any replica) and the pipeline model are ready; `False` when none
        is reachable. Probes every replica (each call limited by `timeout`, else the client's,
        else the failover policy's `probe_timeout_s`) and updates its health."""
        timeout = self._timeout(timeout)
        ready = [self._pool.probe(replica, timeout) for replica in self._pool.replicas()]
        return any(ready)

    def close(self) -> None:
        """Closes the underlying gRPC channels."""
        self._pool.close()
        self._streams.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    def _is_batched(self, timeout: float | None) -> bool:
        """Whether the model's first dimension is a batch dimension; its config, with its
        parameters (limits, schedulers), is fetched once."""
        if self._batched is None:
            response = self._on_replica(
                lambda c: c.get_model_config(
                    self.model, as_json=True, client_timeout=self._timeout(timeout)
                )
            )
            config = response.get("config", response)
            self._batched = int(config.get("max_batch_size", 0)) > 0
            self._settings = PipelineSettings.from_parameters(
                config_parameters(config), strict=False
            )
        return self._batched

    def _on_replica(self, method: Callable[[Any], T]) -> T:
        """An idempotent call on a replica (failing over), errors as `SdserveError`."""
        return _call(self._pool.call, method)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


ADMIN_KEY_ENV = "SDSERVE_ADMIN_KEY"
"""Environment variable the CLI and the web UI read the operator's key from (as the server)."""
ADMIN_KEY_FILE_ENV = "SDSERVE_ADMIN_KEY_FILE"
"""Environment variable naming a file that holds the operator's key (as the server's)."""


def _connect(url: str, tls: TlsSettings | None) -> TritonClient:
    client: TritonClient = connect(url, tls)
    return client


class _Attempts:
    """The replicas one request has tried, what they answered, and whether to go on."""

    def __init__(self, pool: ReplicaPool, timeout: float | None, started_allowed: bool) -> None:
        self.pool = pool
        self.timeout = timeout
        self.deadline: float | None = None  # from the first attempt on
        self.started_allowed = started_allowed
        self.tried: list[Replica] = []
        self.errors: list[tuple[ReplicaError, Outcome]] = []

    def next(self) -> Replica | None:
        """The replica for the next attempt; `None` when all were tried or time is up."""
        now = time.monotonic()
        if self.deadline is None and self.timeout is not None:
            self.deadline = now + self.timeout
        if self.errors and self.deadline is not None and now >= self.deadline:
            return None
        replica = self.pool.acquire(self.tried)
        if replica is not None:
            self.tried.append(replica)
        return replica

    def remaining(self) -> float | None:
        """The limit of the current attempt: the whole timeout for the first, what is left of
        it for a retry (`None`: no limit)."""
        if self.deadline is None or len(self.tried) <= 1:
            return self.timeout
        return max(self.deadline - time.monotonic(), 1e-3)

    def failed(self, replica: Replica, error: InferenceServerException) -> None:
        """Records a failed attempt; raises when the request may not go to another replica."""
        outcome = self.pool.release(replica, error)
        self.errors.append((self.pool.error(replica.url, error), outcome))
        if not outcome.may_retry(self.started_allowed):
            raise self.give_up() from None

    def give_up(self) -> SdserveError:
        """The error the caller gets: the only failure as it is, or every replica's."""
        errors = [error for error, _ in self.errors]
        if not errors:  # not reached: a pool has a replica and next() tries it
            return SdserveError("no replica to send the request to")
        combined = SdserveError.from_triton(combine(errors))
        if self.errors[-1][1] is Outcome.BROKEN and not self.started_allowed and len(self.pool) > 1:
            combined = SdserveError(
                f"{combined.message} (not sent to another replica: the request may have started "
                "generating; a seed and retry_started=True allow it)",
                combined.status,
            )
        return combined


class _Submission:
    """One `submit`ted request: its attempts, each an `async_infer`, and its cancellation."""

    def __init__(
        self,
        client: InpaintClient,
        attempts: _Attempts,
        inputs: list[Any],
        outputs: list[Any],
        batched: bool,
    ) -> None:
        self.future: Future[GenerationResult] = Future()
        self._model = client.model
        self._attempts = attempts
        self._inputs, self._outputs, self._batched = inputs, outputs, batched
        self._lock = threading.Lock()
        self._context: Any = None
        self._cancelled = False

    def send(self) -> None:
        """Sends the next attempt, or settles the future when there is none to send."""
        if self._cancelled:
            self.future.set_exception(SdserveError("cancelled", "StatusCode.CANCELLED"))
            return
        replica = self._attempts.next()
        if replica is None:
            self.future.set_exception(self._attempts.give_up())
            return
        try:
            context = replica.client.async_infer(
                self._model,
                self._inputs,
                partial(self._done, replica),
                outputs=self._outputs,
                client_timeout=self._attempts.remaining(),
            )
        except InferenceServerException as error:
            self._done(replica, None, error)
            return
        with self._lock:
            self._context = context
            cancelled = self._cancelled
        if cancelled:
            context.cancel()

    def cancel(self) -> None:
        """Cancels the attempt in flight and any retry."""
        with self._lock:
            self._cancelled = True
            context = self._context
        if context is not None:
            context.cancel()

    def _done(self, replica: Replica, result: Any, error: InferenceServerException | None) -> None:
        if error is None:
            self._attempts.pool.release(replica)
            try:
                self.future.set_result(_result(result, self._batched))
            except SdserveError as exc:
                self.future.set_exception(exc)
            return
        try:
            self._attempts.failed(replica, error)
        except SdserveError as exc:
            self.future.set_exception(exc)
            return
        # Not on gRPC's callback thread: choosing a replica may probe one (blocking).
        threading.Thread(target=self.send, name="sdserve-retry", daemon=True).start()


class PendingGeneration:
    """A request in flight (from `InpaintClient.submit`)."""

    def __init__(self, future: Future[GenerationResult], context: Any) -> None:
        self._future = future
        self._context = context

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Waits for the images; raises `SdserveError` (also when cancelled)."""
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise SdserveError(f"no result within {timeout} s") from None

    def cancel(self) -> None:
        """Cancels the request; the server stops at its next denoising step."""
        self._context.cancel()

    def done(self) -> bool:
        return self._future.done()


def _result(result: Any, batched: bool) -> GenerationResult:
    images, seeds = result.as_numpy(IMAGES.name), result.as_numpy(SEEDS.name)
    return GenerationResult.from_outputs(images, seeds, batched)


def infer_inputs(tensors: Mapping[str, Array]) -> list[grpcclient.InferInput]:
    """Triton inputs carrying numpy arrays as they are: name, shape and dtype from each array.

    `InpaintClient` sends its requests through it; callers that send raw wire tensors
    (tests, benchmarks, deliberately invalid requests) use it too. It adds no batch
    dimension (see `add_batch_dim`) and checks nothing; tritonclient's own errors pass
    through (a dtype Triton has no type for, such as complex, raises `TypeError`).

    Args:
        tensors (`Mapping[str, np.ndarray]`): wire tensors by input name, e.g. from
            `encode_request`.

    Returns:
        One `tritonclient.grpc.InferInput` per tensor, in the mapping's order.
    """
    inputs = []
    for name, array in tensors.items():
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def _unbatch(name: str, array: Array | None, batched: bool) -> Array:
    if array is None:
        raise SdserveError(f"the response has no {name!r} output")
    if not batched:
        return array
    if array.ndim == 0 or array.shape[0] != 1:
        raise SdserveError(f"expected {name!r} with batch size 1, got shape {tuple(array.shape)}")
    return array.reshape(array.shape[1:])


def _call(method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Calls a tritonclient method, turning its exceptions into `SdserveError`."""
    try:
        return method(*args, **kwargs)
    except InferenceServerException as exc:
        raise SdserveError.from_triton(exc) from None
