"""One declaration per exported component: the single source of truth for tensor names.

The ONNX export (input/output names, dynamic axes), the parity check (tolerance), the
Triton configs (names, dtypes, dims) and the pipeline's calls (argument order) are all
derived from the `ComponentSpec`s below, so names cannot drift between them.

Dims are symbolic names. A name that the checkpoint fixes (channels, hidden size,
sequence length) is resolved from the checkpoint's configs when the repository is
built; every other name is a dynamic axis (-1 in Triton, a dynamic axis in ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass

# Axes that stay dynamic everywhere (batch, spatial sizes).
DYNAMIC_AXES = frozenset({"batch", "height", "width", "latent_height", "latent_width"})


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a component.

    Args:
        name: tensor name in ONNX, in Triton and in BLS calls.
        dtype: Triton data type without the `TYPE_` prefix (`FP32`, `INT64`, ...).
        dims: symbolic dims, e.g. `("batch", "unet_in_channels", "latent_height", ...)`.
    """

    name: str
    dtype: str
    dims: tuple[str, ...]

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete dims for a Triton config: fixed sizes from `sizes`, -1 for dynamic axes."""
        return tuple(-1 if d in DYNAMIC_AXES else _fixed(sizes, d, self.name) for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX `dynamic_axes` entry for this tensor."""
        return {i: d for i, d in enumerate(self.dims) if d in DYNAMIC_AXES}


@dataclass(frozen=True)
class ComponentSpec:
    """An exported model: its tensors, parity tolerance and TensorRT shape profile.

    Args:
        name: Triton model name and ONNX file stem.
        inputs: input tensors, in the order of the exported module's `forward`.
        outputs: output tensors, in the order the module returns them.
        atol: max abs difference ONNX vs PyTorch (fp32) allowed by the export's parity check.
        trt_batch: TensorRT (min, opt, max) batch for the profile, in the component's units.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-4
    trt_batch: tuple[int, int, int] = (1, 1, 4)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def onnx_dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}


def _fixed(sizes: dict[str, int], dim: str, tensor: str) -> int:
    if dim not in sizes:
        raise KeyError(f"dim {dim!r} of tensor {tensor!r} is neither dynamic nor given in {sizes}")
    return sizes[dim]


TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", "INT64", ("batch", "sequence_length")),),
    outputs=(TensorSpec("last_hidden_state", "FP32", ("batch", "sequence_length", "hidden_size")),),
)

UNET = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec(
            "sample", "FP32", ("batch", "unet_in_channels", "latent_height", "latent_width")
        ),
        TensorSpec("timestep", "FP32", ("batch",)),
        TensorSpec("encoder_hidden_states", "FP32", ("batch", "sequence_length", "hidden_size")),
    ),
    outputs=(
        TensorSpec(
            "noise_pred", "FP32", ("batch", "latent_channels", "latent_height", "latent_width")
        ),
    ),
    trt_batch=(2, 2, 8),  # [uncond, cond] pairs
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    inputs=(TensorSpec("image", "FP32", ("batch", "image_channels", "height", "width")),),
    outputs=(
        TensorSpec(
            "latent_mean", "FP32", ("batch", "latent_channels", "latent_height", "latent_width")
        ),
        TensorSpec(
            "latent_logvar", "FP32", ("batch", "latent_channels", "latent_height", "latent_width")
        ),
    ),
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    inputs=(
        TensorSpec(
            "latent_sample", "FP32", ("batch", "latent_channels", "latent_height", "latent_width")
        ),
    ),
    outputs=(TensorSpec("image", "FP32", ("batch", "image_channels", "height", "width")),),
)

SD15_COMPONENTS: tuple[ComponentSpec, ...] = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)

# SDXL: two text encoders read at their penultimate layer, the second also giving the pooled
# (projected) embedding; the UNet takes those plus the size/crop `time_ids`. The VAE
# components are SD 1.5's and stay fp32 whatever precision the rest uses (SDXL's VAE
# overflows in fp16).

TEXT_ENCODER_XL = ComponentSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", "INT64", ("batch", "sequence_length")),),
    outputs=(
        TensorSpec("penultimate_hidden_state", "FP32", ("batch", "sequence_length", "hidden_size")),
    ),
)

TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    inputs=(TensorSpec("input_ids", "INT64", ("batch", "sequence_length")),),
    outputs=(
        TensorSpec(
            "penultimate_hidden_state", "FP32", ("batch", "sequence_length", "hidden_size_2")
        ),
        TensorSpec("text_embeds", "FP32", ("batch", "projection_dim")),
    ),
)

UNET_XL = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec(
            "sample", "FP32", ("batch", "unet_in_channels", "latent_height", "latent_width")
        ),
        TensorSpec("timestep", "FP32", ("batch",)),
        TensorSpec(
            "encoder_hidden_states", "FP32", ("batch", "sequence_length", "cross_attention_dim")
        ),
        TensorSpec("text_embeds", "FP32", ("batch", "projection_dim")),
        TensorSpec("time_ids", "FP32", ("batch", "time_ids")),
    ),
    outputs=UNET.outputs,
    trt_batch=UNET.trt_batch,
)

SDXL_COMPONENTS: tuple[ComponentSpec, ...] = (
    TEXT_ENCODER_XL, TEXT_ENCODER_2, UNET_XL, VAE_ENCODER, VAE_DECODER,
)  # fmt: skip

COMPONENTS_BY_ARCHITECTURE: dict[str, tuple[ComponentSpec, ...]] = {
    "sd15": SD15_COMPONENTS,
    "sdxl": SDXL_COMPONENTS,
}


def components_for(architecture: str) -> tuple[ComponentSpec, ...]:
    """The exported components of an architecture (`CheckpointFacts.architecture`)."""
    if architecture not in COMPONENTS_BY_ARCHITECTURE:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(COMPONENTS_BY_ARCHITECTURE)}"
        )
    return COMPONENTS_BY_ARCHITECTURE[architecture]
