"""Graph reuse (issue 17 item 5): a checkpoint of the demo's graph with other weights (seed 1),
exported with `share_graph_with="inpaint"`, runs on the demo's component models with every
initializer overridden by its own; it gives its normal export's images and diffusers' on its
weights, leaves the demo's unchanged; the export refuses another graph, and the runner refuses
a checkpoint name that is not one (or whose weights are missing or of another graph)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from cases import diffusers_inpaint, make_case, max_abs
from helpers import wire

from sdserve_pipeline.inprocess import load_service, read_parameters
from sdserve_pipeline.ort_runner import OrtRunner
from sdserve_pipeline.service import PipelineService
from sdserve_pipeline.shared_graph import CheckpointWeightsError
from sdserve_protocol.settings import PipelineSettings

STEPS = 10
SHARED = "inpaint_b"  # checkpoint B through the demo's (A's) component models
OWN = "own_b"  # checkpoint B exported with its own component models (`own_b_*`)


@pytest.fixture(scope="module")
def b_pipeline_dir(tmp_path_factory) -> Path:
    from sdserve_export.demo_pipeline import save_demo_pipeline

    return save_demo_pipeline(tmp_path_factory.mktemp("demo-b") / "pipeline-b", seed=1)


@pytest.fixture(scope="module")
def shared_repository(repository, b_pipeline_dir, tmp_path_factory) -> Path:
    """The demo repository (`inpaint`), B sharing its graph (`inpaint_b`), and B on its own
    component models (`own_b`)."""
    from sdserve_export.repository import build_repository

    out = tmp_path_factory.mktemp("shared-graph") / "model_repository"
    shutil.copytree(repository, out)
    quiet = {"log": lambda _msg: None}
    build_repository(b_pipeline_dir, out, pipeline_name=SHARED, share_graph_with="inpaint", **quiet)
    build_repository(b_pipeline_dir, out, pipeline_name=OWN, component_prefix="own_b_", **quiet)
    return out


def _tensors(seed: int = 42):
    image, mask = make_case(64, 64)
    return wire(image, mask, steps=STEPS, seed=seed)


def _on_runners_of(a: PipelineService, repository: Path, checkpoint: str) -> PipelineService:
    """Pipeline `checkpoint` on the very runners (sessions, variant caches) of service `a`,
    as the Triton pipeline models of both call the same component models."""
    settings = PipelineSettings.from_parameters(read_parameters(repository / checkpoint))
    runners = vars(a.loop.components)

    def make_runner(spec, _model_name):
        shared = runners[spec.name]
        return OrtRunner(spec, shared.session, shared.variants, checkpoint)

    assets = repository / checkpoint / "1" / "assets"
    return PipelineService.from_settings(settings, assets, make_runner)


def test_export_writes_weights_not_models(shared_repository):
    settings = PipelineSettings.from_parameters(read_parameters(shared_repository / SHARED))
    assert settings.shared_graph
    assert settings.components == {
        r: r for r in ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    }
    weights = shared_repository / SHARED / "1" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == sorted(settings.components.values())
    assert (weights / "unet" / "model.onnx").is_file()
    assert not (shared_repository / "inpaint_b_unet").exists()


def test_shared_graph_gives_the_own_export_and_diffusers_and_leaves_a_unchanged(
    shared_repository, b_pipeline_dir
):
    from diffusers import StableDiffusionInpaintPipeline

    a = load_service(shared_repository, "inpaint")
    a_before = a.generate(_tensors())["images"]
    b_shared = _on_runners_of(a, shared_repository, SHARED).generate(_tensors())["images"]
    a_after = a.generate(_tensors())["images"]
    b_own = load_service(shared_repository, OWN).generate(_tensors())["images"]
    b_inprocess = load_service(shared_repository, SHARED).generate(_tensors())["images"]

    pipe = StableDiffusionInpaintPipeline.from_pretrained(b_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    image, mask = make_case(64, 64)
    reference = diffusers_inpaint(pipe, image, mask, steps=STEPS)

    own, ref = max_abs(b_shared[0], b_own[0]), max_abs(b_shared[0], reference)
    print(f"\nshared graph vs own export: {own}/255, vs diffusers: {ref}/255")
    assert own <= 1
    assert ref <= 2
    np.testing.assert_array_equal(b_inprocess, b_shared)  # load_service does the same
    np.testing.assert_array_equal(a_after, a_before)  # A's weights untouched
    assert max_abs(a_before[0], b_shared[0]) > 4  # B's weights were really used
    unet = a.loop.components.unet.variants
    assert [v.get("checkpoint") for v in unet.describe()] == [SHARED]


def test_a_shared_graph_checkpoint_refuses_adapters(shared_repository):
    from sdserve_protocol.rules import RequestError

    tensors = _tensors() | {"adapters": np.array([b"anything"], dtype=object)}
    with pytest.raises(RequestError, match="serves no LoRA adapters"):
        load_service(shared_repository, SHARED).generate(tensors)


def test_export_refuses_another_graph(repository, base_pipeline_dir, tmp_path):
    from sdserve_export.repository import SharedGraphError, build_repository

    out = tmp_path / "model_repository"
    shutil.copytree(repository, out)
    quiet = {"log": lambda _msg: None}
    with pytest.raises(SharedGraphError, match=r"--share-graph-with inpaint: .* unet graph"):
        build_repository(base_pipeline_dir, out, "four", share_graph_with="inpaint", **quiet)
    assert not (out / "four").exists() and not (out / "model_repository.partial").exists()
    with pytest.raises(SharedGraphError, match="--share-graph-with nowhere: no pipeline"):
        build_repository(base_pipeline_dir, out, "four", share_graph_with="nowhere", **quiet)


def _runner_model(repository: Path, model: str):
    """The Triton runner model (`triton_models/onnx_runner/model.py`) of `model`, on a fake
    `triton_python_backend_utils` that records responses."""
    from google.protobuf import json_format

    from sdserve_export.triton_configs import parse_pbtxt

    fake = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        INVALID_ARG = "INVALID_ARG"
        INTERNAL = "INTERNAL"

        def __init__(self, message, code="INTERNAL"):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs, self.error = list(output_tensors), error

    fake.TritonError = TritonError
    fake.InferenceResponse = InferenceResponse
    fake.Tensor = lambda name, array: (name, array)
    fake.get_input_tensor_by_name = lambda request, name: request.inputs[name]
    sys.modules["triton_python_backend_utils"] = fake
    try:
        path = repository / model / "1" / "model.py"
        spec = importlib.util.spec_from_file_location(f"runner_{model}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        del sys.modules["triton_python_backend_utils"]
    config = parse_pbtxt((repository / model / "config.pbtxt").read_text())
    args = {
        "model_config": json.dumps(
            json_format.MessageToDict(config, preserving_proto_field_name=True)
        ),
        "model_repository": str(repository / model),
        "model_version": "1",
        "model_name": model,
    }
    runner = module.TritonPythonModel()
    runner.initialize(args)
    return runner


class _Request:
    def __init__(self, inputs, parameters):
        self.inputs = {
            name: types.SimpleNamespace(as_numpy=lambda a=a: a) for name, a in inputs.items()
        }
        self._parameters = json.dumps(parameters)

    def parameters(self):
        return self._parameters


def test_the_runner_refuses_a_checkpoint_it_cannot_use(shared_repository, monkeypatch, tmp_path):
    monkeypatch.setenv("SDSERVE_STATE_DIR", str(tmp_path / "state"))
    runner = _runner_model(shared_repository, "vae_decoder")
    latents = {"latent_sample": np.zeros((1, 4, 8, 8), np.float32)}
    assert runner.input_names == ["latent_sample"]

    other_graph = shared_repository / "evil" / "1" / "weights" / "vae_decoder"
    other_graph.mkdir(parents=True)
    shutil.copy(shared_repository / "vae_encoder" / "1" / "model.onnx", other_graph)
    outside = shared_repository.parent / "1" / "weights" / "vae_decoder"  # for "..": never read
    outside.mkdir(parents=True)
    shutil.copy(shared_repository / "vae_decoder" / "1" / "model.onnx", outside)

    refused = {
        "..": "not a model name", ".": "not a model name", "../inpaint_b": "not a model name",
        "inpaint_b/../inpaint_b": "not a model name", "/etc": "not a model name",
        "a" * 200: "not a model name", "inpaint": "no weights", "missing": "no weights",
        "evil": "another graph",
    }  # fmt: skip
    for name, reason in refused.items():
        response = runner._run(_Request(latents, {"checkpoint": name}))
        assert response.error is not None, name
        assert response.error.code == "INVALID_ARG", name
        assert response.error.message.startswith("checkpoint refused: "), name
        assert reason in response.error.message, (name, response.error.message)

    good = runner._run(_Request(latents, {"checkpoint": SHARED}))
    base = runner._run(_Request(latents, {}))
    assert good.error is None and base.error is None
    assert np.abs(good.outputs[0][1] - base.outputs[0][1]).max() > 1e-3  # B's weights
    with_adapters = runner._run(_Request(latents, {"checkpoint": SHARED, "adapters": '[["x", 1]]'}))
    assert with_adapters.error.code == "INVALID_ARG"


def test_weights_resolver_checks_names_before_paths(shared_repository):
    from sdserve_pipeline.shared_graph import WeightsResolver

    resolver = WeightsResolver(shared_repository / "unet" / "1", "model.onnx")
    path, _ = resolver.resolve(SHARED)
    assert path == shared_repository.resolve() / SHARED / "1" / "weights" / "unet" / "model.onnx"
    for name in ("", "..", "a/b", "a\\b", "x\x00"):
        with pytest.raises(CheckpointWeightsError, match="not a model name"):
            resolver.resolve(name)
