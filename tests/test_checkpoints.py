"""Checkpoints loaded on demand (`sdserve_pipeline.checkpoints`): the shared registry's LRU,
reference counts and budget, its safety across processes, the batcher's lease, and which
models a server loads at start."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import random
import threading
import time
from pathlib import Path

import pytest
from cases import make_case
from helpers import wire
from test_batcher import Outcomes

from sdserve_pipeline.batcher import ContinuousBatcher
from sdserve_pipeline.checkpoints import (
    Checkpoint,
    CheckpointBusy,
    CheckpointLease,
    CheckpointLoadError,
    CheckpointRegistry,
    describe_checkpoints,
    on_demand_models,
    pipeline_lease,
    startup_models,
)
from sdserve_pipeline.server_state import read_variants, write_variants

MB = 2**20


def checkpoint(name: str, *models: str, mb: int = 10) -> Checkpoint:
    models = models or (f"{name}_unet", f"{name}_vae")
    return Checkpoint(name, models, {m: mb * MB for m in models})


class Triton:
    """Records load and unload calls; `loaded` is what would be in memory."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.loaded: set[str] = set()
        self.fail = fail or set()

    def load(self, model: str) -> None:
        self.calls.append(("load", model))
        if model in self.fail:
            raise RuntimeError(f"failed to load {model}")
        self.loaded.add(model)

    def unload(self, model: str) -> None:
        self.calls.append(("unload", model))
        self.loaded.discard(model)

    def registry(self, folder: Path, budget_mb: float, **kwargs) -> CheckpointRegistry:
        return CheckpointRegistry(folder, int(budget_mb * MB), self.load, self.unload, **kwargs)


def test_a_checkpoint_is_loaded_on_first_use_and_only_once(tmp_path):
    triton = Triton()
    registry = triton.registry(tmp_path, 100)
    a = checkpoint("a")
    registry.acquire(a)
    registry.acquire(a)
    assert sorted(triton.calls) == [("load", "a_unet"), ("load", "a_vae")]
    state = registry.snapshot()["a"]
    assert state["state"] == "loaded" and state["users"] == {str(os.getpid()): 2}
    registry.release("a")
    registry.release("a")
    assert registry.snapshot()["a"]["users"] == {}  # unused, still loaded
    assert triton.loaded == {"a_unet", "a_vae"}


def test_the_least_recently_used_idle_checkpoint_makes_room(tmp_path):
    triton = Triton()
    clock = iter(range(100))
    registry = triton.registry(tmp_path, 45, clock=lambda: next(clock))  # two fit, not three
    a, b, c = checkpoint("a"), checkpoint("b"), checkpoint("c")
    for ckpt in (a, b):
        registry.acquire(ckpt)
        registry.release(ckpt.name)
    registry.acquire(a)  # a is now the more recent
    registry.release("a")
    registry.acquire(c)
    assert triton.loaded == {"a_unet", "a_vae", "c_unet", "c_vae"}
    assert ("unload", "b_unet") in triton.calls and ("unload", "a_unet") not in triton.calls
    assert set(registry.snapshot()) == {"a", "c"}


def test_a_checkpoint_in_use_is_never_unloaded(tmp_path):
    triton = Triton()
    registry = triton.registry(tmp_path, 25)  # one at a time
    a, b = checkpoint("a"), checkpoint("b")
    registry.acquire(a)
    with pytest.raises(CheckpointBusy, match=r"'b' cannot be loaded now.*\(a\); retry later"):
        registry.acquire(b, wait_s=0.2)
    assert triton.loaded == {"a_unet", "a_vae"}
    assert "b" not in registry.snapshot()

    released = threading.Timer(0.3, registry.release, ["a"])
    released.start()
    registry.acquire(b, wait_s=10)  # waits for a's request to finish, then takes its room
    released.join()
    assert triton.loaded == {"b_unet", "b_vae"}
    assert sorted(triton.calls[-4:-2]) == [("unload", "a_unet"), ("unload", "a_vae")]
    assert sorted(triton.calls[-2:]) == [("load", "b_unet"), ("load", "b_vae")]  # after


def test_a_model_shared_with_a_loaded_checkpoint_stays_and_counts_once(tmp_path):
    triton = Triton()
    registry = triton.registry(tmp_path, 35)
    a = checkpoint("a", "a_unet", "vae")
    b = checkpoint("b", "b_unet", "vae")
    c = checkpoint("c", "c_unet", "vae")
    registry.acquire(a)
    registry.acquire(b)  # 30 MB: a_unet, b_unet and the shared vae once
    registry.release("a")
    registry.acquire(c)  # a goes, the vae stays for b
    assert ("unload", "vae") not in triton.calls
    assert triton.loaded == {"b_unet", "c_unet", "vae"}


