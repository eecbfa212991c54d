"""Several Triton servers serving the same models: spread requests, fail over, re-probe.

A `ReplicaPool` holds one gRPC client per server address. Each request goes to the healthy
replica with the fewest requests outstanding from this pool (round robin among equals). A
replica that cannot be reached, or that broke a request off, is marked unhealthy for a
backoff period (doubling per consecutive failure, up to a maximum); once that has passed
the next request to look for a replica probes it (server and model ready) first. When no
replica is healthy, the one due soonest is tried anyway, so a single server behaves as a
plain client.

Whether a failed request may go to another replica depends on what the failure says about
it (`classify`):

- `NOT_SENT`: no server got it (connection refused, unreachable, TLS setup failed);
- `REFUSED`: a server answered that it did not start it (queue full, request timed out in
  its queue, model not loaded there or being unloaded);
- `BROKEN`: the connection broke during the call (a server killed mid-request), or a
  backend process of the server died under it: the request may have started generating;
- `FINAL`: any other answer (invalid input, a cancel, a deadline, a failure inside the
  pipeline), which another replica would repeat or which the caller asked for.

`NOT_SENT` and `REFUSED` are retried on another replica; `BROKEN` only for a request the
caller allows (`retry_started`) and that is deterministic (a seed given: the retry returns
the same images); `FINAL` never.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

T = TypeVar("T")


# UNAVAILABLE answers of a server that did not start the request (Triton's and the
# pipeline's own wording). Any other UNAVAILABLE is taken as a broken call.
NOT_STARTED_MESSAGES: tuple[str, ...] = (
    "Exceeds maximum queue size",  # the pipeline's queue is full
    "Request timeout expired",  # waited in the pipeline's queue, never started
    "memory budget",  # refused by admission by memory
    "has no available versions",  # the model is not loaded (or being unloaded) there
    "unknown model",
)
# Of those, the ones from a busy but healthy server: it stays in rotation.
BUSY_MESSAGES: tuple[str, ...] = ("Exceeds maximum queue size", "memory budget")
# INTERNAL answers of a server whose backend stub died during the request (Triton 2.51:
# "unet: Stub process 'unet_0_0' is not healthy."); the server reloads the model meanwhile.
CRASH_MESSAGES: tuple[str, ...] = ("is not healthy", "Stub process")
# gRPC's wording of a call that never reached a server.
_NOT_SENT_MESSAGES: tuple[str, ...] = (
    "failed to connect to all addresses",
    "errors resolving",
    "DNS resolution failed",
    "Connection refused",
    "Network is unreachable",
    "No route to host",
)
_RESTRICTED = "This protocol is restricted"  # a control API without its key, not a failure


class ReplicaError(InferenceServerException):  # type: ignore[misc]
    """A tritonclient error from the replica(s) at `url`; still an `InferenceServerException`.

    Args:
        url (`str`): the replica's address (comma-separated when several failed).
        message (`str`): what went wrong (each replica's failure when several did).
        status (`str`, *optional*): the gRPC status string of the (last) failure.
    """

    def __init__(self, url: str, message: str, status: str | None) -> None:
        super().__init__(msg=message, status=status)
        self.url = url


Describe = Callable[[str, str], str]
"""`(url, message) -> message` a pool applies to its replicas' errors (e.g. TLS hints)."""


def _keep(url: str, message: str) -> str:
    return message


class Outcome(enum.Enum):
    """What a failed call says about the request and the replica (see the module doc)."""

    NOT_SENT = "not sent"
    REFUSED = "refused"
    BROKEN = "broken"
    FINAL = "final"

    def may_retry(self, started_allowed: bool) -> bool:
        """Whether the request may go to another replica."""
        if self is Outcome.BROKEN:
            return started_allowed
        return self in (Outcome.NOT_SENT, Outcome.REFUSED)


def classify(status: str | None, message: str) -> Outcome:
    """The `Outcome` of a failed call from its gRPC status string and message."""
    code = (status or "").rsplit(".", 1)[-1]
    if code == "UNAVAILABLE":
        if _RESTRICTED in message:
            return Outcome.FINAL
        if any(text in message for text in _NOT_SENT_MESSAGES):
            return Outcome.NOT_SENT
        if any(text in message for text in NOT_STARTED_MESSAGES):
            return Outcome.REFUSED
        return Outcome.BROKEN
    if code == "NOT_FOUND" and "unknown model" in message:
        return Outcome.REFUSED  # not loaded here (or being unloaded): another may have it
    if code == "INTERNAL" and any(text in message for text in CRASH_MESSAGES):
        return Outcome.BROKEN  # a backend process died under it: this server is reloading
    return Outcome.FINAL


def classify_exception(error: InferenceServerException) -> Outcome:
    """`classify` for a tritonclient exception."""
    status = error.status()
    return classify(None if status is None else str(status), str(error.message() or error))


@dataclass(frozen=True)
class FailoverPolicy:
    """How a `ReplicaPool` treats failed replicas.

    Args:
        backoff_s (`float`, *optional*, defaults to 1.0):
            Seconds a failed replica is left out before it is probed again; doubles with
            each consecutive failure.
        max_backoff_s (`float`, *optional*, defaults to 30.0): The longest backoff.
        probe_timeout_s (`float`, *optional*, defaults to 2.0):
            Limit of each readiness call of a probe.
    """

    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    probe_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < backoff_s <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}"
            )
        if self.probe_timeout_s <= 0:
            raise ValueError(f"probe_timeout_s must be > 0, got {self.probe_timeout_s}")


