"""Checkpoints loaded on demand: which pipelines' component models are in memory, server-wide.

A pipeline exported with `load_on_demand` (export `--load-on-demand`) is a checkpoint whose
component models (UNet, text encoder(s), VAE) are not loaded when the server starts; the
pipeline model itself is (it is small). Its first request loads them through Triton's own
model control (explicit mode; from the pipeline model, BLS `pb_utils.load_model`), and when
the loaded checkpoints' component weights would pass the server's budget, the least recently
used checkpoint that no request is using is unloaded first (`pb_utils.unload_model`).

Every pipeline model is its own process, so the record of what is loaded, loading and in use
is one JSON file that they share, read and written under an exclusive `flock`
(`CheckpointRegistry`): a checkpoint is unloaded only by a process that saw, under the lock,
that nobody uses it, and marked as unloading before the lock is let go, so no process can
start using it meanwhile (the race of Triton issue #3583 between one client's unload and
another's load). Users are recorded by process id: the entries of a process that died are
dropped when the file is next read.

A pipeline holds its checkpoint while it has requests running (`CheckpointLease`): the first
request to start acquires it (loading it if needed), the last to finish releases it.

The budget is the server's (environment `SDSERVE_CHECKPOINT_BUDGET_MB`: MB, `auto` (half
the memory the server may use, the default) or 0 (no limit: nothing is unloaded)); a
checkpoint's size is the bytes of its component models' files (their weights), the same
measure the LoRA variant cache uses. The shared file lives in `SDSERVE_STATE_DIR`, by default
a folder per server process under the system's temporary folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdserve_pipeline.outcomes import Overloaded
from sdserve_pipeline.server_state import pid_alive, state_dir

BUDGET_ENV = "SDSERVE_CHECKPOINT_BUDGET_MB"
STATE_FILE = "checkpoints.json"
LOCK_FILE = "checkpoints.lock"

LOADED, LOADING, UNLOADING = "loaded", "loading", "unloading"


class CheckpointBusy(Overloaded):
    """No room to load a checkpoint: the loaded ones that would have to go are in use."""


class CheckpointLoadError(RuntimeError):
    """Loading a checkpoint's component models failed."""


def checkpoint_budget_mb(env: Mapping[str, str] = os.environ) -> str:
    """The server's checkpoint budget as set (`BUDGET_ENV`; default `auto`)."""
    return env.get(BUDGET_ENV, "auto").strip() or "auto"


def model_bytes(repository: Path, model: str) -> int:
    """Bytes of model `model`'s files in `repository` (its weights; the config excluded)."""
    folder = repository / model
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.parent != folder)


@dataclass(frozen=True)
class Checkpoint:
    """A pipeline whose component models are loaded on demand.

    Args:
        name: the pipeline model's name.
        models: its component models.
        sizes: bytes of each component model (`model_bytes`).
    """

    name: str
    models: tuple[str, ...]
    sizes: Mapping[str, int]

    @property
    def size(self) -> int:
        return sum(self.sizes[m] for m in self.models)


