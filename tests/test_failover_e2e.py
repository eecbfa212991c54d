"""Fail over between replicas end to end: two real tritonservers on loopback serving the same
repository, one SDK client given both addresses, one server killed (SIGKILL to its process
group, as a crashed machine) while requests are in flight on it.

- With seeds and `retry_started`, no request is lost: the ones broken off on the killed
  server are sent again to the other, and every image equals the single-server reference
  for its seed.
- A restarted server (same address) is probed after its backoff and takes requests again.
- A server stopped gracefully (`TritonServer.stop()`: drain, then exit) loses no request even
  without `retry_started`: the requests it refuses never started.
- Without `retry_started`, exactly the requests broken off on the killed server fail (they
  may have started generating), each with a message saying so; every other one succeeds.

Everything is bounded: 20 requests at concurrency 4 (64×64, 30 steps), each with a 120 s
limit, the whole load within `LOAD_LIMIT_S`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cases import make_case
from tritonclient.utils import InferenceServerException

from sdserve_client import GenerationResult, InpaintClient, SdserveError
from sdserve_client.replicas import FailoverPolicy, Outcome, classify_exception
from sdserve_client.tls import connect
from sdserve_pipeline.triton_server import TritonServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PROMPT = "a red bicycle"
REQUESTS, CONCURRENCY, STEPS = 20, 4, 30
SEEDS = [100 + i for i in range(REQUESTS)]
LOAD_LIMIT_S = 300
REQUEST_TIMEOUT_S = 120


class Recorder:
    """Counts each replica's inference attempts and keeps their failures (wraps the SDK's
    own connection, so the clients are the real tritonclient ones)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.failures: list[tuple[str, InferenceServerException]] = []

    def connect(self, url: str) -> Any:
        return _Recorded(connect(url, None), url, self)


class _Recorded:
    def __init__(self, client: Any, url: str, recorder: Recorder) -> None:
        self._client, self._url, self._recorder = client, url, recorder

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        with self._recorder.lock:
            self._recorder.attempts[self._url] += 1
        try:
            return self._client.infer(*args, **kwargs)
        except InferenceServerException as error:
            with self._recorder.lock:
                self._recorder.failures.append((self._url, error))
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class Replicas:
    """Two servers of one repository; a killed one can be started again on its ports."""

    def __init__(self, repository: Path, build: Path) -> None:
        self.repository, self.build = repository, build
        self.servers = {name: self._server(name) for name in ("a", "b")}

    def _server(self, name: str, like: TritonServer | None = None) -> TritonServer:
        ports = like.ports if like is not None else None
        return TritonServer(
            self.repository,
            http_port=ports.http if ports else 0,
            grpc_port=ports.grpc if ports else 0,
            metrics_port=ports.metrics if ports else 0,
            build_dir=self.build / name,
            heal=False,  # this test is about replicas, not about a component's stub
        )

    def url(self, name: str) -> str:
        return self.servers[name].grpc_url

    def start(self, *names: str) -> None:
        for name in names:  # start all, then wait: the servers load side by side
            self.servers[name].start()
        for name in names:
            self.servers[name].wait_ready(timeout_s=300)

    def kill(self, name: str) -> None:
        """SIGKILL to the server's whole process group (no drain), then reap it."""
        server = self.servers[name]
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        server.stop()

    def restart(self, name: str) -> None:
        old = self.servers[name]
        assert not old.is_running
        self.servers[name] = self._server(name, like=old)
        self.start(name)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module")
def replicas(repository, tmp_path_factory):
    pair = Replicas(repository, tmp_path_factory.mktemp("replicas"))
    try:
        pair.start("a", "b")
        yield pair
    finally:
        pair.stop()


def _run(client: InpaintClient, seed: int) -> GenerationResult:
    image, mask = make_case(64, 64, seed=1)
    return client.inpaint(image, mask, PROMPT, steps=STEPS, seed=seed, timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def reference(replicas) -> dict[int, np.ndarray]:
    """Each seed's image from server b alone, under the same load."""
    with InpaintClient(replicas.url("b")) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda seed: _run(client, seed), SEEDS, timeout=LOAD_LIMIT_S))
    return {seed: result.arrays for seed, result in zip(SEEDS, results, strict=True)}


def _load_and_kill(
    client: InpaintClient, replicas: Replicas, victim: str, completed_first: int = 5
) -> list[Future[GenerationResult]]:
    """Sends every seed at `CONCURRENCY`; once `completed_first` are done and requests are in
    flight on `victim`, kills it. Returns the futures, all settled."""
    victim_url = replicas.url(victim)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(_run, client, seed) for seed in SEEDS]
        deadline = time.monotonic() + LOAD_LIMIT_S
        while time.monotonic() < deadline:
            done = sum(f.done() for f in futures)
            in_flight = {s.url: s.outstanding for s in client.replicas}[victim_url]
            if done >= completed_first and in_flight > 0:
                break
            assert done < REQUESTS, "the load ended before the victim had a request in flight"
            time.sleep(0.005)
        else:
            pytest.fail(f"no request in flight on {victim} within {LOAD_LIMIT_S} s")
        replicas.kill(victim)
        for future in futures:
            future.exception(timeout=LOAD_LIMIT_S)  # settled, or the test fails here
    return futures


