"""The preview decoder (issue 18): a tiny VAE (diffusers `AutoencoderTiny`, TAESD) exported with
`--preview-decoder DIR`, checked against PyTorch, refused when it does not fit the checkpoint,
and decoding the previews of streamed requests in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cases import make_case, max_abs
from diffusers import AutoencoderTiny
from helpers import Spy, streamed, wire

from sdserve_export.cli import main as export_main
from sdserve_export.demo_pipeline import save_demo_preview_decoder
from sdserve_export.preview_decoder import PreviewDecoderError, load_preview_decoder
from sdserve_export.repository import build_repository
from sdserve_pipeline.components import PREVIEW_DECODER, VAE_DECODER
from sdserve_pipeline.images import postprocess
from sdserve_pipeline.onnx_runtime import create_session
from sdserve_pipeline.ort_runner import OrtRunner
from sdserve_pipeline.streaming import linear_decoder, previews
from sdserve_protocol.events import Preview

SD15_SIZES = {"latent_channels": 4, "image_channels": 3}


@pytest.fixture(scope="module")
def tiny_vae(preview_decoder_dir):
    return AutoencoderTiny.from_pretrained(preview_decoder_dir).eval()


def torch_decoder(tiny_vae, processors):
    """PyTorch's `AutoencoderTiny.decode` of the denoising latents, quantised as diffusers
    quantises a VAE's output: the reference of the exported preview decoder."""

    def decode(latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return postprocess(processors, tiny_vae.decode(latents).sample)

    return decode


# --- (a) export and parity ------------------------------------------------------------------


def test_the_export_checks_the_preview_decoder_like_the_vae(taesd_export):
    repository, reports = taesd_export
    report = next(r for r in reports if r.component == "preview_decoder")
    assert report.ok and report.tolerance == VAE_DECODER.atol == PREVIEW_DECODER.atol
    config = (repository / "inpaint" / "config.pbtxt").read_text()
    assert '"preview_decoder_model"' in config  # the pipeline calls it
    assert (repository / "preview_decoder" / "1" / "model.onnx").is_file()


def test_onnx_preview_decoder_matches_pytorch_autoencoder_tiny(taesd_repository, tiny_vae):
    runner = OrtRunner(
        PREVIEW_DECODER, create_session(taesd_repository / "preview_decoder/1/model.onnx")
    )
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in [(1, 4, 8, 8), (3, 4, 6, 10), (2, 4, 12, 8)]:
        latents = 2 * torch.randn(shape, generator=generator)
        (got,) = runner(latents)
        with torch.no_grad():
            want = tiny_vae.decode(latents).sample  # UNet-space latents as they are (factor 1)
        assert got.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])  # 8x the latent size
        worst = max(worst, (got - want).abs().max().item())
    print(f"preview_decoder: max |onnx - torch| = {worst:.2e}")
    assert worst <= VAE_DECODER.atol


# --- (b) refusals ----------------------------------------------------------------------------


def test_wrong_latent_channels_are_refused_naming_the_option(
    demo_pipeline_dir, tmp_path, capsys
):  # fmt: skip
    wrong = save_demo_preview_decoder(tmp_path / "taesd-16", latent_channels=16)
    out = tmp_path / "repo"
    with pytest.raises(PreviewDecoderError, match="--preview-decoder .*latent_channels is 16"):
        build_repository(demo_pipeline_dir, out, preview_decoder=wrong, log=lambda _msg: None)
    assert not out.exists() and not (tmp_path / "repo.partial").exists()  # nothing exported
    argv = ["repository", "--source", str(demo_pipeline_dir), "--out", str(out)]
    assert export_main([*argv, "--preview-decoder", str(wrong)]) == 1
    error = capsys.readouterr().err
    assert "--preview-decoder" in error and "4 channels" in error
    assert not out.exists()


def test_a_folder_that_is_not_an_autoencoder_tiny_is_refused(demo_pipeline_dir, tmp_path):
    with pytest.raises(PreviewDecoderError, match="--preview-decoder .*AutoencoderKL, not a"):
        load_preview_decoder(demo_pipeline_dir / "vae", SD15_SIZES)
    with pytest.raises(PreviewDecoderError, match="--preview-decoder .*no config.json"):
        load_preview_decoder(tmp_path, SD15_SIZES)
    with pytest.raises(PreviewDecoderError, match="--preview-decoder .*no config.json"):
        load_preview_decoder(tmp_path / "madebyollin" / "taesd", SD15_SIZES)  # never the hub
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    (rgba / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny",
                                                  "out_channels": 4}))  # fmt: skip
    with pytest.raises(PreviewDecoderError, match="out_channels is 4"):
        load_preview_decoder(rgba, SD15_SIZES)


# --- (c) in-process streaming ----------------------------------------------------------------


