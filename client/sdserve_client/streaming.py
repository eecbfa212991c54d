"""Streamed generation: a request's queue position, progress and previews, then its images.

`InpaintClient.stream` sends the request to the pipeline's stream model (`<model>_stream`)
over Triton's gRPC bidirectional stream, on a connection of its own (one stream at a time
per connection; a stream that ended with its result gives the connection back for the next
stream, `StreamConnections`), and yields its events
(`sdserve_protocol.events`: `Queued`, `Progress`, `Preview`) then a `GenerationResult`.
Closing the stream (`cancel`, leaving the loop early, or the client going away) cancels the
request on the server at its next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from sdserve_protocol.events import STREAM_OUTPUTS, Preview, Progress, Queued, Result, decode_event

from .errors import SdserveError

if TYPE_CHECKING:
    from .sdk import GenerationResult

_END = object()


class StreamConnections:
    """Idle gRPC connections for streams, per server.

    A stream takes a connection of its own (tritonclient runs one stream per connection)
    and gives it back once it ended with its result, so a client that streams request
    after request does not connect anew each time. A stream that was cancelled or failed
    closes its connection.

    Args:
        connect: makes a connection to a server (`host:port`).
    """

    def __init__(self, connect: Callable[[str], Any]) -> None:
        self._connect = connect
        self._idle: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, url: str) -> Any:
        """An idle connection to `url`, or a new one."""
        with self._lock:
            idle = self._idle.get(url)
            if idle:
                return idle.pop()
        return self._connect(url)

    def give_back(self, url: str, client: Any, reusable: bool) -> None:
        """Keep `client` for the next stream to `url` if `reusable`, else close it."""
        with self._lock:
            if reusable and not self._closed:
                self._idle.setdefault(url, []).append(client)
                return
        client.close()

    def close(self) -> None:
        """Close every idle connection; later ones are closed when given back."""
        with self._lock:
            self._closed = True
            idle = [client for clients in self._idle.values() for client in clients]
            self._idle.clear()
        for client in idle:
            client.close()


class StreamedGeneration:
    """One streamed request: iterate it for its events; the last is a `GenerationResult`.

    Args:
        client: a tritonclient gRPC client of its own (one stream per connection).
        model: the stream model's name.
        inputs: the request's `InferInput`s.
        batched: whether the tensors carry a leading batch dimension.
        make_result: builds the `GenerationResult` from the result's `images` and `seeds`
            (without a batch dimension).
        timeout: seconds the whole stream may take (`None`: no limit).
        release: takes `client` back when the stream is closed, told whether the stream
            ended with its result (the connection can serve another stream); default:
            closes it.
    """

    def __init__(
        self,
        client: Any,
        model: str,
        inputs: list[Any],
        batched: bool,
        make_result: Callable[[Any, Any], GenerationResult],
        timeout: float | None = None,
        release: Callable[[Any, bool], None] | None = None,
    ) -> None:
        self._client = client
        self._batched = batched
        self._make_result = make_result
        self._release = release or (lambda client, _reusable: client.close())
        self._responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._finished = False
        self._cancelled = False
        self._completed = False  # the result arrived
        self._closed = threading.Lock()
        try:
            client.start_stream(callback=self._on_response, stream_timeout=timeout)
            client.async_stream_infer(model, inputs)
        except InferenceServerException as exc:
            self.close()
            raise SdserveError.from_triton(exc) from None

    def _on_response(self, result: Any, error: Any) -> None:
        self._responses.put((result, error))

    def __iter__(self) -> Iterator[Any]:
        try:
            while not self._finished:
                result, error = self._responses.get()
                if result is None and error is None:  # cancelled
                    return
                if error is not None:
                    self._finished = True
                    raise SdserveError.from_triton(error)
                event = decode_event(self._tensors(result))
                if isinstance(event, Result):
                    self._finished = self._completed = True
                    yield self._make_result(event.outputs.get("images"), event.outputs.get("seeds"))
                else:
                    yield event
        finally:
            self.close()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._async_events()

    async def _async_events(self) -> AsyncIterator[Any]:
        events = iter(self)
        while (event := await asyncio.to_thread(next, events, _END)) is not _END:
            yield event

    def result(self, on_event: Callable[[Any], None] | None = None) -> GenerationResult:
        """Consume the stream, telling `on_event` each event; returns the images."""
        for event in self:
            if not isinstance(event, Queued | Progress | Preview):
                return event  # type: ignore[no-any-return]
            if on_event is not None:
                on_event(event)
        if self._cancelled:
            raise SdserveError("cancelled", "StatusCode.CANCELLED")
        raise SdserveError("the stream ended without a result")

    def cancel(self) -> None:
        """Cancel the request: the server stops it at its next step."""
        self._finished = self._cancelled = True
        self._responses.put((None, None))  # wakes a reader
        self.close()

    def close(self) -> None:
        """Close the stream (cancelling the request if it still runs) and release its
        connection: kept for another stream after a result, else closed."""
        if not self._closed.acquire(blocking=False):
            return  # closed already
        reusable = self._completed and not self._cancelled
        try:
            self._client.stop_stream(cancel_requests=not reusable)
        except Exception:  # a broken stream: its connection is not reused
            reusable = False
            raise
        finally:
            self._release(self._client, reusable)

    def _tensors(self, result: Any) -> dict[str, Any]:
        tensors = {}
        for t in STREAM_OUTPUTS:
            array = result.as_numpy(t.name)
            if array is not None:
                tensors[t.name] = array[0] if self._batched else array
        return tensors
