"""Export each component of a diffusers pipeline to ONNX, as its ComponentSpec declares it."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from sdserve_pipeline.components import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_XL,
    UNET,
    UNET_XL,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
)

OPSET = 17
TWO_GB = 2**31
EXTERNAL_DATA_SUFFIX = ".data"


class TextEncoderExport(nn.Module):
    """input_ids → last_hidden_state (what SD 1.5's encode_prompt uses)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class PenultimateTextEncoderExport(nn.Module):
    """input_ids → penultimate hidden states (+ projected pooled `text_embeds` for a
    CLIPTextModelWithProjection): what SDXL's encode_prompt reads (`hidden_states[-2]`)."""

    def __init__(self, text_encoder: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        if self.pooled:
            return out.hidden_states[-2], out.text_embeds
        return out.hidden_states[-2]


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


@dataclass(frozen=True)
class ExportTarget:
    """A module to export, its spec, and a maker of example inputs at a given size.

    `example(batch, latent_height, latent_width)` returns inputs in the spec's order.
    """

    spec: ComponentSpec
    module: nn.Module
    example: Callable[[int, int, int], tuple[torch.Tensor, ...]]


# Traced at a latent size that is not a multiple of the UNet's total upsampling (8), so
# the UNet records its size-matching upsample path, which is exact at every size.
TRACE_SIZE = (2, 12, 10)
CHECK_SIZES = (TRACE_SIZE, (1, 8, 16))


def sd15_targets(text_encoder: nn.Module, unet: nn.Module, vae: nn.Module) -> list[ExportTarget]:
    """The four SD 1.5 components with example-input makers derived from their configs."""
    seq, hidden = text_encoder.config.max_position_embeddings, text_encoder.config.hidden_size
    vocab = text_encoder.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return [
        ExportTarget(
            TEXT_ENCODER,
            TextEncoderExport(text_encoder),
            lambda b, h, w: (torch.randint(0, vocab, (b, seq), generator=gen),),
        ),
        ExportTarget(
            UNET,
            UNetExport(unet),
            lambda b, h, w: (
                randn(b, unet.config.in_channels, h, w),
                torch.full((b,), 981.0),
                randn(b, seq, hidden),
            ),
        ),
        *vae_targets(vae, gen),
    ]


def sdxl_targets(
    text_encoder: nn.Module, text_encoder_2: nn.Module, unet: nn.Module, vae: nn.Module
) -> list[ExportTarget]:
    """The five SDXL components (the VAE ones as SD 1.5's, kept fp32)."""
    seq = text_encoder.config.max_position_embeddings
    vocab = text_encoder.config.vocab_size
    cross_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    projection = text_encoder_2.config.projection_dim
    gen = torch.Generator().manual_seed(0)

    def ids(b: int, h: int, w: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, vocab, (b, seq), generator=gen),)

    def unet_inputs(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        size = torch.tensor([h * 8.0, w * 8.0, 0.0, 0.0, h * 8.0, w * 8.0])  # pixels, crop, target
        return (
            torch.randn(b, unet.config.in_channels, h, w, generator=gen),
            torch.full((b,), 981.0),
            torch.randn(b, seq, cross_dim, generator=gen),
            torch.randn(b, projection, generator=gen),
            size.repeat(b, 1),
        )

    return [
        ExportTarget(TEXT_ENCODER_XL, PenultimateTextEncoderExport(text_encoder, False), ids),
        ExportTarget(TEXT_ENCODER_2, PenultimateTextEncoderExport(text_encoder_2, True), ids),
        ExportTarget(UNET_XL, UNetXLExport(unet), unet_inputs),
        *vae_targets(vae, gen),
    ]


def vae_targets(vae: nn.Module, gen: torch.Generator) -> list[ExportTarget]:
    """VAE encoder (posterior mean, logvar) and decoder, always exported in fp32."""
    vae = vae.to(torch.float32)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_channels = vae.config.latent_channels

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return [
        ExportTarget(
            VAE_ENCODER,
            VaeEncoderExport(vae),
            lambda b, h, w: (randn(b, vae.config.in_channels, h * vae_scale, w * vae_scale),),
        ),
        ExportTarget(
            VAE_DECODER,
            VaeDecoderExport(vae),
            lambda b, h, w: (randn(b, latent_channels, h, w),),
        ),
    ]


def export_onnx(target: ExportTarget, out_file: Path, force_external_data: bool = False) -> Path:
    """Export `target` to `out_file`; weights over 2 GB go to one `<file>.data` beside it.

    Args:
        target: the module, spec and example-input maker.
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
