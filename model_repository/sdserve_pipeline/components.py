"""One declaration per exported component: the single source of truth for tensor names.

The ONNX export (input/output names, dynamic axes), the parity check (tolerance), the
Triton configs (names, dtypes, dims) and the pipeline's calls (argument order) are all
derived from the `ComponentSpec`s below, so names cannot drift between them.

Dims are symbolic names. A name that the checkpoint fixes (channels, hidden size,
sequence length) is resolved from the checkpoint's configs when the repository is
built; every other name is a dynamic axis (-1 in Triton, a dynamic axis in ONNX).

Each spec also says how many rows (batch entries) one request's call has (`CallRows`), which
the TensorRT export checks its engines' batch ranges against, and `example_inputs` makes
random inputs for any spec: the ONNX export traces and checks with them, the TensorRT parity
check and the benchmarks run on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# Axes that stay dynamic everywhere (batch, spatial sizes, the UNet's text length).
DYNAMIC_AXES = frozenset(
    {"batch", "height", "width", "latent_height", "latent_width", "text_length"}
)
# The UNet's `encoder_hidden_states` are as long as the prompt's embeddings: one text-encoder
# window (`sequence_length`, 77) per chunk of a long or weighted prompt (`sdserve_pipeline.
# prompts`), so `text_length` is a multiple of `sequence_length`.
TEXT_LENGTH = "text_length"
# Tokens of the CLIP BPE vocabulary, which every SD 1.5 and SDXL text encoder reads.
CLIP_VOCAB_SIZE = 49408
# Tokens of one CLIP text-encoder window (position embeddings), the same for every SD 1.5 and
# SDXL text encoder: a long prompt is encoded in chunks of this many.
CLIP_TEXT_WINDOW = 77
MAX_TIMESTEP = 1000  # training timesteps of SD 1.5 and SDXL schedulers


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
class CallRows:
    """How many rows (batch entries) one request's call of a component has.

    Calls of several requests are batched together, but one request's rows always go in
    one call, so an engine must accept `count(n, guidance)` rows for every `n` up to the
    request limit.

    Args:
        per_image: one row per requested image (`num_images`), else one per request.
        guidance_pair: doubled under classifier-free guidance (an unconditional row per
            conditional one).
    """

    per_image: bool = False
    guidance_pair: bool = False

    def count(self, num_images: int, guidance: bool) -> int:
        """Rows of one request's call: `num_images` images, guidance on or off."""
        rows = num_images if self.per_image else 1
        return 2 * rows if guidance and self.guidance_pair else rows

    def bounds(self, max_images: int) -> tuple[int, int]:
        """(fewest, most) rows of one request's call, up to `max_images` images."""
        return self.count(1, guidance=False), self.count(max_images, guidance=True)


