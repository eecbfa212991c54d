"""Image and mask preparation, postprocessing and the feathered composite.

Pre- and postprocessing go through diffusers' own `VaeImageProcessor`, configured as
`StableDiffusionInpaintPipeline` configures it, so pixels are normalised, masks binarised
and outputs quantised exactly as diffusers does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter

MASK_THRESHOLD = 128  # uint8 mask values >= this are regenerated (diffusers binarises at 0.5)


@dataclass(frozen=True)
class Processors:
    """The two processors of diffusers' inpainting pipelines."""

    image: VaeImageProcessor
    mask: VaeImageProcessor

    @classmethod
    def for_vae_scale(cls, vae_scale_factor: int) -> Processors:
        return cls(
            image=VaeImageProcessor(vae_scale_factor=vae_scale_factor),
            mask=VaeImageProcessor(
                vae_scale_factor=vae_scale_factor,
                do_normalize=False,
                do_binarize=True,
                do_convert_grayscale=True,
            ),
        )


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The smallest (height, width) >= the given one whose sides are multiples of `multiple`."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


# A size bucket as the pipeline uses it: (height, width) in pixels. On the wire (the
# `size_buckets` config parameter) buckets are written `WIDTHxHEIGHT`, as TensorRT plan
# names and `sdserve_export.tensorrt_engines.SizeBucket.name` write them.
Bucket = tuple[int, int]


class SizeBucketError(ValueError):
    """A request larger than every size bucket the model serves."""


def parse_size_buckets(text: str) -> tuple[Bucket, ...]:
    """The `size_buckets` parameter → sorted unique (height, width) buckets.

    Args:
        text: comma-separated `WIDTHxHEIGHT` sizes, e.g. `"512x512,1152x896"`; empty (or
            only blanks) means no buckets: requests are padded to the latent grid only.

    Raises:
        ValueError: an entry is not `WIDTHxHEIGHT` with positive sides.
    """
    buckets = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        width, sep, height = part.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) and int(height)):
            raise ValueError(f"size bucket {part!r} is not WIDTHxHEIGHT, e.g. '1152x896'")
        buckets.add((int(height), int(width)))
    return tuple(sorted(buckets))


def format_size_buckets(buckets: Iterable[Bucket]) -> str:
    """(height, width) buckets → the `size_buckets` parameter (`WIDTHxHEIGHT,...`, sorted)."""
    return ",".join(f"{width}x{height}" for height, width in sorted(set(buckets)))


def check_size_buckets(buckets: Iterable[Bucket], multiple: int) -> tuple[Bucket, ...]:
    """Sorted unique buckets, each side a positive multiple of `multiple` (the VAE scale).

    Raises:
        ValueError: a bucket off the latent grid (a load-time problem of the model config).
    """
    checked = tuple(sorted({(int(h), int(w)) for h, w in buckets}))
    for height, width in checked:
        if height < 1 or width < 1 or height % multiple or width % multiple:
            raise ValueError(
                f"size bucket {width}x{height} (WIDTHxHEIGHT) is not a positive multiple of "
                f"the VAE scale factor {multiple}"
            )
    return checked


def snap_to_bucket(
    height: int, width: int, buckets: Sequence[Bucket], multiple: int
) -> tuple[int, int]:
    """The (height, width) a request is generated at.

    Without buckets: the request padded to a multiple of `multiple` (`padded_size`). With
    buckets: the smallest bucket containing the request (both sides >=); among those of
    equal area, the one closest to the request's aspect ratio, then the lower one. The
    request is padded to it with `pad_to` and the output cropped back.

    Args:
        height: request height in pixels.
        width: request width in pixels.
        buckets: (height, width) sizes the model serves (see `check_size_buckets`); empty
            for any size.
        multiple: the latent grid (VAE scale factor), used without buckets.

    Raises:
        SizeBucketError: the request is larger than every bucket.
    """
    if not buckets:
        return padded_size(height, width, multiple)
    fitting = [(h, w) for h, w in buckets if h >= height and w >= width]
    if not fitting:
        largest_h, largest_w = max(buckets, key=lambda b: (b[0] * b[1], b))
        listed = format_size_buckets(buckets).replace(",", ", ")
        raise SizeBucketError(
            f"height {height}, width {width} fits no size bucket of this model; the largest "
            f"is {largest_w}x{largest_h} (WIDTHxHEIGHT; buckets: {listed})"
        )
    aspect = math.log(height / width)
    return min(fitting, key=lambda b: (b[0] * b[1], abs(math.log(b[0] / b[1]) - aspect), b))


def largest_square_side(buckets: Iterable[Bucket]) -> int:
    """Side of the largest square that fits in some bucket (0 without buckets)."""
    return max((min(height, width) for height, width in buckets), default=0)


def pad_to(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an (H, W[, C]) array at the bottom/right to (height, width) by repeating its edge."""
    pad = [(0, height - array.shape[0]), (0, width - array.shape[1])]
    pad += [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array


def preprocess_image(processors: Processors, image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 in [-1, 1], as diffusers' `image_processor`."""
    height, width = image.shape[:2]
    pil = Image.fromarray(image, mode="RGB")
    out = processors.image.preprocess(pil, height=height, width=width)
    return out.to(dtype=torch.float32)


def preprocess_mask(processors: Processors, mask: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 → (1, 1, H, W) float32 of {0, 1}, as diffusers' `mask_processor`."""
    height, width = mask.shape
    return processors.mask.preprocess(Image.fromarray(mask, mode="L"), height=height, width=width)


def postprocess(processors: Processors, decoded: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) VAE output → (N, H, W, 3) uint8, quantised as diffusers' PIL output."""
    images = processors.image.postprocess(decoded, output_type="np")  # (N, H, W, 3) in [0, 1]
    return (images * 255).round().astype(np.uint8)


def feather_alpha(mask: np.ndarray, radius: int) -> np.ndarray:
    """Blend weight of generated pixels: 0 outside the mask, ramping to 1 inside it.

    The ramp lies entirely inside the mask (erode, then blur, then cut at the mask), so
    every pixel outside the mask keeps weight 0 exactly.

    Args:
        mask: (H, W) uint8, >= 128 means regenerated.
        radius: width in pixels of the ramp (0 gives a hard edge).
    """
    binary = mask >= MASK_THRESHOLD
    if radius <= 0:
        return binary.astype(np.float32)
    pil = Image.fromarray(binary.astype(np.uint8) * 255, mode="L")
    eroded = pil.filter(ImageFilter.MinFilter(2 * radius + 1))
    blurred = eroded.filter(ImageFilter.GaussianBlur(radius / 2))
    alpha = np.asarray(blurred, dtype=np.float32) / 255.0
    return np.where(binary, alpha, 0.0).astype(np.float32)


def composite(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paste `original` back where alpha is 0, blend where 0 < alpha < 1.

    Args:
        original: (H, W, 3) uint8 input pixels.
        generated: (N, H, W, 3) uint8 generated images.
        alpha: (H, W) float32 weight of the generated pixels.
    """
    a = alpha[None, :, :, None]  # (1, H, W, 1)
    mixed = a * generated.astype(np.float32) + (1.0 - a) * original[None].astype(np.float32)
    out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    keep = alpha[None, :, :, None] == 0.0
    return np.where(keep, original[None], out)