@dataclass(frozen=True)
class ReplicaState:
    """One replica as the pool sees it.

    Args:
        url (`str`): its gRPC address.
        healthy (`bool`): in rotation (not failed, or probed ready since).
        outstanding (`int`): requests of this pool in flight there.
        failures (`int`): consecutive failures.
        last_error (`str`, *optional*): the latest failure's message.
    """

    url: str
    healthy: bool
    outstanding: int
    failures: int
    last_error: str | None = None


class Replica:
    """A server address, its client and its health (guarded by the pool's lock)."""

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.client = client
        self.healthy = True
        self.outstanding = 0
        self.failures = 0
        self.retry_at = 0.0
        self.probing = False
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"Replica({self.url!r}, healthy={self.healthy}, outstanding={self.outstanding})"


def combine(errors: Sequence[ReplicaError]) -> ReplicaError:
    """One error for the failures of several replicas (the only one's as it is)."""
    if len(errors) == 1:
        return errors[0]
    urls = ",".join(dict.fromkeys(e.url for e in errors))
    parts = "; ".join(f"{e.url}: {e}" for e in errors)
    last = errors[-1].status()
    return ReplicaError(urls, f"no replica could serve the call: {parts}", last)


def split_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """Server addresses from one string (comma-separated) or a sequence; at least one."""
    items = url.split(",") if isinstance(url, str) else list(url)
    urls = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not urls:
        raise ValueError(f"no server address in {url!r}")
    return urls


