"""Export each component of a diffusers pipeline to ONNX, as its ComponentSpec declares it."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from sdserve_pipeline.components import (
    CLIP_VOCAB_SIZE,
    PREVIEW_DECODER,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_XL,
    TEXT_LENGTH,
    UNET,
    UNET_XL,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
    example_inputs,
    image_dims,
)

OPSET = 17
TWO_GB = 2**31
EXTERNAL_DATA_SUFFIX = ".data"


class TextEncoderExport(nn.Module):
    """input_ids, clip_skip → each row's `final_layer_norm(hidden_states[-(clip_skip + 1)])`,
    what SD 1.5's encode_prompt uses (clip_skip 0: `last_hidden_state`)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model` any more)
        self.final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return self.final_layer_norm(select_layer(out.hidden_states, clip_skip, from_last=1))


class PenultimateTextEncoderExport(nn.Module):
    """input_ids, clip_skip → each row's `hidden_states[-(clip_skip + 2)]` (+ projected pooled
    `text_embeds` for a CLIPTextModelWithProjection): what SDXL's encode_prompt reads
    (clip_skip 0: the penultimate layer)."""

    def __init__(self, text_encoder: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(
        self, input_ids: torch.Tensor, clip_skip: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        hidden = select_layer(out.hidden_states, clip_skip, from_last=2)
        if self.pooled:
            return hidden, out.text_embeds
        return hidden


def select_layer(
    hidden_states: tuple[torch.Tensor, ...], clip_skip: torch.Tensor, from_last: int
) -> torch.Tensor:
    """Row i of `hidden_states[-(clip_skip[i] + from_last)]`: (B, L, D), exact copies.

    Args:
        hidden_states: the embeddings' output and each layer's, (B, L, D) each.
        clip_skip: (B,) int64 layers to skip per row; clamped to the first entry.
        from_last: the entry at clip_skip 0, counted from the end (1: the last).
    """
    stacked = torch.stack(hidden_states, dim=1)  # (B, layers + 1, L, D)
    top = len(hidden_states) - from_last
    index = top - clip_skip  # (B,), kept within the stack by Max/Min (not exported as Clip)
    index = torch.minimum(
        torch.maximum(index, torch.zeros_like(index)), torch.full_like(index, top)
    )
    batch, _, length, width = stacked.shape
    index = index.view(batch, 1, 1, 1).expand(batch, 1, length, width)
    return torch.gather(stacked, 1, index).squeeze(1)


def max_clip_skip(text_encoder: nn.Module, from_last: int) -> int:
    """Largest clip_skip diffusers accepts for this encoder: `hidden_states[-(k + from_last)]`
    must exist among its `num_hidden_layers + 1` entries."""
    return int(text_encoder.config.num_hidden_layers) + 1 - from_last


class UNetXLExport(nn.Module):
    """SDXL UNet: `added_cond_kwargs` (pooled text embeds, time ids) as plain inputs."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class UNetExport(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoderExport(nn.Module):
    """image → (mean, logvar) of the latent posterior; the pipeline samples it."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean, posterior.logvar


class VaeDecoderExport(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class PreviewDecoderExport(nn.Module):
    """A tiny VAE (diffusers `AutoencoderTiny`): denoising latents → image in [-1, 1], as
    diffusers' pipelines decode with it (`vae.decode(latents / vae.config.scaling_factor)`;
    TAESD's factor is 1.0: it reads the UNet's latents as they are)."""

    def __init__(self, tiny_vae: nn.Module) -> None:
        super().__init__()
        self.tiny_vae = tiny_vae
        self.scaling_factor = float(tiny_vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.scaling_factor != 1.0:
            latents = latents / self.scaling_factor
        return self.tiny_vae.decode(latents, return_dict=False)[0]


@dataclass(frozen=True)
class ExportTarget:
    """A module to export, its spec, and what its example inputs need.

    Args:
        spec: the component declaration.
        module: the module to trace (inputs and outputs in the spec's order).
        sizes: values of the checkpoint-fixed dims of its tensors (`checkpoint_sizes`).
        vae_scale_factor: pixels per latent.
        rng: draws every example input of a checkpoint's targets, in the order asked.
        vocab_size: tokens of the text encoder's vocabulary.
    """

    spec: ComponentSpec
    module: nn.Module
    sizes: Mapping[str, int]
    vae_scale_factor: int
    rng: np.random.Generator
    vocab_size: int = CLIP_VOCAB_SIZE

    def example(
        self, batch: int, latent_height: int, latent_width: int, text_chunks: int = 1
    ) -> tuple[torch.Tensor, ...]:
        """`example_inputs` at a latent size (and the UNet's text at `text_chunks` windows),
        in the spec's input order."""
        scale = self.vae_scale_factor
        dims = {
            **self.sizes,
            **image_dims(batch, latent_height * scale, latent_width * scale, scale),
            TEXT_LENGTH: self.sizes["sequence_length"] * text_chunks,
        }
        inputs = example_inputs(self.spec, dims, self.rng, self.vocab_size)
        return tuple(torch.from_numpy(array) for array in inputs.values())


# Traced at a latent size that is not a multiple of the UNet's total upsampling (8), so
# the UNet records its size-matching upsample path, which is exact at every size; and at one
# text window, checked also at two (the UNet's `text_length` axis is dynamic: long prompts).
TRACE_SIZE = (2, 12, 10)
CHECK_SIZES = (TRACE_SIZE, (1, 8, 16, 2))


def checkpoint_sizes(
    text_encoder: nn.Module,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder_2: nn.Module | None = None,
) -> dict[str, int]:
    """Values of the fixed symbolic dims of the component specs, from the module configs."""
    te, vae_config = text_encoder.config, vae.config
    sizes = {
        "sequence_length": te.max_position_embeddings,
        "hidden_size": te.hidden_size,
        "unet_in_channels": unet.config.in_channels,
        "latent_channels": vae_config.latent_channels,
        "image_channels": vae_config.in_channels,
    }
    if text_encoder_2 is not None:
        te2 = text_encoder_2.config
        sizes |= {
            "hidden_size_2": te2.hidden_size,
            "projection_dim": te2.projection_dim,
            "cross_attention_dim": te.hidden_size + te2.hidden_size,
            "time_ids": 6,  # original size, crop top-left, target size
        }
    return sizes


def sd15_targets(text_encoder: nn.Module, unet: nn.Module, vae: nn.Module) -> list[ExportTarget]:
    """The four SD 1.5 components, their example inputs sized from their configs."""
    target = _target_maker(checkpoint_sizes(text_encoder, unet, vae), text_encoder, vae)
    vae = vae.to(torch.float32)
    return [
        target(TEXT_ENCODER, TextEncoderExport(text_encoder)),
        target(UNET, UNetExport(unet)),
        target(VAE_ENCODER, VaeEncoderExport(vae)),
        target(VAE_DECODER, VaeDecoderExport(vae)),
    ]


def sdxl_targets(
    text_encoder: nn.Module, text_encoder_2: nn.Module, unet: nn.Module, vae: nn.Module
) -> list[ExportTarget]:
    """The five SDXL components (the VAE ones as SD 1.5's, exported in fp32)."""
    sizes = checkpoint_sizes(text_encoder, unet, vae, text_encoder_2)
    target = _target_maker(sizes, text_encoder, vae)
    vae = vae.to(torch.float32)
    return [
        target(TEXT_ENCODER_XL, PenultimateTextEncoderExport(text_encoder, False)),
        target(TEXT_ENCODER_2, PenultimateTextEncoderExport(text_encoder_2, True)),
        target(UNET_XL, UNetXLExport(unet)),
        target(VAE_ENCODER, VaeEncoderExport(vae)),
        target(VAE_DECODER, VaeDecoderExport(vae)),
    ]


def preview_decoder_target(
    tiny_vae: nn.Module, sizes: Mapping[str, int], vae_scale_factor: int
) -> ExportTarget:
    """The preview decoder (a tiny VAE, loaded in fp32) of a checkpoint with these `sizes`
    (`checkpoint_sizes`) and latent scale; its example inputs drawn from their own generator."""
    module = PreviewDecoderExport(tiny_vae.eval())
    return ExportTarget(PREVIEW_DECODER, module, sizes, vae_scale_factor, np.random.default_rng(0))


def _target_maker(
    sizes: Mapping[str, int], text_encoder: nn.Module, vae: nn.Module
) -> Callable[[ComponentSpec, nn.Module], ExportTarget]:
    """Makes the targets of one checkpoint, all drawing from one generator (seed 0)."""
    rng = np.random.default_rng(0)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vocab_size = text_encoder.config.vocab_size

    def target(spec: ComponentSpec, module: nn.Module) -> ExportTarget:
        return ExportTarget(spec, module, sizes, vae_scale_factor, rng, vocab_size)

    return target


def export_onnx(target: ExportTarget, out_file: Path, force_external_data: bool = False) -> Path:
    """Export `target` to `out_file`; weights over 2 GB go to one `<file>.data` beside it.

    Args:
        target: the module, its spec and what its example inputs need.
        out_file: destination `.onnx` path (its folder is created).
        force_external_data: write the weights externally whatever their size.
    """
    spec = target.spec
    out_file.parent.mkdir(parents=True, exist_ok=True)
    example = target.example(*TRACE_SIZE)
    with tempfile.TemporaryDirectory(dir=out_file.parent) as tmp:
        tmp_file = Path(tmp) / out_file.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow
            torch.onnx.export(
                target.module.eval(),
                example,
                str(tmp_file),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.onnx_dynamic_axes(),
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        # Re-save: consolidates the exporter's per-tensor external files into one.
        model = onnx.load(str(tmp_file), load_external_data=True)
    save_onnx(model, out_file, force_external_data)
    return out_file


def save_onnx(model: onnx.ModelProto, out_file: Path, force_external_data: bool = False) -> None:
    """Save inline when it fits in one protobuf, else with all weights in one external file."""
    data_file = out_file.with_name(out_file.name + EXTERNAL_DATA_SUFFIX)
    data_file.unlink(missing_ok=True)
    external = force_external_data or _initializer_bytes(model) > TWO_GB - 2**26
    onnx.save_model(
        model,
        str(out_file),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data_file.name,
        size_threshold=1024,
    )


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)
