"""A standard 4-channel SD 1.5 checkpoint: text-to-image and latent-blending inpainting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import diffusers_inpaint, make_case, max_abs
from helpers import wire
from PIL import Image

from sdserve_pipeline.schedulers import SCHEDULERS


@pytest.fixture(scope="module")
def diffusers_base(base_pipeline_dir):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    txt2img = StableDiffusionPipeline.from_pretrained(base_pipeline_dir)
    inpaint = StableDiffusionInpaintPipeline.from_pretrained(base_pipeline_dir)
    for pipe in (txt2img, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return txt2img, inpaint


@pytest.fixture(scope="module")
def diffusers_img2img(base_pipeline_dir):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(base_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    original = pipe.scheduler
    yield pipe
    pipe.scheduler = original


@pytest.mark.parametrize(
    ("strength", "scheduler"), [(0.6, None), (1.0, None), (0.75, "euler_a"), (0.5, "dpmpp_2m")]
)
def test_image_to_image_matches_the_img2img_pipeline(
    base_service, diffusers_img2img, strength, scheduler
):
    pipe = diffusers_img2img
    image, _ = make_case(64, 96, seed=8)
    controls = {"steps": 8, "seed": 5, "strength": strength}
    if scheduler is not None:  # euler_a draws from the generator at each step
        cls, overrides = SCHEDULERS[scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
        controls["scheduler"] = scheduler
    ours = base_service.generate(wire(image, **controls))["images"][0]
    reference = pipe(
        "a red bicycle", image=Image.fromarray(image), strength=strength, num_inference_steps=8,
        generator=torch.Generator().manual_seed(5),
    ).images[0]  # fmt: skip
    assert ours.shape == (64, 96, 3)
    assert max_abs(ours, np.asarray(reference)) <= 2


def test_image_to_image_defaults_to_diffusers_img2img_strength(base_service, service):
    image, mask = make_case(64, 64, seed=8)
    assert base_service.parse(wire(image)).strength == 0.8  # StableDiffusionImg2ImgPipeline's
    assert service.parse(wire(image)).strength == 0.8
    assert service.parse(wire(image, mask)).strength == 1.0  # inpainting: the checkpoint's


def test_repository_holds_both_pipelines_apart(combined_repository):
    names = sorted(p.name for p in combined_repository.iterdir())
    assert names == sorted([
        "inpaint", "inpaint_stream", "inpaint_adapters", "text_encoder", "unet", "vae_encoder",
        "vae_decoder", "sd15_base", "sd15_base_stream", "sd15_base_adapters",
        "base_text_encoder", "base_unet", "base_vae_encoder",
        "base_vae_decoder", "checkpoints",
    ])  # fmt: skip
    config = (combined_repository / "base_unet/config.pbtxt").read_text()
    assert 'name: "base_unet"' in config and "dims: 4\n" in config


def test_text_to_image_matches_stable_diffusion_pipeline(base_service, diffusers_base):
    txt2img, _ = diffusers_base
    ours = base_service.generate(wire(steps=8, seed=3, height=64, width=96))["images"][0]
    reference = txt2img(
        "a red bicycle", height=64, width=96, num_inference_steps=8,
        generator=torch.Generator().manual_seed(3),
    ).images[0]  # fmt: skip
    assert max_abs(ours, np.asarray(reference)) <= 2


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_blends_latents_like_diffusers(base_service, diffusers_base, strength):
    _, inpaint = diffusers_base
    image, mask = make_case(64, 64, seed=4)
    ours = base_service.generate(wire(image, mask, steps=8, seed=9, strength=strength))
    reference = diffusers_inpaint(inpaint, image, mask, seed=9, steps=8, strength=strength)
    assert max_abs(ours["images"][0], reference) <= 2
