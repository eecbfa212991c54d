"""Launch the `tritonserver` binary shipped in the `nvidia-pytriton` wheel.

The wheel carries the server, its Python backend and one backend stub per Python version,
but the stub that matches the running interpreter must sit next to the backend library.
Rather than modifying the installed wheel, a backend directory is assembled under the
build folder from symlinks:

    build/triton_backends/python/libtriton_python.so           -> wheel backends/python/
    build/triton_backends/python/triton_python_backend_utils.py -> wheel backends/python/
    build/triton_backends/python/triton_python_backend_stub    -> wheel python_backend_stubs/X.Y/

The server runs in its own process group (so Ctrl-C in a terminal reaches only the
launcher, which then shuts the server down in order) with the virtualenv's `bin/` first on
`PATH` (the stub finds its packages through the first `python3` there) and the wheel's
bundled libraries on `LD_LIBRARY_PATH`. It gets SIGTERM when the launcher dies, however the
launcher dies (Linux parent-death signal), so no server is left holding the ports.

Triton's control APIs are closed behind the operator's key (`server_security`), gRPC may be
served over TLS, and a watchdog reloads a model whose backend stub died (`healing`). The
launcher itself talks to the server over HTTP on loopback (`triton_control`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import final

from sdserve_pipeline.checkpoints import BUDGET_ENV, on_demand_models, startup_models
from sdserve_pipeline.healing import STUB_NAME, StubWatchdog
from sdserve_pipeline.server_security import AdminKey, TlsConfig, resolve_admin_key
from sdserve_pipeline.server_state import STATE_DIR_ENV
from sdserve_pipeline.triton_control import ControlClient, ControlError
from sdserve_protocol.settings import config_parameters, is_pipeline

DEFAULT_HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LIBS_DIR_NAME = "nvidia_pytriton.libs"
BACKENDS_DIR_NAME = "triton_backends"

# glog severity prefix of an error line, e.g. "E1121 23:17:26.039617 2817 server.cc:241] ...".
_ERROR_LINE = re.compile(r"^E\d{4} ")
_LOADED_LINE = re.compile(r"successfully loaded '([^']+)'")


class TritonServerError(RuntimeError):
    """The server could not be located, started, made ready or stopped."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the `nvidia-pytriton` wheel live.

    Args:
        root (`Path`):
            The wheel's `pytriton/tritonserver` folder.
        libs_dir (`Path`):
            The wheel's bundled shared libraries (`site-packages/nvidia_pytriton.libs`).
    """

    root: Path
    libs_dir: Path

    @property
    def server_binary(self) -> Path:
        """The `tritonserver` executable."""
        return self.root / "bin" / "tritonserver"

    @property
    def backends_dir(self) -> Path:
        """The wheel's backend folder (one subfolder per backend, without the stub)."""
        return self.root / "backends"

    @property
    def caches_dir(self) -> Path:
        """The wheel's response-cache implementations."""
        return self.root / "caches"

    def stub_path(self, python_version: tuple[int, int]) -> Path:
        """The Python backend stub built for `python_version` (major, minor)."""
        major, minor = python_version
        return self.root / "python_backend_stubs" / f"{major}.{minor}" / STUB_NAME


