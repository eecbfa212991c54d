"""Streamed requests: events from the batcher to a client, without slowing the batch.

A streamed request reaches the pipeline model from its stream model (`<name>_stream`, a
decoupled Triton model) with a random `stream_id`. The batcher tells the request's listener
about each event; the pipeline model's `EventPublisher` queues it and returns at once, and
its own thread delivers the events in order to the stream model, which sends them to the
clients. Each turn takes the next event of every stream that has one, and delivers those of
one kind (previews: of one shape) together, one BLS call for all streams: a step's progress
events cost one call, not one per stream. The request's answer goes through the same queue,
after its events, so the result is always the stream's last response.

A stream whose events cannot be delivered as fast as they come never grows without bound:
past `max_pending` queued events, the oldest progress and preview events of that stream are
dropped (the newest progress is kept). A delivery that reports the stream cancelled (the
client closed it or went away) marks it, and the batcher drops the request at its next step.
Previews (`previews`) of the requests due for one in a step are decoded together: by
default a linear projection of the latents per model family (`linear_decoder`), drawn over
the input image outside the region being generated.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from sdserve_protocol.contract import GenerationParams
from sdserve_protocol.events import Preview, Progress, Queued

StreamEvent = Queued | Progress | Preview
# Delivers events of one kind (previews: of one shape), one per stream, in one call; returns
# per event whether its stream is cancelled.
Deliver = Callable[[Sequence[str], Sequence[StreamEvent]], Sequence[bool]]
_EVENTS = (Queued, Progress, Preview)
Listener = Callable[[StreamEvent], None]
# Decodes (N, 4, h, w) denoising latents to (N, h', w', 3) uint8 preview images.
PreviewDecoder = Callable[[torch.Tensor], npt.NDArray[np.uint8]]


@dataclass
class _Stream:
    events: deque[StreamEvent | Callable[[], None]] = field(default_factory=deque)
    cancelled: bool = False


class EventPublisher:
    """Delivers the events of every open stream, in order per stream, on its own thread.

    Args:
        deliver: sends events of one kind, one per stream, to their streams (one BLS call
            to the stream model in Triton); returns which of those streams are cancelled.
        max_pending: most events queued per stream; beyond, older progress/preview events
            of that stream are dropped.
        on_error: told when a delivery or an answer raises (the thread keeps going).
    """

    def __init__(
        self,
        deliver: Deliver,
        max_pending: int = 64,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._deliver = deliver
        self.max_pending = max_pending
        self._on_error = on_error or (lambda err: None)
        self._streams: dict[str, _Stream] = {}
        self._ready: deque[str] = deque()  # streams with something to send, in arrival order
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="sdserve-events", daemon=True)
        self._thread.start()

    def open(self, stream_id: str) -> Listener:
        """Start a stream; returns the listener the batcher tells its events."""
        with self._wake:
            self._streams[stream_id] = _Stream()
        return lambda event: self._put(stream_id, event)

    def cancelled(self, stream_id: str) -> bool:
        """The stream model said the client has gone or cancelled."""
        stream = self._streams.get(stream_id)
        return stream is not None and stream.cancelled

    def finish(self, stream_id: str, answer: Callable[[], None]) -> None:
        """Run `answer` (send the request's response) after the stream's queued events; the
        stream then closes."""
        self._put(stream_id, answer)

    def pending(self) -> int:
        """Streams open (tests: nothing is left behind)."""
        with self._wake:
            return len(self._streams)

    def close(self, timeout_s: float | None = None) -> None:
        """Deliver what is queued, then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _put(self, stream_id: str, item: StreamEvent | Callable[[], None]) -> None:
        with self._wake:
            stream = self._streams.get(stream_id)
            if stream is None:
                return  # closed: a late event
            if not stream.events:
                self._ready.append(stream_id)
            stream.events.append(item)
            if len(stream.events) > self.max_pending:
                _drop_oldest_event(stream.events)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._ready:
                    if self._closing:
                        return
                    self._wake.wait()
                turn = self._take_turn()
            events = [(s, item) for s, item in turn if isinstance(item, _EVENTS)]
            for group in _by_kind(events):
                self._deliver_group(group)
            for _, item in turn:
                if not isinstance(item, _EVENTS):
                    try:
                        item()  # an answer, after its stream's events
                    except Exception as err:  # noqa: BLE001 (one stream's failure only)
                        self._on_error(err)

    def _take_turn(self) -> list[tuple[str, StreamEvent | Callable[[], None]]]:
        """The next item of every stream that has one (under the lock)."""
        turn = []
        ready, self._ready = self._ready, deque()
        for stream_id in ready:
            stream = self._streams[stream_id]
            item = stream.events.popleft()
            if not isinstance(item, _EVENTS):
                del self._streams[stream_id]  # its answer, after its events: done
            elif stream.events:
                self._ready.append(stream_id)
            if isinstance(item, _EVENTS) and stream.cancelled:
                continue  # its client has gone
            turn.append((stream_id, item))
        return turn

    def _deliver_group(self, group: list[tuple[str, StreamEvent]]) -> None:
        ids = [stream_id for stream_id, _ in group]
        try:
            cancelled = self._deliver(ids, [event for _, event in group])
        except Exception as err:  # noqa: BLE001 (delivery failures are reported, not fatal)
            self._on_error(err)
            return
        with self._wake:
            for stream_id, gone in zip(ids, cancelled, strict=True):
                stream = self._streams.get(stream_id)
                if gone and stream is not None:
                    stream.cancelled = True


def _by_kind(
    events: list[tuple[str, StreamEvent]],
) -> list[list[tuple[str, StreamEvent]]]:
    """Events grouped by kind (previews: by image shape), first arrivals first."""
    groups: dict[tuple[object, ...], list[tuple[str, StreamEvent]]] = {}
    for stream_id, event in events:
        shape = event.images.shape if isinstance(event, Preview) else ()
        groups.setdefault((type(event), *shape), []).append((stream_id, event))
    return list(groups.values())


def _drop_oldest_event(events: deque[StreamEvent | Callable[[], None]]) -> None:
    """Drop the oldest event that is not the newest progress and not the answer."""
    newest_progress = max((i for i, e in enumerate(events) if isinstance(e, Progress)), default=-1)
    for i, event in enumerate(events):
        if isinstance(event, Queued | Preview) or (
            isinstance(event, Progress) and i != newest_progress
        ):
            del events[i]
            return


# Latent → RGB projections (ComfyUI's `latent_rgb_factors`, as their live previews use).
_RGB_FACTORS = {
    "sd15": (
        ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
         (-0.2120, -0.2616, -0.7177)),
        (0.0, 0.0, 0.0),
    ),
    "sdxl": (
        ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
         (-0.3165, -0.2492, -0.2188)),
        (0.1084, -0.0175, -0.0011),
    ),
}  # fmt: skip


