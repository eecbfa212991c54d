"""TensorRT optimisation profiles of a component: size buckets, batch ranges, shapes.

Pure: no TensorRT, no GPU. An engine serves static image sizes (`SizeBucket`s; by default
per architecture, `default_buckets`); `derive_profiles` makes one profile per bucket from a
`ComponentSpec` (batch range from `spec.trt_batch`, in units of 2 for the UNet; spatial
dims min = opt = max per bucket; other dims fixed by the checkpoint). The pipeline snaps
each request to the smallest bucket containing it (its `size_buckets` parameter, written by
`gpu_variant` from the plans), so any request size is served.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sdserve_pipeline.components import CLIP_TEXT_WINDOW, TEXT_LENGTH, ComponentSpec, TensorSpec
from sdserve_protocol.rules import DEFAULT_LIMITS
from sdserve_protocol.sizes import SizeBucket

# Symbolic dims set by the size bucket; every other non-batch dim is fixed by the checkpoint.
PIXEL_DIMS = {"height": "height", "width": "width"}
LATENT_DIMS = {"latent_height": "height", "latent_width": "width"}
BATCH_DIM = "batch"

# Batch unit per component: the UNet always runs [uncond, cond] pairs under CFG.
BATCH_UNITS: Mapping[str, int] = {"unet": 2}

STATIC_PROFILE = "static"  # profile tag of a component without spatial dims (text encoder)
SDXL_VAE_SCALING_FACTOR = 0.13025  # the SDXL VAE overflows in fp16: keep it fp32

SD_BUCKETS = (
    SizeBucket(height=512, width=512),
    SizeBucket(height=768, width=768),
    SizeBucket(height=512, width=768),
    SizeBucket(height=768, width=512),
)
SDXL_BUCKETS = (
    SizeBucket(height=1024, width=1024),
    SizeBucket(height=896, width=1152),
    SizeBucket(height=1152, width=896),
    SizeBucket(height=832, width=1216),
    SizeBucket(height=1216, width=832),
    SizeBucket(height=768, width=1344),
    SizeBucket(height=1344, width=768),
    SizeBucket(height=640, width=1536),
    SizeBucket(height=1536, width=640),
)
BUCKETS_BY_ARCHITECTURE: Mapping[str, tuple[SizeBucket, ...]] = {
    "sd15": SD_BUCKETS,
    "sdxl": SDXL_BUCKETS,
}
DEFAULT_BUCKETS = SD_BUCKETS + SDXL_BUCKETS  # every architecture's, e.g. for `derive_profiles`


def default_buckets(architecture: str) -> tuple[SizeBucket, ...]:
    """The sizes engines of an architecture (`CheckpointFacts.architecture`) serve by default."""
    if architecture not in BUCKETS_BY_ARCHITECTURE:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(BUCKETS_BY_ARCHITECTURE)}"
        )
    return BUCKETS_BY_ARCHITECTURE[architecture]


def profile_order(bucket: SizeBucket) -> tuple[int, int]:
    """Profiles (and the bucket list of a plan name) are ordered by width, then height, as
    plans have always been named, so plans already built keep their names."""
    return bucket.width, bucket.height


def default_fp32_components(
    vae_scaling_factor: float, architecture: str = "sd15"
) -> frozenset[str]:
    """Components (spec names) kept fp32 by default: the VAE of SDXL checkpoints (it
    overflows in fp16).

    Args:
        vae_scaling_factor: `vae.config.scaling_factor`; SDXL's VAE has 0.13025 (an SD 1.5
            pipeline carrying an SDXL VAE is caught by it too).
        architecture: `CheckpointFacts.architecture`; `sdxl` keeps its VAE fp32.
    """
    sdxl_vae = abs(vae_scaling_factor - SDXL_VAE_SCALING_FACTOR) < 1e-6
    if sdxl_vae or architecture == "sdxl":
        return frozenset({"vae_encoder", "vae_decoder"})
    return frozenset()


@dataclass(frozen=True)
class BatchRange:
    """TensorRT (min, opt, max) of the batch dim, each a multiple of `unit`.

    Args:
        min: smallest batch the engine accepts.
        opt: batch the kernels are tuned for.
        max: largest batch the engine accepts.
        unit: granularity; 2 for the UNet, which runs [uncond, cond] pairs under CFG.
    """

    min: int
    opt: int
    max: int
    unit: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch range needs 1 <= min <= opt <= max, got {self.as_tuple()}")
        if any(value % self.unit for value in self.as_tuple()):
            raise ValueError(
                f"batch range {self.as_tuple()} is not in units of {self.unit} "
                "(the UNet runs [uncond, cond] pairs under classifier-free guidance)"
            )

    def as_tuple(self) -> tuple[int, int, int]:
        return self.min, self.opt, self.max

    @property
    def tag(self) -> str:
        """`b2-8` (opt = min) or `b2-4-8`, as in plan names."""
        if self.opt == self.min:
            return f"b{self.min}-{self.max}"
        return f"b{self.min}-{self.opt}-{self.max}"

    @classmethod
    def parse_tag(cls, tag: str) -> tuple[int, int, int]:
        """`b2-8` → (2, 2, 8); `b2-4-8` → (2, 4, 8)."""
        match = re.fullmatch(r"b(\d+)-(\d+)(?:-(\d+))?", tag)
        if not match:
            raise ValueError(f"batch tag {tag!r} is not bMIN-MAX or bMIN-OPT-MAX")
        low, second, third = match.groups()
        if third is None:
            return int(low), int(low), int(second)
        return int(low), int(second), int(third)

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max


def batch_range(spec: ComponentSpec, override: Sequence[int] | None = None) -> BatchRange:
    """The component's batch range: `spec.trt_batch` (or `override`) in its batch unit."""
    low, opt, high = override or spec.trt_batch
    return BatchRange(low, opt, high, unit=BATCH_UNITS.get(spec.name, 1))