@dataclass(frozen=True)
class ServerPorts:
    """Ports of the three endpoints; 0 means "pick a free one" (see `resolve_ports`).

    Args:
        http (`int`, *optional*, defaults to 8000): HTTP/REST port.
        grpc (`int`, *optional*, defaults to 8001): gRPC port.
        metrics (`int`, *optional*, defaults to 8002): Prometheus metrics port.
    """

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def locate_distribution() -> TritonDistribution:
    """Finds the `tritonserver` distribution inside the installed `nvidia-pytriton` wheel.

    Returns:
        The wheel's server, backend and library locations.

    Raises:
        TritonServerError: `nvidia-pytriton` is not installed or lacks the server binary.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "nvidia-pytriton is not installed; it provides the tritonserver binary "
            "(pip install nvidia-pytriton==0.7.0)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    dist = TritonDistribution(
        root=package_dir / "tritonserver", libs_dir=package_dir.parent / LIBS_DIR_NAME
    )
    if not dist.server_binary.is_file():
        raise TritonServerError(
            f"nvidia-pytriton at {package_dir} has no tritonserver binary "
            f"({dist.server_binary} is missing); reinstall nvidia-pytriton"
        )
    return dist


def _link(target: Path, link: Path) -> None:
    """Points the symlink `link` at `target`, atomically replacing whatever is there."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def prepare_backend_dir(
    dist: TritonDistribution,
    build_dir: Path,
    python_version: tuple[int, int] | None = None,
) -> Path:
    """Assembles a backend directory of symlinks to the wheel plus the matching stub.

    Idempotent and safe to run concurrently; the installed wheel is not modified.

    Args:
        dist (`TritonDistribution`):
            The wheel's layout, from `locate_distribution`.
        build_dir (`Path`):
            Build folder; the backends go to `build_dir / "triton_backends"`.
        python_version (`tuple[int, int]`, *optional*, defaults to the running interpreter's):
            (major, minor) of the Python that the stub will embed.

    Returns:
        The folder to pass as `--backend-directory`.

    Raises:
        TritonServerError: The wheel has no stub for `python_version`.
    """
    version = python_version or (sys.version_info.major, sys.version_info.minor)
    stub = dist.stub_path(version)
    if not stub.is_file():
        available = sorted(p.parent.name for p in stub.parent.parent.glob(f"*/{STUB_NAME}"))
        raise TritonServerError(
            f"nvidia-pytriton has no Python backend stub for Python {version[0]}.{version[1]} "
            f"(available: {', '.join(available) or 'none'})"
        )
    backends = build_dir.resolve() / BACKENDS_DIR_NAME
    for backend in sorted(p for p in dist.backends_dir.iterdir() if p.is_dir()):
        out = backends / backend.name
        out.mkdir(parents=True, exist_ok=True)
        for item in backend.iterdir():
            if item.name != "__pycache__":
                _link(item, out / item.name)
    _link(stub, backends / "python" / STUB_NAME)
    return backends


def pick_free_ports(host: str, count: int) -> list[int]:
    """Asks the OS for `count` distinct free TCP ports on `host`.

    The sockets are closed before returning, so another process could take a port before
    the server binds it; that race is accepted for local runs and tests.

    Args:
        host (`str`): Address the ports must be free on.
        count (`int`): Number of ports.

    Returns:
        `count` distinct port numbers.
    """
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sockets = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def resolve_ports(ports: ServerPorts, host: str) -> ServerPorts:
    """Replaces each 0 in `ports` with a free port on `host`; other ports are kept.

    Args:
        ports (`ServerPorts`): Requested ports.
        host (`str`): Address the server will bind.

    Returns:
        Ports with no zeros.
    """
    requested = [ports.http, ports.grpc, ports.metrics]
    free = iter(pick_free_ports(host, requested.count(0)))
    http, grpc, metrics = (port or next(free) for port in requested)
    return ServerPorts(http=http, grpc=grpc, metrics=metrics)


def _listening_inodes(port: int, proc: Path) -> set[str]:
    """Socket inodes listening on TCP `port` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def port_holders(port: int, proc: Path = Path("/proc")) -> list[str]:
    """`pid (command line)` of each process listening on TCP `port` that we may inspect."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port, proc)}
    holders = []
    for pid_dir in proc.iterdir() if sockets else ():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in sockets for fd in (pid_dir / "fd").iterdir()):
                argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
                holders.append(f"{pid_dir.name} ({b' '.join(argv).decode(errors='replace')})")
    return holders


