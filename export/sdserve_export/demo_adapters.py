"""LoRA adapters made with PEFT on a diffusers pipeline folder (the tiny demo's, for tests and
benchmarks): random non-zero B, saved as diffusers saves them or in kohya's layout."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_WITH_CONV = (*UNET_ATTENTION, "conv1", "conv2")  # 3x3 convs of the resnets
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_adapter(
    pipe_dir: Path,
    out_file: Path,
    *,
    unet: tuple[str, ...] = UNET_ATTENTION,
    text: tuple[str, ...] = (),
    text_2: tuple[str, ...] = (),
    xl: bool = False,
    rank: int = 4,
    alpha: int = 8,
    seed: int = 0,
    kohya: bool = False,
    strength: float = 0.02,
) -> Path:
    """A LoRA file for the pipeline in `pipe_dir`: PEFT adapters on the UNet modules named
    `unet` (and text encoder modules `text`), B drawn at random (PEFT starts it at zero) with
    standard deviation `strength`: strong enough to change the image, weak enough that the
    tiny random model stays where float rounding is not amplified (at 0.2 with conv targets,
    diffusers' own fused and unfused results differed by 43 levels)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    layers, peft_layers, metadata = {}, {}, {}
    classes = {
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    for prefix, targets in (("unet", unet), ("text_encoder", text), ("text_encoder_2", text_2)):
        if not targets:
            continue
        cls = classes[prefix]
        model = cls.from_pretrained(pipe_dir, subfolder=prefix)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"
        )
        model.add_adapter(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * strength)
        state = get_peft_model_state_dict(model)
        # kohya files name CLIP modules as transformers < 5.6 did (`text_model.encoder...`)
        peft_layers[prefix] = (
            state if prefix == "unet" else {f"text_model.{k}": v for k, v in state.items()}
        )
        layers[prefix] = state if prefix == "unet" else convert_state_dict_to_diffusers(state)
        metadata[prefix] = config.to_dict()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        peft_keys = {f"{p}.{k}": v for p, state in peft_layers.items() for k, v in state.items()}
        kohya_state = convert_state_dict_to_kohya(peft_keys)  # alpha = rank per module
        save_file({k: v.contiguous() for k, v in kohya_state.items()}, str(out_file))
        return out_file
    second: dict = {}
    if xl:
        second = dict(
            text_encoder_2_lora_layers=layers.get("text_encoder_2"),
            text_encoder_2_lora_adapter_metadata=metadata.get("text_encoder_2"),
        )
    (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
        out_file.parent,
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=metadata.get("unet"),
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
        weight_name=out_file.name,
        **second,
    )
    return out_file
