"""Under cancellation, overload, shutdown and sustained load the server keeps serving."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import infer_inputs, make_case, max_abs, served
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from sdserve_client import InpaintClient, SdserveError
from sdserve_client.webui.server_info import fetch_metrics, metric_value
from sdserve_pipeline.triton_server import TritonServer, process_group_members
from sdserve_protocol.metrics import PENDING_METRIC, QUEUE_DURATION_METRIC

pytestmark = pytest.mark.e2e
PROMPT = "a red bicycle"


def _with_queue(repository: Path, out: Path, max_queue_size: int, max_active: int) -> Path:
    """A copy of `repository` whose pipeline model denoises at most `max_active` requests at
    once and queues at most `max_queue_size` more."""
    shutil.copytree(repository, out)
    config_file = out / "inpaint" / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), mc.ModelConfig())
    config.parameters["max_queue_size"].string_value = str(max_queue_size)
    config.parameters["max_active_requests"].string_value = str(max_active)
    config_file.write_text(text_format.MessageToString(config))
    return out


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    repo = _with_queue(
        repository, tmp_path_factory.mktemp("q") / "repo", max_queue_size=2, max_active=1
    )
    build = tmp_path_factory.mktemp("triton-robust")
    with served(repo, build) as srv:
        yield srv


@pytest.fixture(scope="module")
def roomy_server(repository, tmp_path_factory):
    """The repository as exported: a queue of 16, room for 8 concurrent clients."""
    build = tmp_path_factory.mktemp("triton-roomy")
    with served(repository, build) as srv:
        yield srv


def _request(steps: int, seed: int) -> list[grpcclient.InferInput]:
    image, mask = make_case(64, 64, seed=1)
    tensors = {
        "prompt": np.array([PROMPT.encode()], np.object_), "image": image, "mask": mask,
        "steps": np.array([steps], np.int32), "seed": np.array([seed], np.int64),
    }  # fmt: skip
    return infer_inputs(tensors)


def _unet_executions(client: grpcclient.InferenceServerClient, headers: dict[str, str]) -> int:
    stats = client.get_inference_statistics("unet", headers=headers).model_stats
    return sum(s.execution_count for s in stats)


def test_cancelled_request_stops_within_a_step_and_next_is_served(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = _unet_executions(client, server.admin_key.grpc_headers)
    done = threading.Event()
    outcome: list[object] = []

    def callback(result, error):
        outcome.append(error if error is not None else result)
        done.set()

    call = client.async_infer("inpaint", _request(steps=150, seed=1), callback)
    deadline = time.monotonic() + 60
    while (
        _unet_executions(client, server.admin_key.grpc_headers) == before
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert _unet_executions(client, server.admin_key.grpc_headers) > before, (
        "the request never reached the UNet"
    )
    call.cancel()
    at_cancel = _unet_executions(client, server.admin_key.grpc_headers)
    assert done.wait(30)
    time.sleep(1.0)  # any step still running would show up by now
    steps_after = _unet_executions(client, server.admin_key.grpc_headers) - at_cancel
    assert steps_after <= 1, f"{steps_after} UNet steps ran after the cancel"
    assert isinstance(outcome[0], InferenceServerException)
    assert "CANCELLED" in str(outcome[0].status()) or "cancel" in str(outcome[0]).lower()
    started = time.monotonic()
    with InpaintClient(server.grpc_url) as sdk:
        image, mask = make_case(64, 64, seed=1)
        assert sdk.inpaint(image, mask, PROMPT, steps=2, seed=3).arrays.shape == (1, 64, 64, 3)
    assert time.monotonic() - started < 30


def test_the_pipeline_queue_is_on_the_metrics_endpoint(server):
    """Requests that wait for room in the running batch show on Triton's metrics endpoint as
    the pipeline's own queue metrics (Triton's queue metrics stay ~0: the batcher holds it)."""
    image, mask = make_case(64, 64, seed=1)
    before = metric_value(fetch_metrics(server.metrics_url) or "", QUEUE_DURATION_METRIC, "inpaint")

    def one(seed: int):
        with InpaintClient(server.grpc_url) as sdk:
            return sdk.inpaint(image, mask, PROMPT, steps=4, seed=seed).seeds

    with ThreadPoolExecutor(2) as pool:  # max_active is 1 here: one of the two waits
        assert sorted(s for seeds in pool.map(one, (11, 12)) for s in seeds) == [11, 12]
    text = fetch_metrics(server.metrics_url)
    assert text is not None
    assert metric_value(text, PENDING_METRIC, "inpaint") == 0
    waited = metric_value(text, QUEUE_DURATION_METRIC, "inpaint")
    assert waited is not None and waited > (before or 0.0)


def test_overload_is_rejected_quickly_and_accepted_requests_complete(server):
    n = 8

    def one(i: int):
        started = time.monotonic()
        try:
            with InpaintClient(server.grpc_url) as sdk:
                image, mask = make_case(64, 64, seed=1)
                result = sdk.inpaint(image, mask, PROMPT, steps=20, seed=100 + i)
            return ("ok", result.seeds[0], result.arrays[0], time.monotonic() - started)
        except SdserveError as err:
            return ("rejected", str(err), None, time.monotonic() - started)

    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(one, range(n)))
    accepted = [o for o in outcomes if o[0] == "ok"]
    rejected = [o for o in outcomes if o[0] == "rejected"]
    # Room for 1 denoising + 2 queued: at least 5 of 8 turned away.
    assert len(rejected) >= 5, "a queue of 2 must turn some of 8 concurrent requests away"
    for _, message, _, elapsed in rejected:
        assert "queue" in message.lower(), message
        assert elapsed < 5.0, f"rejection took {elapsed:.1f} s"
    with InpaintClient(server.grpc_url) as sdk:  # each accepted image is the one its seed makes
        image, mask = make_case(64, 64, seed=1)
        for _, seed, array, _ in accepted[:2]:
            alone = sdk.inpaint(image, mask, PROMPT, steps=20, seed=seed).arrays[0]
            assert max_abs(alone, array) == 0


def _server_rss_kib(server: TritonServer) -> int:
    total = 0
    for pid in process_group_members(server.pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


@pytest.mark.slow
def test_soak_500_requests_at_concurrency_8(roomy_server):
    server = roomy_server
    total, concurrency = 500, 8
    image, mask = make_case(64, 64, seed=2)
    results: dict[int, np.ndarray] = {}
    failures: list[str] = []
    rss: dict[int, int] = {}
    completed: list[int] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        with InpaintClient(server.grpc_url) as sdk:
            for i in counter:
                try:
                    out = sdk.inpaint(image, mask, PROMPT, steps=2, seed=1000 + i).arrays[0]
                except Exception as err:  # noqa: BLE001 (every failure is counted)
                    with lock:
                        failures.append(f"{i}: {err}")
                    continue
                with lock:
                    completed.append(i)
                    if i % 50 == 0:
                        results[i] = out
                    if i in (100, total - 1):
                        rss[i] = _server_rss_kib(server)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures[:5]
    assert sorted(completed) == list(range(total))
    growth = rss[total - 1] / rss[100] - 1
    print(f"soak: {total} requests, 0 failures, server RSS {rss[100]} → {rss[total - 1]} KiB "
          f"({growth:+.1%})")  # fmt: skip
    assert growth <= 0.10
    with InpaintClient(server.grpc_url) as sdk:
        for i in (0, 250, 450):
            again = sdk.inpaint(image, mask, PROMPT, steps=2, seed=1000 + i).arrays[0]
            np.testing.assert_array_equal(again, results[i])


def test_sigterm_finishes_in_flight_requests_refuses_new_and_leaves_no_stub(
    repository, tmp_path_factory
):
    build = tmp_path_factory.mktemp("triton-shutdown")
    srv = TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, build_dir=build,
                       exit_timeout_s=60)  # fmt: skip
    srv.start()
    srv.wait_ready(timeout_s=300)
    pgid = srv.pid
    image, mask = make_case(64, 64, seed=1)

    def one(seed: int):
        with InpaintClient(srv.grpc_url) as sdk:
            return sdk.inpaint(image, mask, PROMPT, steps=15, seed=seed).seeds

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, s) for s in range(4)]
        time.sleep(1.0)  # all four are in flight, denoising together
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.5)
        with pytest.raises(SdserveError), InpaintClient(srv.grpc_url) as sdk:
            sdk.inpaint(image, mask, PROMPT, steps=2, seed=9, timeout=10)
        assert [f.result(timeout=120) for f in futures] == [[0], [1], [2], [3]]
        stopper.join(timeout=120)
    assert not process_group_members(pgid)


def test_sdk_submit_can_be_cancelled_and_deadlines_apply(server):
    from sdserve_client import GenerationRequest

    image, mask = make_case(64, 64, seed=1)
    with InpaintClient(server.grpc_url) as sdk:
        pending = sdk.submit(GenerationRequest(PROMPT, image=image, mask=mask, steps=150, seed=1))
        time.sleep(1.0)
        pending.cancel()
        with pytest.raises(SdserveError, match="(?i)cancel"):
            pending.result(timeout=30)
        with pytest.raises(SdserveError, match="(?i)deadline|timeout"):
            sdk.inpaint(image, mask, PROMPT, steps=150, seed=2, timeout=0.5)
        done = sdk.submit(GenerationRequest(PROMPT, image=image, mask=mask, steps=2, seed=3))
        assert done.result(timeout=60).seeds == [3]


def test_concurrent_compatible_requests_share_unet_calls_and_match_alone(roomy_server, service):
    server = roomy_server
    """Issue 7: requests queued together are denoised together, each result as alone."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    image, mask = make_case(64, 64, seed=1)
    seeds, steps = [201, 202, 203, 204], 6

    def one(seed: int) -> np.ndarray:
        with InpaintClient(server.grpc_url) as sdk:
            return sdk.inpaint(image, mask, PROMPT, steps=steps, seed=seed).arrays[0]

    with ThreadPoolExecutor(1) as pool:  # warm up
        pool.submit(one, 1).result()
    before = _unet_executions(client, server.admin_key.grpc_headers)
    with ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(one, seeds))
    executions = _unet_executions(client, server.admin_key.grpc_headers) - before
    per_request = steps + 1  # PNDM runs one extra timestep
    assert executions < len(seeds) * per_request, f"{executions} UNet calls: nothing batched"
    for seed, array in zip(seeds, together, strict=True):
        alone = service.generate({
            "prompt": np.array([PROMPT.encode()], object), "image": image, "mask": mask,
            "steps": np.array([steps], np.int32), "seed": np.array([seed], np.int64),
        })["images"][0]  # fmt: skip
        assert max_abs(array, alone) <= 1
