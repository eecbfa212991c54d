"""Reload a model whose Python backend stub died (OOM killer, segfault, a stray SIGKILL).

Triton 2.51 does not restart a dead stub: every request to the model fails with "Stub
process '<instance>' is not healthy" while `/v2/health/ready` and the model's own ready
endpoint keep answering 200. The watchdog below runs in the launcher, watches the server's
stub processes through `/proc` (Linux), and when a ready model has fewer live stubs than it
had, it unloads the model, which makes the server report not-ready at once (a model that is
unloading or loading fails Triton's strict readiness), and loads it again from the
repository; the server is ready again when the new stub is. Requests that were running in
the dead stub have already failed with Triton's INTERNAL error; those sent while the model
reloads fail at once with "model is not ready" (or, for components, the pipeline's
`ComponentError` naming the component).

A model that the operator unloads (its index state is no longer READY) is not reloaded; a
model the operator loads or reloads is picked up at the next poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from sdserve_pipeline.triton_control import ControlClient, ControlError

STUB_NAME = "triton_python_backend_stub"


def python_stubs(server_pid: int, proc: Path = Path("/proc")) -> dict[str, list[int]]:
    """Live Python backend stubs of the server `server_pid`, by model name.

    A stub is a child of the server whose `argv[0]` is the stub binary and whose `argv[1]`
    is `<repository>/<model>/<version>/model.py`.

    Args:
        server_pid (`int`): The tritonserver process.
        proc (`Path`, *optional*): The procfs mount (tests pass a fake tree).

    Returns:
        Model name → pids of its stubs (one per instance), each list sorted.
    """
    stubs: dict[str, list[int]] = {}
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            stat = (pid_dir / "stat").read_text()
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) != server_pid or state == "Z" or len(argv) < 2:
            continue
        if Path(argv[0].decode(errors="replace")).name != STUB_NAME:
            continue
        model = Path(argv[1].decode(errors="replace")).parent.parent.name
        stubs.setdefault(model, []).append(int(pid_dir.name))
    return {model: sorted(pids) for model, pids in stubs.items()}


class StubWatchdog:
    """Polls the server's stubs and reloads a model whose stub died.

    Args:
        server_pid (`int`): The tritonserver process.
        control (`ControlClient`): Its HTTP API, with the admin key.
        interval_s (`float`, *optional*, defaults to 0.5): Seconds between polls.
        log (`Callable[[str], None]`, *optional*): Told what was found and done.
        list_stubs (`Callable[[int], dict[str, list[int]]]`, *optional*):
            Defaults to `python_stubs` (tests pass a fake).
    """

    def __init__(
        self,
        server_pid: int,
        control: ControlClient,
        *,
        interval_s: float = 0.5,
        log: Callable[[str], None] = lambda message: None,
        list_stubs: Callable[[int], dict[str, list[int]]] = python_stubs,
    ) -> None:
        self.server_pid = server_pid
        self.control = control
        self.interval_s = interval_s
        self.log = log
        self.list_stubs = list_stubs
        self.expected: dict[str, int] = {}  # model → stubs it had when last healthy
        self.reloads: list[tuple[str, float]] = []  # (model, seconds to recover)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Records the current stubs as healthy and starts polling in a daemon thread."""
        self.expected = {m: len(p) for m, p in self.list_stubs(self.server_pid).items()}
        self._thread = threading.Thread(target=self._run, name="sdserve-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops polling (a reload in progress finishes first, up to `timeout_s`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except ControlError as err:  # the server is going away, or busy: next poll
                self.log(f"watchdog: {err}")

    def check(self) -> list[str]:
        """One poll: reload every ready model that lost a stub; returns their names."""
        current = self.list_stubs(self.server_pid)
        broken = [m for m, count in self.expected.items() if len(current.get(m, [])) < count]
        states = {m.name: m.state for m in self.control.index()} if broken else {}
        healed = []
        for model in broken:
            if self._stop.is_set():
                break
            if states.get(model) != "READY":  # unloaded on purpose: stop watching it
                self.log(f"watchdog: {model} is {states.get(model) or 'gone'}; not reloaded")
                del self.expected[model]
                continue
            self.heal(model)
            healed.append(model)
        current = self.list_stubs(self.server_pid) if healed else current
        for model, pids in current.items():  # new or reloaded models, healed ones
            if model not in broken or model in healed:
                self.expected[model] = len(pids)
        return healed

    def heal(self, model: str) -> None:
        """Unloads `model` (the server turns not-ready) and loads it again."""
        start = time.monotonic()
        self.log(f"watchdog: a Python backend stub of {model} died; reloading {model}")
        self.control.unload(model)
        self.control.load(model)  # returns once loaded; the dead stub's unload goes on
        took = time.monotonic() - start
        self.reloads.append((model, took))
        self.log(f"watchdog: {model} reloaded in {took:.1f}s")


__all__ = ["STUB_NAME", "StubWatchdog", "python_stubs"]


def wait_for_server(control: ControlClient, server_pid: int, timeout_s: float) -> bool:
    """Waits until the server answers ready; False if it exited or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and Path(f"/proc/{server_pid}").exists():
        try:
            if control.is_ready():
                return True
        except ControlError:
            pass
        time.sleep(1.0)
    return False


def main(argv: list[str] | None = None) -> int:
    """`python -m sdserve_pipeline.healing`: the watchdog beside a tritonserver that was
    started without the launcher (docker/entrypoint.sh), until that server exits."""
    import argparse
    import os
    import sys

    from sdserve_pipeline.server_security import (
        ADMIN_KEY_ENV,
        ADMIN_KEY_FILE_ENV,
        SecurityConfigError,
        resolve_admin_key,
    )

    parser = argparse.ArgumentParser(prog="python -m sdserve_pipeline.healing")
    parser.add_argument("--server-pid", type=int, required=True, help="tritonserver's pid")
    parser.add_argument("--http", default="127.0.0.1:8000", help="its HTTP host:port")
    parser.add_argument("--ready-timeout", type=float, default=7200.0)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[sdserve] {message}", file=sys.stderr, flush=True)

    try:  # the operator's key, as the server got it; never generated here
        if not (os.environ.get(ADMIN_KEY_ENV) or os.environ.get(ADMIN_KEY_FILE_ENV)):
            raise SecurityConfigError(f"set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}")
        key = resolve_admin_key(os.environ, Path("unused"))
    except SecurityConfigError as err:
        log(f"watchdog: no admin key ({err}); not started")
        return 1
    control = ControlClient(args.http, key.headers)
    if not wait_for_server(control, args.server_pid, args.ready_timeout):
        log("watchdog: the server never became ready; not started")
        return 1
    watchdog = StubWatchdog(args.server_pid, control, interval_s=args.interval, log=log)
    watchdog.start()
    log(f"watchdog: watching {', '.join(sorted(watchdog.expected)) or 'no'} Python model(s)")
    while Path(f"/proc/{args.server_pid}").exists():
        time.sleep(1.0)
    watchdog.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
