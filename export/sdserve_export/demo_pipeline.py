"""A tiny SD 1.5-inpainting-architecture pipeline with seeded random weights.

Same blocks as the real checkpoint (9-channel UNet with cross-attention down/up blocks,
4-level AutoencoderKL, CLIP text encoder, the real CLIP tokenizer, PNDM as SD 1.5 ships it),
only narrower, so it builds and runs in seconds on a CPU. Saved in diffusers format, it
loads with `StableDiffusionInpaintPipeline.from_pretrained(folder)` offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdserve_export.clip_tokenizer import VOCAB_SIZE, clip_tokenizer

DEFAULT_FOLDER = Path("build/demo-pipeline")
TEXT_HIDDEN = 64


def tiny_unet(in_channels: int = 9) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=0.18215,
    )


def tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def sd15_scheduler() -> PNDMScheduler:
    """PNDM configured as the SD 1.5 inpainting checkpoint ships it."""
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    # Not a PNDM argument, but in SD 1.5's scheduler_config.json: schedulers built from this
    # config (DDIM, DDPM, ...) must not clip x0 to [-1, 1], as with the real checkpoint.
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def temper_cross_attention(unet: UNet2DConditionModel, scale: float = 0.1) -> None:
    """Scale the cross-attention outputs so text shifts the noise prediction modestly.

    With default random init, cond - uncond is larger than the prediction itself, so CFG at
    7.5 drives the latents to ~25 (a trained SD model keeps them near 4) and the images
    become chaotic: float rounding (ONNX Runtime vs PyTorch kernels) then moves pixels by
    several levels. Still random weights; just a trained model's proportions.
    """
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(scale)
                module.bias.mul_(scale)


def build_demo_pipeline(
    seed: int = 0, in_channels: int = 9
) -> StableDiffusionInpaintPipeline | StableDiffusionPipeline:
    """The tiny pipeline with weights drawn from `torch.manual_seed(seed)`.

    Args:
        seed: seed of the random weights.
        in_channels: 9 for an inpainting checkpoint, 4 for a standard text-to-image one
            (saved as a `StableDiffusionPipeline`).
    """
    torch.manual_seed(seed)
    unet, vae, text_encoder = tiny_unet(in_channels), tiny_vae(), tiny_text_encoder()
    temper_cross_attention(unet)
    pipeline_class = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    return pipeline_class(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_demo_pipeline(folder: Path = DEFAULT_FOLDER, seed: int = 0, in_channels: int = 9) -> Path:
    """Write the tiny pipeline in diffusers format (safetensors) to `folder`."""
    build_demo_pipeline(seed, in_channels).save_pretrained(folder)
    return folder
