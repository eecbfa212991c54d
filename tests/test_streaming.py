"""Streamed requests in-process: the batcher's events (`ContinuousBatcher(listener=...)`),
the `EventPublisher` that delivers them (ordered, bounded, cancellable), the latent previews
and the event wire encoding."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from cases import make_case, max_abs
from helpers import WAIT_S, gated_unet, wire

from sdserve_pipeline.batcher import ContinuousBatcher
from sdserve_pipeline.executor import Cancelled
from sdserve_pipeline.streaming import EventPublisher, linear_decoder, previews
from sdserve_protocol.contract import GenerationParams, MaskCrop, decode_request
from sdserve_protocol.events import (
    Preview,
    Progress,
    Queued,
    Result,
    decode_event,
    encode_event,
)
from sdserve_protocol.rules import RequestError


class Answers:
    """Collects outcomes by name; waits for a count."""

    def __init__(self) -> None:
        self.by_name: dict[str, object] = {}
        self._cond = threading.Condition()

    def callback(self, name: str):
        def done(outcome) -> None:
            with self._cond:
                self.by_name[name] = outcome
                self._cond.notify_all()

        return done

    def wait(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.by_name) >= count, WAIT_S)


@pytest.fixture(scope="module")
def case():
    return make_case(64, 64, seed=21)


def test_one_progress_per_step_in_order_and_previews_every_k(service, case):
    image, mask = case
    request = wire(image, mask, steps=5, seed=3, scheduler="euler", preview_every=2)
    alone = service.generate(request)
    events: list = []
    answers = Answers()
    batcher = ContinuousBatcher(service)
    try:
        batcher.submit(request, answers.callback("r"), listener=events.append)
        answers.wait(1)
    finally:
        batcher.close()
    assert max_abs(answers.by_name["r"]["images"], alone["images"]) == 0  # unchanged
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5]
    assert {p.total_steps for p in progress} == {5}
    assert progress[-1].eta_s == 0 and all(p.elapsed_s >= 0 for p in progress)
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [2, 4]  # none after the last step: the result comes
    assert all(p.images.shape == (1, 64, 64, 3) and p.images.dtype == np.uint8 for p in previews)
    keep = mask < 128  # outside the mask a preview shows the input
    assert all((p.images[0][keep] == image[keep]).all() for p in previews)
    assert events.index(previews[0]) == events.index(progress[1]) + 1  # after its step


def test_waiting_requests_hear_their_queue_position_as_it_changes(service, case):
    image, mask = case
    gate = threading.Event()
    gated = gated_unet(service, gate)
    heard: dict[str, list] = {"b": [], "c": []}
    answers = Answers()
    batcher = ContinuousBatcher(gated, max_active=1, max_queued=4)
    try:
        batcher.submit(wire(image, mask, steps=2, seed=1, scheduler="euler"), answers.callback("a"))
        batcher.submit(wire(image, mask, steps=2, seed=2, scheduler="euler"), answers.callback("b"),
                       listener=heard["b"].append)  # fmt: skip
        batcher.submit(wire(image, mask, steps=2, seed=3, scheduler="euler"), answers.callback("c"),
                       listener=heard["c"].append)  # fmt: skip
        gate.set()
        answers.wait(3)
    finally:
        batcher.close()
    queued = {name: [e.position for e in events if isinstance(e, Queued)]
              for name, events in heard.items()}  # fmt: skip
    assert queued["b"][0] in (1, 2) and queued["b"][-1] == 1
    assert queued["c"][:1] in ([2], [3]) and queued["c"][-1] == 1
    assert all(
        a > b for a, b in zip(queued["c"], queued["c"][1:], strict=False)
    )  # only moves forward
    for name in ("b", "c"):
        assert [e.step for e in heard[name] if isinstance(e, Progress)] == [1, 2]


def test_outpainting_progress_counts_every_band_step_and_previews_the_canvas(service, case):
    image, _ = case
    request = wire(image, steps=2, seed=4, scheduler="euler", outpaint=[0, 0, 128, 0])
    alone = service.generate(request)
    request = {**request, "preview_every": np.array([1], np.int32)}
    events: list = []
    answers = Answers()
    batcher = ContinuousBatcher(service)
    try:
        batcher.submit(request, answers.callback("o"), listener=events.append)
        answers.wait(1)
    finally:
        batcher.close()
    assert max_abs(answers.by_name["o"]["images"], alone["images"]) == 0  # unchanged
    progress = [e for e in events if isinstance(e, Progress)]
    bands = progress[-1].bands
    assert bands == 2  # 64 + 128 wide at 128-pixel bands
    assert [p.step for p in progress] == list(range(1, 2 * bands + 1))
    assert [p.band for p in progress] == [b for b in range(1, bands + 1) for _ in range(2)]
    # A preview after every step but the last, each of the whole canvas, after its progress.
    shown = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in shown] == [1, 2, 3]
    assert all(p.images.shape == (1, 64, 192, 3) for p in shown)
    overlap = 16  # OutpaintSettings.overlap: the original is regenerated that deep
    for preview in shown:
        assert (preview.images[0, :, : 64 - overlap] == image[:, : 64 - overlap]).all()
        assert (preview.images[0, :, 64:] != 0).any()  # the new region is drawn, not blank
        at = events.index(preview)
        assert isinstance(events[at - 1], Progress) and events[at - 1].step == preview.step
    first, second = shown[0].images[0], shown[2].images[0]  # band 1, then band 2 running
    assert (first != second).any()


class SlowDeliver:
    """A stream model that takes its time (or says the client has gone)."""

    def __init__(self, gate: threading.Event, cancelled: bool = False) -> None:
        self.gate, self.cancelled = gate, cancelled
        self.delivered: list[tuple[str, object]] = []
        self.calls: list[list[str]] = []  # each call's streams
        self.entered = threading.Event()

    def __call__(self, stream_ids, events) -> list[bool]:
        self.entered.set()
        self.gate.wait(WAIT_S)
        self.calls.append(list(stream_ids))
        self.delivered.extend(zip(stream_ids, events, strict=True))
        return [self.cancelled] * len(events)


def test_publisher_delivers_in_order_then_answers_and_forgets_the_stream():
    gate = threading.Event()
    gate.set()
    deliver = SlowDeliver(gate)
    publisher = EventPublisher(deliver)
    answered = threading.Event()
    tell = publisher.open("s")
    for step in range(1, 4):
        tell(Progress(step, 3, 0.1 * step, 0.0))
    publisher.finish("s", answered.set)
    assert answered.wait(WAIT_S)
    publisher.close(WAIT_S)
    assert [e.step for _, e in deliver.delivered] == [1, 2, 3]
    assert publisher.pending() == 0
    tell(Progress(4, 3, 1.0, 0.0))  # late: dropped, not queued
    assert len(deliver.delivered) == 3


def test_a_turn_delivers_every_streams_next_event_in_one_call_per_kind():
    gate = threading.Event()
    deliver = SlowDeliver(gate)
    publisher = EventPublisher(deliver)
    a, b, c = (publisher.open(name) for name in "abc")
    a(Progress(1, 2, 0.0, 0.0))
    assert deliver.entered.wait(WAIT_S)  # the first turn (a's first event) is being delivered
    a(Progress(2, 2, 0.0, 0.0))
    a(Preview(2, 2, np.zeros((1, 3, 3, 3), np.uint8)))
    for tell in (b, c):
        tell(Progress(1, 2, 0.0, 0.0))
        tell(Preview(1, 2, np.zeros((1, 2, 2, 3), np.uint8)))
    answered = threading.Event()
    for name in "abc":
        publisher.finish(name, answered.set if name == "c" else lambda: None)
    gate.set()
    assert answered.wait(WAIT_S)
    publisher.close(WAIT_S)
    # Turn 2: every stream's progress in one call; turn 3: the previews, one call per shape.
    assert deliver.calls == [["a"], ["a", "b", "c"], ["a"], ["b", "c"]]
    for name in "abc":
        kinds = [type(e).__name__ for s, e in deliver.delivered if s == name]
        assert kinds == (
            ["Progress", "Progress", "Preview"] if name == "a" else ["Progress", "Preview"]
        )
    assert publisher.pending() == 0


def test_a_stream_that_does_not_read_is_bounded_and_keeps_the_newest_progress():
    gate = threading.Event()  # the stream model is stuck: nothing is delivered
    deliver = SlowDeliver(gate)
    publisher = EventPublisher(deliver, max_pending=4)
    other = publisher.open("fast")
    slow = publisher.open("slow")
    for step in range(1, 101):
        slow(Progress(step, 100, 0.0, 0.0))
        if step % 10 == 0:
            slow(Preview(step, 100, np.zeros((1, 2, 2, 3), np.uint8)))
    answered = threading.Event()
    other(Queued(1))
    publisher.finish("fast", answered.set)
    gate.set()
    assert answered.wait(WAIT_S)
    publisher.finish("slow", lambda: None)
    publisher.close(WAIT_S)
    slow_events = [e for s, e in deliver.delivered if s == "slow"]
    assert len(slow_events) <= 5  # at most max_pending queued, plus the one in delivery
    assert [e.step for e in slow_events if isinstance(e, Progress)][-1] == 100
    assert [e for s, e in deliver.delivered if s == "fast"] == [Queued(1)]


def test_a_cancelled_stream_is_marked_and_stops_receiving():
    gate = threading.Event()
    gate.set()
    deliver = SlowDeliver(gate, cancelled=True)
    publisher = EventPublisher(deliver)
    tell = publisher.open("gone")
    tell(Progress(1, 3, 0.0, 0.0))
    answered = threading.Event()
    tell(Progress(2, 3, 0.0, 0.0))
    publisher.finish("gone", answered.set)
    assert answered.wait(WAIT_S)
    publisher.close(WAIT_S)
    assert len(deliver.delivered) == 1  # the first said cancelled: the second is not sent


def test_a_cancelled_stream_stops_its_request_at_the_next_step(service, case):
    image, mask = case
    gate = threading.Event()
    gate.set()
    publisher = EventPublisher(SlowDeliver(gate, cancelled=True))
    answers = Answers()
    batcher = ContinuousBatcher(service)
    try:
        batcher.submit(wire(image, mask, steps=50, seed=1), answers.callback("s"),
                       is_cancelled=lambda: publisher.cancelled("s"),
                       listener=publisher.open("s"))  # fmt: skip
        answers.wait(1)
    finally:
        batcher.close()
        publisher.close(WAIT_S)
    assert isinstance(answers.by_name["s"], Cancelled)
    assert batcher.outstanding_steps == 0 and batcher.pending == 0


def test_event_encoding_round_trips():
    preview = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    for event in (Queued(3), Progress(2, 10, 1.5, 6.0, 2, 3, time_s=1_764_500_000.25)):
        assert decode_event(encode_event(event)) == event
    back = decode_event(encode_event(Preview(4, 10, preview)))
    assert isinstance(back, Preview) and back.step == 4 and (back.images == preview).all()
    images = np.zeros((1, 4, 4, 3), np.uint8)
    result = decode_event(
        {"images": images, "seeds": np.array([1]), "event": np.array([b"result"], object)}
    )
    assert isinstance(result, Result) and set(result.outputs) == {"images", "seeds"}
    with pytest.raises(ValueError, match="unknown stream event"):
        decode_event({"event": np.array([b"bogus"], object)})


def test_previews_are_each_requests_size_with_its_input_outside_the_mask(case):
    image, mask = case
    params = GenerationParams("x", 64, 64, 0, image=image, mask=mask)
    small = GenerationParams("x", 32, 48, 0)
    due = [(torch.zeros(2, 4, 8, 8), params), (torch.zeros(1, 4, 4, 6), small)]
    out, xl = previews(linear_decoder("sd15"), due)
    assert out.shape == (2, 64, 64, 3)
    inside = mask >= 128
    assert (out[:, inside] == 127).all()  # zero latents project to mid gray
    assert (out[:, ~inside] == image[~inside]).all()
    assert xl.shape == (1, 32, 48, 3)
    assert (previews(linear_decoder("sdxl"), [(torch.zeros(1, 4, 4, 6), small)])[0] != 127).any()


def test_previews_are_placed_as_the_final_images_are(case):
    image, mask = case
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 8, 8)  # generated at 64x64
    decode = linear_decoder("sd15")
    full = previews(decode, [(latents, GenerationParams("x", 64, 64, 0))])[0]
    # Off the latent grid: cropped from the generation size, as the images are, not resized.
    off_grid = previews(decode, [(latents, GenerationParams("x", 60, 56, 0))])[0]
    assert off_grid.shape == (1, 60, 56, 3) and (off_grid == full[:, :60, :56]).all()
    # A padding_mask_crop request: its crop (64x64 generated) resized into its box on the
    # image as sent, every pixel outside the box the input's.
    photo = np.random.default_rng(2).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    box = (16, 8, 80, 72)  # 64x64 on the photo
    blank = np.zeros(photo.shape[:2], np.uint8)
    crop = MaskCrop(box, photo, blank, blank)
    cropped = GenerationParams("x", 64, 64, 0, image=image, mask=mask, crop=crop)
    (on_photo,) = previews(decode, [(latents, cropped)])
    assert on_photo.shape == (1, 96, 128, 3)
    outside = np.ones(photo.shape[:2], bool)
    outside[8:72, 16:80] = False
    assert (on_photo[0][outside] == photo[outside]).all()
    inside = previews(decode, [(latents, GenerationParams("x", 64, 64, 0, image=image, mask=mask))])
    assert (on_photo[0, 8:72, 16:80] == inside[0][0]).all()  # the box is 64x64: no resize


def test_previews_of_one_latent_shape_are_decoded_in_one_call():
    calls: list[tuple[int, ...]] = []
    decode = linear_decoder("sd15")

    def counting(latents: torch.Tensor) -> np.ndarray:
        calls.append(tuple(latents.shape))
        return decode(latents)

    torch.manual_seed(0)
    a, b, c = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 6, 8)
    p64, p48 = GenerationParams("x", 64, 64, 0), GenerationParams("x", 48, 64, 0)
    got = previews(counting, [(a, p64), (c, p48), (b, p64)])
    assert sorted(calls) == [(1, 4, 6, 8), (3, 4, 8, 8)]  # one call per shape
    for (latents, params), together in zip([(a, p64), (c, p48), (b, p64)], got, strict=True):
        alone = previews(decode, [(latents, params)])[0]
        assert (together == alone).all()  # each request's own, in order


@pytest.mark.parametrize("value", [-1, 1001])
def test_preview_every_out_of_range_names_the_input(value):
    with pytest.raises(RequestError, match="preview_every"):
        decode_request(wire(preview_every=value), None)