def test_killing_a_replica_mid_load_loses_no_request(replicas, reference):
    recorder = Recorder()
    client = InpaintClient(
        [replicas.url("a"), replicas.url("b")],
        retry_started=True,  # with the seeds given, a retry returns the same images
        failover=FailoverPolicy(backoff_s=30.0, max_backoff_s=30.0),
        connect=recorder.connect,
    )
    with client:
        futures = _load_and_kill(client, replicas, victim="a")
        states = {s.url: s for s in client.replicas}
    results = [future.result() for future in futures]  # none failed
    for seed, result in zip(SEEDS, results, strict=True):
        assert result.seeds == [seed]
        np.testing.assert_array_equal(result.arrays, reference[seed])
    a, b = replicas.url("a"), replicas.url("b")
    broken = [e for url, e in recorder.failures if classify_exception(e) is Outcome.BROKEN]
    assert broken, f"no request was broken off on the killed server: {recorder.failures}"
    assert {url for url, _ in recorder.failures} == {a}
    assert recorder.attempts[a] + recorder.attempts[b] == REQUESTS + len(recorder.failures)
    assert recorder.attempts[a] > len(recorder.failures)  # a served requests before its death
    assert not states[a].healthy and states[b].healthy
    messages = sorted({f"{e.status()} {e.message()}" for _, e in recorder.failures})
    print(
        f"failover: {REQUESTS} requests, {len(broken)} broken off on the killed server and "
        f"resent, {len(recorder.failures) - len(broken)} other failed attempts, 0 lost; "
        f"attempts a={recorder.attempts[a]} b={recorder.attempts[b]}; errors seen: {messages}"
    )


def test_a_restarted_replica_is_probed_and_takes_requests_again(replicas, reference):
    if replicas.servers["a"].is_running:
        replicas.kill("a")
    recorder = Recorder()
    client = InpaintClient(
        [replicas.url("a"), replicas.url("b")],
        failover=FailoverPolicy(backoff_s=0.5, max_backoff_s=1.0, probe_timeout_s=2.0),
        connect=recorder.connect,
    )
    a = replicas.url("a")
    with client:
        for seed in SEEDS[:2]:  # a refuses the connection: the requests go to b
            np.testing.assert_array_equal(_run(client, seed).arrays, reference[seed])
        assert not {s.url: s for s in client.replicas}[a].healthy
        replicas.restart("a")
        deadline = time.monotonic() + 60
        seeds = iter(SEEDS * 10)
        while recorder.attempts[a] <= 1 and time.monotonic() < deadline:
            seed = next(seeds)
            np.testing.assert_array_equal(_run(client, seed).arrays, reference[seed])
            time.sleep(0.2)
        assert recorder.attempts[a] > 1, f"{a} never took a request after its restart"
        assert {s.url: s for s in client.replicas}[a].healthy


def test_a_replica_stopped_gracefully_mid_load_loses_no_request_even_without_retry(
    replicas, reference
):
    """`TritonServer.stop()` drains: the pipeline is unloaded (new requests are refused, the
    running ones finish), then the server exits. A refused request never started, so it
    moves to the other replica whatever `retry_started` says."""
    for name in ("a", "b"):
        if not replicas.servers[name].is_running:
            replicas.restart(name)
    recorder = Recorder()
    client = InpaintClient(
        [replicas.url("a"), replicas.url("b")],
        failover=FailoverPolicy(backoff_s=30.0, max_backoff_s=30.0),
        connect=recorder.connect,
    )  # retry_started=False: the default
    a = replicas.url("a")
    with client, ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(_run, client, seed) for seed in SEEDS]
        deadline = time.monotonic() + LOAD_LIMIT_S
        while sum(f.done() for f in futures) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        replicas.servers["a"].stop()  # drain, then SIGTERM; returns once the server is gone
        results = [future.result(timeout=LOAD_LIMIT_S) for future in futures]  # none failed
    for seed, result in zip(SEEDS, results, strict=True):
        np.testing.assert_array_equal(result.arrays, reference[seed])
    outcomes = Counter(classify_exception(e).name for _, e in recorder.failures)
    assert Outcome.BROKEN.name not in outcomes, recorder.failures
    assert recorder.attempts[a] > len(recorder.failures)  # a served until it was stopped
    print(f"graceful stop: {REQUESTS} requests, 0 lost; failed attempts on a: {dict(outcomes)}")


def test_without_retry_started_only_the_broken_off_requests_fail_and_say_why(replicas, reference):
    for name in ("a", "b"):
        if not replicas.servers[name].is_running:
            replicas.restart(name)
    recorder = Recorder()
    client = InpaintClient(
        [replicas.url("a"), replicas.url("b")],
        failover=FailoverPolicy(backoff_s=30.0, max_backoff_s=30.0),
        connect=recorder.connect,
    )  # retry_started=False: the default
    with client:
        futures = _load_and_kill(client, replicas, victim="b")
    failed = []
    for seed, future in zip(SEEDS, futures, strict=True):
        error = future.exception()
        if error is None:
            np.testing.assert_array_equal(future.result().arrays, reference[seed])
            continue
        assert isinstance(error, SdserveError)
        assert error.status == "StatusCode.UNAVAILABLE", error
        assert "may have started generating" in error.message, error
        assert "retry_started=True" in error.message, error
        failed.append(seed)
    broken = [e for url, e in recorder.failures if classify_exception(e) is Outcome.BROKEN]
    assert 1 <= len(failed) == len(broken) <= CONCURRENCY, (failed, recorder.failures)
    assert {url for url, _ in recorder.failures} == {replicas.url("b")}
    print(f"no retry: {len(failed)} of {REQUESTS} broken off on the killed server, failed")
