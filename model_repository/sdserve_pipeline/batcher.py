"""Continuous batching: requests join the running batch at the next denoising step.

One worker thread owns the denoising loop. Each turn it

1. admits the requests that arrived since the last turn (prompt encoding, latents: their
   text-encoder and VAE-encoder calls batched),
2. runs one denoising step of every admitted request (one UNet call per latent size, split
   at the executor's `max_rows["unet"]`; requests may be at different steps of different
   schedules: timesteps are per row),
3. answers the requests that are done (one VAE-decoder call per latent size, composite)
   or cancelled.

So a request arriving mid-run waits at most one step to start, not for the whole batch, and
leaves as soon as its own steps are done. Each request keeps its own scheduler, seed,
guidance scale and strength: its images are the ones it gets alone.

Outpainting requests (several runs, band after band) go to one side thread so they never
hold up the shared loop.

The batcher owns the request queue: beyond `max_active` denoising requests, up to
`max_queued` more wait to join (first come, first admitted), each at most its queue timeout;
past that a request is refused at once (`Overloaded`). With a memory budget, a request whose
estimated peak memory (`admission.MemoryModel`) would take the total reserved by the requests
taken past the budget is refused at once too (`OverMemoryBudget`, an `Overloaded`).
`submit` never blocks, so in Triton `execute` returns at once and no request waits in
Triton's own scheduler queue. (Triton 2.51's dynamic batcher, which would otherwise hold that
queue, sometimes left a request queued about 500 ms while the model instance was free: see
benchmarks/README.md.)

Every request taken is answered exactly once, and each answer is reported to the `Observer`
with its outcome label (`outcomes.outcome_of`) and duration; so are queue waits and the load:
requests pending, denoising steps outstanding over queued and running requests (queued: the
estimate of `admission.denoising_steps`; running: the steps left on its schedule), memory
reserved.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from sdserve_pipeline.admission import MemoryBudget, MemoryModel, denoising_steps
from sdserve_pipeline.executor import Cancelled
from sdserve_pipeline.generation import Job
from sdserve_pipeline.outcomes import NullObserver, Observer, Overloaded, QueueTimeout, outcome_of
from sdserve_pipeline.service import PipelineService, wire_outputs
from sdserve_pipeline.streaming import Listener, PreviewDecoder, previews
from sdserve_protocol.canvas import Window
from sdserve_protocol.contract import GenerationParams
from sdserve_protocol.events import Preview, Progress, Queued

__all__ = ["ContinuousBatcher", "Done", "Overloaded", "QueueTimeout", "generate_all"]


class Lease(Protocol):
    """What a request holds while it runs (`checkpoints.CheckpointLease`)."""

    def enter(self) -> None: ...

    def exit(self) -> None: ...


# Receives a request's wire outputs, or the exception that ended it. Called exactly once.
Done = Callable[[dict[str, npt.NDArray[Any]] | Exception], None]


@dataclass(eq=False)
class _Request:
    params: GenerationParams
    is_cancelled: Callable[[], bool]
    done: Done
    queued_at: float  # time.monotonic() when it was taken
    deadline: float  # time.monotonic() after which it may no longer start
    steps_left: int = 0  # denoising steps still to run (an estimate until it starts)
    memory: int = 0  # estimated peak bytes, reserved while it is held
    job: Job | None = None
    answered: bool = False
    listener: Listener | None = None  # told its queue position, progress and previews
    position: int = 0  # its last reported queue position
    started_at: float = 0.0  # time.monotonic() when it started denoising
    leased: bool = False  # holds the batcher's lease (its checkpoint is loaded for it)


class ContinuousBatcher:
    """Serves requests through a `PipelineService` with step-level batching.

    Args:
        service: the validated pipeline (its loop and outpainting settings).
        max_active: most requests denoising together.
        max_queued: most requests waiting beyond those (outpainting ones included); more
            are refused at once with `Overloaded`.
        queue_timeout_s: how long a request may wait to start before it is answered with
            `QueueTimeout` (a request's own `timeout_s` replaces it; 0: no limit).
        on_callback_error: told when a `done` callback raises (the worker keeps going).
        observer: told every outcome, queue wait and load change (metrics; see `Observer`).
        memory: estimates each request's peak memory (default: `MemoryModel()` for the
            service's architecture and latent scale).
        memory_budget: most estimated bytes held by the requests taken (0: no limit); a
            request that would pass it is refused at once with `OverMemoryBudget`.
        join_wait_s: after a turn that answered k requests, how long to wait for up to k
            newcomers before the next step (0: none). Clients that send their next request
            when answered arrive a round trip after the answer, just after the next step has
            started; without this wait they sit out that whole step.
        preview: decodes the latents of the previews due in a step, all at once (default:
            the service's, `PipelineService.preview`: its preview decoder (a tiny VAE) when
            the repository has one, else the model family's linear projection,
            `streaming.linear_decoder`).
        lease: entered by each request before it starts and exited when it is answered
            (`checkpoints.CheckpointLease`: the components of a checkpoint loaded on demand
            stay loaded while a request runs). A request whose `enter` raises is answered
            with that error.
    """

    def __init__(
        self,
        service: PipelineService,
        max_active: int = 8,
        max_queued: int = 16,
        queue_timeout_s: float = 120.0,
        on_callback_error: Callable[[Exception], None] | None = None,
        observer: Observer | None = None,
        memory: MemoryModel | None = None,
        memory_budget: int = 0,
        join_wait_s: float = 0.0,
        preview: PreviewDecoder | None = None,
        lease: Lease | None = None,
    ) -> None:
        if max_active < 1 or max_queued < 0 or queue_timeout_s < 0:
            raise ValueError(
                f"need max_active >= 1, max_queued >= 0, queue_timeout_s >= 0; got "
                f"{max_active}, {max_queued}, {queue_timeout_s}"
            )
        self.service = service
        self.max_active = max_active
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.join_wait_s = join_wait_s
        self._on_callback_error = on_callback_error or (lambda err: None)
        self._observer = observer or NullObserver()
        facts = service.loop.facts
        self.memory = memory or MemoryModel(facts.architecture, facts.vae_scale_factor)
        self._preview = preview or service.preview
        self._lease = lease
        self._budget = MemoryBudget(memory_budget)
        self._held = 0  # requests taken and not yet answered
        self._pending = 0  # of those, not started yet
        self._steps = 0  # denoising steps left over the requests held
        self._waiting: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._active: list[_Request] = []
        self._outpainter = ThreadPoolExecutor(1, thread_name_prefix="sdserve-outpaint")
        self._worker = threading.Thread(target=self._run, name="sdserve-batcher", daemon=True)
        self._worker.start()

    def submit(
        self,
        inputs: Mapping[str, npt.NDArray[Any]],
        done: Done,
        is_cancelled: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
        listener: Listener | None = None,
    ) -> None:
        """Validate a wire request and queue it; `done` gets its outcome. Never blocks: a bad
        request's `RequestError`, `Overloaded` when the queue is full or `OverMemoryBudget`
        when its memory estimate does not fit, is answered at once from this thread.

        Args:
            timeout_s: how long this request may wait to start (None or 0: the batcher's
                `queue_timeout_s`).
            listener: told the request's events (a streamed request): its queue position
                when it changes, `Progress` after each denoising step, a `Preview` every
                `params.preview_every` steps. Called from the batcher's threads: must not
                block (`streaming.EventPublisher` queues them).

        Raises:
            RuntimeError: the batcher is closed.
        """
        now, limit = time.monotonic(), timeout_s or self.queue_timeout_s
        try:
            params = self.service.parse(inputs)
            steps = denoising_steps(self.service, params)
            memory = self.memory.request_bytes_of(self.service, params)
        except Exception as err:  # noqa: BLE001 (answered, not raised)
            self.refuse(done, err, now)
            return
        deadline = now + limit if limit > 0 else float("inf")
        request = _Request(params, is_cancelled or (lambda: False), done, now, deadline,
                           steps_left=steps, memory=memory, listener=listener)  # fmt: skip
        with self._wake:
            if self._closing:
                raise RuntimeError("the batcher is closed")
            refused = self._take(request)
            if refused is None:
                if params.outpaint is not None:
                    self._outpainter.submit(self._outpaint, request)
                else:
                    self._waiting.append(request)
                    self._wake.notify()
                positions = self._positions()
        if refused is not None:
            self.refuse(done, refused, now)
        else:
            self._tell_positions(positions)

    def refuse(self, done: Done, error: Exception, taken_at: float | None = None) -> None:
        """Answer a request that is not queued (a bad request, refused at once) with `error`;
        counted like every other answer. Callers use it for requests they reject before
        `submit` (e.g. a malformed batch dimension).

        Args:
            taken_at: `time.monotonic()` when the request arrived (default: now).
        """
        self._answer(done, error, time.monotonic() if taken_at is None else taken_at)

    def _take(self, request: _Request) -> Overloaded | None:
        """Hold the request if there is room in the queue and the memory budget (under the
        lock); else the reason it is refused."""
        if self._held >= self.max_active + self.max_queued:
            return Overloaded()
        try:
            self._budget.reserve(request.memory)
        except Overloaded as refused:
            return refused
        self._held += 1
        self._pending += 1
        self._steps += request.steps_left
        self._publish_load()
        return None

    def close(self, timeout_s: float | None = None) -> None:
        """Finish every request already submitted, then stop the worker."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout_s)
        self._outpainter.shutdown(wait=True)

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        answered = 0
        while True:
            taken = self._take_waiting(answered)
            if taken is None:
                return
            arrived, dropped = taken
            for request, outcome in dropped:
                self._finish(request, outcome)
            try:
                answered = self._turn(arrived)
            except Exception as err:  # noqa: BLE001 (a bug here must not hang every request)
                answered = 0
                for request in [*self._active, *arrived]:
                    self._finish(request, err)

    def _take_waiting(
        self, answered: int = 0
    ) -> tuple[list[_Request], list[tuple[_Request, Exception]]] | None:
        """The waiting requests that fit in the running batch, oldest first, and those that
        leave the queue unstarted (timed out or cancelled); waits while there is nothing to
        do. After a turn that `answered` requests, waits up to `join_wait_s` for as many
        newcomers (clients that send their next request on an answer), so they join the
        next step instead of the one after. None: closing and nothing left."""
        with self._wake:
            while not self._waiting and not self._active:
                if self._closing:
                    return None
                self._wake.wait()
            expected = min(answered, self.max_active - len(self._active))
            if expected > 0 and self.join_wait_s > 0 and not self._closing:
                self._wake.wait_for(
                    lambda: len(self._waiting) >= expected or self._closing, self.join_wait_s
                )
            now = time.monotonic()
            dropped: list[tuple[_Request, Exception]] = []
            for request in list(self._waiting):
                if request.is_cancelled():
                    dropped.append((request, Cancelled()))
                elif now > request.deadline:
                    dropped.append((request, QueueTimeout()))
            for request, _ in dropped:
                self._waiting.remove(request)
            room = self.max_active - len(self._active)
            arrived = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self._pending -= len(arrived) + len(dropped)
            if arrived or dropped:
                self._publish_load()
            positions = self._positions()
        for request in [*arrived, *(r for r, _ in dropped)]:
            self._dequeued(request, now)
        self._tell_positions(positions)
        return arrived, dropped

    def _positions(self) -> list[tuple[_Request, int]]:
        """The waiting streamed requests whose queue position changed (under the lock)."""
        moved = []
        for position, request in enumerate(self._waiting, start=1):
            if request.listener is not None and request.position != position:
                request.position = position
                moved.append((request, position))
        return moved

    def _tell_positions(self, moved: list[tuple[_Request, int]]) -> None:
        for request, position in moved:
            self._tell(request, Queued(position))

    def _tell(self, request: _Request, event: Queued | Progress | Preview) -> None:
        if request.listener is not None:
            self._observe(request.listener, event)

    def _tell_progress(self, stepped: list[_Request]) -> None:
        """`Progress` for each streamed request that stepped, then the previews due, decoded
        together."""
        now, wall = time.monotonic(), time.time()
        due: list[_Request] = []
        for request in stepped:
            if request.listener is None or request.job is None:
                continue
            job, total = request.job, len(request.job.timesteps)
            elapsed = now - request.started_at
            eta = elapsed / job.index * (total - job.index) if job.index else 0.0
            self._tell(request, Progress(job.index, total, elapsed, eta, time_s=wall))
            every = request.params.preview_every
            if every and job.index % every == 0 and not job.finished:
                due.append(request)
        if not due:
            return
        jobs = [self._job(request) for request in due]
        latents = [(job.latents, request.params) for job, request in zip(jobs, due, strict=True)]
        images = self._previews(latents)
        if images is None:
            return
        for request, job, one in zip(due, jobs, images, strict=True):
            self._tell(request, Preview(job.index, len(job.timesteps), one))

    def _previews(
        self, due: list[tuple[torch.Tensor, GenerationParams]]
    ) -> list[npt.NDArray[np.uint8]] | None:
        """`streaming.previews` with this batcher's decoder; None (reported) if it fails: a
        preview is not worth a request."""
        try:
            return previews(self._preview, due, self.service.loop.facts.vae_scale_factor)
        except Exception as err:  # noqa: BLE001
            self._on_callback_error(err)
            return None

    @property
    def pending(self) -> int:
        """Requests taken and not started yet (waiting to join, or to outpaint)."""
        return self._pending

    @property
    def outstanding_steps(self) -> int:
        """Denoising steps left over the requests taken and not answered."""
        return self._steps

    @property
    def memory_reserved(self) -> int:
        """Estimated bytes held by the requests taken and not answered."""
        return self._budget.reserved

    @property
    def memory_budget(self) -> int:
        """The memory budget in bytes (0: none)."""
        return self._budget.budget

    def _dequeued(self, request: _Request, now: float) -> None:
        self._observe(self._observer.dequeued, now - request.queued_at)

    def _publish_load(self) -> None:
        """Report the load (under the lock, so reports arrive in order)."""
        self._observe(self._observer.load, self._pending, self._steps, self._budget.reserved)

    def _set_steps_left(self, updates: list[tuple[_Request, int]]) -> None:
        with self._wake:
            for request, left in updates:
                self._steps += max(left, 0) - request.steps_left
                request.steps_left = max(left, 0)
            self._publish_load()

    def _observe(self, report: Callable[..., None], *args: object) -> None:
        try:
            report(*args)
        except Exception as err:  # noqa: BLE001 (metrics must not stop serving)
            self._on_callback_error(err)

    def _turn(self, arrived: list[_Request]) -> int:
        """Admit, step, answer the finished; returns how many were answered."""
        loop = self.service.loop
        run = loop.executor.run_plans  # merges the calls the plans ask for at the same time
        arrived = [r for r in arrived if self._enter(r)]  # its checkpoint loaded (on demand)
        # 1. Admit the newcomers: prompt encoding and latents (text-encoder and VAE-encoder
        #    calls batched across them)
        started = run([loop.start_plan(r.params) for r in arrived])
        for request, job in zip(arrived, started, strict=True):
            if isinstance(job, Exception):
                self._finish(request, job)  # this request fails, not the rest
            else:
                request.job = job
                request.started_at = time.monotonic()
                self._active.append(request)
        # 2. One denoising step of every request still wanted (one UNet call per latent size;
        #    a failed call fails only the requests in it)
        for request in [r for r in self._active if r.is_cancelled()]:
            self._finish(request, Cancelled())
        stepping = list(self._active)
        stepped = run([loop.step_plan(self._job(r)) for r in stepping])
        for request, outcome in zip(stepping, stepped, strict=True):
            if isinstance(outcome, Exception):
                self._finish(request, outcome)
        self._tell_progress([r for r in stepping if not r.answered])
        self._set_steps_left([(r, _steps_left(self._job(r))) for r in self._active])
        # 3. Decode (one VAE-decoder call per latent size) and answer the finished requests
        done = [r for r in self._active if self._job(r).finished]
        decoded = run([loop.finish_plan(self._job(r)) for r in done])
        for request, images in zip(done, decoded, strict=True):
            if isinstance(images, Exception):
                self._finish(request, images)
            else:
                self._finish(request, wire_outputs(images, request.params))
        return len(done)

    @staticmethod
    def _job(request: _Request) -> Job:
        if request.job is None:
            raise RuntimeError("request was not admitted")
        return request.job

    def _finish(self, request: _Request, outcome: dict[str, npt.NDArray[Any]] | Exception) -> None:
        """Answer a request once and free its slot."""
        if request.answered:
            return
        request.answered = True
        if request in self._active:
            self._active.remove(request)
        request.job = None  # free its tensors now
        self._release(request)
        self._answer(request.done, outcome, request.queued_at)

    def _enter(self, request: _Request) -> bool:
        """Enter the lease for a request about to start; if that fails, answer it."""
        if self._lease is not None:
            try:
                self._lease.enter()
            except Exception as err:  # noqa: BLE001 (answered, not raised)
                self._finish(request, err)
                return False
            request.leased = True
        return True

    def _release(self, request: _Request) -> None:
        """Free the request's slot, its memory reservation, its outstanding steps and its
        hold on the lease."""
        with self._wake:
            self._held -= 1
            self._budget.release(request.memory)
            self._steps -= request.steps_left
            request.steps_left = 0
            self._publish_load()
        if request.leased and self._lease is not None:
            request.leased = False
            self._lease.exit()

    def _outpaint(self, request: _Request) -> None:
        total = request.steps_left
        per_band = denoising_steps(self.service, replace(request.params, outpaint=None))
        bands = max(1, total // (per_band * request.params.num_images))
        done = 0

        def check() -> bool:  # the loop checks once before each step
            self._set_steps_left([(request, request.steps_left - 1)])
            return request.is_cancelled()

        def stepped(
            job: Job, band: GenerationParams, canvas: npt.NDArray[np.uint8], window: Window
        ) -> None:
            nonlocal done
            done += 1
            self._outpaint_progress(request, done, total, per_band, bands)
            every = request.params.preview_every
            if request.listener is not None and every and done % every == 0 and done < total:
                self._outpaint_preview(request, job, band, canvas, window, done, total)

        try:
            now = time.monotonic()
            request.started_at = now
            with self._wake:
                self._pending -= 1
                self._publish_load()
            self._dequeued(request, now)
            if now > request.deadline:
                raise QueueTimeout()
            if self._lease is not None:
                self._lease.enter()
                request.leased = True
            outcome: dict[str, npt.NDArray[Any]] | Exception = self.service.outpaint_request(
                request.params, check, stepped if request.listener is not None else None
            )
        except Exception as err:  # noqa: BLE001
            outcome = err
        self._release(request)
        self._answer(request.done, outcome, request.queued_at)

    def _outpaint_progress(
        self, request: _Request, done: int, total: int, per_band: int, bands: int
    ) -> None:
        """`Progress` after `done` steps of an outpainting request (`bands` bands of
        `per_band` steps per image; `total` steps: an estimate, so it grows if exceeded)."""
        if request.listener is None:
            return
        total = max(total, done)
        elapsed = time.monotonic() - request.started_at
        band = (done - 1) // per_band % bands + 1
        eta = elapsed / done * (total - done)
        self._tell(request, Progress(done, total, elapsed, eta, band, bands, time.time()))

    def _outpaint_preview(
        self, request: _Request, job: Job, band: GenerationParams, canvas: npt.NDArray[np.uint8],
        window: Window, done: int, total: int,
    ) -> None:  # fmt: skip
        """A `Preview` of the whole canvas: the band being generated (its preview, over
        what is known) inside the canvas so far. Outpainting runs alone, so it is decoded
        alone."""
        decoded = self._previews([(job.latents, band)])
        if decoded is None:
            return
        images = decoded[0]
        whole = np.repeat(canvas[np.newaxis], len(images), axis=0)
        whole[(slice(None),) + tuple(window.slices)] = images
        self._tell(request, Preview(done, max(total, done), whole))

    def _answer(
        self, done: Done, outcome: dict[str, npt.NDArray[Any]] | Exception, taken_at: float
    ) -> None:
        """Report the outcome, then hand it to `done` (once per request)."""
        self._observe(self._observer.answered, outcome_of(outcome), time.monotonic() - taken_at)
        try:
            done(outcome)
        except Exception as err:  # noqa: BLE001 (a broken callback must not stop serving)
            self._on_callback_error(err)


def _steps_left(job: Job) -> int:
    """Denoising steps (UNet evaluations) left on a running job's schedule."""
    return len(job.timesteps) - job.index


def generate_all(
    service: PipelineService, requests: Sequence[Mapping[str, npt.NDArray[Any]]], **options: Any
) -> list[dict[str, npt.NDArray[Any]] | Exception]:
    """Serve wire requests through a `ContinuousBatcher` as if they all arrived at once, and
    wait for every answer: each request's wire outputs, or the exception that ended it.

    Every request is taken before the worker's first turn, so up to `max_active` (default:
    all of them) are admitted and denoised together. Tests and the benchmark ceiling use it,
    so the code that serves is the code they check and measure.

    Args:
        options: `ContinuousBatcher` arguments (default: room for every request, no queue
            timeout).
    """
    outcomes: list[dict[str, npt.NDArray[Any]] | Exception] = [
        RuntimeError("the batcher never answered") for _ in requests
    ]

    def answer(i: int) -> Done:
        def done(outcome: dict[str, npt.NDArray[Any]] | Exception) -> None:
            outcomes[i] = outcome

        return done

    settings: dict[str, Any] = {
        "max_active": max(1, len(requests)), "max_queued": len(requests), "queue_timeout_s": 0,
    }  # fmt: skip
    batcher = ContinuousBatcher(service, **(settings | options))
    try:
        with batcher._wake:  # the worker waits for this lock: one turn sees every request
            for i, inputs in enumerate(requests):
                batcher.submit(inputs, answer(i))
    finally:
        batcher.close()  # finishes every request submitted
    return outcomes