def step_latents(service, request):
    """The request's parameters and its latents after each denoising step, from the loop
    driven step by step (alone)."""
    params = service.parse(request)
    loop = service.loop
    job = loop.executor.run(loop.start_plan(params))
    latents = []
    while not job.finished:
        loop.executor.run(loop.step_plan(job))
        latents.append(job.latents.clone())
    return params, latents


def test_streamed_previews_are_the_tiny_vae_decoding_of_each_steps_latents(
    taesd_service, tiny_vae
):  # fmt: skip
    image, mask = make_case(64, 64, seed=41)
    request = wire(image, mask, steps=4, seed=5, scheduler="euler_a", preview_every=1)
    result, events = streamed(taesd_service, request)
    shown = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in shown] == [1, 2, 3]  # none after the last step: the result comes
    params, latents = step_latents(taesd_service, request)
    reference = torch_decoder(tiny_vae, taesd_service.loop.processors)
    keep, worst = mask < 128, 0
    for preview in shown:
        expected = previews(reference, [(latents[preview.step - 1], params)])[0]
        assert preview.images.shape == expected.shape == (1, 64, 64, 3)
        worst = max(worst, max_abs(preview.images, expected))
        assert (preview.images[0][keep] == image[keep]).all()  # the input outside the mask
        linear = previews(linear_decoder("sd15"), [(latents[preview.step - 1], params)])[0]
        assert max_abs(preview.images, linear) > 16  # not the linear projection
    assert worst <= 1  # ONNX Runtime vs PyTorch: float rounding at most one level
    unary = taesd_service.generate({k: v for k, v in request.items() if k != "preview_every"})
    assert np.array_equal(result["images"], unary["images"])  # previews change nothing


def test_previews_of_several_requests_share_calls_of_at_most_max_rows(taesd_service):
    spy = Spy(taesd_service, max_rows={"preview_decoder": 2})
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    together = spy.service.preview(latents)
    assert spy.rows["preview_decoder"] == [2, 1]
    alone = np.concatenate([taesd_service.preview(row) for row in latents.split(1)])
    assert together.shape == (3, 64, 64, 3) and (together == alone).all()


def test_without_a_preview_decoder_previews_stay_the_linear_projection(service):
    assert service.loop.components.preview_decoder is None
    latents = torch.randn(1, 4, 8, 8)
    assert (service.preview(latents) == linear_decoder("sd15")(latents)).all()


def test_outpainting_previews_go_through_the_preview_decoder(taesd_service):
    image, _ = make_case(64, 64, seed=42)
    request = wire(image, steps=2, seed=4, scheduler="euler", outpaint=[0, 0, 128, 0])
    unary = taesd_service.generate(request)
    spy = Spy(taesd_service)
    result, events = streamed(spy.service, {**request, "preview_every": np.array([1], np.int32)})
    assert np.array_equal(result["images"], unary["images"])
    shown = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in shown] == [1, 2, 3]  # 2 bands of 2 steps, none after the last
    assert all(p.images.shape == (1, 64, 192, 3) for p in shown)  # the whole canvas
    assert spy.rows["preview_decoder"] == [1, 1, 1]  # one image each, by the tiny VAE


def test_sdxl_streams_previews_through_its_preview_decoder(
    demo_xl_pipeline_dir, preview_decoder_dir, tiny_vae, tmp_path
):  # fmt: skip
    """TAESDXL has TAESD's layout: the same tiny decoder serves an SDXL repository."""
    from sdserve_pipeline.inprocess import load_service

    out = tmp_path / "model_repository"
    reports = build_repository(
        demo_xl_pipeline_dir, out, pipeline_name="inpaint_xl", component_prefix="xl_",
        preview_decoder=preview_decoder_dir, log=lambda _msg: None,
    )  # fmt: skip
    assert next(r for r in reports if r.component == "preview_decoder").ok
    service = load_service(out, "inpaint_xl")
    image, mask = make_case(64, 64, seed=43)
    request = wire(image, mask, steps=4, seed=6, scheduler="euler", preview_every=1)
    result, events = streamed(service, request)
    shown = [e for e in events if isinstance(e, Preview)]
    params, latents = step_latents(service, request)
    assert [p.step for p in shown] == list(range(1, len(latents))) and shown  # all but the last
    reference = torch_decoder(tiny_vae, service.loop.processors)
    for preview in shown:
        expected = previews(reference, [(latents[preview.step - 1], params)])[0]
        assert max_abs(preview.images, expected) <= 1
        linear = previews(linear_decoder("sdxl"), [(latents[preview.step - 1], params)])[0]
        assert max_abs(preview.images, linear) > 16
    unary = service.generate({k: v for k, v in request.items() if k != "preview_every"})
    assert np.array_equal(result["images"], unary["images"])