def linear_decoder(architecture: str) -> PreviewDecoder:
    """The default preview decoder: the model family's latent → RGB projection."""
    factors, bias = (torch.tensor(f) for f in _RGB_FACTORS[architecture])

    def decode(latents: torch.Tensor) -> npt.NDArray[np.uint8]:
        projected = torch.einsum("nchw,cr->nhwr", latents.float().cpu(), factors)
        rgb = ((projected + bias + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return np.asarray(rgb.numpy())

    return decode


def previews(
    decode: PreviewDecoder,
    due: Sequence[tuple[torch.Tensor, GenerationParams]],
    vae_scale_factor: int = 8,
) -> list[npt.NDArray[np.uint8]]:
    """The previews of the requests due for one in a step, decoded together.

    Latents of one shape go through `decode` as one batch; each request's images are then
    placed as its final images are (`_fit`): at its size, the input outside the mask, a
    cropped request's crop back on its image.

    Args:
        decode: (N, 4, h, w) latents → (N, h', w', 3) uint8 (`linear_decoder`, or a tiny
            VAE decoder).
        due: each request's (N_i, 4, h, w) denoising latents (unscaled) and its parameters.
        vae_scale_factor: image pixels per latent (the checkpoint's VAE).

    Returns:
        Each request's (N_i, H, W, 3) uint8 preview, in `due`'s order.
    """
    decoded: list[npt.NDArray[np.uint8] | None] = [None] * len(due)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (latents, _) in enumerate(due):
        by_shape.setdefault(tuple(latents.shape[1:]), []).append(i)
    for indices in by_shape.values():
        images = decode(torch.cat([due[i][0] for i in indices]))
        offsets = np.cumsum([0] + [len(due[i][0]) for i in indices])
        for i, start, stop in zip(indices, offsets[:-1], offsets[1:], strict=True):
            _, _, h, w = due[i][0].shape
            size = (h * vae_scale_factor, w * vae_scale_factor)
            decoded[i] = _fit(images[start:stop], due[i][1], size)
    return [images for images in decoded if images is not None]


def _fit(
    images: npt.NDArray[np.uint8], params: GenerationParams, size: tuple[int, int]
) -> npt.NDArray[np.uint8]:
    """Decoded previews placed as the request's images are: scaled to the generation size
    `size`, cropped to the request's size, the input outside the mask; a `padding_mask_crop`
    request's crop resized into its box on the image as sent."""
    if images.shape[1:3] != size:
        images = _resized(images, size)
    out = np.ascontiguousarray(images[:, : params.height, : params.width])
    if params.image is not None and params.mask is not None and params.image.shape[:2] == (
        out.shape[1:3]
    ):  # fmt: skip
        keep = params.mask < 128
        out[:, keep] = params.image[keep]
    if params.crop is not None:
        rows, cols = params.crop.slices
        x1, y1, x2, y2 = params.crop.box
        whole = np.repeat(params.crop.image[np.newaxis], len(out), axis=0)
        whole[:, rows, cols] = _resized(out, (y2 - y1, x2 - x1))
        out = whole
    return out


def _resized(images: npt.NDArray[np.uint8], size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    height, width = size
    return np.stack([
        np.asarray(Image.fromarray(one).resize((width, height), Image.Resampling.BILINEAR))
        for one in images
    ])  # fmt: skip