def check_ports_free(host: str, ports: ServerPorts) -> None:
    """Raises `TritonServerError` naming who holds any of `ports` on `host`."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    taken = []
    for name, port in (("HTTP", ports.http), ("gRPC", ports.grpc), ("metrics", ports.metrics)):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                sock.bind((host, port))
            except OSError as exc:
                holders = port_holders(port)
                who = f"held by pid {', '.join(holders)}" if holders else f"{exc.strerror}"
                taken.append(f"{name} port {port} on {host} is taken: {who}")
    if taken:
        raise TritonServerError(
            "; ".join(taken) + " (stop that process, or pick other ports; 0 picks free ones)"
        )


def _die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` that asks Linux to SIGTERM the child when the launcher dies.

    The signal follows the thread that forked, so start the server from a thread that lives
    as long as the launcher (the main thread).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def build_command(
    binary: Path,
    model_repository: Path,
    backend_dir: Path,
    *,
    host: str,
    ports: ServerPorts,
    exit_timeout_s: int,
    log_verbose: int = 0,
    cache_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    load_models: Sequence[str] | None = None,
) -> list[str]:
    """The `tritonserver` argument list (for `subprocess`, never a shell string).

    Args:
        binary (`Path`): The `tritonserver` executable.
        model_repository (`Path`): Model repository folder.
        backend_dir (`Path`): Backend folder, from `prepare_backend_dir`.
        host (`str`): Address that HTTP, gRPC and metrics bind.
        ports (`ServerPorts`): Resolved ports (no zeros).
        exit_timeout_s (`int`): Seconds in-flight requests get on shutdown.
        log_verbose (`int`, *optional*, defaults to 0): Triton's `--log-verbose` level.
        cache_dir (`Path`, *optional*): Response-cache implementations (`--cache-directory`).
        extra_args (`Sequence[str]`, *optional*): Further `--flag=value` arguments, appended.
        load_models (`Sequence[str]`, *optional*): The models loaded at start (default: all;
            `checkpoints.startup_models` leaves out those loaded on demand).

    Returns:
        The command, as a list of strings.
    """
    command = [
        str(binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_dir}",
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--log-verbose={log_verbose}",
        # Explicit control lets `TritonServer.drain` unload the pipeline models gracefully
        # before SIGTERM, and pipelines load their checkpoints on demand.
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in (["*"] if load_models is None else load_models)),
    ]
    if cache_dir is not None:
        command.append(f"--cache-directory={cache_dir}")
    return command + list(extra_args)


def _prepend(path_list: str | None, *entries: str) -> str:
    """`entries` followed by the non-empty entries of the `os.pathsep` list `path_list`."""
    existing = [p for p in (path_list or "").split(os.pathsep) if p]
    return os.pathsep.join([*entries, *(p for p in existing if p not in entries)])


def python_lib_dirs() -> list[str]:
    """Folders holding the running interpreter's shared `libpython`, if it has one.

    The stub links `libpython3.X.so.1.0`; without this folder on `LD_LIBRARY_PATH` the loader
    may pick another build of the same minor version (e.g. the system one) or none at all.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    shared = sysconfig.get_config_var("Py_ENABLE_SHARED")
    return [str(libdir)] if shared and libdir and Path(libdir).is_dir() else []


def build_env(
    base_env: Mapping[str, str],
    libs_dir: Path,
    python_bin_dir: Path,
    extra_lib_dirs: Iterable[str] = (),
) -> dict[str, str]:
    """The server's environment: `base_env` with `PATH` and `LD_LIBRARY_PATH` prefixed.

    Args:
        base_env (`Mapping[str, str]`): Environment to start from (usually `os.environ`).
        libs_dir (`Path`): The wheel's bundled libraries, put first on `LD_LIBRARY_PATH`.
        python_bin_dir (`Path`):
            The virtualenv's `bin/` (dirname of `sys.executable`, not resolved), put first on
            `PATH` so that the stub embeds that environment's packages.
        extra_lib_dirs (`Iterable[str]`, *optional*):
            Further library folders, after `libs_dir` (see `python_lib_dirs`).

    Returns:
        A new environment dict.
    """
    env = dict(base_env)
    env["PATH"] = _prepend(env.get("PATH"), str(python_bin_dir))
    env["LD_LIBRARY_PATH"] = _prepend(env.get("LD_LIBRARY_PATH"), str(libs_dir), *extra_lib_dirs)
    return env


def client_host(host: str) -> str:
    """The address a local client should dial for a server bound to `host`."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def format_address(host: str, port: int) -> str:
    """`host:port`, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_excerpt(log_path: Path, tail_lines: int = 40) -> str:
    """The error lines and the last `tail_lines` lines of a server log, for error messages.

    Args:
        log_path (`Path`): The server's log file.
        tail_lines (`int`, *optional*, defaults to 40): Number of final lines to keep.

    Returns:
        The excerpt, or a note that the log could not be read.
    """
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(server log {log_path} unreadable: {exc})"
    tail = lines[-tail_lines:]
    errors = [line for line in lines[:-tail_lines] if _ERROR_LINE.match(line)]
    parts = [f"--- error lines of {log_path} ---", *errors] if errors else []
    return "\n".join([*parts, f"--- last {len(tail)} lines of {log_path} ---", *tail])


