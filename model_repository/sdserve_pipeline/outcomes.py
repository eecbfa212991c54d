"""What became of each request: its outcome, how long it took, how long it queued.

Triton counts a pipeline request as a success as soon as `execute` hands it to the batcher,
before any answer, so its own counters say nothing about overloads, timeouts, cancellations
or failures. The batcher reports every answer here instead (exactly once per request, those
refused before queueing included), through an `Observer`; the Triton pipeline model forwards
the reports to its custom metrics (`sdserve_requests_total`, `sdserve_request_duration_us`,
`sdserve_queue_wait_us`, `sdserve_outstanding_steps`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy.typing as npt

from sdserve_pipeline.executor import Cancelled
from sdserve_protocol.metrics import OUTCOMES
from sdserve_protocol.rules import RequestError

# The `outcome` label values, declared with the metric names (readers import them there):
# success; invalid (RequestError: INVALID_ARG, nothing was run); cancelled (by the client);
# timeout (waited in the queue past its timeout); overloaded (refused at once: queue full, or
# not enough memory budget left); failed (anything else: a component error, a bug).
SUCCESS, INVALID, CANCELLED, TIMEOUT, OVERLOADED, FAILED = OUTCOMES

# Histogram bucket bounds, microseconds. A request takes from ~10 ms (a tiny image, refused
# or invalid) to minutes (50 steps at 1024² on a CPU); queue waits from ~0 to the queue
# timeout (120 s by default).
DURATION_BUCKETS_US = tuple(
    float(s * 1e6) for s in (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
)
QUEUE_WAIT_BUCKETS_US = tuple(
    float(s * 1e6) for s in (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
)


class Overloaded(Exception):
    """Refused at once: `max_active` requests are denoising and `max_queued` more are waiting.

    The default message is Triton's own for a full queue, so clients see one wording either
    way. Subclasses give other reasons to refuse (see `memory.OverMemoryBudget`).
    """

    def __init__(self, message: str = "Exceeds maximum queue size") -> None:
        super().__init__(message)


class QueueTimeout(Exception):
    """The request waited to join the running batch longer than its queue timeout."""

    def __init__(self) -> None:
        super().__init__("Request timeout expired")


def outcome_of(result: Mapping[str, npt.NDArray[Any]] | Exception) -> str:
    """The `outcome` label of a request's answer: outputs are a success, an exception is
    classified by its type (Triton's codes follow the same split: INVALID_ARG, CANCELLED,
    UNAVAILABLE for timeout and overloaded, INTERNAL for failed)."""
    if not isinstance(result, Exception):
        return SUCCESS
    if isinstance(result, RequestError):
        return INVALID
    if isinstance(result, Cancelled):
        return CANCELLED
    if isinstance(result, QueueTimeout):
        return TIMEOUT
    if isinstance(result, Overloaded):
        return OVERLOADED
    return FAILED


class Observer(Protocol):
    """Told what the batcher does, for metrics. Called from the batcher's threads and the
    submitting ones; implementations must be thread-safe and must not block."""

    def answered(self, outcome: str, duration_s: float) -> None:
        """A request was answered (once per request): its `OUTCOMES` label and the seconds
        from being taken to being answered."""

    def dequeued(self, waited_s: float) -> None:
        """A request left the queue (started, timed out or cancelled before starting) after
        waiting `waited_s` seconds."""

    def load(self, pending: int, outstanding_steps: int, reserved_bytes: int) -> None:
        """The load changed: requests waiting to start, denoising steps left over queued and
        running requests, memory reserved by them (estimated bytes)."""


class NullObserver:
    """Observes nothing (in-process use, tests that do not look)."""

    def answered(self, outcome: str, duration_s: float) -> None:
        pass

    def dequeued(self, waited_s: float) -> None:
        pass

    def load(self, pending: int, outstanding_steps: int, reserved_bytes: int) -> None:
        pass