def test_a_failed_load_is_reported_and_retried_by_the_next_request(tmp_path):
    triton = Triton(fail={"a_vae"})
    registry = triton.registry(tmp_path, 100)
    with pytest.raises(CheckpointLoadError, match="'a': failed to load a_vae"):
        registry.acquire(checkpoint("a"))
    assert registry.snapshot() == {}
    triton.fail.clear()
    registry.acquire(checkpoint("a"))
    assert registry.snapshot()["a"]["state"] == "loaded"


def test_the_hold_of_a_process_that_died_is_dropped(tmp_path):
    triton = Triton()
    crashed, dead = 999_999, set()
    alive = lambda pid: pid not in dead  # noqa: E731
    triton.registry(tmp_path, 25, pid=crashed, is_alive=alive).acquire(checkpoint("a"))
    dead.add(crashed)  # its process died without releasing
    registry = triton.registry(tmp_path, 25, is_alive=alive)
    registry.acquire(checkpoint("b"), wait_s=0)
    assert triton.loaded == {"b_unet", "b_vae"}


def test_a_checkpoint_larger_than_the_budget_is_a_load_time_error(tmp_path):
    registry = Triton().registry(tmp_path, 15)
    with pytest.raises(ValueError, match="'a' needs 20 MB .* budget of 15 MB"):
        CheckpointLease(registry, checkpoint("a"), wait_s=0)


@pytest.mark.parametrize("text", ["lots", "-5"])
def test_a_bad_budget_is_a_load_time_error(tmp_path, text):
    env = {"SDSERVE_CHECKPOINT_BUDGET_MB": text, "SDSERVE_STATE_DIR": str(tmp_path)}
    with pytest.raises(ValueError, match="SDSERVE_CHECKPOINT_BUDGET_MB"):
        pipeline_lease("a", tmp_path, [], 0, print, print, env=env)


def test_the_lease_acquires_for_the_first_request_and_releases_after_the_last(tmp_path):
    triton = Triton()
    registry = triton.registry(tmp_path, 100)
    lease = CheckpointLease(registry, checkpoint("a"), wait_s=0)
    lease.enter()
    lease.enter()
    assert registry.snapshot()["a"]["users"] == {str(os.getpid()): 1}  # the process, once
    lease.exit()
    assert registry.snapshot()["a"]["users"] == {str(os.getpid()): 1}
    lease.exit()
    assert registry.snapshot()["a"]["users"] == {}


# ------------------------------------------------------------------ across processes


