"""Image and mask preparation, postprocessing and the feathered composite.

Pre- and postprocessing go through diffusers' own `VaeImageProcessor`, configured as
`StableDiffusionInpaintPipeline` configures it, so pixels are normalised, masks binarised
and outputs quantised exactly as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter

from sdserve_protocol.canvas import MASK_THRESHOLD  # diffusers binarises at 0.5


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


def pad_to(array: npt.NDArray[Any], height: int, width: int) -> npt.NDArray[Any]:
    """Pad an (H, W[, C]) array at the bottom/right to (height, width) by repeating its edge."""
    pad = [(0, height - array.shape[0]), (0, width - array.shape[1])]
    pad += [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array


def preprocess_image(processors: Processors, image: npt.NDArray[np.uint8]) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 in [-1, 1], as diffusers' `image_processor`."""
    height, width = image.shape[:2]
    pil = Image.fromarray(image, mode="RGB")
    out = processors.image.preprocess(pil, height=height, width=width)
    return out.to(dtype=torch.float32)


def blur_mask(
    processors: Processors, mask: npt.NDArray[np.uint8], radius: int
) -> npt.NDArray[np.uint8]:
    """(H, W) uint8 mask, Gaussian-blurred by diffusers' `VaeImageProcessor.blur` (a request's
    `mask_blur`; diffusers' inpainting pipelines then binarise it as any mask)."""
    blurred = processors.mask.blur(Image.fromarray(mask, mode="L"), radius)
    return np.asarray(blurred, dtype=np.uint8)


def preprocess_mask(processors: Processors, mask: npt.NDArray[np.uint8]) -> torch.Tensor:
    """(H, W) uint8 → (1, 1, H, W) float32 of {0, 1}, as diffusers' `mask_processor`."""
    height, width = mask.shape
    return processors.mask.preprocess(Image.fromarray(mask, mode="L"), height=height, width=width)


def postprocess(processors: Processors, decoded: torch.Tensor) -> npt.NDArray[np.uint8]:
    """(N, 3, H, W) VAE output → (N, H, W, 3) uint8, quantised as diffusers' PIL output."""
    images = cast(
        npt.NDArray[np.float32], processors.image.postprocess(decoded, output_type="np")
    )  # in [0, 1]
    return (images * 255).round().astype(np.uint8)


def feather_alpha(mask: npt.NDArray[np.uint8], radius: int) -> npt.NDArray[np.float32]:
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


def composite(
    original: npt.NDArray[np.uint8],
    generated: npt.NDArray[np.uint8],
    alpha: npt.NDArray[np.float32],
) -> npt.NDArray[np.uint8]:
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
