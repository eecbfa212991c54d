"""Tests of the tritonserver launcher: pure parts, then a real server on loopback (e2e)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ADD_ONE, infer_add_one, write_model

from sdserve_pipeline import serve
from sdserve_pipeline.triton_server import (
    STUB_NAME,
    ServerPorts,
    TritonDistribution,
    TritonServer,
    TritonServerError,
    build_command,
    build_env,
    client_host,
    format_address,
    locate_distribution,
    log_excerpt,
    pick_free_ports,
    prepare_backend_dir,
    process_group_members,
    resolve_ports,
)


def _has_tritonserver() -> bool:
    try:
        locate_distribution()
    except TritonServerError:
        return False
    return True


needs_tritonserver = pytest.mark.skipif(
    not _has_tritonserver(), reason="nvidia-pytriton (tritonserver) not installed"
)


# --- Pure parts ---------------------------------------------------------------------------


def test_build_command_is_an_argument_list_with_every_flag() -> None:
    command = build_command(
        Path("/opt/bin/tritonserver"),
        Path("/models"),
        Path("/build/triton_backends"),
        host="127.0.0.1",
        ports=ServerPorts(http=1, grpc=2, metrics=3),
        exit_timeout_s=7,
        log_verbose=1,
    )

    assert command == [
        "/opt/bin/tritonserver",
        "--model-repository=/models",
        "--backend-directory=/build/triton_backends",
        "--http-address=127.0.0.1",
        "--http-port=1",
        "--grpc-address=127.0.0.1",
        "--grpc-port=2",
        "--metrics-address=127.0.0.1",
        "--metrics-port=3",
        "--exit-timeout-secs=7",
        "--log-verbose=1",
        "--model-control-mode=explicit",
        "--load-model=*",
    ]


def test_build_command_appends_cache_dir_then_extra_args() -> None:
    command = build_command(
        Path("tritonserver"),
        Path("/models with space"),
        Path("/b"),
        host="0.0.0.0",
        ports=ServerPorts(),
        exit_timeout_s=30,
        cache_dir=Path("/caches"),
        extra_args=["--strict-readiness=false"],
    )

    assert command[-2:] == ["--cache-directory=/caches", "--strict-readiness=false"]
    assert "--model-repository=/models with space" in command  # one argument, no quoting
    assert "--http-port=8000" in command and "--grpc-port=8001" in command
    assert "--metrics-port=8002" in command and "--grpc-address=0.0.0.0" in command


def test_pick_free_ports_returns_distinct_bindable_ports() -> None:
    ports = pick_free_ports("127.0.0.1", 3)

    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_resolve_ports_fills_only_zeros() -> None:
    ports = resolve_ports(ServerPorts(http=0, grpc=9123, metrics=0), "127.0.0.1")

    assert ports.grpc == 9123
    assert ports.http > 0 and ports.metrics > 0 and ports.http != ports.metrics
    assert resolve_ports(ServerPorts(), "127.0.0.1") == ServerPorts(8000, 8001, 8002)


def test_build_env_puts_venv_bin_and_libs_first() -> None:
    base = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/root"}

    env = build_env(base, Path("/w/libs"), Path("/venv/bin"), ["/py/lib"])

    assert env["PATH"] == "/venv/bin:/usr/bin:/bin"
    assert env["LD_LIBRARY_PATH"] == "/w/libs:/py/lib:/opt/lib"
    assert env["HOME"] == "/root"
    assert base["PATH"] == "/usr/bin:/bin"  # the base mapping is not modified


def test_build_env_without_existing_values_has_no_empty_entries() -> None:
    env = build_env({"LD_LIBRARY_PATH": ""}, Path("/w/libs"), Path("/venv/bin"))

    assert env["PATH"] == "/venv/bin"
    assert env["LD_LIBRARY_PATH"] == "/w/libs"


def test_build_env_does_not_duplicate_entries() -> None:
    env = build_env({"PATH": "/venv/bin:/bin"}, Path("/w/libs"), Path("/venv/bin"))

    assert env["PATH"] == "/venv/bin:/bin"


def _fake_distribution(
    root: Path, versions: tuple[str, ...] = ("3.10", "3.11")
) -> TritonDistribution:
    python = root / "tritonserver" / "backends" / "python"
    python.mkdir(parents=True)
    (python / "libtriton_python.so").write_bytes(b"so")
    (python / "triton_python_backend_utils.py").write_text("# utils\n")
    (python / "__pycache__").mkdir()
    for version in versions:
        stub = root / "tritonserver" / "python_backend_stubs" / version / STUB_NAME
        stub.parent.mkdir(parents=True)
        stub.write_text(version)
    return TritonDistribution(root=root / "tritonserver", libs_dir=root / "libs")


def test_prepare_backend_dir_links_wheel_files_and_matching_stub(tmp_path: Path) -> None:
    dist = _fake_distribution(tmp_path / "wheel")

    backends = prepare_backend_dir(dist, tmp_path / "build", python_version=(3, 11))
    again = prepare_backend_dir(dist, tmp_path / "build", python_version=(3, 11))

    python = backends / "python"
    assert again == backends == (tmp_path / "build" / "triton_backends").resolve()
    assert sorted(p.name for p in python.iterdir()) == sorted(
        ["libtriton_python.so", "triton_python_backend_utils.py", STUB_NAME]
    )
    assert all(p.is_symlink() for p in python.iterdir())
    assert (python / STUB_NAME).read_text() == "3.11"
    assert (python / "libtriton_python.so").resolve() == dist.backends_dir / "python" / (
        "libtriton_python.so"
    )


def test_prepare_backend_dir_relinks_stub_for_another_python(tmp_path: Path) -> None:
    dist = _fake_distribution(tmp_path / "wheel")

    prepare_backend_dir(dist, tmp_path / "build", python_version=(3, 11))
    backends = prepare_backend_dir(dist, tmp_path / "build", python_version=(3, 10))

    assert (backends / "python" / STUB_NAME).read_text() == "3.10"


def test_prepare_backend_dir_without_stub_names_available_versions(tmp_path: Path) -> None:
    dist = _fake_distribution(tmp_path / "wheel")

    with pytest.raises(TritonServerError, match=r"Python 3\.7 \(available: 3\.10, 3\.11\)"):
        prepare_backend_dir(dist, tmp_path / "build", python_version=(3, 7))


def test_locate_distribution_without_pytriton_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)

    with pytest.raises(TritonServerError, match="nvidia-pytriton is not installed"):
        locate_distribution()


@needs_tritonserver
def test_locate_distribution_finds_binary_stub_and_libs() -> None:
    dist = locate_distribution()

    assert os.access(dist.server_binary, os.X_OK)
    assert dist.stub_path(sys.version_info[:2]).is_file()
    assert dist.libs_dir.is_dir()


def test_urls_dial_loopback_for_wildcard_hosts(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, host="0.0.0.0", build_dir=tmp_path / "build")

    assert server.grpc_url == "127.0.0.1:8001"
    assert server.http_url == "127.0.0.1:8000"
    assert server.metrics_url == "http://127.0.0.1:8002/metrics"
    assert server.log_path == (tmp_path / "build" / "logs" / "tritonserver-8001.log").resolve()


def test_client_host_and_format_address_handle_ipv6() -> None:
    assert client_host("::") == "::1"
    assert client_host("10.0.0.5") == "10.0.0.5"
    assert format_address("::1", 8001) == "[::1]:8001"
    assert format_address("127.0.0.1", 8001) == "127.0.0.1:8001"


def test_log_excerpt_keeps_early_error_lines_and_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    lines = ["E1121 23:17:26.1 1 server.cc:1] early failure"]
    lines += [f"I1121 line {i}" for i in range(100)]
    log.write_text("\n".join(lines) + "\n")

    excerpt = log_excerpt(log, tail_lines=5)

    assert "early failure" in excerpt
    assert "line 99" in excerpt and "line 95" in excerpt and "line 94" not in excerpt
    assert "unreadable" in log_excerpt(tmp_path / "missing.log")


def test_server_methods_before_start(tmp_path: Path) -> None:
    server = TritonServer(tmp_path / "missing", build_dir=tmp_path / "build")

    assert server.stop() is None and server.wait(0) is None and not server.is_running
    with pytest.raises(TritonServerError, match="call start"):
        server.wait_ready(1)
    with pytest.raises(TritonServerError, match="does not exist"):
        server.start()


def test_serve_parse_args_defaults() -> None:
    args = serve.parse_args(["--repository", "build/model_repository"])

    assert (args.host, args.http_port, args.grpc_port, args.metrics_port) == (
        "127.0.0.1",
        8000,
        8001,
        8002,
    )


# --- End to end: a real tritonserver ------------------------------------------------------

_REJECT = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        error = pb_utils.TritonError("rejected on purpose", pb_utils.TritonError.INVALID_ARG)
        return [pb_utils.InferenceResponse(error=error) for _ in requests]
"""