@dataclass(frozen=True)
class ShapeRange:
    """TensorRT (min, opt, max) shapes of one input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: input name → (min, opt, max) shapes.

    Args:
        name: the bucket's `WIDTHxHEIGHT`, or `static` for a component without spatial dims.
        shapes: one `ShapeRange` per input, in the spec's input order.
    """

    name: str
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)

    def opt_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape.opt for name, shape in self.shapes.items()}


def is_spatial(spec: ComponentSpec) -> bool:
    """Whether any tensor of the component has a pixel or latent spatial dim."""
    spatial = PIXEL_DIMS.keys() | LATENT_DIMS.keys()
    return any(d in spatial for t in (*spec.inputs, *spec.outputs) for d in t.dims)


def bucket_dims(bucket: SizeBucket, vae_scale_factor: int) -> dict[str, int]:
    """Values of the spatial symbolic dims for one bucket."""
    latent_height, latent_width = bucket.latent(vae_scale_factor)
    return {
        "height": bucket.height,
        "width": bucket.width,
        "latent_height": latent_height,
        "latent_width": latent_width,
    }


def input_range(
    tensor: TensorSpec,
    sizes: Mapping[str, int],
    batch: BatchRange,
    spatial: Mapping[str, int],
    text_chunks: int = DEFAULT_LIMITS.max_prompt_chunks,
) -> ShapeRange:
    """(min, opt, max) of one input: batch from `batch`, the UNet's text length from one
    window to `text_chunks` windows (the pipeline's `limit_max_prompt_chunks`), every other
    dim fixed."""
    lows, opts, highs = [], [], []
    for dim in tensor.dims:
        if dim == BATCH_DIM:
            low, opt, high = batch.as_tuple()
        elif dim == TEXT_LENGTH:  # one text window up to the most chunks of a prompt
            low, opt, high = CLIP_TEXT_WINDOW, CLIP_TEXT_WINDOW, CLIP_TEXT_WINDOW * text_chunks
        else:
            low = opt = high = _fixed_dim(dim, tensor.name, sizes, spatial)
        lows.append(low)
        opts.append(opt)
        highs.append(high)
    return ShapeRange(tuple(lows), tuple(opts), tuple(highs))


def derive_profiles(
    spec: ComponentSpec,
    sizes: Mapping[str, int],
    buckets: Iterable[SizeBucket] = DEFAULT_BUCKETS,
    vae_scale_factor: int = 8,
    batch: BatchRange | None = None,
    text_chunks: int = DEFAULT_LIMITS.max_prompt_chunks,
) -> tuple[Profile, ...]:
    """Optimisation profiles of a component: one per size bucket (one in all without spatial dims).

    Args:
        spec: the component declaration (tensor names and symbolic dims).
        sizes: values of the checkpoint-fixed dims (`sequence_length`, `hidden_size`, ...).
        buckets: image sizes to serve; latent sizes follow from `vae_scale_factor`.
        vae_scale_factor: pixels per latent (8 for SD 1.5 and SDXL).
        batch: batch range; defaults to `batch_range(spec)`.
        text_chunks: most text-encoder windows of the UNet's text (the pipeline's
            `limit_max_prompt_chunks`).
    """
    batch = batch or batch_range(spec)
    if not is_spatial(spec):
        shapes = {t.name: input_range(t, sizes, batch, {}, text_chunks) for t in spec.inputs}
        return (Profile(STATIC_PROFILE, shapes),)
    profiles = []
    for bucket in sorted(set(buckets), key=profile_order):
        spatial = bucket_dims(bucket, vae_scale_factor)
        shapes = {t.name: input_range(t, sizes, batch, spatial, text_chunks) for t in spec.inputs}
        profiles.append(Profile(bucket.name, shapes))
    if not profiles:
        raise ValueError(f"{spec.name}: no size bucket given")
    return tuple(profiles)


def sizes_from_config(
    spec: ComponentSpec, dims_by_tensor: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """Values of the fixed symbolic dims, read back from a config's (or ONNX file's) dims.

    Args:
        spec: the component declaration.
        dims_by_tensor: tensor name → concrete dims (-1 where dynamic), e.g. from config.pbtxt.

    Raises:
        ValueError: a tensor is missing, has another rank, or a symbolic dim has two values.
    """
    sizes: dict[str, int] = {}
    for tensor in (*spec.inputs, *spec.outputs):
        if tensor.name not in dims_by_tensor:
            raise ValueError(f"{spec.name}: tensor {tensor.name!r} not in {sorted(dims_by_tensor)}")
        dims = list(dims_by_tensor[tensor.name])
        if len(dims) != len(tensor.dims):
            raise ValueError(f"{spec.name}.{tensor.name}: rank {len(dims)}, spec {tensor.dims}")
        for symbol, value in zip(tensor.dims, dims, strict=True):
            if value < 0:
                continue
            if sizes.setdefault(symbol, value) != value:
                raise ValueError(f"{spec.name}: dim {symbol!r} is both {sizes[symbol]} and {value}")
    return sizes


def _fixed_dim(dim: str, tensor: str, sizes: Mapping[str, int], spatial: Mapping[str, int]) -> int:
    if dim in spatial:
        return spatial[dim]
    if dim in sizes:
        return sizes[dim]
    raise ValueError(f"dim {dim!r} of input {tensor!r} has no value (sizes: {dict(sizes)})")
