"""A backend stub that dies is reloaded: the watchdog's logic on fakes, then a real
tritonserver whose UNet (or pipeline) stub is SIGKILLed under concurrent load."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cases import make_case, served

from sdserve_client import InpaintClient, SdserveError
from sdserve_pipeline.healing import STUB_NAME, StubWatchdog, python_stubs
from sdserve_pipeline.triton_control import ModelState

PROMPT = "a red bicycle"

# --- The watchdog's decisions, on fakes ----------------------------------------------------


class FakeControl:
    def __init__(self, states: dict[str, str]) -> None:
        self.states = states
        self.calls: list[tuple[str, str]] = []

    def index(self) -> list[ModelState]:
        return [ModelState(name, "1", state) for name, state in self.states.items()]

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name))

    def load(self, name: str) -> None:
        self.calls.append(("load", name))


def _watchdog(stubs: list[dict[str, list[int]]], states: dict[str, str]):
    control = FakeControl(states)
    snapshots = iter(stubs)
    current: dict[str, dict[str, list[int]]] = {}

    def list_stubs(pid: int) -> dict[str, list[int]]:
        current["now"] = next(snapshots, current.get("now", {}))
        return current["now"]

    watchdog = StubWatchdog(1, control, list_stubs=list_stubs)  # type: ignore[arg-type]
    watchdog.expected = {m: len(p) for m, p in list_stubs(1).items()}
    return watchdog, control


def test_a_ready_model_that_lost_its_stub_is_unloaded_then_loaded() -> None:
    healthy = {"unet": [10], "inpaint": [11]}
    watchdog, control = _watchdog(
        [healthy, {"inpaint": [11]}, {"unet": [12], "inpaint": [11]}], {"unet": "READY"}
    )

    assert watchdog.check() == ["unet"]
    assert control.calls == [("unload", "unet"), ("load", "unet")]
    assert watchdog.expected == {"unet": 1, "inpaint": 1} and watchdog.reloads[0][0] == "unet"


def test_a_model_the_operator_unloaded_is_not_reloaded() -> None:
    watchdog, control = _watchdog(
        [{"unet": [10], "inpaint": [11]}, {"inpaint": [11]}], {"unet": "UNAVAILABLE"}
    )

    assert watchdog.check() == [] and control.calls == []
    assert watchdog.expected == {"inpaint": 1}  # no longer watched


def test_a_reloaded_or_new_model_is_watched_without_a_reload() -> None:
    watchdog, control = _watchdog(
        [{"unet": [10]}, {"unet": [20], "vae": [21, 22]}], {"unet": "READY"}
    )

    assert watchdog.check() == [] and control.calls == []  # unet: a new stub, none missing
    assert watchdog.expected == {"unet": 1, "vae": 2}


def test_python_stubs_reads_children_of_the_server_by_model(tmp_path: Path) -> None:
    def process(pid: int, ppid: int, state: str, *argv: str) -> None:
        folder = tmp_path / str(pid)
        folder.mkdir()
        (folder / "stat").write_text(f"{pid} (name with ) paren) {state} {ppid} 1 1\n")
        (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    stub = f"/build/triton_backends/python/{STUB_NAME}"
    process(101, 100, "S", stub, "/repo/unet/1/model.py", "shm")
    process(102, 100, "S", stub, "/repo/unet/1/model.py", "shm")
    process(103, 100, "Z", stub, "/repo/inpaint/1/model.py", "shm")  # a zombie: dead
    process(104, 999, "S", stub, "/repo/vae/1/model.py", "shm")  # another server's
    process(105, 100, "S", "/usr/bin/python3", "/repo/vae/1/model.py")  # not a stub
    (tmp_path / "self").mkdir()

    assert python_stubs(100, proc=tmp_path) == {"unet": [101, 102]}


# --- End to end: kill a stub under load -----------------------------------------------------

STEPS = 150  # the most a request may ask: the kill lands mid-run however fast the machine
CLIENTS = 6
ANSWER_BOUND_S = 120.0  # every request answered within this after the kill


@pytest.fixture(scope="module")
def healing_server(repository, tmp_path_factory):
    events: list[str] = []
    with served(repository, tmp_path_factory.mktemp("heal"), on_event=events.append) as srv:
        srv.events = events  # type: ignore[attr-defined]
        yield srv


def _generate(url: str, seed: int, timeout_s: float = ANSWER_BOUND_S) -> np.ndarray:
    image, mask = make_case(64, 64, seed=1)
    with InpaintClient(url, timeout=timeout_s) as client:
        return client.inpaint(image, mask, PROMPT, steps=STEPS, seed=seed).arrays[0]


class ReadinessLog:
    """Polls server and model readiness in a thread; records every change."""

    def __init__(self, server, model: str) -> None:
        self.server, self.model = server, model
        self.seen: list[tuple[float, bool, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        """Records the current readiness if it changed."""
        control = self.server.control
        try:
            state = (control.is_ready(), control.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 (a busy server: next poll)
            return
        if not self.seen or self.seen[-1][1:] != state:
            self.seen.append((time.monotonic(), *state))

    def __enter__(self) -> ReadinessLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the state at the end, whatever the last poll saw


def _wait_healed(server, model: str, count: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    watchdog = server.watchdog
    while time.monotonic() < deadline:
        reloaded = [m for m, _ in watchdog.reloads].count(model) >= count
        if reloaded and server.control.is_ready() and server.control.is_model_ready(model):
            return
        time.sleep(0.2)
    pytest.fail(f"{model} not reloaded within {timeout_s}s; events: {server.events}")


def _unet_calls(server) -> int:
    """UNet executions so far (Triton's statistics API, with the operator's key)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics("unet", headers=server.admin_key.grpc_headers)
    return sum(s.execution_count for s in stats.model_stats)


