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
    AutoencoderTiny,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdserve_export.clip_tokenizer import clip_tokenizer
from sdserve_pipeline.components import CLIP_VOCAB_SIZE

DEFAULT_FOLDER = Path("build/demo-pipeline")
DEFAULT_XL_FOLDER = Path("build/demo-pipeline-xl")
DEFAULT_PREVIEW_FOLDER = Path("build/demo-preview-decoder")
TEXT_HIDDEN = 64
XL_TEXT_HIDDEN = (32, 48)  # text_encoder, text_encoder_2 (SDXL: 768, 1280)
XL_PROJECTION = 48  # text_encoder_2's projection_dim (SDXL: 1280)
XL_TIME_EMBED = 8  # unet addition_time_embed_dim (SDXL: 256)


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


def tiny_vae(
    scaling_factor: float = 0.18215, force_upcast: bool = True, norm_num_groups: int = 32
) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=128,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def tiny_text_config(
    hidden: int = TEXT_HIDDEN, layers: int = 2, projection_dim: int | None = None,
    hidden_act: str = "quick_gelu", pad_token_id: int = 49407,
) -> CLIPTextConfig:  # fmt: skip
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def tiny_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(tiny_text_config())


def tiny_xl_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP ViT-L-like and OpenCLIP bigG-like encoders (3 layers: SDXL reads the penultimate)."""
    first = CLIPTextModel(tiny_text_config(XL_TEXT_HIDDEN[0], layers=3))
    second = CLIPTextModelWithProjection(
        tiny_text_config(XL_TEXT_HIDDEN[1], layers=3, projection_dim=XL_PROJECTION,
                         hidden_act="gelu", pad_token_id=0)  # "!" pads, as SDXL's tokenizer_2
    )  # fmt: skip
    return first, second


def tiny_xl_unet(in_channels: int = 9) -> UNet2DConditionModel:
    """SDXL's UNet layout (no attention at the top level, 3 levels, text_time added embedding)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=sum(XL_TEXT_HIDDEN),  # both penultimate states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_EMBED,
        # pooled text_embeds + 6 time ids (original size, crop top-left, target size)
        projection_class_embeddings_input_dim=XL_PROJECTION + 6 * XL_TIME_EMBED,
        norm_num_groups=32,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """Euler configured as SDXL 1.0 (inpainting 0.1) ships it."""
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    )
    # In SDXL's scheduler_config.json too, read by schedulers built from it (DDIM, PNDM, ...).
    scheduler.register_to_config(
        clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0
    )
    return scheduler


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
    return assemble_sd15(tiny_unet(in_channels), tiny_vae(), tiny_text_encoder())


def assemble_sd15(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> StableDiffusionInpaintPipeline | StableDiffusionPipeline:
    """An SD 1.5 pipeline from random-weight networks: the real CLIP tokenizer, SD 1.5's
    scheduler, cross-attention tempered; an inpainting pipeline for a 9-channel UNet."""
    temper_cross_attention(unet)
    in_channels = unet.config.in_channels
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


def build_demo_xl_pipeline(seed: int = 0) -> StableDiffusionXLInpaintPipeline:
    """The tiny SDXL-inpainting pipeline, weights drawn from `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    # 4+ channels per GroupNorm group, as in the real VAE (128 / 32): with one channel per
    # group, the constant masked image of text-to-image normalises to amplified rounding
    # noise (variance 0), and ONNX Runtime vs PyTorch then differ by several levels.
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True, norm_num_groups=8)
    unet = tiny_xl_unet()
    text_encoder, text_encoder_2 = tiny_xl_text_encoders()
    temper_cross_attention(unet)
    return StableDiffusionXLInpaintPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet.eval(),
        scheduler=sdxl_scheduler(),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_demo_xl_pipeline(folder: Path = DEFAULT_XL_FOLDER, seed: int = 0) -> Path:
    """Write the tiny SDXL inpainting pipeline in diffusers format (safetensors) to `folder`."""
    build_demo_xl_pipeline(seed).save_pretrained(folder)
    return folder


def save_demo_pipeline(folder: Path = DEFAULT_FOLDER, seed: int = 0, in_channels: int = 9) -> Path:
    """Write the tiny pipeline in diffusers format (safetensors) to `folder`."""
    build_demo_pipeline(seed, in_channels).save_pretrained(folder)
    return folder


def tiny_preview_decoder(latent_channels: int = 4) -> AutoencoderTiny:
    """TAESD's architecture (diffusers `AutoencoderTiny`: 4 levels, 8x upsampling, scaling
    factor 1.0), only narrower and with one block per level."""
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
    )


def save_demo_preview_decoder(
    folder: Path = DEFAULT_PREVIEW_FOLDER, seed: int = 0, latent_channels: int = 4
) -> Path:
    """Write a tiny random-weight preview decoder (a stand-in for TAESD / TAESDXL, which fits
    both demo pipelines) in diffusers format (safetensors) to `folder`; export it with
    `repository --preview-decoder folder`."""
    torch.manual_seed(seed)
    tiny_preview_decoder(latent_channels).eval().save_pretrained(folder)
    return folder
