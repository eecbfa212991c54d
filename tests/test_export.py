"""Export: demo pipeline, tokenizer, ONNX parity per component, external data, configs."""

from pathlib import Path

import onnx
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline

from sdserve_export.clip_tokenizer import clip_tokenizer
from sdserve_export.onnx_export import export_onnx, sd15_targets
from sdserve_export.parity import ParityError, check_parity, require_parity
from sdserve_export.triton_configs import parse_pbtxt
from sdserve_pipeline.components import CLIP_VOCAB_SIZE, SD15_COMPONENTS
from sdserve_protocol.contract import INPUTS, OUTPUTS
from sdserve_protocol.events import STREAM_OUTPUTS


def test_clip_tokenizer_is_the_real_vocabulary():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB_SIZE == 49408
    # ids of CLIP's published tokenizer for this sentence
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_demo_pipeline_loads_offline_with_diffusers(diffusers_pipe):
    assert diffusers_pipe.unet.config.in_channels == 9
    assert len(diffusers_pipe.tokenizer) == 49408
    assert type(diffusers_pipe.scheduler).__name__ == "PNDMScheduler"


def test_every_component_matches_pytorch(export_reports):
    _, reports = export_reports
    assert [r.component for r in reports] == [s.name for s in SD15_COMPONENTS]
    for report in reports:
        assert report.max_abs_diff <= 1e-4, str(report)


def test_vae_encoder_returns_mean_and_logvar_not_a_sample(repository: Path, diffusers_pipe):
    from sdserve_pipeline.components import VAE_ENCODER
    from sdserve_pipeline.onnx_runtime import create_session
    from sdserve_pipeline.ort_runner import OrtRunner

    runner = OrtRunner(VAE_ENCODER, create_session(repository / "vae_encoder/1/model.onnx"))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, logvar = runner(image)
    with torch.no_grad():
        posterior = diffusers_pipe.vae.encode(image).latent_dist
    torch.testing.assert_close(mean, posterior.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(logvar, posterior.logvar, atol=1e-4, rtol=0)
    assert posterior.std.mean() > 0.5  # sampling matters on the demo VAE


def test_external_data_goes_to_one_file(diffusers_pipe, tmp_path):
    target = sd15_targets(diffusers_pipe.text_encoder, diffusers_pipe.unet, diffusers_pipe.vae)[0]
    out = export_onnx(target, tmp_path / "te" / "model.onnx", force_external_data=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert out.stat().st_size < 1_000_000 < (out.parent / "model.onnx.data").stat().st_size
    assert require_parity(check_parity(target, out)).ok


def test_parity_check_fails_on_drift(diffusers_pipe, repository: Path, tmp_path):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        Path(diffusers_pipe.config._name_or_path) if False else diffusers_pipe.name_or_path
    )
    target = sd15_targets(pipe.text_encoder, pipe.unet, pipe.vae)[3]  # vae_decoder
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.add_(1e-3)  # the PyTorch side drifts from the ONNX file
    with pytest.raises(ParityError, match="vae_decoder"):
        require_parity(check_parity(target, repository / "vae_decoder/1/model.onnx"))


def test_configs_parse_and_name_the_onnx_tensors(repository: Path):
    for spec in SD15_COMPONENTS:
        config = parse_pbtxt((repository / spec.name / "config.pbtxt").read_text())
        graph = onnx.load(
            str(repository / spec.name / "1/model.onnx"), load_external_data=False
        ).graph
        assert [t.name for t in config.input] == spec.input_names == [i.name for i in graph.input]
        assert (
            [t.name for t in config.output] == spec.output_names == [o.name for o in graph.output]
        )
    pipeline = parse_pbtxt((repository / "inpaint/config.pbtxt").read_text())
    assert [t.name for t in pipeline.input] == [t.name for t in INPUTS] + ["stream_id"]
    assert [t.name for t in pipeline.output] == [t.name for t in OUTPUTS]
    assert [t.name for t in pipeline.input if not t.optional] == ["prompt"]
    stream = parse_pbtxt((repository / "inpaint_stream/config.pbtxt").read_text())
    assert stream.model_transaction_policy.decoupled
    assert stream.parameters["pipeline_model"].string_value == "inpaint"
    assert [t.name for t in stream.input][: len(INPUTS)] == [t.name for t in INPUTS]
    assert [t.name for t in stream.input if not t.optional] == ["prompt"]
    assert {t.name for t in STREAM_OUTPUTS} <= {t.name for t in stream.output}
