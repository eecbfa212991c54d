"""LoRA adapters per request through a real tritonserver (issue 17): concurrent requests on
different adapter sets each get their single-request result (the in-process one), an adapter
file added while serving is usable, bad requests are INVALID_ARG and change nothing else, and
so is a request whose adapter file is removed while it runs."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cases import make_case, served
from helpers import PROMPT, wire

from sdserve_client import GenerationRequest, InpaintClient, InvalidRequestError, SdserveError
from sdserve_pipeline.inprocess import load_service

pytestmark = [pytest.mark.e2e]

SETS = [
    ((), None),
    (("unet_convs",), (0.8,)),
    (("with_text", "kohya"), (0.8, 0.5)),
    (("text_only",), (1.0,)),
    (("unet_convs",), (0.8,)),
    (("kohya",), (-0.6,)),
]


@pytest.fixture(scope="module")
def server(repository, adapters_dir, tmp_path_factory):
    with served(repository, tmp_path_factory.mktemp("lora-build")) as server:
        yield server


@pytest.fixture(scope="module")
def in_process(repository, adapters_dir):
    return load_service(repository)


def _request(names, scales, seed, steps=4):
    image, mask = make_case(64, 64, seed=5)
    return GenerationRequest(
        PROMPT, image=image, mask=mask, steps=steps, seed=seed, scheduler="euler_a",
        adapters=list(names) or None, adapter_scales=None if scales is None else list(scales),
    )  # fmt: skip


def _in_process(service, names, scales, seed):
    image, mask = make_case(64, 64, seed=5)
    tensors = wire(image, mask, steps=4, seed=seed, scheduler="euler_a")
    tensors.pop("preserve_unmasked")  # the SDK request leaves it at the server default
    if names:
        tensors["adapters"] = np.array([n.encode() for n in names], dtype=object)
        tensors["adapter_scales"] = np.array(scales, dtype=np.float32)
    return service.generate(tensors)["images"]


@pytest.mark.slow
def test_concurrent_requests_on_different_sets_match_their_single_results(server, in_process):
    expected = [_in_process(in_process, n, s, seed=11) for n, s in SETS]

    def run(case):
        names, scales = case
        with InpaintClient(server.grpc_url) as client:
            return client.generate(_request(names, scales, seed=11)).arrays

    with ThreadPoolExecutor(len(SETS)) as pool:
        results = list(pool.map(run, SETS))
    for (names, _), got, want in zip(SETS, results, expected, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=f"adapters {names}")
    assert np.abs(results[0].astype(int) - results[1]).max() > 4  # adapters change the image


def test_bad_adapter_requests_are_invalid_arg_and_serving_goes_on(server, adapters_dir):
    with InpaintClient(server.grpc_url) as client:
        with pytest.raises(SdserveError, match="'nope' is not an adapter.*available: kohya") as err:
            client.generate(_request(("nope",), None, seed=1))
        assert err.value.status == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InvalidRequestError, match="adapter_scales: nan out of range"):
            client.generate(_request(("kohya",), (float("nan"),), seed=1))
        client.generate(_request(("kohya",), (1.0,), seed=1))


def test_adapter_added_while_serving_is_usable_then_removed_is_refused(server, adapters_dir):
    new = adapters_dir / "added_live.safetensors"
    shutil.copy(adapters_dir / "unet_convs.safetensors", new)
    try:
        with InpaintClient(server.grpc_url) as client:
            live = client.generate(_request(("added_live",), (0.8,), seed=3)).arrays
            same = client.generate(_request(("unet_convs",), (0.8,), seed=3)).arrays
        np.testing.assert_array_equal(live, same)
    finally:
        new.unlink()
    with InpaintClient(server.grpc_url) as client, pytest.raises(SdserveError, match="added_live"):
        client.generate(_request(("added_live",), (0.8,), seed=3))


def test_adapter_removed_while_its_request_runs_fails_only_that_request(server, adapters_dir):
    """The file goes after the request was checked, while it runs: the runner refuses the set
    and that request is INVALID_ARGUMENT naming the adapter, as at parse time; a request on
    another set running beside it finishes."""
    racy = adapters_dir / "removed_live.safetensors"
    shutil.copy(adapters_dir / "unet_convs.safetensors", racy)
    try:
        with InpaintClient(server.grpc_url) as client:
            doomed = client.submit(_request(("removed_live",), (0.8,), seed=3, steps=60))
            other = client.submit(_request(("kohya",), (0.5,), seed=3, steps=40))
            deadline = time.monotonic() + 60
            while not _running(server, more_steps_than=60):  # both checked, none queued
                assert time.monotonic() < deadline, "the requests never started"
                time.sleep(0.02)
            racy.unlink()
            with pytest.raises(SdserveError, match="'removed_live' is not an adapter") as err:
                doomed.result(timeout=120)
            assert err.value.status == "StatusCode.INVALID_ARGUMENT"
            assert other.result(timeout=120).arrays.shape == (1, 64, 64, 3)
    finally:
        racy.unlink(missing_ok=True)


def _running(server, more_steps_than: int) -> bool:
    """The pipeline has no request waiting and more denoising steps outstanding than given."""
    from sdserve_client.webui.server_info import fetch_metrics, metric_value
    from sdserve_protocol.metrics import OUTSTANDING_STEPS_METRIC, PENDING_METRIC

    text = fetch_metrics(server.metrics_url) or ""
    steps = metric_value(text, OUTSTANDING_STEPS_METRIC, "inpaint") or 0
    return metric_value(text, PENDING_METRIC, "inpaint") == 0 and steps > more_steps_than


def test_sdk_and_cli_list_the_adapters(server, adapters_dir, capsys):
    from sdserve_client import cli

    refused = adapters_dir / "old.ckpt"
    refused.write_bytes(b"pickle")
    try:
        with InpaintClient(server.grpc_url) as client:
            listing = {entry["name"]: entry for entry in client.list_adapters()}
        assert listing["with_text"] == {
            "name": "with_text", "architecture": "sd15", "rank": 2,
            "targets": {"unet": 128, "text_encoder": 8},
        }  # fmt: skip
        assert listing["kohya"]["targets"] == {"unet": 172, "text_encoder": 8}
        assert "only .safetensors" in listing["old"]["error"]
        assert cli.main(["adapters", "--url", server.grpc_url]) == 0
    finally:
        refused.unlink()
    lines = capsys.readouterr().out.splitlines()
    assert "with_text\tsd15\trank=2\tunet:128,text_encoder:8" in lines
    assert any(line.startswith("old\trefused: ") for line in lines)


def test_web_ui_offers_the_adapters_and_generates_what_the_sdk_does(server, adapters_dir):
    """The web UI's handlers (no browser) on this server: its adapter section offers the usable
    files, and an image made there with an adapter equals the SDK's with the same adapter."""
    pytest.importorskip("gradio", reason="the [ui] extra is not installed")
    from sdserve_client.webui import app
    from sdserve_client.webui import callbacks as cb
    from sdserve_client.webui.backend import Backend

    backend = Backend(server.grpc_url)
    try:
        handlers = app._Handlers(backend, app.AppConfig(server.grpc_url))
        handlers.refresh("inpaint", "euler_a", 4, 1)
        controls, adapters, _, note = handlers.adapters("inpaint", [], [])
        offered = {value for _, value in adapters["choices"]}
        assert controls["visible"] and "at most 4 per request" in note
        assert {"unet_convs", "with_text", "text_only", "kohya"} <= offered
        values = ("inpaint", PROMPT, "", "euler_a", 4, 7.5, 1.0, "11", 1, True, False, 0)
        table = cb.adapter_rows(["with_text"], [["with_text", 0.8]])
        *_, (_, _, images, *_) = handlers.text_to_image(*values, ["with_text"], table, 64, 64, "s")
    finally:
        backend.close()
    with InpaintClient(server.grpc_url) as client:
        want = client.text_to_image(
            PROMPT, 64, 64, steps=4, seed=11, scheduler="euler_a", guidance_scale=7.5,
            adapters=["with_text"], adapter_scales=[0.8],
        ).arrays  # fmt: skip
    np.testing.assert_array_equal(images[0], want[0])


def test_the_checkpoint_listing_shows_each_cached_variant_and_its_memory(server, adapters_dir):
    with InpaintClient(server.grpc_url) as client:
        client.generate(_request(("unet_convs",), (0.8,), seed=2))
        listing = client.list_checkpoints()
    (inpaint,) = [c for c in listing["checkpoints"] if c["name"] == "inpaint"]
    unet = next(c for c in inpaint["components"] if c["name"] == "unet")
    variants = [v for v in unet["variants"] if [n for n, _ in v["adapters"]] == ["unet_convs"]]
    assert variants and variants[0]["adapters"][0][1] == pytest.approx(0.8)
    assert 0 < variants[0]["size_mb"] <= unet["size_mb"]
