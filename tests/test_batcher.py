"""Continuous batching (`sdserve_pipeline.batcher`): requests join at the next step, leave
when done, and get exactly the images they get alone."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
from cases import make_case, max_abs
from helpers import WAIT_S, Spy, gated_unet, variant, wire

from sdserve_pipeline.batcher import ContinuousBatcher, Overloaded, QueueTimeout
from sdserve_pipeline.executor import Cancelled
from sdserve_pipeline.service import PipelineService
from sdserve_protocol.rules import RequestError


class Outcomes:
    """Collects each request's outcome and the order they were answered in."""

    def __init__(self) -> None:
        self.by_name: dict[str, object] = {}
        self.order: list[str] = []
        self._done = threading.Condition()

    def callback(self, name: str):
        def done(outcome) -> None:
            with self._done:
                self.by_name[name] = outcome
                self.order.append(name)
                self._done.notify_all()

        return done

    def wait(self, count: int) -> None:
        with self._done:
            if not self._done.wait_for(lambda: len(self.order) >= count, timeout=WAIT_S):
                raise TimeoutError(f"{len(self.order)} of {count} requests answered")


class Recorder:
    """An `outcomes.Observer` that keeps every report."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, float]] = []
        self.waits: list[float] = []
        self.loads: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

    def answered(self, outcome: str, duration_s: float) -> None:
        with self._lock:
            self.outcomes.append((outcome, duration_s))

    def dequeued(self, waited_s: float) -> None:
        with self._lock:
            self.waits.append(waited_s)

    def load(self, pending: int, outstanding_steps: int, reserved_bytes: int) -> None:
        with self._lock:
            self.loads.append((pending, outstanding_steps, reserved_bytes))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(outcome for outcome, _ in self.outcomes))


def spied_service(service: PipelineService, on_unet=None):
    """A copy of the demo service whose UNet calls are recorded (rows per call)."""
    rows: list[int] = []
    unet = service.loop.components.unet

    def spy(*inputs):
        rows.append(inputs[0].shape[0])
        if on_unet is not None:
            on_unet(len(rows))
        return unet(*inputs)

    return variant(service, unet=spy), rows


@pytest.fixture(scope="module")
def case():
    return make_case(64, 64, seed=11)


def test_a_request_joins_a_running_one_at_the_next_step(service, case):
    image, mask = case
    first = wire(image, mask, steps=6, seed=1, scheduler="euler")
    second = wire(image, mask, steps=6, seed=2, scheduler="ddim", guidance_scale=5.0)
    alone = [service.generate(r)["images"] for r in (first, second)]
    outcomes = Outcomes()
    holder: dict[str, ContinuousBatcher] = {}

    def join_during_second_call(calls: int) -> None:
        if calls == 2:  # the first request is mid-run: the second arrives now
            holder["b"].submit(second, outcomes.callback("second"))

    spied, rows = spied_service(service, join_during_second_call)
    batcher = holder["b"] = ContinuousBatcher(spied)
    try:
        batcher.submit(first, outcomes.callback("first"))
        outcomes.wait(2)
    finally:
        batcher.close()
    # Alone for 2 steps, together for 4 (2 CFG rows each), then the second's last 2 alone.
    assert rows == [2, 2, 4, 4, 4, 4, 2, 2]
    assert outcomes.order == ["first", "second"]  # the first leaves as soon as it is done
    for name, single in zip(("first", "second"), alone, strict=True):
        assert max_abs(outcomes.by_name[name]["images"], single) == 0


def test_requests_arriving_in_one_turn_share_their_admission_and_decode_calls(service, case):
    image, mask = case
    first, *others = [wire(image, mask, steps=2, seed=s, scheduler="euler") for s in (1, 2, 3)]
    alone = [service.generate(r)["images"] for r in (first, *others)]
    outcomes = Outcomes()
    stepping, others_submitted = threading.Event(), threading.Event()
    spy = Spy(service)
    # the first request's first step waits for the other two to arrive
    batcher = ContinuousBatcher(gated_unet(spy.service, others_submitted, before=stepping.set))
    try:
        batcher.submit(first, outcomes.callback("0"))
        assert stepping.wait(WAIT_S)
        for i, request in enumerate(others, start=1):
            batcher.submit(request, outcomes.callback(str(i)))
        others_submitted.set()
        outcomes.wait(3)
    finally:
        batcher.close()
    assert spy.rows["text_encoder"] == [2, 4]  # the first alone, then the two others at once
    assert spy.rows["vae_encoder"] == [1, 2]
    assert spy.rows["vae_decoder"] == [1, 2]
    for i, single in enumerate(alone):
        assert max_abs(outcomes.by_name[str(i)]["images"], single) == 0


def test_mixed_sizes_schedulers_and_strengths_match_alone(service):
    image, mask = make_case(64, 64, seed=3)
    tall, tall_mask = make_case(96, 64, seed=4)
    requests = {
        "square": wire(image, mask, steps=4, seed=5, scheduler="euler_a"),
        "tall": wire(tall, tall_mask, steps=5, seed=6, scheduler="dpmpp_2m"),
        "strength": wire(image, mask, steps=6, seed=7, strength=0.5),
        "no_cfg": wire(image, mask, steps=3, seed=8, guidance_scale=1.0, num_images=2),
        "txt2img": wire(steps=4, seed=9, height=64, width=64),
    }
    alone = {name: service.generate(r)["images"] for name, r in requests.items()}
    outcomes = Outcomes()
    all_submitted = threading.Event()
    spied, rows = spied_service(service, lambda calls: all_submitted.wait(WAIT_S))
    batcher = ContinuousBatcher(spied)
    try:
        for name, request in requests.items():
            batcher.submit(request, outcomes.callback(name))
        all_submitted.set()
        outcomes.wait(len(requests))
    finally:
        batcher.close()
    for name, single in alone.items():
        assert max_abs(outcomes.by_name[name]["images"], single) == 0, name
    # From the second turn on, the 64x64 requests share one call: 2 + 2 + 2 (no CFG,
    # 2 images) + 2 rows; the 96x64 one has its own.
    assert max(rows) == 8 and 2 in rows


def test_cancelled_request_stops_and_the_others_finish(service, case):
    image, mask = case
    cancel = threading.Event()
    keep = wire(image, mask, steps=5, seed=1)
    alone = service.generate(keep)["images"]

    def cancel_after_two(calls: int) -> None:
        if calls == 2:
            cancel.set()

    spied, rows = spied_service(service, cancel_after_two)
    outcomes = Outcomes()
    batcher = ContinuousBatcher(spied)
    try:
        with batcher._wake:  # the worker's first turn sees both (as `generate_all` does)
            batcher.submit(
                wire(image, mask, steps=50, seed=2), outcomes.callback("gone"), cancel.is_set
            )
            batcher.submit(keep, outcomes.callback("kept"))
        outcomes.wait(2)
    finally:
        batcher.close()
    assert isinstance(outcomes.by_name["gone"], Cancelled)
    assert rows[:2] == [4, 4] and set(rows[2:]) == {2}  # gone after its second step
    assert max_abs(outcomes.by_name["kept"]["images"], alone) == 0


def test_bad_request_is_answered_at_once_without_taking_a_slot(service):
    outcomes = Outcomes()
    batcher = ContinuousBatcher(service, max_active=1)
    try:
        batcher.submit(wire(steps=0, height=64, width=64), outcomes.callback("bad"))
        assert outcomes.order == ["bad"]  # answered from the submitting thread
        assert isinstance(outcomes.by_name["bad"], RequestError)
        assert outcomes.by_name["bad"].name == "steps"
        batcher.submit(wire(steps=2, height=64, width=64, seed=1), outcomes.callback("good"))
        outcomes.wait(2)
    finally:
        batcher.close()
    assert outcomes.by_name["good"]["images"].shape == (1, 64, 64, 3)


def test_requests_beyond_max_active_wait_and_beyond_the_queue_are_refused(service, case):
    image, mask = case
    outcomes = Outcomes()
    observed = Recorder()
    stepping, release = threading.Event(), threading.Event()
    batcher = ContinuousBatcher(
        gated_unet(service, release, before=stepping.set),  # the first holds the batch
        max_active=1,
        max_queued=1,
        observer=observed,
    )
    try:
        batcher.submit(wire(image, mask, steps=2, seed=1), outcomes.callback("first"))
        assert stepping.wait(WAIT_S)
        batcher.submit(wire(image, mask, steps=2, seed=2), outcomes.callback("second"))
        batcher.submit(wire(image, mask, steps=2, seed=3), outcomes.callback("third"))
        assert outcomes.order == ["third"]  # refused at once, from the submitting thread
        assert isinstance(outcomes.by_name["third"], Overloaded)
        assert "Exceeds maximum queue size" in str(outcomes.by_name["third"])
        assert batcher.pending == 1  # the second waits: the first is denoising
        release.set()
        outcomes.wait(3)
    finally:
        release.set()
        batcher.close()
    assert outcomes.order == ["third", "first", "second"]
    waits = observed.waits
    assert batcher.pending == 0 and len(waits) == 2 and waits[1] > waits[0]
    assert observed.counts() == {"overloaded": 1, "success": 2}


def test_a_client_sending_on_each_answer_joins_the_next_step_with_join_wait(service, case):
    """A closed-loop client's next request arrives a round trip after its answer; with
    `join_wait_s` the batcher waits for it and it joins the very next step."""
    image, mask = case
    outcomes = Outcomes()
    holder: dict[str, ContinuousBatcher] = {}

    def answered_then_send_next(outcome) -> None:
        outcomes.callback("short")(outcome)

        def send() -> None:
            time.sleep(0.02)  # the round trip; the batcher waits up to 60 s for it
            holder["b"].submit(
                wire(image, mask, steps=2, seed=3, scheduler="euler"), outcomes.callback("next")
            )

        threading.Thread(target=send).start()

    spied, rows = spied_service(service)
    batcher = holder["b"] = ContinuousBatcher(spied, join_wait_s=60)
    try:
        with batcher._wake:  # the worker's first turn sees both (as `generate_all` does)
            batcher.submit(
                wire(image, mask, steps=4, seed=1, scheduler="euler"), outcomes.callback("long")
            )
            batcher.submit(
                wire(image, mask, steps=2, seed=2, scheduler="euler"), answered_then_send_next
            )
        outcomes.wait(3)
    finally:
        batcher.close()
    # long + short for 2 steps; then long + next for 2: next never sits out a step
    assert rows == [4, 4, 4, 4]


def test_a_request_waiting_past_its_queue_timeout_is_answered_unstarted(service, case):
    image, mask = case
    outcomes = Outcomes()
    release = threading.Event()
    batcher = ContinuousBatcher(gated_unet(service, release), max_active=1, queue_timeout_s=WAIT_S)
    cancelled = threading.Event()
    try:
        batcher.submit(wire(image, mask, steps=2, seed=1), outcomes.callback("running"))
        batcher.submit(
            wire(image, mask, steps=2, seed=2), outcomes.callback("late"), timeout_s=0.05
        )
        batcher.submit(
            wire(image, mask, steps=2, seed=3), outcomes.callback("gone"), cancelled.is_set
        )
        time.sleep(0.1)  # past the late one's own timeout (not a timing assertion)
        cancelled.set()
        release.set()
        outcomes.wait(3)
    finally:
        release.set()
        batcher.close()
    assert isinstance(outcomes.by_name["late"], QueueTimeout)
    assert isinstance(outcomes.by_name["gone"], Cancelled)
    assert outcomes.by_name["running"]["images"].shape == (1, 64, 64, 3)


def test_a_failing_unet_call_fails_its_requests_only(service, case):
    image, mask = case
    tall, tall_mask = make_case(96, 64, seed=4)
    good = wire(image, mask, steps=3, seed=1)
    alone = service.generate(good)["images"]
    unet = service.loop.components.unet

    def broken_for_tall(*inputs):
        if inputs[0].shape[2] == 12:  # 96 px / 8
            raise RuntimeError("unet: engine lost")
        return unet(*inputs)

    outcomes = Outcomes()
    batcher = ContinuousBatcher(variant(service, unet=broken_for_tall))
    try:
        batcher.submit(wire(tall, tall_mask, steps=3, seed=2), outcomes.callback("tall"))
        batcher.submit(good, outcomes.callback("good"))
        outcomes.wait(2)
    finally:
        batcher.close()
    assert "engine lost" in str(outcomes.by_name["tall"])
    assert max_abs(outcomes.by_name["good"]["images"], alone) == 0


def test_a_raising_callback_does_not_stop_the_worker(service):
    errors: list[Exception] = []
    outcomes = Outcomes()

    def broken(outcome) -> None:
        raise OSError("client went away")

    batcher = ContinuousBatcher(service, on_callback_error=errors.append)
    try:
        batcher.submit(wire(steps=2, height=64, width=64, seed=1), broken)
        batcher.submit(wire(steps=2, height=64, width=64, seed=2), outcomes.callback("next"))
        outcomes.wait(1)
    finally:
        batcher.close()
    assert [str(e) for e in errors] == ["client went away"]
    assert outcomes.by_name["next"]["images"].shape == (1, 64, 64, 3)


def test_outpainting_runs_beside_the_loop_and_matches_alone(service, case):
    image, _ = case
    request = wire(image, np.zeros((64, 64), np.uint8), steps=3, seed=4)
    request["outpaint"] = np.array([16, 0, 8, 0], np.int32)
    alone = service.generate(request)
    outcomes = Outcomes()
    batcher = ContinuousBatcher(service)
    try:
        batcher.submit(request, outcomes.callback("outpaint"))
        batcher.submit(wire(image, case[1], steps=3, seed=5), outcomes.callback("inpaint"))
        outcomes.wait(2)
    finally:
        batcher.close()
    assert outcomes.by_name["outpaint"]["images"].shape == alone["images"].shape
    assert max_abs(outcomes.by_name["outpaint"]["images"], alone["images"]) == 0


def test_close_finishes_what_was_submitted_then_refuses(service):
    outcomes = Outcomes()
    batcher = ContinuousBatcher(service)
    for seed in (1, 2):
        batcher.submit(wire(steps=3, height=64, width=64, seed=seed), outcomes.callback(str(seed)))
    batcher.close()
    assert sorted(outcomes.order) == ["1", "2"]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(wire(steps=3, height=64, width=64, seed=3), outcomes.callback("late"))


# --- every outcome counted; outstanding steps; admission by memory ----------------------------


def test_every_request_is_counted_once_with_its_outcome(service, case):
    image, mask = case
    tall, tall_mask = make_case(96, 64, seed=4)
    outcomes, observed, gate, cancel = Outcomes(), Recorder(), threading.Event(), threading.Event()
    batcher = ContinuousBatcher(
        gated_unet(service, gate, broken_height=12),  # 96 px / 8
        max_active=1, max_queued=2, queue_timeout_s=WAIT_S, observer=observed,
    )  # fmt: skip
    try:
        batcher.submit(wire(image, mask, steps=2, seed=1), outcomes.callback("served"))
        batcher.submit(
            wire(image, mask, steps=2, seed=2), outcomes.callback("late"), timeout_s=0.05
        )
        batcher.submit(wire(image, mask, steps=2, seed=3), outcomes.callback("gone"), cancel.is_set)
        batcher.submit(wire(image, mask, steps=2, seed=4), outcomes.callback("full"))
        batcher.submit(wire(image, mask, steps=0), outcomes.callback("bad"))
        batcher.refuse(outcomes.callback("malformed"), RequestError("prompt", "batch of 2"))
        assert observed.counts() == {"overloaded": 1, "invalid": 2}  # answered at once
        time.sleep(0.1)  # past the late one's own timeout (not a timing assertion)
        cancel.set()
        gate.set()
        outcomes.wait(6)
        batcher.submit(wire(tall, tall_mask, steps=2, seed=5), outcomes.callback("broken"))
        outcomes.wait(7)
    finally:
        gate.set()
        batcher.close()
    assert observed.counts() == {"success": 1, "invalid": 2, "cancelled": 1, "timeout": 1,
                                 "overloaded": 1, "failed": 1}  # fmt: skip
    assert all(duration >= 0 for _, duration in observed.outcomes)
    assert len(observed.waits) == 4  # served, late, gone, broken left the queue
    assert observed.loads[-1] == (0, 0, 0) and batcher.outstanding_steps == 0


def test_outstanding_steps_count_queued_estimates_and_running_schedules(service, case):
    image, mask = case
    seen: list[tuple[int, int]] = []
    holder: dict[str, ContinuousBatcher] = {}

    def look(calls: int) -> None:  # at each UNet call, before that step is counted
        seen.append((holder["b"].outstanding_steps, holder["b"].memory_reserved))

    spied, _ = spied_service(service, look)
    observed, outcomes = Recorder(), Outcomes()
    batcher = holder["b"] = ContinuousBatcher(spied, max_active=1, observer=observed)
    first = wire(image, mask, steps=4, seed=1, scheduler="euler")
    half = wire(image, mask, steps=6, seed=2, scheduler="euler", strength=0.5)  # 3 steps
    reserved = sum(
        batcher.memory.request_bytes_of(service, service.parse(r)) for r in (first, half)
    )
    try:
        with batcher._wake:  # both taken before the worker looks: one turn sees both
            batcher.submit(first, outcomes.callback("first"))
            batcher.submit(half, outcomes.callback("half"))
        outcomes.wait(2)
    finally:
        batcher.close()
    assert [steps for steps, _ in seen] == [7, 6, 5, 4, 3, 2, 1]
    assert seen[0][1] == reserved
    assert batcher.outstanding_steps == 0 and batcher.memory_reserved == 0
    assert observed.loads[-1] == (0, 0, 0)


def test_outpainting_steps_are_images_times_bands_and_count_down(service, case):
    from sdserve_pipeline.admission import denoising_steps

    image, _ = case
    request = wire(image, np.zeros((64, 64), np.uint8), steps=2, seed=4, num_images=2)
    request["outpaint"] = np.array([0, 0, 200, 0], np.int32)  # 64 x 264: bands of 128
    expected = denoising_steps(service, service.parse(request))
    seen: list[int] = []
    holder: dict[str, ContinuousBatcher] = {}
    spied, _ = spied_service(service, lambda calls: seen.append(holder["b"].outstanding_steps))
    outcomes, observed = Outcomes(), Recorder()
    batcher = holder["b"] = ContinuousBatcher(spied, observer=observed)
    try:
        batcher.submit(request, outcomes.callback("outpaint"))
        outcomes.wait(1)
    finally:
        batcher.close()
    assert outcomes.by_name["outpaint"]["images"].shape == (2, 64, 264, 3)
    assert observed.counts() == {"success": 1} and len(observed.waits) == 1
    assert expected == 2 * 2 * 3  # steps x images x bands
    assert seen[0] == expected - 1  # the first step is counted as it starts
    assert seen == sorted(seen, reverse=True) and batcher.outstanding_steps == 0


def test_a_request_past_the_memory_budget_is_refused_at_once_with_the_numbers(service, case):
    from sdserve_pipeline.admission import MB, OverMemoryBudget

    image, mask = case
    small = wire(image, mask, steps=2, seed=1)
    large = wire(image, mask, steps=2, seed=1, num_images=8)
    probe = ContinuousBatcher(service)
    probe.close()
    one = probe.memory.request_bytes_of(service, service.parse(small))
    outcomes, observed, gate = Outcomes(), Recorder(), threading.Event()
    batcher = ContinuousBatcher(
        gated_unet(service, gate), memory_budget=int(1.5 * one), observer=observed
    )
    try:
        batcher.submit(small, outcomes.callback("first"))
        batcher.submit(small, outcomes.callback("second"))
        batcher.submit(large, outcomes.callback("large"))
        assert outcomes.order == ["second", "large"]  # refused at once, from this thread
        second, alone = outcomes.by_name["second"], outcomes.by_name["large"]
        assert isinstance(second, OverMemoryBudget) and isinstance(second, Overloaded)
        assert f"needs about {one / MB:.0f} MB" in str(second)
        assert f"budget is {1.5 * one / MB:.0f} MB" in str(second)
        assert f"in progress hold {one / MB:.0f} MB" in str(second)
        assert "more than the whole budget" in str(alone) and "more" not in str(second)
        assert batcher.memory_reserved == one
        gate.set()
        outcomes.wait(3)
        batcher.submit(small, outcomes.callback("after"))  # the first one's share is free
        outcomes.wait(4)
    finally:
        gate.set()
        batcher.close()
    assert outcomes.by_name["after"]["images"].shape == (1, 64, 64, 3)
    assert observed.counts() == {"success": 2, "overloaded": 2}
    assert batcher.memory_reserved == 0
