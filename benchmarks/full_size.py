"""The full-size SD 1.5-inpainting architecture with random weights, for performance work.

Random weights cost exactly the compute of the real checkpoint (same shapes, same kernels),
and need no download. The builder saves a diffusers folder and exports it into a Triton
model repository with `sdserve_export.repository.build_repository`; both are cached, so a
second call returns at once.

Usage (from the repository root; a few minutes and about 4 GB of disk the first time):

    .venv/bin/python benchmarks/full_size.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdserve_export.clip_tokenizer import VOCAB_SIZE
from sdserve_export.demo_pipeline import assemble_sd15
from sdserve_export.repository import build_repository

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FOLDER = ROOT / "build" / "bench" / "full-sd15-inpaint"
REPOSITORY = ROOT / "build" / "bench" / "full_repository"


def sd15_unet() -> UNet2DConditionModel:
    """SD 1.5-inpainting's UNet config: 9 input channels, 860 M parameters."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    )


def sd15_vae() -> AutoencoderKL:
    """SD 1.5's AutoencoderKL config (83 M parameters)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_text_encoder() -> CLIPTextModel:
    """CLIP ViT-L/14's text tower, as SD 1.5 uses it (123 M parameters)."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_full_size_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """The full-size inpainting pipeline with weights drawn from `torch.manual_seed(seed)`.

    Args:
        seed (`int`, *optional*, defaults to 0): seed of the random weights.
    """
    torch.manual_seed(seed)
    return assemble_sd15(sd15_unet(), sd15_vae(), sd15_text_encoder())


def ensure_full_size(
    folder: Path = PIPELINE_FOLDER, repository: Path = REPOSITORY, log=print
) -> tuple[Path, Path]:
    """Builds (or reuses) the diffusers folder and the Triton repository.

    Args:
        folder (`Path`): where the diffusers pipeline is saved.
        repository (`Path`): where the Triton model repository is written.
        log (`Callable[[str], None]`): progress sink.

    Returns:
        `(folder, repository)`.
    """
    if not (folder / "model_index.json").is_file():
        started = time.perf_counter()
        log(f"[full-size] building random-weight SD 1.5-inpainting into {folder}")
        build_full_size_pipeline().save_pretrained(folder)
        log(f"[full-size] saved ({time.perf_counter() - started:.0f} s)")
    if not (repository / "inpaint" / "config.pbtxt").is_file():
        started = time.perf_counter()
        log(f"[full-size] exporting to {repository} (minutes)")
        build_repository(folder, repository, log=log)
        log(f"[full-size] exported ({time.perf_counter() - started:.0f} s)")
    return folder, repository


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: build what is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=PIPELINE_FOLDER)
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    args = parser.parse_args(argv)
    ensure_full_size(args.folder, args.repository)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
