"""What the pipeline needs from a checkpoint besides the exported networks.

Written by the export next to the pipeline model (`<repo>/inpaint/1/assets/`):
the tokenizer files, the scheduler config and `pipeline.json` (the few VAE/UNet config
values the loop depends on). Loaded the same way inside Triton and in-process.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

PIPELINE_JSON = "pipeline.json"
SCHEDULER_JSON = "scheduler_config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"  # SDXL's second tokenizer (pads with "!")
ASSETS_DIR = "assets"  # inside the pipeline model's version folder
VERSION = "1"  # the model version folder the export writes and the servers load
TOKENIZER_LOCK = threading.RLock()
"""Held around every use of a tokenizer: a fast tokenizer sets its truncation and padding on
the shared Rust object per call, so a request checked in the submitting thread (untruncated
token count) while the batcher's thread tokenizes (padded, truncated) gets ragged ids."""


@dataclass(frozen=True)
class CheckpointFacts:
    """Config values of the checkpoint that decide the loop's arithmetic.

    Args:
        vae_scaling_factor: `vae.config.scaling_factor` (0.18215 for SD 1.5).
        vae_scale_factor: pixels per latent (2 ** (len(vae.block_out_channels) - 1)).
        latent_channels: `vae.config.latent_channels`.
        unet_in_channels: 9 for inpainting checkpoints, 4 for text-to-image ones.
        default_size: `unet.config.sample_size * vae_scale_factor` (512 for SD 1.5).
        text_max_length: tokenizer `model_max_length` (77).
        architecture: `sd15` (one text encoder) or `sdxl` (two, pooled embeds, time ids);
            picks the component set and the prompt encoding.
        default_strength: strength of an image request that gives none (1.0; SDXL
            inpainting: 0.9999, as diffusers' `StableDiffusionXLInpaintPipeline`).
        force_zeros_for_empty_prompt: SDXL: zero the negative embeddings when there is no
            negative prompt (the pipeline's `force_zeros_for_empty_prompt` config).
        max_clip_skip: the largest `clip_skip` the text encoder(s) have layers for (as
            diffusers indexes them: SD 1.5 `num_hidden_layers`, SDXL one less, of the
            shallower encoder); 0 in assets written before clip skip.
    """

    vae_scaling_factor: float
    vae_scale_factor: int
    latent_channels: int
    unet_in_channels: int
    default_size: int
    text_max_length: int
    architecture: str = "sd15"
    default_strength: float = 1.0
    force_zeros_for_empty_prompt: bool = False
    max_clip_skip: int = 0


@dataclass(frozen=True)
class PipelineAssets:
    facts: CheckpointFacts
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    tokenizer_2: CLIPTokenizer | None = None

    @classmethod
    def load(cls, folder: str | Path) -> PipelineAssets:
        folder = Path(folder)
        facts = CheckpointFacts(**json.loads((folder / PIPELINE_JSON).read_text()))
        tokenizer = CLIPTokenizer.from_pretrained(folder / TOKENIZER_DIR)
        scheduler_config = json.loads((folder / SCHEDULER_JSON).read_text())
        tokenizer_2 = None
        if (folder / TOKENIZER_2_DIR).is_dir():
            tokenizer_2 = CLIPTokenizer.from_pretrained(folder / TOKENIZER_2_DIR)
        return cls(facts, tokenizer, scheduler_config, tokenizer_2)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PIPELINE_JSON).write_text(json.dumps(asdict(self.facts), indent=2) + "\n")
        (folder / SCHEDULER_JSON).write_text(json.dumps(self.scheduler_config, indent=2) + "\n")
        self.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
        if self.tokenizer_2 is not None:
            self.tokenizer_2.save_pretrained(folder / TOKENIZER_2_DIR)