@dataclass(frozen=True)
class ComponentSpec:
    """An exported model: its tensors, parity tolerance and TensorRT shape profile.

    Args:
        name: Triton model name and ONNX file stem.
        inputs: input tensors, in the order of the exported module's `forward`.
        outputs: output tensors, in the order the module returns them.
        atol: max abs difference ONNX vs PyTorch (fp32) allowed by the export's parity check.
        trt_batch: TensorRT (min, opt, max) batch for the profile, in the component's units.
        rows: how many rows one request's call has (default: one row).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-4
    trt_batch: tuple[int, int, int] = (1, 1, 4)
    rows: CallRows = field(default_factory=CallRows)

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


# One row per prompt: [negative, prompt] under guidance.
PROMPT_ROWS = CallRows(guidance_pair=True)

# Every text encoder takes each row's `clip_skip` beside its tokens (diffusers' semantics,
# chosen inside the graph from the stack of hidden states, so rows with different values share
# one call): SD 1.5's gives `final_layer_norm(hidden_states[-(clip_skip + 1)])` (0: its
# `last_hidden_state`), SDXL's give `hidden_states[-(clip_skip + 2)]` (0: the penultimate layer).
# Values past the first layer are clamped to it; the server refuses them first.
TEXT_INPUTS = (
    TensorSpec("input_ids", "INT64", ("batch", "sequence_length")),
    TensorSpec("clip_skip", "INT64", ("batch",)),
)
EXAMPLE_MAX_CLIP_SKIP = 2  # example inputs draw clip_skip in [0, 2] (the graph clamps)

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    inputs=TEXT_INPUTS,
    outputs=(TensorSpec("last_hidden_state", "FP32", ("batch", "sequence_length", "hidden_size")),),
    rows=PROMPT_ROWS,
)

UNET = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec(
            "sample", "FP32", ("batch", "unet_in_channels", "latent_height", "latent_width")
        ),
        TensorSpec("timestep", "FP32", ("batch",)),
        TensorSpec("encoder_hidden_states", "FP32", ("batch", TEXT_LENGTH, "hidden_size")),
    ),
    outputs=(
        TensorSpec(
            "noise_pred", "FP32", ("batch", "latent_channels", "latent_height", "latent_width")
        ),
    ),
    trt_batch=(2, 2, 8),  # [uncond, cond] pairs
    rows=CallRows(per_image=True, guidance_pair=True),
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
    rows=CallRows(per_image=True),
)

SD15_COMPONENTS: tuple[ComponentSpec, ...] = (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)

# SDXL: two text encoders read at their penultimate layer (at clip_skip 0), the second also
# giving the pooled (projected) embedding; the UNet takes those plus the size/crop `time_ids`.
# The VAE components are SD 1.5's and stay fp32 whatever precision the rest uses (SDXL's VAE
# overflows in fp16).

TEXT_ENCODER_XL = ComponentSpec(
    name="text_encoder",
    inputs=TEXT_INPUTS,
    outputs=(
        TensorSpec("penultimate_hidden_state", "FP32", ("batch", "sequence_length", "hidden_size")),
    ),
    rows=PROMPT_ROWS,
)

TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    inputs=TEXT_INPUTS,
    outputs=(
        TensorSpec(
            "penultimate_hidden_state", "FP32", ("batch", "sequence_length", "hidden_size_2")
        ),
        TensorSpec("text_embeds", "FP32", ("batch", "projection_dim")),
    ),
    rows=PROMPT_ROWS,
)

UNET_XL = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec(
            "sample", "FP32", ("batch", "unet_in_channels", "latent_height", "latent_width")
        ),
        TensorSpec("timestep", "FP32", ("batch",)),
        TensorSpec("encoder_hidden_states", "FP32", ("batch", TEXT_LENGTH, "cross_attention_dim")),
        TensorSpec("text_embeds", "FP32", ("batch", "projection_dim")),
        TensorSpec("time_ids", "FP32", ("batch", "time_ids")),
    ),
    outputs=UNET.outputs,
    trt_batch=UNET.trt_batch,
    rows=UNET.rows,
)

SDXL_COMPONENTS: tuple[ComponentSpec, ...] = (
    TEXT_ENCODER_XL, TEXT_ENCODER_2, UNET_XL, VAE_ENCODER, VAE_DECODER,
)  # fmt: skip

COMPONENTS_BY_ARCHITECTURE: dict[str, tuple[ComponentSpec, ...]] = {
    "sd15": SD15_COMPONENTS,
    "sdxl": SDXL_COMPONENTS,
}

# Optional, either architecture: a tiny VAE decoder (diffusers `AutoencoderTiny`: TAESD for SD
# 1.5, TAESDXL for SDXL) that decodes the previews of streamed requests. It takes the denoising
# latents as the UNet sees them (its own scaling factor, 1.0 for TAESD, is applied inside the
# graph, as diffusers' pipelines divide by it) and gives images in [-1, 1], 8x the latent size.
PREVIEW_DECODER = ComponentSpec(
    name="preview_decoder",
    inputs=(
        TensorSpec(
            "latents", "FP32", ("batch", "latent_channels", "latent_height", "latent_width")
        ),
    ),
    outputs=VAE_DECODER.outputs,
    rows=CallRows(per_image=True),
)

OPTIONAL_COMPONENTS: tuple[ComponentSpec, ...] = (PREVIEW_DECODER,)


def components_for(architecture: str) -> tuple[ComponentSpec, ...]:
    """The exported components of an architecture (`CheckpointFacts.architecture`)."""
    if architecture not in COMPONENTS_BY_ARCHITECTURE:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(COMPONENTS_BY_ARCHITECTURE)}"
        )
    return COMPONENTS_BY_ARCHITECTURE[architecture]


def served_components(architecture: str, roles: Iterable[str]) -> tuple[ComponentSpec, ...]:
    """The components a pipeline calls: its architecture's, then the optional ones (the
    preview decoder) among `roles` (the roles its settings name a model for)."""
    wanted = set(roles)
    optional = tuple(spec for spec in OPTIONAL_COMPONENTS if spec.name in wanted)
    return (*components_for(architecture), *optional)


def image_dims(batch: int, height: int, width: int, vae_scale_factor: int) -> dict[str, int]:
    """Values of the dynamic dims for `batch` images of `height` x `width` pixels.

    Raises:
        ValueError: a side is not a multiple of `vae_scale_factor`.
    """
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(
            f"image size {width}x{height} (WIDTHxHEIGHT) is not a multiple of the VAE scale "
            f"factor {vae_scale_factor}"
        )
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // vae_scale_factor,
        "latent_width": width // vae_scale_factor,
    }


def example_inputs(
    spec: ComponentSpec,
    dims: Mapping[str, int],
    rng: np.random.Generator,
    vocab_size: int = CLIP_VOCAB_SIZE,
) -> dict[str, npt.NDArray[np.generic]]:
    """Random inputs of a component, in its input order, drawn from `rng` in that order.

    Token ids are uniform below `vocab_size`, `clip_skip` uniform in [0,
    `EXAMPLE_MAX_CLIP_SKIP`], timesteps uniform in [0, 1000), SDXL's
    `time_ids` are the image's (height, width, crop top 0, crop left 0, height, width) as the
    pipeline sends them, and every other input is standard normal (fp32).

    Args:
        spec: the component declaration.
        dims: the value of every symbolic dim of its inputs: the checkpoint's fixed sizes
            and `image_dims(...)` (`time_ids` also needs `height` and `width`);
            `text_length` defaults to one text window (`sequence_length`, else 77).
        rng: the random source.
        vocab_size: tokens of the text encoder's vocabulary.

    Raises:
        ValueError: a dim has no value.
    """
    if TEXT_LENGTH not in dims:  # one text window
        dims = {**dims, TEXT_LENGTH: dims.get("sequence_length", CLIP_TEXT_WINDOW)}
    inputs: dict[str, npt.NDArray[np.generic]] = {}
    for tensor in spec.inputs:
        shape = tuple(_dim(dims, d, tensor.name) for d in tensor.dims)
        if tensor.name == "clip_skip":
            inputs[tensor.name] = rng.integers(0, EXAMPLE_MAX_CLIP_SKIP + 1, size=shape)
        elif tensor.dtype == "INT64":
            inputs[tensor.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            inputs[tensor.name] = rng.uniform(0, MAX_TIMESTEP, size=shape).astype(np.float32)
        elif tensor.name == "time_ids":
            height, width = (_dim(dims, d, tensor.name) for d in ("height", "width"))
            row = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            inputs[tensor.name] = np.broadcast_to(row, shape).copy()
        else:
            inputs[tensor.name] = rng.standard_normal(size=shape, dtype=np.float32)
    return inputs


def _dim(dims: Mapping[str, int], dim: str, tensor: str) -> int:
    if dim not in dims:
        raise ValueError(f"dim {dim!r} of input {tensor!r} has no value in {dict(dims)}")
    return dims[dim]