def loaded_models(log_path: Path) -> list[str]:
    """Names of the models the server log reports as loaded so far (for progress output)."""
    try:
        return _LOADED_LINE.findall(log_path.read_text(errors="replace"))
    except OSError:
        return []


def _read_stat(pid_dir: Path) -> tuple[int, str] | None:
    """(process group, state) from `/proc/<pid>/stat`, or None if the process is gone."""
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # fields after "pid (comm) "
    return int(fields[2]), fields[0]


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`, read from `/proc` (Linux).

    Args:
        pgid (`int`): Process group id; the server's pid, as it leads its own group.

    Returns:
        Pids of the group's processes that have not exited.
    """
    members = []
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            stat = _read_stat(pid_dir)
            if stat is not None and stat[0] == pgid and stat[1] != "Z":
                members.append(int(pid_dir.name))
    return members


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    """Sends `sig` to process group `pgid`, ignoring a group that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@final
class TritonServer:
    """A `tritonserver` child process serving a model repository.

    The ports are resolved (0 → a free port) when the object is created, so the URLs are
    known before `start`. Used as a context manager it starts on entry and stops on exit;
    call `wait_ready` inside the block.

    Args:
        model_repository (`str` or `Path`):
            Triton model repository folder.
        host (`str`, *optional*, defaults to `"127.0.0.1"`):
            Address that HTTP, gRPC and metrics bind.
        http_port (`int`, *optional*, defaults to 8000): HTTP port; 0 picks a free port.
        grpc_port (`int`, *optional*, defaults to 8001): gRPC port; 0 picks a free port.
        metrics_port (`int`, *optional*, defaults to 8002): Metrics port; 0 picks a free port.
        exit_timeout_s (`int`, *optional*, defaults to 30):
            Seconds in-flight requests get after SIGTERM (`--exit-timeout-secs`).
        log_verbose (`int`, *optional*, defaults to 0): Triton's `--log-verbose` level.
        build_dir (`str` or `Path`, *optional*, defaults to `./build`):
            Build folder holding the backend directory and, by default, the log.
        log_path (`str` or `Path`, *optional*):
            Server log (stdout and stderr); defaults to
            `build_dir/logs/tritonserver-<grpc port>.log`.
        extra_args (`Sequence[str]`, *optional*): Further `tritonserver` arguments.
        stop_margin_s (`float`, *optional*, defaults to 10.0):
            Seconds `stop` waits beyond `exit_timeout_s` before killing the process group.
        admin_key (`AdminKey`, *optional*):
            The key that opens Triton's control APIs; defaults to `resolve_admin_key` over
            the environment, generating one into `build_dir/admin-key-<grpc port>`.
        tls (`TlsConfig`, *optional*): Serve gRPC over TLS with these files.
        heal (`bool`, *optional*, defaults to True):
            Once ready, reload any model whose Python backend stub dies (`StubWatchdog`).
        heal_interval_s (`float`, *optional*, defaults to 0.5): Seconds between stub polls.
        on_event (`Callable[[str], None]`, *optional*): Told what the watchdog does.
        checkpoint_budget_mb (`str`, *optional*): MB the component models of checkpoints
            loaded on demand may hold together, `auto` or `0` (`checkpoints`); default: the
            environment's `SDSERVE_CHECKPOINT_BUDGET_MB`, else `auto`.
    """

    def __init__(
        self,
        model_repository: str | Path,
        *,
        host: str = DEFAULT_HOST,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        exit_timeout_s: int = 30,
        log_verbose: int = 0,
        build_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        extra_args: Sequence[str] = (),
        stop_margin_s: float = 10.0,
        admin_key: AdminKey | None = None,
        tls: TlsConfig | None = None,
        heal: bool = True,
        heal_interval_s: float = 0.5,
        on_event: Callable[[str], None] | None = None,
        checkpoint_budget_mb: str | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.ports = resolve_ports(ServerPorts(http_port, grpc_port, metrics_port), host)
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.build_dir = Path(build_dir if build_dir is not None else "build").resolve()
        default_log = self.build_dir / "logs" / f"tritonserver-{self.ports.grpc}.log"
        self.log_path = Path(log_path).resolve() if log_path is not None else default_log
        self.extra_args = tuple(extra_args)
        self.stop_margin_s = stop_margin_s
        self.admin_key = admin_key or resolve_admin_key(
            os.environ, self.build_dir / f"admin-key-{self.ports.grpc}"
        )
        self.tls = tls
        if tls is not None:
            tls.check()
        self.heal = heal
        self.heal_interval_s = heal_interval_s
        self.on_event = on_event or (lambda message: None)
        self.watchdog: StubWatchdog | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # components of checkpoints loaded on demand are left out (`checkpoints`)
        self.checkpoint_budget_mb = checkpoint_budget_mb
        self.state_dir = self.build_dir / f"checkpoints-{self.ports.grpc}"  # pipelines share it
        self.on_demand = on_demand_models(self.model_repository)
        self.startup_models = startup_models(self.model_repository) if self.on_demand else None

    @property
    def grpc_url(self) -> str:
        """`host:port` of the gRPC endpoint, as `tritonclient.grpc` expects it."""
        return format_address(client_host(self.host), self.ports.grpc)

    @property
    def http_url(self) -> str:
        """`host:port` of the HTTP endpoint, as `tritonclient.http` expects it."""
        return format_address(client_host(self.host), self.ports.http)

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{format_address(client_host(self.host), self.ports.metrics)}/metrics"

    @property
    def control(self) -> ControlClient:
        """The server's HTTP API on loopback, with the admin key (what the launcher uses)."""
        return ControlClient(self.http_url, self.admin_key.headers)

    @property
    def pid(self) -> int | None:
        """The server's pid (also its process group id), once started."""
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        """Whether the server process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def command(self, dist: TritonDistribution, backend_dir: Path) -> list[str]:
        """The argument list this server runs, for the given distribution and backends."""
        return build_command(
            dist.server_binary,
            self.model_repository,
            backend_dir,
            host=self.host,
            ports=self.ports,
            exit_timeout_s=self.exit_timeout_s,
            log_verbose=self.log_verbose,
            cache_dir=dist.caches_dir if dist.caches_dir.is_dir() else None,
            extra_args=[*self.security_args(), *self.extra_args],
            load_models=self.startup_models,
        )

    def security_args(self) -> list[str]:
        """The flags closing the control APIs behind the key, and serving TLS if set."""
        return [*self.admin_key.server_args(), *(self.tls.server_args() if self.tls else [])]

    def start(self) -> None:
        """Starts `tritonserver` in a new process group, logging to `log_path`.

        Raises:
            TritonServerError: Already started, repository missing, a port taken (naming the
                process that holds it), or the wheel is unusable.
        """
        if self._process is not None:
            raise TritonServerError(f"tritonserver already started (pid {self._process.pid})")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} does not exist")
        check_ports_free(self.host, self.ports)
        dist = locate_distribution()
        backend_dir = prepare_backend_dir(dist, self.build_dir)
        env = build_env(os.environ, dist.libs_dir, Path(sys.executable).parent, python_lib_dirs())
        if self.checkpoint_budget_mb is not None:
            env[BUDGET_ENV] = self.checkpoint_budget_mb
        shutil.rmtree(self.state_dir, ignore_errors=True)  # a previous server's record
        env[STATE_DIR_ENV] = str(self.state_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.command(dist, backend_dir),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )

    def wait_ready(
        self,
        timeout_s: float = 300.0,
        *,
        poll_interval_s: float = 0.5,
        on_progress: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Polls until the server and every model in its repository index are ready, then
        starts the stub watchdog (if `heal`).

        Args:
            timeout_s (`float`, *optional*, defaults to 300.0): Seconds to wait in total.
            poll_interval_s (`float`, *optional*, defaults to 0.5): Seconds between polls.
            on_progress (`Callable[[str], None]`, *optional*):
                Called with a short status line whenever the status changes.

        Returns:
            Names of the ready models.

        Raises:
            TritonServerError: The server exited or was not ready within `timeout_s`; the
                message ends with an excerpt of the server log.
        """
        if self._process is None:
            raise TritonServerError("tritonserver was not started; call start() first")
        deadline = time.monotonic() + timeout_s
        last_status = ""
        control = self.control
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                raise self._error(f"tritonserver exited with code {returncode} before ready")
            ready, status = self._poll_ready(control)
            if status != last_status and on_progress is not None:
                on_progress(status)
            last_status = status
            if ready is not None:
                self._start_watchdog()
                return ready
            if time.monotonic() >= deadline:
                raise self._error(f"tritonserver not ready after {timeout_s:g}s ({status})")
            time.sleep(poll_interval_s)

    def _poll_ready(self, control: ControlClient) -> tuple[list[str] | None, str]:
        """One readiness poll: (ready model names or None, status line)."""
        try:
            if not (control.is_live() and control.is_ready()):
                return None, "server up, not ready yet"
            models = [m for m in control.index() if m.name not in self.on_demand]
            pending = [f"{m.name} ({m.state or 'UNKNOWN'})" for m in models if m.state != "READY"]
        except ControlError:
            loaded = loaded_models(self.log_path)
            return None, f"starting; models loaded so far: {', '.join(loaded) or 'none'}"
        if pending:
            return None, f"models not ready: {', '.join(pending)}"
        names = list(dict.fromkeys(m.name for m in models))
        return names, f"ready: {len(names)} model(s)"

    def _start_watchdog(self) -> None:
        if self.heal and self.watchdog is None and self.pid is not None:
            self.watchdog = StubWatchdog(
                self.pid, self.control, interval_s=self.heal_interval_s, log=self.on_event
            )
            self.watchdog.start()

    def _error(self, message: str) -> TritonServerError:
        """A `TritonServerError` with `message` and an excerpt of the server log."""
        return TritonServerError(f"{message}\n{log_excerpt(self.log_path)}")

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Waits for the server to exit on its own; returns its exit code (None on timeout)."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """Stops the server: SIGTERM, then SIGKILL to its whole process group if needed.

        In-flight requests get `exit_timeout_s`; after `exit_timeout_s + stop_margin_s` the
        group is killed. Any process left in the group (e.g. a `triton_python_backend_stub`)
        is killed too, so nothing is orphaned. Safe to call more than once.

        Returns:
            The server's exit code, or None if it was never started.
        """
        process = self._process
        if process is None:
            return None
        if self.watchdog is not None:
            self.watchdog.stop()
        if process.poll() is None:
            self.drain(self.exit_timeout_s)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.exit_timeout_s + self.stop_margin_s)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid, signal.SIGKILL)
                process.wait()
        self._reap_group(process.pid)
        return process.returncode

    def drain(self, timeout_s: float) -> list[str]:
        """Unloads the models that queue requests (the pipelines) and waits for them to finish.

        Triton's own SIGTERM handling refuses every new request at once, including the BLS
        calls that in-flight pipeline requests still have to make, so those would fail.
        Unloading a model instead refuses new requests to it while its queued and running
        ones complete, and their BLS calls still reach the components, which stay loaded.

        Args:
            timeout_s: how long to wait for the pipelines to finish their work.

        Returns:
            The names of the models drained (none if the server is not answering).
        """
        control = self.control
        try:
            names = [
                m.name
                for m in control.index()
                if m.state == "READY"
                and is_pipeline(config_parameters(control.model_config(m.name)))
            ]
            for name in names:
                control.unload(name)  # returns at once; the model unloads when idle
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._still_loaded(control, names):
                time.sleep(0.1)
        except ControlError:
            return []
        return names

    @staticmethod
    def _still_loaded(control: ControlClient, names: list[str]) -> bool:
        states = {m.name: m.state for m in control.index()}
        return any(states.get(name) in ("READY", "UNLOADING") for name in names)

    def _reap_group(self, pgid: int, timeout_s: float = 5.0) -> None:
        """Kills what is left of process group `pgid` and waits until it is gone."""
        deadline = time.monotonic() + timeout_s
        while process_group_members(pgid):
            _kill_group(pgid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                raise TritonServerError(
                    f"processes {process_group_members(pgid)} of group {pgid} survived SIGKILL"
                )
            time.sleep(0.05)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = [
    "DEFAULT_HOST",
    "ServerPorts",
    "TritonDistribution",
    "TritonServer",
    "TritonServerError",
    "build_command",
    "build_env",
    "check_ports_free",
    "client_host",
    "format_address",
    "locate_distribution",
    "log_excerpt",
    "pick_free_ports",
    "port_holders",
    "prepare_backend_dir",
    "process_group_members",
    "python_lib_dirs",
    "resolve_ports",
]
