"""Checkpoints loaded on demand through a real tritonserver (issue 17): two checkpoints
whose components do not both fit the server's budget. Neither is loaded at start; a request
loads its own, evicting the other when it is idle; an evicted and reloaded checkpoint gives
the same images; concurrent requests to both all get their single-request results; the
listing (`sdserve-client models`) tells what is loaded and its memory."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cases import make_case, max_abs, served
from helpers import PROMPT, wire

from sdserve_client import GenerationRequest, InpaintClient
from sdserve_export.triton_configs import parse_pbtxt, to_pbtxt
from sdserve_pipeline.checkpoints import model_bytes
from sdserve_pipeline.inprocess import load_service
from sdserve_protocol.settings import PipelineSettings, config_parameters

pytestmark = [pytest.mark.e2e]

CHECKPOINTS = ("inpaint", "other")
SHARED = "other_on_inpaint_graph"  # other's weights on inpaint's component models


def _load_on_demand(model_dir: Path) -> None:
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    config.parameters["load_on_demand"].string_value = "true"
    (model_dir / "config.pbtxt").write_text(to_pbtxt(config))


@pytest.fixture(scope="module")
def two_checkpoints(repository, tmp_path_factory) -> Path:
    """The demo checkpoint (`inpaint`) and another with other weights (`other`, components
    `other_*`), both loaded on demand; and `other` again as `SHARED`, its weights on
    `inpaint`'s component models (graph reuse)."""
    from sdserve_export.demo_pipeline import save_demo_pipeline
    from sdserve_export.repository import build_repository

    root = tmp_path_factory.mktemp("checkpoints")
    out = root / "repo"
    shutil.copytree(repository, out)
    source = save_demo_pipeline(root / "other-pipeline", seed=1)
    build_repository(
        source, out, pipeline_name="other", component_prefix="other_", load_on_demand=True,
        log=lambda _msg: None,
    )  # fmt: skip
    build_repository(
        source, out, pipeline_name=SHARED, share_graph_with="inpaint", load_on_demand=True,
        log=lambda _msg: None,
    )  # fmt: skip
    _load_on_demand(out / "inpaint")
    return out


def _models(repository: Path, pipeline: str) -> list[str]:
    config = parse_pbtxt((repository / pipeline / "config.pbtxt").read_text())
    return list(PipelineSettings.from_parameters(config_parameters(config)).components.values())


@pytest.fixture(scope="module")
def server(two_checkpoints, tmp_path_factory):
    largest = max(
        sum(model_bytes(two_checkpoints, m) for m in _models(two_checkpoints, name))
        for name in CHECKPOINTS
    )
    budget_mb = 1.5 * largest / 2**20  # one checkpoint fits, not two
    with served(
        two_checkpoints, tmp_path_factory.mktemp("checkpoints-build"),
        checkpoint_budget_mb=f"{budget_mb:.3f}",
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def expected(two_checkpoints):
    names = (*CHECKPOINTS, SHARED)
    return {name: _in_process(load_service(two_checkpoints, name), seed=7) for name in names}


def _request(seed: int) -> GenerationRequest:
    image, mask = make_case(64, 64, seed=4)
    return GenerationRequest(PROMPT, image=image, mask=mask, steps=3, seed=seed, scheduler="ddim")


def _in_process(service, seed: int):
    image, mask = make_case(64, 64, seed=4)
    tensors = wire(image, mask, steps=3, seed=seed, scheduler="ddim")
    tensors.pop("preserve_unmasked")  # the SDK request leaves it at the server default
    return service.generate(tensors)["images"]


def _generate(server, model: str, seed: int = 7):
    with InpaintClient(server.grpc_url, model=model) as client:
        return client.generate(_request(seed)).arrays


def _states(server) -> dict[str, str]:
    with InpaintClient(server.grpc_url) as client:
        listing = client.list_checkpoints()
    return {c["name"]: c["state"] for c in listing["checkpoints"] if c["name"] in CHECKPOINTS}


def test_nothing_is_loaded_at_start_and_a_request_loads_its_checkpoint(server, expected):
    loaded = {m.name for m in server.control.index() if m.state == "READY"}
    assert "inpaint" in loaded and "other" in loaded and "checkpoints" in loaded
    assert not {"unet", "other_unet", "vae_decoder", "other_vae_decoder"} & loaded
    assert _states(server) == {"inpaint": "on disk", "other": "on disk"}

    np.testing.assert_array_equal(_generate(server, "inpaint"), expected["inpaint"])
    assert _states(server) == {"inpaint": "loaded", "other": "on disk"}


def test_switching_evicts_the_idle_checkpoint_and_reloading_gives_the_same_images(server, expected):
    first = _generate(server, "inpaint")
    np.testing.assert_array_equal(_generate(server, "other"), expected["other"])
    assert _states(server) == {"inpaint": "on disk", "other": "loaded"}
    ready = {m.name for m in server.control.index() if m.state == "READY"}
    assert "other_unet" in ready and "unet" not in ready  # Triton really unloaded it
    np.testing.assert_array_equal(_generate(server, "inpaint"), first)  # evicted, reloaded
    assert np.abs(expected["inpaint"].astype(int) - expected["other"]).max() > 4


def test_concurrent_requests_to_both_checkpoints_get_their_single_results(server, expected):
    jobs = [name for name in CHECKPOINTS for _ in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda name: _generate(server, name), jobs))
    for name, got in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_the_listing_reports_memory_per_checkpoint_and_component(server, two_checkpoints):
    _generate(server, "other")
    with InpaintClient(server.grpc_url) as client:
        listing = client.list_checkpoints()
    assert listing["budget_mb"] > 0
    other = next(c for c in listing["checkpoints"] if c["name"] == "other")
    assert other["on_demand"] and other["state"] == "loaded" and other["requests"] == 0
    unet = next(c for c in other["components"] if c["name"] == "other_unet")
    on_disk = model_bytes(two_checkpoints, "other_unet") / 2**20
    assert unet["ready"] and unet["size_mb"] == round(on_disk, 1)
    assert unet["rss_mb"] > unet["size_mb"]  # a live process holding the weights


def test_a_checkpoint_on_a_loaded_graph_runs_on_its_models_with_its_own_weights(server, expected):
    np.testing.assert_array_equal(_generate(server, "inpaint"), expected["inpaint"])
    np.testing.assert_array_equal(_generate(server, SHARED), expected[SHARED])
    assert max_abs(expected[SHARED], expected["other"]) <= 1  # other's weights, own export
    np.testing.assert_array_equal(_generate(server, "inpaint"), expected["inpaint"])
    ready = {m.name for m in server.control.index() if m.state == "READY"}
    assert "unet" in ready and "other_unet" not in ready  # no models of its own loaded