class CheckpointRegistry:
    """The server-wide record of loaded checkpoints, shared by the pipeline processes.

    Args:
        folder: holds the shared file and its lock (`state_dir`).
        budget_bytes: most bytes the loaded checkpoints' models may hold (0: no limit).
        load: loads a model by name (Triton: `pb_utils.load_model`); raises on failure.
        unload: unloads a model by name (`pb_utils.unload_model`).
        poll_s: how often a waiting process looks again.
        pid: this process (tests pass others).
        is_alive: whether a process id is alive (tests pass a fake).
        clock: seconds, for least-recently-used order.
    """

    def __init__(
        self,
        folder: Path,
        budget_bytes: int,
        load: Callable[[str], None],
        unload: Callable[[str], None],
        *,
        poll_s: float = 0.05,
        pid: int | None = None,
        is_alive: Callable[[int], bool] = pid_alive,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget = budget_bytes
        self._load, self._unload = load, unload
        self.poll_s = poll_s
        self.pid = os.getpid() if pid is None else pid
        self._is_alive = is_alive
        self._clock = clock

    def check_fits(self, checkpoint: Checkpoint) -> None:
        """Raises `ValueError` (a load-time error) when `checkpoint` alone passes the budget."""
        if self.budget and checkpoint.size > self.budget:
            raise ValueError(
                f"checkpoint {checkpoint.name!r} needs {checkpoint.size / 2**20:.0f} MB for "
                f"its models, more than the server's checkpoint budget of "
                f"{self.budget / 2**20:.0f} MB ({BUDGET_ENV})"
            )

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The shared record, under the lock; written back when the block ends."""
        with open(self.folder / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                path = self.folder / STATE_FILE
                state = json.loads(path.read_text()) if path.is_file() else {}
                self._drop_dead(state)
                yield state
                scratch = path.with_name(path.name + f".{self.pid}")
                scratch.write_text(json.dumps(state, indent=1, sort_keys=True))
                scratch.replace(path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _drop_dead(self, state: dict[str, Any]) -> None:
        for name, entry in list(state.items()):
            entry["users"] = {
                pid: n for pid, n in entry["users"].items() if self._is_alive(int(pid))
            }
            if entry["state"] != LOADED and not self._is_alive(entry["by"]):
                del state[name]  # its loader or unloader died midway: state unknown, redo

    def acquire(self, checkpoint: Checkpoint, wait_s: float = 0.0) -> None:
        """Mark `checkpoint` used by this process, loading it first if it is not loaded.

        Waits while another process loads or unloads it, or while the checkpoints that
        would have to be unloaded to make room are in use, up to `wait_s` seconds.

        Raises:
            CheckpointBusy: no room within `wait_s` (the budget is held by checkpoints in use).
            CheckpointLoadError: a model failed to load (the checkpoint stays unloaded).
        """
        deadline = time.monotonic() + wait_s
        while True:
            with self._state() as state:
                plan = self._plan(state, checkpoint)
            if plan is not None:
                break
            if time.monotonic() >= deadline:
                raise CheckpointBusy(self._busy_message(checkpoint))
            time.sleep(self.poll_s)
        must_load, victims, to_unload = plan
        if must_load:
            self._switch(checkpoint, victims, to_unload)

    def _plan(
        self, state: dict[str, Any], checkpoint: Checkpoint
    ) -> tuple[bool, list[str], list[str]] | None:
        """Under the lock: take the checkpoint if loaded (False, [], []); else reserve room
        for it, marking the victims unloading and it loading (True, the victims, the models
        to unload). None: wait and look again."""
        entry = state.get(checkpoint.name)
        me = str(self.pid)
        if entry is not None:
            if entry["state"] != LOADED:
                return None  # another process loads or unloads it
            entry["users"][me] = entry["users"].get(me, 0) + 1
            entry["last_used"] = self._clock()
            return False, [], []
        victims = self._victims(state, checkpoint)
        if victims is None:
            return None
        kept = {m for name, e in state.items() if name not in victims for m in e["models"]}
        to_unload = sorted({m for v in victims for m in state[v]["models"]} - kept)
        for name in victims:
            state[name]["state"], state[name]["by"] = UNLOADING, self.pid
        state[checkpoint.name] = {
            "models": list(checkpoint.models), "sizes": dict(checkpoint.sizes),
            "state": LOADING, "by": self.pid, "users": {me: 1}, "last_used": self._clock(),
        }  # fmt: skip
        return True, victims, to_unload

    def _victims(self, state: dict[str, Any], checkpoint: Checkpoint) -> list[str] | None:
        """The least recently used checkpoints, unused, whose unloading makes room (None:
        not enough of them)."""
        if not self.budget:
            return []
        sizes: dict[str, int] = {}
        for entry in state.values():
            sizes |= entry["sizes"]

        def fits(victims: list[str]) -> bool:  # with the victims' models unloaded
            still = {m for n, e in state.items() if n not in victims for m in e["models"]}
            needed = sum(checkpoint.sizes[m] for m in set(checkpoint.models) - still)
            return sum(sizes[m] for m in still) + needed <= self.budget

        idle = sorted(
            (e["last_used"], name)
            for name, e in state.items()
            if e["state"] == LOADED and not e["users"]
        )
        victims: list[str] = []
        for _, name in idle:
            if fits(victims):
                break
            victims.append(name)
        return victims if fits(victims) else None

    def _switch(self, checkpoint: Checkpoint, victims: list[str], to_unload: list[str]) -> None:
        """Outside the lock: unload the victims' models, load the checkpoint's (each set at
        once); record it."""
        with ThreadPoolExecutor(max(1, len(to_unload)), "sdserve-unload") as pool:
            list(pool.map(self._unload, to_unload))
        try:  # in parallel: each Python-backend model starts its own process
            with ThreadPoolExecutor(len(checkpoint.models), "sdserve-load") as pool:
                list(pool.map(self._load, checkpoint.models))
        except Exception as err:
            with self._state() as state:
                for name in [*victims, checkpoint.name]:
                    state.pop(name, None)
            raise CheckpointLoadError(f"checkpoint {checkpoint.name!r}: {err}") from err
        with self._state() as state:
            for name in victims:
                state.pop(name, None)
            state[checkpoint.name]["state"] = LOADED
            state[checkpoint.name]["last_used"] = self._clock()

    def _busy_message(self, checkpoint: Checkpoint) -> str:
        with self._state() as state:
            used = sorted(name for name, e in state.items() if e["users"] or e["state"] != LOADED)
        return (
            f"checkpoint {checkpoint.name!r} cannot be loaded now: the server's checkpoint "
            f"budget ({self.budget / 2**20:.0f} MB) is held by checkpoints in use "
            f"({', '.join(used) or 'none'}); retry later"
        )

    def release(self, checkpoint: str) -> None:
        """This process no longer uses `checkpoint` (it stays loaded until room is needed)."""
        with self._state() as state:
            entry = state.get(checkpoint)
            if entry is None:
                return
            me = str(self.pid)
            left = entry["users"].get(me, 0) - 1
            if left > 0:
                entry["users"][me] = left
            else:
                entry["users"].pop(me, None)
            entry["last_used"] = self._clock()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The record: checkpoint → `state`, `models`, `sizes`, `users` (pid → requests),
        `last_used`."""
        with self._state() as state:
            copy: dict[str, dict[str, Any]] = json.loads(json.dumps(state))
        return copy


class CheckpointLease:
    """One pipeline process's hold on its checkpoint: held while any request of it runs.

    Args:
        registry: the server-wide record.
        checkpoint: the pipeline's checkpoint.
        wait_s: how long a request waits for room before `CheckpointBusy`.
    """

    def __init__(self, registry: CheckpointRegistry, checkpoint: Checkpoint, wait_s: float) -> None:
        registry.check_fits(checkpoint)
        self.registry = registry
        self.checkpoint = checkpoint
        self.wait_s = wait_s
        self._users = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        """A request starts: the first one acquires (loads) the checkpoint; raises as
        `CheckpointRegistry.acquire`."""
        with self._lock:
            if self._users == 0:
                self.registry.acquire(self.checkpoint, self.wait_s)
            self._users += 1

    def exit(self) -> None:
        """A request that entered is done: the last one releases the checkpoint."""
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self.registry.release(self.checkpoint.name)


def checkpoint_of(
    name: str, repository: Path, models: Sequence[str]
) -> Checkpoint:  # fmt: skip
    """Pipeline `name`'s checkpoint: its component models and their sizes on disk."""
    unique = tuple(dict.fromkeys(models))
    return Checkpoint(name, unique, {m: model_bytes(repository, m) for m in unique})


def pipeline_lease(
    name: str,
    repository: Path,
    models: Sequence[str],
    wait_s: float,
    load: Callable[[str], None],
    unload: Callable[[str], None],
    env: Mapping[str, str] = os.environ,
) -> CheckpointLease:
    """The lease of pipeline `name` (loaded on demand) on the server's shared registry.

    Raises:
        ValueError: the budget is not valid, or the checkpoint alone passes it (load time).
    """
    from sdserve_pipeline.admission import budget_bytes

    text = checkpoint_budget_mb(env)
    try:
        budget = budget_bytes(text)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}: {text!r} is not a number of MB or 'auto'") from None
    if budget < 0:
        raise ValueError(f"{BUDGET_ENV}: {text!r} is negative")
    registry = CheckpointRegistry(state_dir(env), budget, load, unload)
    return CheckpointLease(registry, checkpoint_of(name, repository, models), wait_s)


