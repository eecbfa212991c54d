"""Streamed generation: a request's queue position, progress and previews, then its images.

`InpaintClient.stream` sends the request to the pipeline's stream model (`<model>_stream`)
over Triton's gRPC bidirectional stream, on a connection of its own, and yields its events
(`sdserve_protocol.events`: `Queued`, `Progress`, `Preview`) then a `GenerationResult`.
Closing the stream (`cancel`, leaving the loop early, or the client going away) cancels the
request on the server at its next step.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from sdserve_protocol.events import STREAM_OUTPUTS, Preview, Progress, Queued, Result, decode_event

from .errors import SdserveError

if TYPE_CHECKING:
    from .sdk import GenerationResult

_END = object()


class StreamedGeneration:
    """One streamed request: iterate it for its events; the last is a `GenerationResult`.

    Args:
        client: a tritonclient gRPC client of its own (one stream per connection); closed
            with the stream.
        model: the stream model's name.
        inputs: the request's `InferInput`s.
        batched: whether the tensors carry a leading batch dimension.
        make_result: builds the `GenerationResult` from the result's `images` and `seeds`
            (without a batch dimension).
        timeout: seconds the whole stream may take (`None`: no limit).
    """

    def __init__(
        self,
        client: Any,
        model: str,
        inputs: list[Any],
        batched: bool,
        make_result: Callable[[Any, Any], GenerationResult],
        timeout: float | None = None,
    ) -> None:
        self._client = client
        self._batched = batched
        self._make_result = make_result
        self._responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._finished = False
        self._cancelled = False
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
                    self._finished = True
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
        """Close the stream and its connection (cancelling the request if it still runs)."""
        try:
            self._client.stop_stream(cancel_requests=True)
        finally:
            self._client.close()

    def _tensors(self, result: Any) -> dict[str, Any]:
        tensors = {}
        for t in STREAM_OUTPUTS:
            array = result.as_numpy(t.name)
            if array is not None:
                tensors[t.name] = array[0] if self._batched else array
        return tensors
