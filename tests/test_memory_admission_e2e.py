"""A burst of requests at the size limits under a low memory budget, on a real tritonserver
(admission by memory): each is served or refused at once with UNAVAILABLE saying why, the
server's RSS stays under its idle RSS + the budget + a margin, and nothing crashes."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import make_case, served
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from sdserve_pipeline.triton_server import TritonServer, process_group_members

pytestmark = pytest.mark.e2e
MB = 1 << 20
BUDGET_MB = 2500
BYTES_PER_PIXEL = 700  # the tiny demo's calibration (admission.MemoryModel)
MARGIN_MB = 250  # above idle + budget, for what the estimate leaves out (10 % of the budget)
SIDE, IMAGES = 256, 4  # the size limits set below: 256² pixels, 4 images
LIMITS = {
    "limit_max_pixels": str(SIDE * SIDE),
    "limit_max_images": str(IMAGES),
    "limit_max_canvas_pixels": str(SIDE * 2 * SIDE),
    "memory_budget_mb": str(BUDGET_MB),
    "memory_bytes_per_pixel": str(BYTES_PER_PIXEL),
}


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("memory") / "repo"
    shutil.copytree(repository, repo)
    config_file = repo / "inpaint" / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), mc.ModelConfig())
    for key, value in LIMITS.items():
        config.parameters[key].string_value = value
    config_file.write_text(text_format.MessageToString(config))
    with served(repo, tmp_path_factory.mktemp("triton-memory")) as srv:
        yield srv


def server_rss_bytes(server: TritonServer) -> int:
    """Sum of VmRSS over tritonserver and its backend stubs (shared pages counted in each)."""
    total = 0
    for pid in process_group_members(server.pid):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:  # gone between the listing and the read
            continue
        total += sum(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:"))
    return total


class PeakRss(threading.Thread):
    """Samples the server's RSS every 20 ms until stopped; keeps the highest."""

    def __init__(self, server: TritonServer) -> None:
        super().__init__(daemon=True)
        self.server, self.peak, self._halt = server, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            self.peak = max(self.peak, server_rss_bytes(self.server))

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def _inputs(**tensors) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in tensors.items():
        array = np.asarray(value)[np.newaxis]  # the pipeline model's batch dim
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


KINDS = ("inpaint", "inpaint", "t2i", "inpaint", "outpaint", "inpaint",
         "t2i", "inpaint", "outpaint", "inpaint", "t2i", "inpaint")  # fmt: skip
NUM_IMAGES = (4, 4, 4, 1, 4, 2, 4, 4, 1, 4, 2, 4)


def _burst() -> list[tuple[str, list[grpcclient.InferInput], tuple[int, ...]]]:
    """12 requests at the limits: (kind, inputs, expected shape of the images)."""
    image, mask = make_case(SIDE, SIDE, seed=3)
    requests = []
    for i, (kind, n) in enumerate(zip(KINDS, NUM_IMAGES, strict=True)):
        tensors = {"prompt": np.array([b"a red bicycle"], np.object_),
                   "steps": np.array([2], np.int32), "seed": np.array([100 + i], np.int64),
                   "num_images": np.array([n], np.int32)}  # fmt: skip
        shape = (n, SIDE, SIDE, 3)
        if kind == "t2i":
            tensors |= {"height": np.array([SIDE], np.int32), "width": np.array([SIDE], np.int32)}
        elif kind == "outpaint":  # to the canvas limit
            tensors |= {"image": image, "outpaint": np.array([0, 0, SIDE, 0], np.int32)}
            shape = (n, SIDE, 2 * SIDE, 3)
        else:
            tensors |= {"image": image, "mask": mask}
        requests.append((kind, _inputs(**tensors), shape))
    return requests


def test_a_burst_at_the_limits_stays_within_the_budget(server):
    """Two bursts of 12, one after the other (the second meets the arenas the first left).
    Measured here (tiny demo, 2 shared cores): idle 949 MB, peak +1774 MB under the 2500 MB
    budget, 4 served (4 + 1 images inpainted, two outpaintings), 8 refused, 16 s a burst."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    warm = _inputs(prompt=np.array([b"warm"], np.object_), steps=np.array([2], np.int32),
                   height=np.array([64], np.int32), width=np.array([64], np.int32))  # fmt: skip
    client.infer("inpaint", warm)  # every component has run once
    time.sleep(1.0)
    stubs = set(process_group_members(server.pid))
    idle = server_rss_bytes(server)
    sampler = PeakRss(server)
    sampler.start()

    def send(request, started: float):
        kind, inputs, shape = request
        try:
            result = client.infer("inpaint", inputs, client_timeout=600)
        except InferenceServerException as err:
            return kind, str(err.status()), err.message(), time.monotonic() - started
        assert result.as_numpy("images").shape == (1, *shape), kind
        return kind, "OK", "", time.monotonic() - started

    answers = []
    for _ in range(2):
        requests = _burst()
        started = [time.monotonic()] * len(requests)
        with ThreadPoolExecutor(len(requests)) as pool:
            answers += list(pool.map(send, requests, started))
    peak = sampler.stop()
    served = [a for a in answers if a[1] == "OK"]
    refused = [a for a in answers if a[1] != "OK"]
    print(f"memory burst: idle {idle / MB:.0f} MB, peak {peak / MB:.0f} MB "
          f"(+{(peak - idle) / MB:.0f} MB; budget {BUDGET_MB} MB), {len(served)} served, "
          f"{len(refused)} refused")  # fmt: skip
    for kind, status, message, _ in refused:
        assert status == "StatusCode.UNAVAILABLE", (kind, status, message)
        assert message.startswith("Not enough memory: the request needs about"), message
        assert f"the memory budget is {BUDGET_MB} MB" in message
    for kind, _, _, elapsed in refused:
        assert elapsed < 10, f"{kind} refused after {elapsed:.0f} s, not at once"
    assert served and refused, "the budget should let some in and turn some away"
    assert peak - idle <= (BUDGET_MB + MARGIN_MB) * MB
    # nothing crashed: the same processes, ready, and serving
    assert set(process_group_members(server.pid)) == stubs
    assert client.is_server_ready() and client.is_model_ready("inpaint")
    assert client.infer("inpaint", warm).as_numpy("images").shape == (1, 1, 64, 64, 3)