def on_demand_models(repository: Path) -> set[str]:
    """The models of `repository` that are loaded on demand, not at start: the components
    of pipelines with `load_on_demand` that no other pipeline uses."""
    from sdserve_pipeline.inprocess import read_parameters
    from sdserve_protocol.settings import PipelineSettings, is_pipeline

    on_demand: set[str] = set()
    always: set[str] = set()
    for config in sorted(repository.glob("*/config.pbtxt")):
        params = read_parameters(config.parent)
        if not is_pipeline(params):
            continue
        settings = PipelineSettings.from_parameters(params, strict=False)
        models = set(settings.components.values())
        (on_demand if settings.load_on_demand else always).update(models)
    return on_demand - always


def startup_models(repository: Path) -> list[str]:
    """The models of `repository` the server loads when it starts (`--load-model` each)."""
    skipped = on_demand_models(repository)
    return sorted(
        c.parent.name for c in repository.glob("*/config.pbtxt") if c.parent.name not in skipped
    )


def describe_checkpoints(
    repository: Path,
    registry: Mapping[str, Mapping[str, Any]],
    budget_bytes: int,
    is_ready: Callable[[str], bool],
    rss_bytes: Mapping[str, int],
    variants: Mapping[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The checkpoint listing's answer (`sdserve_protocol.checkpoints`).

    Args:
        repository: the model repository.
        registry: `CheckpointRegistry.snapshot()`.
        budget_bytes: the server's checkpoint budget (0: none).
        is_ready: whether a model is loaded and ready (Triton: `pb_utils.is_model_ready`).
        rss_bytes: model → resident bytes of its processes (`stub_rss_bytes`).
        variants: model → its LoRA weight variants (`adapters`, `size_mb`).
    """
    from sdserve_pipeline.inprocess import read_parameters
    from sdserve_protocol.checkpoints import ON_DISK
    from sdserve_protocol.settings import PipelineSettings, is_pipeline

    listed = []
    for config in sorted(repository.glob("*/config.pbtxt")):
        params = read_parameters(config.parent)
        if not is_pipeline(params):
            continue
        settings = PipelineSettings.from_parameters(params, strict=False)
        name = config.parent.name
        models = list(dict.fromkeys(settings.components.values()))
        components: list[dict[str, Any]] = [
            {
                "name": m, "ready": is_ready(m), "size_mb": _mb(model_bytes(repository, m)),
                "rss_mb": _mb(rss_bytes[m]) if m in rss_bytes else None,
                "variants": (variants or {}).get(m, []),
            }
            for m in models
        ]  # fmt: skip
        entry = registry.get(name)
        if settings.load_on_demand:
            state = entry["state"] if entry is not None else ON_DISK
        else:
            state = LOADED if all(c["ready"] for c in components) else ON_DISK
        listed.append({
            "name": name, "architecture": settings.architecture,
            "on_demand": settings.load_on_demand, "state": state,
            "requests": sum(entry["users"].values()) if entry is not None else 0,
            "size_mb": round(sum(c["size_mb"] for c in components), 1),
            "components": components,
        })  # fmt: skip
    return {"budget_mb": _mb(budget_bytes), "checkpoints": listed}


def _mb(size: int) -> float:
    return round(size / 2**20, 1)


def stub_rss_bytes(server_pid: int, proc: Path = Path("/proc")) -> dict[str, int]:
    """Model → resident bytes of its Python backend stubs (Linux; `healing.python_stubs`)."""
    from sdserve_pipeline.healing import python_stubs

    rss: dict[str, int] = {}
    for model, pids in python_stubs(server_pid, proc).items():
        for pid in pids:
            try:
                status = (proc / str(pid) / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    rss[model] = rss.get(model, 0) + int(line.split()[1]) * 1024
    return rss


def registry_snapshot(folder: Path) -> dict[str, dict[str, Any]]:
    """The shared record in `folder`, read (for the listing; loads and unloads nothing)."""

    def refuse(model: str) -> None:
        raise RuntimeError(f"a snapshot does not load or unload ({model})")

    return CheckpointRegistry(folder, 0, refuse, refuse).snapshot()
