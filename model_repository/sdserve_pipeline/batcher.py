"""Continuous batching: requests join the running batch at the next denoising step.

One worker thread owns the denoising loop. Each turn it

1. admits the requests that arrived since the last turn (prompt encoding, latents: their
   text-encoder and VAE-encoder calls batched),
2. runs one denoising step of every admitted request (one UNet call per latent size, split
   at the loop's `max_rows["unet"]`; requests may be at different steps of different
   schedules: timesteps are per row),
3. answers the requests that are done (one VAE-decoder call per latent size, composite)
   or cancelled.

So a request arriving mid-run waits at most one step to start, not for the whole batch, and
leaves as soon as its own steps are done. Each request keeps its own scheduler, seed,
guidance scale and strength: its images are the ones it gets alone.

Outpainting requests (several runs, band after band) go to one side thread so they never
hold up the shared loop. `submit` blocks while `max_active` requests are in progress; in
Triton that keeps the overflow in the model's own queue, where `max_queue_size` and the
queue timeout apply.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sdserve_pipeline.loop import Cancelled, Job
from sdserve_pipeline.request import GenerationParams
from sdserve_pipeline.service import PipelineService, wire_outputs

# Receives a request's wire outputs, or the exception that ended it. Called exactly once.
Done = Callable[[dict[str, np.ndarray] | Exception], None]


@dataclass(eq=False)
class _Request:
    params: GenerationParams
    is_cancelled: Callable[[], bool]
    done: Done
    job: Job | None = None
    answered: bool = False


class ContinuousBatcher:
    """Serves requests through a `PipelineService` with step-level batching.

    Args:
        service: the validated pipeline (its loop and outpainting settings).
        max_active: most requests admitted at once (denoising, waiting to join, or
            outpainting); `submit` blocks beyond it.
        on_callback_error: told when a `done` callback raises (the worker keeps going).
    """

    def __init__(
        self,
        service: PipelineService,
        max_active: int = 8,
        on_callback_error: Callable[[Exception], None] | None = None,
    ) -> None:
        if max_active < 1:
            raise ValueError(f"max_active must be at least 1, got {max_active}")
        self.service = service
        self.max_active = max_active
        self._on_callback_error = on_callback_error or (lambda err: None)
        self._slots = threading.BoundedSemaphore(max_active)
        self._arrived: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._active: list[_Request] = []
        self._outpainter = ThreadPoolExecutor(1, thread_name_prefix="sdserve-outpaint")
        self._worker = threading.Thread(target=self._run, name="sdserve-batcher", daemon=True)
        self._worker.start()

    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        done: Done,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Validate a wire request and queue it; `done` gets its outcome (a bad request's
        `RequestError` at once, from this thread). Blocks while `max_active` are in progress.

        Raises:
            RuntimeError: the batcher is closed.
        """
        try:
            params = self.service.parse(inputs)
        except Exception as err:  # noqa: BLE001 (answered, not raised)
            self._answer(done, err)
            return
        self._slots.acquire()
        request = _Request(params, is_cancelled or (lambda: False), done)
        with self._wake:
            if self._closing:
                self._slots.release()
                raise RuntimeError("the batcher is closed")
            if params.outpaint is not None:
                self._outpainter.submit(self._outpaint, request)
            else:
                self._arrived.append(request)
                self._wake.notify()

    def close(self, timeout_s: float | None = None) -> None:
        """Finish every request already submitted, then stop the worker."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout_s)
        self._outpainter.shutdown(wait=True)

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            arrived = self._take_arrived()
            if arrived is None:
                return
            try:
                self._turn(arrived)
            except Exception as err:  # noqa: BLE001 (a bug here must not hang every request)
                for request in [*self._active, *arrived]:
                    self._finish(request, err)

    def _take_arrived(self) -> list[_Request] | None:
        """Requests that arrived since the last turn; waits while there is nothing to do.
        None: closing and nothing left."""
        with self._wake:
            while not self._arrived and not self._active:
                if self._closing:
                    return None
                self._wake.wait()
            arrived = list(self._arrived)
            self._arrived.clear()
            return arrived

    def _turn(self, arrived: list[_Request]) -> None:
        loop = self.service.loop
        # 1. Admit the newcomers: prompt encoding and latents (text-encoder and VAE-encoder
        #    calls batched across them)
        started = loop.start_many([(r.params, r.is_cancelled) for r in arrived])
        for request, job in zip(arrived, started, strict=True):
            if isinstance(job, Exception):
                self._finish(request, job)  # this request fails, not the rest
            else:
                request.job = job
                self._active.append(request)
        # 2. One denoising step of every request still wanted
        for request in [r for r in self._active if r.is_cancelled()]:
            self._finish(request, Cancelled())
        failed = loop.step_all([self._job(r) for r in self._active])
        for request in [r for r in self._active if id(r.job) in failed]:
            self._finish(request, failed[id(request.job)])
        # 3. Decode (one VAE-decoder call per latent size) and answer the finished requests
        done = [r for r in self._active if self._job(r).finished]
        decoded = loop.finish_many([self._job(r) for r in done])
        for request, images in zip(done, decoded, strict=True):
            if isinstance(images, Exception):
                self._finish(request, images)
            else:
                self._finish(request, wire_outputs(images, request.params))

    @staticmethod
    def _job(request: _Request) -> Job:
        if request.job is None:
            raise RuntimeError("request was not admitted")
        return request.job

    def _finish(self, request: _Request, outcome: dict[str, np.ndarray] | Exception) -> None:
        """Answer a request once and free its slot."""
        if request.answered:
            return
        request.answered = True
        if request in self._active:
            self._active.remove(request)
        request.job = None  # free its tensors now
        self._answer(request.done, outcome)
        self._slots.release()

    def _outpaint(self, request: _Request) -> None:
        try:
            outcome: dict[str, np.ndarray] | Exception = self.service.outpaint_request(
                request.params, request.is_cancelled
            )
        except Exception as err:  # noqa: BLE001
            outcome = err
        self._answer(request.done, outcome)
        self._slots.release()

    def _answer(self, done: Done, outcome: dict[str, np.ndarray] | Exception) -> None:
        try:
            done(outcome)
        except Exception as err:  # noqa: BLE001 (a broken callback must not stop serving)
            self._on_callback_error(err)