def _kill_stub_under_load(server, model: str, reloads_before: int, timeout_s: float):
    """Starts CLIENTS requests (deadline `timeout_s`), SIGKILLs `model`'s stub once they
    run, and returns (outcomes, seconds from the kill to the last answer, readiness log,
    the time of the kill)."""
    reference = _generate(server.grpc_url, seed=5)
    outcomes: dict[int, object] = {}
    with ReadinessLog(server, model) as readiness, ThreadPoolExecutor(CLIENTS) as pool:

        def one(seed: int) -> None:
            try:
                outcomes[seed] = _generate(server.grpc_url, seed, timeout_s)
            except SdserveError as exc:
                outcomes[seed] = exc

        before = _unet_calls(server)
        futures = [pool.submit(one, seed) for seed in range(100, 100 + CLIENTS)]
        deadline = time.monotonic() + 60
        while _unet_calls(server) < before + 3:  # admitted and denoising
            assert time.monotonic() < deadline, "the requests never reached the UNet"
            time.sleep(0.05)
        (pid,) = python_stubs(server.pid)[model]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        for future in futures:
            future.result(timeout=timeout_s + 30)
        answered_s = time.monotonic() - killed
        _wait_healed(server, model, reloads_before + 1)
    assert np.array_equal(_generate(server.grpc_url, seed=5), reference)  # same image after
    return outcomes, answered_s, readiness.seen, killed


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_unet_stub_fails_its_requests_clearly_and_is_reloaded(healing_server):
    server = healing_server

    outcomes, answered_s, seen, killed = _kill_stub_under_load(server, "unet", 0, ANSWER_BOUND_S)

    failures = [o for o in outcomes.values() if isinstance(o, SdserveError)]
    assert len(outcomes) == CLIENTS and answered_s < ANSWER_BOUND_S
    assert failures, "the kill landed after every request had finished"
    for failure in failures:
        assert failure.status in ("StatusCode.INTERNAL", "StatusCode.UNAVAILABLE"), failure
        assert "unet" in str(failure), failure
    # not ready while broken, ready again after
    after_kill = [(ready, model_ready) for t, ready, model_ready in seen if t > killed]
    assert (False, False) in after_kill and after_kill[-1] == (True, True), seen
    recovery_s = server.watchdog.reloads[-1][1]
    print(f"\nunet stub killed: {len(failures)}/{CLIENTS} requests failed, all answered in "
          f"{answered_s:.1f}s; reloaded in {recovery_s:.1f}s; events: {server.events}")  # fmt: skip


PIPELINE_DEADLINE_S = 45.0


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_pipeline_stub_is_reloaded_and_serves_the_same_images(healing_server):
    """Requests inside a pipeline stub that dies cannot be answered by anyone: Triton 2.51's
    Python backend loses their response senders with the stub. They end at the client's
    deadline; the server turns not-ready, reloads the pipeline and serves as before."""
    server = healing_server
    before = [m for m, _ in server.watchdog.reloads].count("inpaint")

    outcomes, answered_s, seen, killed = _kill_stub_under_load(
        server, "inpaint", before, PIPELINE_DEADLINE_S
    )

    assert len(outcomes) == CLIENTS and answered_s < PIPELINE_DEADLINE_S + 10
    clear = ("StatusCode.INTERNAL", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
    for outcome in outcomes.values():
        if isinstance(outcome, SdserveError):
            assert outcome.status in clear, outcome
    after_kill = [ready for t, ready, _ in seen if t > killed]
    assert False in after_kill and after_kill[-1] is True, seen
    print(f"\npipeline stub killed: outcomes {[type(o).__name__ for o in outcomes.values()]}, "
          f"answered in {answered_s:.1f}s; events: {server.events}")  # fmt: skip


@pytest.mark.e2e
def test_the_standalone_watchdog_heals_a_server_started_without_the_launcher(tmp_path: Path):
    """docker/entrypoint.sh runs `python -m sdserve_pipeline.healing` beside tritonserver."""
    import subprocess
    import sys

    from helpers import ADD_ONE, infer_add_one, write_model

    from sdserve_pipeline.triton_server import TritonServer

    repository = tmp_path / "models"
    write_model(repository, "add_one", ADD_ONE)
    server = TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0,
                          build_dir=tmp_path / "build", heal=False)  # fmt: skip
    with server:
        server.wait_ready(120)
        env = {**os.environ, "SDSERVE_ADMIN_KEY": server.admin_key.value}
        env.pop("SDSERVE_ADMIN_KEY_FILE", None)
        watchdog = subprocess.Popen(
            [sys.executable, "-m", "sdserve_pipeline.healing", "--server-pid", str(server.pid),
             "--http", server.http_url],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(3)  # it snapshots the stubs once the server is ready
            (pid,) = python_stubs(server.pid)["add_one"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while python_stubs(server.pid).get("add_one", [pid]) == [pid]:
                assert time.monotonic() < deadline, "add_one was not reloaded"
                time.sleep(0.2)
            while not server.control.is_model_ready("add_one"):
                assert time.monotonic() < deadline, "add_one not ready after its reload"
                time.sleep(0.2)
            np.testing.assert_array_equal(infer_add_one(server.grpc_url), [2.0, 3.5, -2.0])
        finally:
            server.stop()
            _, log = watchdog.communicate(timeout=30)  # ends with its server
    assert watchdog.returncode == 0, log
    assert "watching add_one" in log and "add_one reloaded in" in log, log
