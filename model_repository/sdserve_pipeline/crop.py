"""Inpainting only the masked area (`padding_mask_crop`), as diffusers' inpainting pipelines
do it: `mask_processor.get_crop_region` finds the box around the mask plus the padding,
widened to the aspect of the generation size; the image and mask are cropped to it and
resized to that size with `resize_mode="fill"`; the generated crop goes back onto the image
with `image_processor.apply_overlay`.

The crop happens when the request is parsed (`crop_request`, off the batcher's thread): the
request is then an ordinary inpainting request of the generation size, so sizing, size
buckets, memory admission and batching see what is generated, not the photo it comes from.
The paste-back (`paste_back`) works on the box alone: outside it every pixel is the input's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import numpy as np
import numpy.typing as npt
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdserve_pipeline.images import Processors, blur_mask, composite, feather_alpha
from sdserve_protocol.contract import GenerationParams, MaskCrop


def crop_request(processors: Processors, params: GenerationParams) -> GenerationParams:
    """A decoded `padding_mask_crop` request as it is generated: inpainting of the crop at the
    generation size (`params.height` x `params.width`: image and mask cropped and resized,
    the blur already applied), with `crop` saying where its images go back.

    The mask is blurred first (`mask_blur`, at the image's size, as a diffusers user blurs
    the mask they pass); the box comes from that mask, the generation size (`params.height`
    x `params.width`) and the padding.
    """
    if params.image is None or params.mask is None or params.padding_mask_crop is None:
        raise ValueError("crop_request needs an image, its mask and padding_mask_crop")
    height, width = params.height, params.width
    mask = params.mask
    if params.mask_blur:
        mask = blur_mask(processors, mask, params.mask_blur)
    box = processors.mask.get_crop_region(
        Image.fromarray(mask, mode="L"), width, height, pad=params.padding_mask_crop
    )
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = MaskCrop((x1, y1, x2, y2), params.image, mask, params.mask)
    rows, cols = crop.slices
    image = _fill(processors.image, params.image[rows, cols], "RGB", height, width)
    crop_mask = _fill(processors.mask, mask[rows, cols], "L", height, width)
    return replace(params, image=image, mask=crop_mask, mask_blur=0, crop=crop)


def _fill(
    processor: VaeImageProcessor, crop: npt.NDArray[np.uint8], mode: str, height: int, width: int
) -> npt.NDArray[np.uint8]:
    """The crop resized to height x width keeping its aspect, the rest filled from its edges:
    diffusers' `resize(..., resize_mode="fill")`, which makes an RGB image (a mask is made
    grey again, as the mask processor's grayscale conversion does)."""
    filled = processor.resize(Image.fromarray(crop, mode=mode), height, width, resize_mode="fill")
    return np.asarray(cast(Image.Image, filled).convert(mode), dtype=np.uint8)


def paste_back(
    processors: Processors,
    crop: MaskCrop,
    generated: npt.NDArray[np.uint8],
    preserve_unmasked: bool,
    feather_radius: int,
) -> npt.NDArray[np.uint8]:
    """(N, h, w, 3) generated crops → (N, H, W, 3) images: each crop resized into its box and
    laid under the input outside the mask by diffusers' `apply_overlay`; with
    `preserve_unmasked`, the feathered paste of the input's pixels outside `keep_mask`
    (`images.composite`) after it. Outside the box every pixel is the input's.

    `apply_overlay` runs on the box alone: the full image's mask is 0 outside the box (the box
    holds every non-zero mask pixel), where `apply_overlay` gives the input's pixels.
    """
    rows, cols = crop.slices
    x1, y1, x2, y2 = crop.box
    local = (0, 0, x2 - x1, y2 - y1)
    original = Image.fromarray(crop.image[rows, cols], mode="RGB")
    mask = Image.fromarray(crop.overlay_mask[rows, cols], mode="L")
    boxes = np.stack([
        np.asarray(processors.image.apply_overlay(mask, original, Image.fromarray(g), local))
        for g in generated
    ])  # fmt: skip  # (N, bh, bw, 3)
    if preserve_unmasked:
        boxes = composite(crop.image[rows, cols], boxes, _box_alpha(crop, feather_radius))
    out = np.repeat(crop.image[np.newaxis], len(generated), axis=0)
    out[:, rows, cols] = boxes
    return out


def _box_alpha(crop: MaskCrop, radius: int) -> npt.NDArray[np.float32]:
    """`feather_alpha(keep_mask)` inside the box, computed on the box plus a margin wider than
    the erosion and blur reach (so it equals the full image's there) and 0 outside the box."""
    x1, y1, x2, y2 = crop.box
    height, width = crop.keep_mask.shape
    margin = 4 * radius + 8
    top, left = max(y1 - margin, 0), max(x1 - margin, 0)
    window = crop.keep_mask[top : min(y2 + margin, height), left : min(x2 + margin, width)]
    alpha = feather_alpha(window, radius)
    return alpha[y1 - top : y2 - top, x1 - left : x2 - left]