def _worker(folder: str, seed: int, rounds: int, errors) -> None:
    """Uses random checkpoints; its fake Triton records what is loaded in a shared file and
    checks, while holding a checkpoint, that nobody unloads it."""
    resident = Path(folder) / "resident.json"

    def change(op: str, model: str) -> None:
        with open(Path(folder) / "resident.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            models = set(json.loads(resident.read_text())) if resident.is_file() else set()
            if op == "load":
                models.add(model)
            else:
                models.discard(model)
            resident.write_text(json.dumps(sorted(models)))

    def loaded() -> set[str]:
        with open(Path(folder) / "resident.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return set(json.loads(resident.read_text())) if resident.is_file() else set()

    def load(model: str) -> None:
        time.sleep(0.01)
        change("load", model)

    registry = CheckpointRegistry(
        Path(folder) / "state", 25 * MB, load, lambda m: change("unload", m), poll_s=0.005
    )
    rng = random.Random(seed)
    for _ in range(rounds):
        ckpt = checkpoint(rng.choice("abc"))
        registry.acquire(ckpt, wait_s=30)
        for _ in range(3):
            if not set(ckpt.models) <= loaded():
                errors.put(f"{ckpt.name} not loaded while in use")
            if len(loaded()) > 2:
                errors.put(f"over budget: {sorted(loaded())}")
            time.sleep(0.002)
        registry.release(ckpt.name)


def test_processes_sharing_the_registry_never_unload_what_another_uses(tmp_path):
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    workers = [
        context.Process(target=_worker, args=(str(tmp_path), seed, 15, errors)) for seed in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []


# ------------------------------------------------------------------ the batcher's lease


class CountingLease:
    def __init__(self, fail: Exception | None = None) -> None:
        self.entered = self.exited = 0
        self.fail = fail
        self._lock = threading.Lock()

    def enter(self) -> None:
        if self.fail is not None:
            raise self.fail
        with self._lock:
            self.entered += 1

    def exit(self) -> None:
        with self._lock:
            self.exited += 1


def test_each_request_holds_the_lease_while_it_runs(service):
    image, mask = make_case(64, 64, seed=3)
    lease, outcomes = CountingLease(), Outcomes()
    batcher = ContinuousBatcher(service, lease=lease)
    try:
        for i in range(3):
            batcher.submit(wire(image, mask, steps=2, seed=i), outcomes.callback(str(i)))
        batcher.submit(
            wire(image, mask, steps=2, seed=5, outpaint=[8, 0, 0, 0]), outcomes.callback("o")
        )
        batcher.submit({"prompt": "x", "steps": 0}, outcomes.callback("bad"))
        outcomes.wait(5)
    finally:
        batcher.close()
    assert lease.entered == lease.exited == 4  # the bad request never started
    assert all("images" in outcomes.by_name[name] for name in ("0", "1", "2", "o"))


def test_a_request_whose_checkpoint_cannot_load_gets_the_error(service):
    image, mask = make_case(64, 64, seed=3)
    busy = CheckpointBusy("checkpoint 'a' cannot be loaded now")
    outcomes = Outcomes()
    batcher = ContinuousBatcher(service, lease=CountingLease(fail=busy))
    try:
        batcher.submit(wire(image, mask, steps=2, seed=1), outcomes.callback("a"))
        batcher.submit(
            wire(image, mask, steps=2, seed=1, outpaint=[8, 0, 0, 0]), outcomes.callback("o")
        )
        outcomes.wait(2)
    finally:
        batcher.close()
    assert outcomes.by_name["a"] is busy and outcomes.by_name["o"] is busy
    assert batcher.pending == 0 and batcher.memory_reserved == 0


# ------------------------------------------------------------------ the repository


@pytest.fixture(scope="module")
def on_demand_repository(repository: Path, tmp_path_factory) -> Path:
    """The demo repository plus a second checkpoint of it (`other`) loaded on demand."""
    import shutil

    from sdserve_export.triton_configs import to_pbtxt
    from sdserve_pipeline.inprocess import read_parameters
    from sdserve_protocol.settings import PipelineSettings

    out = tmp_path_factory.mktemp("on_demand") / "repo"
    shutil.copytree(repository, out)
    for role in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        shutil.copytree(repository / role, out / f"other_{role}")
    shutil.copytree(repository / "inpaint", out / "other")
    settings = PipelineSettings.from_parameters(read_parameters(out / "other"))
    components = {role: f"other_{model}" for role, model in settings.components.items()}
    params = PipelineSettings(**{**settings.__dict__, "components": components,
                                 "load_on_demand": True}).to_parameters()  # fmt: skip
    from sdserve_export.triton_configs import parse_pbtxt

    config = parse_pbtxt((out / "other" / "config.pbtxt").read_text())
    config.name = "other"
    for key, value in params.items():
        config.parameters[key].string_value = value
    (out / "other" / "config.pbtxt").write_text(to_pbtxt(config))
    return out


def test_the_server_starts_without_the_components_of_on_demand_checkpoints(
    on_demand_repository,
):
    skipped = {"other_text_encoder", "other_unet", "other_vae_encoder", "other_vae_decoder"}
    assert on_demand_models(on_demand_repository) == skipped
    started = startup_models(on_demand_repository)
    assert "other" in started and "unet" in started and "checkpoints" in started
    assert not skipped & set(started)


def test_the_listing_tells_loaded_on_disk_and_memory(on_demand_repository, tmp_path):
    triton = Triton()
    registry = triton.registry(tmp_path, 0)
    write_variants(tmp_path, "unet", [{"adapters": [["a", 0.5]], "size_mb": 1.5}])
    listing = describe_checkpoints(
        on_demand_repository, registry.snapshot(), 0, lambda m: not m.startswith("other"),
        {"unet": 200 * MB}, read_variants(tmp_path),
    )  # fmt: skip
    by_name = {c["name"]: c for c in listing["checkpoints"]}
    assert set(by_name) == {"inpaint", "other"}
    assert by_name["inpaint"]["state"] == "loaded" and not by_name["inpaint"]["on_demand"]
    assert by_name["other"]["state"] == "on disk" and by_name["other"]["on_demand"]
    unet = next(c for c in by_name["inpaint"]["components"] if c["name"] == "unet")
    weights = (on_demand_repository / "unet" / "1" / "model.onnx").stat().st_size
    assert unet["size_mb"] == round(weights / MB, 1) and unet["rss_mb"] == 200.0
    assert unet["variants"] == [{"adapters": [["a", 0.5]], "size_mb": 1.5}]
    assert by_name["inpaint"]["size_mb"] == by_name["other"]["size_mb"] > 0
