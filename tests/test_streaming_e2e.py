"""Streamed requests through a real tritonserver (issue 18): the `<pipeline>_stream` models,
`InpaintClient.stream`, cancellation, and unary calls unchanged beside them."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import make_case, served
from helpers import PROMPT

from sdserve_client import GenerationRequest, InpaintClient, InvalidRequestError, SdserveError
from sdserve_client.sdk import infer_inputs
from sdserve_client.webui.server_info import fetch_metrics, metric_value
from sdserve_protocol.events import Preview, Progress, Queued
from sdserve_protocol.metrics import OUTSTANDING_STEPS_METRIC, PENDING_METRIC, REQUESTS_METRIC

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(xl_repository, tmp_path_factory):
    with served(xl_repository, tmp_path_factory.mktemp("stream-build")) as server:
        yield server


def _cases() -> dict[str, tuple[str, dict]]:
    image, mask = make_case(64, 64, seed=31)
    wide, wide_mask = make_case(48, 80, seed=32)
    photo = np.random.default_rng(34).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    spot = np.zeros((96, 128), np.uint8)
    spot[40:56, 60:80] = 255  # a small mask: only a crop around it is generated
    return {
        "inpaint_euler_a_previews": ("inpaint", dict(
            image=image, mask=mask, steps=4, seed=1, scheduler="euler_a", preview_every=2)),
        "inpaint_ddim_two": ("inpaint", dict(
            image=wide, mask=wide_mask, steps=3, seed=2, scheduler="ddim", num_images=2,
            strength=0.8)),
        "outpaint_unipc": ("inpaint", dict(
            image=wide, outpaint=(8, 0, 16, 8), steps=3, seed=3, scheduler="unipc",
            preview_every=2)),
        "inpaint_crop_previews": ("inpaint", dict(
            image=photo, mask=spot, padding_mask_crop=6, height=64, width=64, steps=3, seed=6,
            scheduler="euler", preview_every=1)),  # previews of the whole photo
        "text_to_image": ("inpaint", dict(height=64, width=96, steps=3, seed=4,
                                          scheduler="lms", preview_every=1)),
        "xl_inpaint": ("inpaint_xl", dict(image=wide, mask=wide_mask, steps=3, seed=5,
                                          scheduler="euler", preview_every=1)),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_cases()))
def test_streamed_equals_unary_with_one_progress_per_step_then_the_result(server, name):
    model, fields = _cases()[name]
    request = GenerationRequest(PROMPT, **fields)
    with InpaintClient(server.grpc_url, model=model) as client:
        unary = client.generate(request)
        events = list(client.stream(request))
    *progress_events, result = events
    assert np.array_equal(result.arrays, unary.arrays), "streamed images differ from unary"
    assert result.seeds == unary.seeds
    steps = [e for e in progress_events if isinstance(e, Progress)]
    total = steps[-1].total_steps
    assert [e.step for e in steps] == list(range(1, total + 1))  # each step once, in order
    assert all(0 <= time.time() - e.time_s < 600 for e in steps)  # when each step ended
    assert all(isinstance(e, Queued | Progress | Preview) for e in progress_events)
    every = fields.get("preview_every", 0)
    previews = [e for e in progress_events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [s for s in range(1, total) if every and s % every == 0]
    height, width = unary.arrays.shape[1:3]
    assert all(p.images.shape == (len(unary.seeds), height, width, 3) for p in previews)


def _metric(server, name: str, **labels: str) -> float | None:
    return metric_value(fetch_metrics(server.metrics_url) or "", name, "inpaint", **labels)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["leave the loop", "cancel()"])
def test_a_stream_closed_mid_run_cancels_the_request_and_leaves_nothing_behind(server, how):
    image, mask = make_case(64, 64, seed=33)
    request = GenerationRequest(PROMPT, image=image, mask=mask, steps=150, seed=6)
    cancelled_before = _metric(server, REQUESTS_METRIC, outcome="cancelled") or 0
    with InpaintClient(server.grpc_url) as client:
        stream = client.stream(request)
        seen = []
        for event in stream:
            seen.append(event)
            if isinstance(event, Progress) and event.step == 2:
                if how == "cancel()":
                    stream.cancel()  # ends the loop: no result comes
                else:
                    break  # the stream closes: the request is cancelled
        assert all(isinstance(e, Queued | Progress | Preview) for e in seen)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if _metric(server, REQUESTS_METRIC, outcome="cancelled") == cancelled_before + 1:
                break
            time.sleep(0.2)
        assert _metric(server, REQUESTS_METRIC, outcome="cancelled") == cancelled_before + 1
        assert _metric(server, OUTSTANDING_STEPS_METRIC) == 0
        assert _metric(server, PENDING_METRIC) == 0
        # the server goes on serving, streamed and unary
        small = GenerationRequest(PROMPT, image=image, mask=mask, steps=2, seed=7)
        assert list(client.stream(small))[-1].arrays.shape == (1, 64, 64, 3)
        assert client.generate(small).arrays.shape == (1, 64, 64, 3)


def test_bad_preview_every_is_refused_by_the_sdk_and_by_the_server(server):
    with (
        InpaintClient(server.grpc_url) as client,
        pytest.raises(InvalidRequestError, match="preview_every"),
    ):
        client.stream(GenerationRequest(PROMPT, height=64, width=64, preview_every=-1))
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    responses: list = []
    raw.start_stream(callback=lambda result, error: responses.append((result, error)))
    tensors = {"prompt": np.array([[PROMPT.encode()]], object),
               "preview_every": np.array([[5000]], np.int32)}  # fmt: skip
    raw.async_stream_infer("inpaint_stream", infer_inputs(tensors))
    deadline = time.monotonic() + 60
    while not responses and time.monotonic() < deadline:
        time.sleep(0.05)
    raw.stop_stream()
    raw.close()
    (result, error), *_ = responses
    assert result is None and "preview_every" in error.message()
    refused = SdserveError.from_triton(error)  # the stream kept the unary call's status
    assert refused.status == "StatusCode.INVALID_ARGUMENT"
    assert refused.message.startswith("preview_every")


def test_a_unary_call_ignores_preview_every(server):
    fields = dict(height=64, width=64, steps=2, seed=9)
    with InpaintClient(server.grpc_url) as client:
        plain = client.generate(GenerationRequest(PROMPT, **fields))
        with_option = client.generate(GenerationRequest(PROMPT, preview_every=1, **fields))
    assert np.array_equal(plain.arrays, with_option.arrays)


def test_streaming_a_model_without_a_stream_model_says_so(server):
    with (
        InpaintClient(server.grpc_url, model="text_encoder") as client,
        pytest.raises(SdserveError, match="unknown model: .text_encoder_stream."),
    ):
        list(client.stream(GenerationRequest(PROMPT, height=64, width=64)))


def test_http_generate_stream_carries_the_same_events_and_images(server):
    """Triton's HTTP `generate_stream` endpoint (server-sent events) on the stream model: a
    plain HTTP client gets the events as JSON and the images as a flat row-major list."""
    fields = dict(height=64, width=64, steps=3, seed=4, scheduler="euler")
    body = {"prompt": PROMPT, "preview_every": 2, **fields}
    url = f"http://{server.http_url}/v2/models/inpaint_stream/generate_stream"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        lines = response.read().decode().splitlines()
    events = [json.loads(line[len("data:") :]) for line in lines if line.startswith("data:")]
    kinds = [e["event"] for e in events]
    assert kinds == ["queued", "progress", "progress", "preview", "progress", "result"]
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    with InpaintClient(server.grpc_url) as client:
        unary = client.generate(GenerationRequest(PROMPT, **fields))
    images = np.asarray(events[-1]["images"], np.uint8).reshape(unary.arrays.shape)
    assert np.array_equal(images, unary.arrays)
    assert len(events[3]["preview"]) == unary.arrays.size


@pytest.mark.slow
def test_a_stream_client_that_stops_reading_does_not_stall_the_others(server):
    """A client whose stream callback blocks (it reads nothing more) while its request runs
    with a preview every step: unary and streamed requests of other clients still finish."""
    image, mask = make_case(64, 64, seed=35)
    stuck = threading.Event()
    let_go = threading.Event()

    def never_reads(result, error) -> None:
        stuck.set()
        let_go.wait(300)

    raw = grpcclient.InferenceServerClient(server.grpc_url)
    raw.start_stream(callback=never_reads)
    tensors = {"prompt": np.array([[PROMPT.encode()]], object), "image": image[np.newaxis],
               "mask": mask[np.newaxis], "steps": np.array([[150]], np.int32),
               "preview_every": np.array([[1]], np.int32)}  # fmt: skip
    try:
        raw.async_stream_infer("inpaint_stream", infer_inputs(tensors))
        assert stuck.wait(120)
        small = GenerationRequest(PROMPT, image=image, mask=mask, steps=3, seed=10)
        with InpaintClient(server.grpc_url) as client:
            assert client.generate(small).arrays.shape == (1, 64, 64, 3)
            assert list(client.stream(small))[-1].arrays.shape == (1, 64, 64, 3)
        assert not let_go.is_set()  # all of that while the first client read nothing
    finally:
        let_go.set()
        raw.stop_stream(cancel_requests=True)
        raw.close()
