"""Every request's outcome on a real tritonserver's metrics endpoint (issue 14, item 5)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import infer_inputs, make_case, served
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from sdserve_client.webui.server_info import fetch_metrics, metric_value, outcome_counts
from sdserve_protocol.metrics import (
    DURATION_METRIC,
    MEMORY_BUDGET_METRIC,
    MEMORY_RESERVED_METRIC,
    OUTCOMES,
    OUTSTANDING_STEPS_METRIC,
    PENDING_METRIC,
    QUEUE_WAIT_METRIC,
)

pytestmark = pytest.mark.e2e
PROMPT = "a red bicycle"
WAIT_S = 120  # only a hang fails on it
LONG_STEPS = 5000  # cancelled once the others are answered: it must outlast them, even on a
# loaded machine (150 steps of the tiny demo took under a second too often)


def _edit_config(model_dir: Path, **params: str) -> None:
    config_file = model_dir / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), mc.ModelConfig())
    config.name = model_dir.name
    for key, value in params.items():
        config.parameters[key].string_value = value
    config_file.write_text(text_format.MessageToString(config))


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    """`inpaint` denoising one request at a time with room for one more, and `broken`: the
    same pipeline calling a VAE decoder that does not exist (every request fails)."""
    repo = tmp_path_factory.mktemp("outcomes") / "repo"
    shutil.copytree(repository, repo)
    _edit_config(repo / "inpaint", max_active_requests="1", max_queue_size="1",
                 limit_max_steps=str(LONG_STEPS))  # fmt: skip
    shutil.copytree(repo / "inpaint", repo / "broken")
    _edit_config(repo / "broken", vae_decoder_model="no_such_decoder")
    with served(repo, tmp_path_factory.mktemp("triton-outcomes")) as srv:
        yield srv


def _request(steps: int, seed: int = 1) -> list[grpcclient.InferInput]:
    image, mask = make_case(64, 64, seed=1)
    return infer_inputs({
        "prompt": np.array([PROMPT.encode()], np.object_), "image": image, "mask": mask,
        "steps": np.array([steps], np.int32), "seed": np.array([seed], np.int64),
    })  # fmt: skip


class Answers:
    """Outcomes of async requests by name: results or `InferenceServerException`s."""

    def __init__(self) -> None:
        self.by_name: dict[str, object] = {}
        self._done = threading.Condition()

    def callback(self, name: str):
        def done(result, error) -> None:
            with self._done:
                self.by_name[name] = error if error is not None else result
                self._done.notify_all()

        return done

    def wait(self, *names: str) -> None:
        with self._done:
            assert self._done.wait_for(lambda: set(names) <= set(self.by_name), WAIT_S), names

    def status(self, name: str) -> str:
        error = self.by_name[name]
        return str(error.status()) if isinstance(error, InferenceServerException) else "OK"


def _metrics(server) -> str:
    text = fetch_metrics(server.metrics_url)
    assert text is not None
    return text


def _counts(server, model: str) -> dict[str, int]:
    return outcome_counts(_metrics(server), model) or {}


def test_every_outcome_is_counted_once_on_the_metrics_endpoint(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = _counts(server, "inpaint")
    assert set(before) == set(OUTCOMES)  # every series exists from the start, at 0
    answers = Answers()

    # success, then invalid (steps 0: the server's own check; the SDK would refuse to send it)
    client.infer("inpaint", _request(steps=2, seed=1))
    with pytest.raises(InferenceServerException, match="steps"):
        client.infer("inpaint", _request(steps=0))
    # a long request runs; one waits behind it with a 50 ms timeout; the next finds no room
    long_call = client.async_infer("inpaint", _request(steps=LONG_STEPS), answers.callback("long"))
    deadline = time.monotonic() + WAIT_S
    while metric_value(_metrics(server), OUTSTANDING_STEPS_METRIC, "inpaint") in (None, 0):
        assert time.monotonic() < deadline, "the long request never showed as outstanding"
        time.sleep(0.05)
    client.async_infer("inpaint", _request(2, 2), answers.callback("late"), timeout=50_000)
    client.async_infer("inpaint", _request(2, 3), answers.callback("full"))
    answers.wait("full")
    text = _metrics(server)
    outstanding = metric_value(text, OUTSTANDING_STEPS_METRIC, "inpaint")
    assert outstanding is not None and 2 < outstanding <= LONG_STEPS + 2  # long's left + late's
    assert metric_value(text, PENDING_METRIC, "inpaint") == 1  # late waits
    assert (metric_value(text, MEMORY_RESERVED_METRIC, "inpaint") or 0) > 0
    time.sleep(0.2)  # past late's own timeout (not a timing assertion)
    long_call.cancel()
    answers.wait("long", "late")
    # failed: a component error
    with pytest.raises(InferenceServerException, match="no_such_decoder"):
        client.infer("broken", _request(steps=2))

    assert answers.status("full") == answers.status("late") == "StatusCode.UNAVAILABLE"
    assert "CANCELLED" in answers.status("long")
    deadline = time.monotonic() + 10  # a cancelled request is answered at its next step
    expected = {"success": 1, "invalid": 1, "cancelled": 1, "timeout": 1, "overloaded": 1,
                "failed": 0}  # fmt: skip
    while (counts := _counts(server, "inpaint")) != {k: before[k] + n for k, n in expected.items()}:
        assert time.monotonic() < deadline, counts
        time.sleep(0.05)
    assert _counts(server, "broken") == dict.fromkeys(OUTCOMES, 0) | {"failed": 1}
    text = _metrics(server)
    answered = sum(counts.values())
    assert metric_value(text, DURATION_METRIC + "_count", "inpaint") == answered
    assert (metric_value(text, DURATION_METRIC + "_sum", "inpaint") or 0) > 0
    # every request that entered the queue left it once: the success, long and late
    queued = metric_value(text, QUEUE_WAIT_METRIC + "_count", "inpaint")
    assert queued == sum(before[k] for k in ("success", "cancelled", "timeout")) + 3
    assert 'le="+Inf"' in text  # Triton's own histogram series (pb_utils HISTOGRAM)
    for gauge in (OUTSTANDING_STEPS_METRIC, PENDING_METRIC, MEMORY_RESERVED_METRIC):
        assert metric_value(text, gauge, "inpaint") == 0, gauge
    assert (metric_value(text, MEMORY_BUDGET_METRIC, "inpaint") or 0) > 0  # auto: half the RAM