class ReplicaPool:
    """Clients of several servers with the same models; see the module doc.

    Args:
        clients (`Sequence[tuple[str, Any]]`): (address, tritonclient) per replica.
        model (`str`): the model whose readiness a probe checks.
        policy (`FailoverPolicy`, *optional*): backoff and probe settings.
        describe (`Callable[[str, str], str]`, *optional*):
            Rewords a replica's error message (`url, message -> message`) in `ReplicaError`s.
        clock (`Callable[[], float]`, *optional*): monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        clients: Sequence[tuple[str, Any]],
        model: str,
        policy: FailoverPolicy | None = None,
        describe: Describe = _keep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ValueError("a replica pool needs at least one server")
        self.model = model
        self.policy = policy or FailoverPolicy()
        self.describe = describe
        self._replicas = [Replica(url, client) for url, client in clients]
        self._clock = clock
        self._lock = threading.Lock()
        self._turn = 0

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(r.url for r in self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def acquire(self, exclude: Collection[Replica] = (), *, rotate: bool = True) -> Replica | None:
        """The replica for the next attempt, counted as outstanding until `release`; `None`
        when every replica is in `exclude`.

        Probes the replicas whose backoff has passed, then picks the healthy one with the
        fewest requests outstanding (round robin among equals; without `rotate`, the first
        of them, and the turn is left as it is); with none healthy, the one whose backoff
        ends first.
        """
        self._probe_due(exclude)
        with self._lock:
            candidates = [r for r in self._replicas if r not in exclude]
            if not candidates:
                return None
            healthy = [r for r in candidates if r.healthy]
            if healthy:
                fewest = min(r.outstanding for r in healthy)
                equals = [r for r in healthy if r.outstanding == fewest]
                replica = equals[self._turn % len(equals) if rotate else 0]
                self._turn += rotate
            else:
                replica = min(candidates, key=lambda r: r.retry_at)
            replica.outstanding += 1
            return replica

    def release(
        self,
        replica: Replica,
        error: InferenceServerException | None = None,
        *,
        refusal_marks: bool = True,
    ) -> Outcome:
        """Ends an attempt on `replica`: healthy again after a success, or marked after a
        failure by what `error` says; returns the failure's `Outcome` (`FINAL` on success).

        With `refusal_marks` off, a `REFUSED` answer leaves the replica in rotation (the
        answer concerned one model, and the pool serves calls about several).
        """
        outcome = Outcome.FINAL if error is None else classify_exception(error)
        with self._lock:
            replica.outstanding -= 1
            if error is None:
                self._mark_ok(replica)
            elif outcome is not Outcome.REFUSED or refusal_marks:
                self._mark(replica, outcome, str(error.message() or error))
        return outcome

    def call(self, method: Callable[[Any], T]) -> T:
        """Runs an idempotent call (metadata, readiness, config) on a replica, failing over to
        the others on anything but a `FINAL` answer.

        Raises:
            ReplicaError: the `FINAL` answer, or every replica's failure.
        """
        tried: list[Replica] = []
        errors: list[ReplicaError] = []
        while (replica := self.acquire(tried, rotate=False)) is not None:
            tried.append(replica)
            try:
                result = method(replica.client)
            except InferenceServerException as error:
                outcome = self.release(replica, error, refusal_marks=False)
                failure = self.error(replica.url, error)
                if outcome is Outcome.FINAL:
                    raise failure from None
                errors.append(failure)
                continue
            self.release(replica)
            return result
        raise combine(errors)  # every replica failed (there is at least one)

    def error(self, url: str, error: InferenceServerException) -> ReplicaError:
        """`error` of the replica at `url` as a `ReplicaError`, reworded by `describe`."""
        if isinstance(error, ReplicaError):
            return error
        status = error.status()
        message = self.describe(url, str(error.message() or error))
        return ReplicaError(url, message, None if status is None else str(status))

    def probe(self, replica: Replica, timeout: float | None = None) -> bool:
        """Asks `replica` whether the server and the model are ready; updates its health.

        Args:
            replica (`Replica`): one of this pool's.
            timeout (`float`, *optional*): limit per call; the policy's `probe_timeout_s`.
        """
        timeout = self.policy.probe_timeout_s if timeout is None else timeout
        try:
            ready = bool(replica.client.is_server_ready(client_timeout=timeout)) and bool(
                replica.client.is_model_ready(self.model, client_timeout=timeout)
            )
            reason = None if ready else f"{self.model!r} not ready"
        except InferenceServerException as error:
            ready, reason = False, str(error.message() or error)
        with self._lock:
            replica.probing = False
            if ready:
                self._mark_ok(replica)
            else:
                self._mark(replica, Outcome.NOT_SENT, reason)
        return ready

    def states(self) -> list[ReplicaState]:
        """A snapshot of every replica's health and load."""
        with self._lock:
            return [
                ReplicaState(r.url, r.healthy, r.outstanding, r.failures, r.last_error)
                for r in self._replicas
            ]

    def replicas(self) -> list[Replica]:
        """The replicas, in the order of their addresses."""
        return list(self._replicas)

    def close(self) -> None:
        """Closes every replica's client."""
        for replica in self._replicas:
            replica.client.close()

    def _probe_due(self, exclude: Collection[Replica]) -> None:
        now = self._clock()
        with self._lock:
            due = [
                r
                for r in self._replicas
                if not r.healthy and not r.probing and r.retry_at <= now and r not in exclude
            ]
            for replica in due:
                replica.probing = True  # one prober per replica; the others skip it
        for replica in due:
            self.probe(replica)

    def _mark_ok(self, replica: Replica) -> None:
        replica.healthy, replica.failures, replica.retry_at = True, 0, 0.0

    def _mark(self, replica: Replica, outcome: Outcome, reason: str | None) -> None:
        replica.last_error = reason
        if outcome is Outcome.FINAL or (
            outcome is Outcome.REFUSED and any(text in (reason or "") for text in BUSY_MESSAGES)
        ):
            return  # the server answered, or is busy: still in rotation
        replica.healthy = False
        replica.failures += 1
        backoff = self.policy.backoff_s * 2 ** min(replica.failures - 1, 30)
        replica.retry_at = self._clock() + min(backoff, self.policy.max_backoff_s)


__all__ = [
    "BUSY_MESSAGES",
    "CRASH_MESSAGES",
    "NOT_STARTED_MESSAGES",
    "FailoverPolicy",
    "Outcome",
    "Replica",
    "ReplicaError",
    "ReplicaPool",
    "ReplicaState",
    "classify",
    "classify_exception",
    "combine",
    "split_urls",
]