_SLOW_FINALIZE = """
    def finalize(self):
        import time

        time.sleep(300)
"""

_BROKEN = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights missing: unet.onnx (sentinel 4711)")

    def execute(self, requests):
        return []
"""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone already
    return stat[stat.rindex(")") + 2] == "Z"


def _assert_group_gone(pgid: int | None) -> None:
    """No live process (tritonserver or a backend stub) is left in the server's group."""
    assert pgid is not None
    assert process_group_members(pgid) == []
    listed = subprocess.run(
        ["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=False
    ).stdout
    assert [pid for pid in listed.split() if not _is_zombie(int(pid))] == []


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    write_model(repository, "add_one", ADD_ONE)
    write_model(repository, "reject", _REJECT)
    return repository


@pytest.mark.e2e
@needs_tritonserver
def test_server_serves_add_one_and_stops_its_whole_process_group(
    repository: Path, tmp_path: Path
) -> None:
    server = TritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        exit_timeout_s=2,
        build_dir=tmp_path / "build",
    )
    progress: list[str] = []
    with server:
        assert sorted(server.wait_ready(120, on_progress=progress.append)) == ["add_one", "reject"]
        assert server.pid is not None
        stubs = [pid for pid in process_group_members(server.pid) if pid != server.pid]

        np.testing.assert_array_equal(infer_add_one(server.grpc_url), [2.0, 3.5, -2.0])
        assert len(stubs) == 2  # one Python backend stub per model instance, in the group
        assert progress[-1] == "ready: 2 model(s)"

    assert server.wait(0) == 0  # SIGTERM → clean exit
    _assert_group_gone(server.pid)
    assert "Started GRPCInferenceService at 127.0.0.1" in server.log_path.read_text()


@pytest.mark.e2e
@needs_tritonserver
def test_triton_error_code_reaches_the_client(repository: Path, tmp_path: Path) -> None:
    from tritonclient.utils import InferenceServerException

    with TritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, build_dir=tmp_path / "build"
    ) as server:
        server.wait_ready(120)
        with pytest.raises(InferenceServerException, match="rejected on purpose") as exc_info:
            infer_add_one(server.grpc_url, model="reject")

    assert exc_info.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.e2e
@needs_tritonserver
def test_model_failing_to_initialize_fails_wait_ready_with_its_error(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_model(repository, "add_one", ADD_ONE)
    write_model(repository, "broken", _BROKEN)
    server = TritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, build_dir=tmp_path / "build"
    )

    with server, pytest.raises(TritonServerError, match="before ready") as exc_info:
        server.wait_ready(120)

    assert "weights missing: unet.onnx (sentinel 4711)" in str(exc_info.value)
    _assert_group_gone(server.pid)


def _read_lines(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def _wait_for_line(lines: queue.Queue[str], needle: str, timeout_s: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not any(needle in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            pytest.fail(f"no line with {needle!r} within {timeout_s}s; got: {seen}")
    return seen


def _start_launcher(
    repository: Path, tmp_path: Path
) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """`python -m sdserve_pipeline.serve` on free ports; its output lines arrive in a queue."""
    command = [sys.executable, "-m", "sdserve_pipeline.serve", "--repository", str(repository)]
    command += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--exit-timeout-secs", "2", "--build-dir", str(tmp_path / "build")]
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(launcher.stdout, lines), daemon=True).start()
    return launcher, lines


@pytest.mark.e2e
@needs_tritonserver
def test_serve_runs_until_sigterm_then_exits_zero(repository: Path, tmp_path: Path) -> None:
    launcher, lines = _start_launcher(repository, tmp_path)
    try:
        output = "".join(_wait_for_line(lines, "serving;", timeout_s=120))
        grpc_url = re.search(r"gRPC\s+(\S+)", output).group(1)  # type: ignore[union-attr]
        server_pid = int(re.search(r"pid (\d+)", output).group(1))  # type: ignore[union-attr]
        np.testing.assert_array_equal(infer_add_one(grpc_url), [2.0, 3.5, -2.0])

        launcher.send_signal(signal.SIGTERM)

        assert launcher.wait(60) == 0
    finally:
        launcher.kill()
    assert "tritonserver stopped (exit code 0)" in "".join(_wait_for_line(lines, "stopped", 5))
    _assert_group_gone(server_pid)


@pytest.mark.e2e
@needs_tritonserver
def test_stop_kills_a_stub_that_outlives_the_server(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_model(repository, "slow_exit", ADD_ONE + _SLOW_FINALIZE)
    server = TritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        exit_timeout_s=1,
        build_dir=tmp_path / "build",
    )
    with server:
        server.wait_ready(120)

    assert server.wait(0) != 0  # tritonserver gave up on the unload: "Exit timeout expired"
    _assert_group_gone(server.pid)


def test_a_taken_port_names_the_process_holding_it(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (tmp_path / "models").mkdir()
        server = TritonServer(
            tmp_path / "models", http_port=0, grpc_port=port, metrics_port=0, build_dir=tmp_path
        )

        with pytest.raises(TritonServerError, match=f"gRPC port {port} on 127.0.0.1 is taken") as e:
            server.start()

    assert f"held by pid {os.getpid()} (" in str(e.value) and server.pid is None


@pytest.mark.e2e
@needs_tritonserver
def test_a_launcher_killed_with_sigkill_takes_its_server_along(
    repository: Path, tmp_path: Path
) -> None:
    launcher, lines = _start_launcher(repository, tmp_path)
    try:
        output = "".join(_wait_for_line(lines, "serving;", timeout_s=120))
        server_pid = int(re.search(r"pid (\d+)", output).group(1))  # type: ignore[union-attr]
        grpc_port = int(re.search(r"gRPC\s+\S+:(\d+)", output).group(1))  # type: ignore[union-attr]
        assert "admin key: generated for this start" in output

        launcher.kill()  # SIGKILL: no handler, no cleanup
        launcher.wait(10)

        deadline = time.monotonic() + 30  # SIGTERM, then --exit-timeout-secs at most
        while process_group_members(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = process_group_members(server_pid)
    finally:
        launcher.kill()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.killpg(server_pid, signal.SIGKILL)  # a failed run leaves nothing behind
    assert left == [], f"processes {left} outlived their launcher"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", grpc_port))  # the port is free for the next start
