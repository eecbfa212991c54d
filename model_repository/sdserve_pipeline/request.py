"""Validate and decode one wire request (README.md, "Wire contract") into `GenerationParams`.

Everything is checked here, before any allocation or model call; a problem raises
`RequestError` naming the input, the bad value and what is allowed. The Triton adapter
turns it into an INVALID_ARG response.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdserve_client.rules import (
    DEFAULT_NUM_IMAGES,
    MAX_SEED,
    Limits,
    RequestError,
    check_canvas,
    check_mask_has_image,
    check_outpaint,
    check_pixels,
    check_range,
    check_seed,
    check_size_needs_no_image,
    check_strength,
    check_text_bytes,
    default_steps,
)
from sdserve_pipeline.contract import INPUTS_BY_NAME
from sdserve_pipeline.schedulers import SCHEDULER_NAMES

# The rule table (ranges, default limits, error type) is shared with the SDK: see
# `sdserve_client.rules`. Re-exported here, where the server's callers import them from.
__all__ = [
    "MAX_SEED",
    "GenerationParams",
    "Limits",
    "RequestError",
    "parse_request",
]


@dataclass(frozen=True)
class GenerationParams:
    """One validated generation request.

    Args:
        prompt: text to condition on.
        negative_prompt: text for the unconditional branch ("").
        image: (H, W, 3) uint8 RGB, or None for text-to-image.
        mask: (H, W) uint8, >= 128 regenerates; None with an image is invalid.
        height: output height (text-to-image; else the image's).
        width: output width (text-to-image; else the image's).
        steps: denoising steps (50).
        guidance_scale: classifier-free guidance scale; <= 1 disables CFG (7.5).
        strength: how much of the image to destroy (1.0: start from pure noise).
        seed: seed of the first image; image i uses seed + i.
        scheduler: scheduler name, or None for the checkpoint's own.
        num_images: images per request (1).
        preserve_unmasked: paste input pixels back outside the mask (True).
        outpaint: pixels added (left, top, right, bottom), or None.
    """

    prompt: str
    height: int
    width: int
    seed: int
    negative_prompt: str = ""
    image: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)
    steps: int = 50
    guidance_scale: float = 7.5
    strength: float = 1.0
    scheduler: str | None = None
    num_images: int = 1
    preserve_unmasked: bool = True
    outpaint: tuple[int, int, int, int] | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


def parse_request(
    inputs: dict[str, np.ndarray], limits: Limits, default_size: int,
    default_strength: float = 1.0, schedulers: Sequence[str] = SCHEDULER_NAMES,
) -> GenerationParams:  # fmt: skip
    """Check every input of a wire request and decode it.

    Args:
        inputs: wire input name → array, batch dimension already removed.
        limits: the model's limits.
        default_size: text-to-image side when height/width are absent.
        default_strength: strength of a request with an image that gives none (text-to-image
            always starts from pure noise: 1.0).
        schedulers: the scheduler names the model accepts (its `schedulers` parameter, read
            by `schedulers.served_schedulers`; all by default), in lower case.
    """
    for name, array in inputs.items():
        _check_wire(name, array)
    if "prompt" not in inputs:
        raise RequestError("prompt", "is required")
    prompt = _text(inputs, "prompt", limits)
    negative = _text(inputs, "negative_prompt", limits) if "negative_prompt" in inputs else ""
    outpaint = _outpaint(inputs, limits)
    image, mask = _image_and_mask(inputs, limits, mask_required=outpaint is None)
    height, width = _size(inputs, image, limits, default_size)
    if outpaint is not None:
        height, width = check_canvas(height, width, outpaint, limits)
    steps = int(_number(inputs, "steps", default_steps(limits), limits))
    num_images = int(_number(inputs, "num_images", DEFAULT_NUM_IMAGES, limits))
    guidance = float(_number(inputs, "guidance_scale", 7.5, limits))
    strength_default = default_strength if image is not None else 1.0
    strength = float(_number(inputs, "strength", strength_default, limits))
    check_strength(strength, steps, has_image=image is not None)
    seed = _seed(inputs, num_images)
    scheduler = _scheduler(inputs, limits, schedulers)
    preserve = bool(_scalar(inputs, "preserve_unmasked", True))
    return GenerationParams(
        prompt=prompt, negative_prompt=negative, image=image, mask=mask,
        height=height, width=width, steps=steps, guidance_scale=guidance, strength=strength,
        seed=seed, scheduler=scheduler, num_images=num_images, preserve_unmasked=preserve,
        outpaint=outpaint,
    )  # fmt: skip


def _check_wire(name: str, array: np.ndarray) -> None:
    if name not in INPUTS_BY_NAME:
        raise RequestError(name, f"unknown input; valid inputs: {', '.join(INPUTS_BY_NAME)}")
    spec = INPUTS_BY_NAME[name]
    dtype = spec.numpy_dtype
    if array.dtype.type is not dtype and not (dtype is np.object_ and array.dtype.kind == "S"):
        raise RequestError(name, f"dtype {array.dtype} given, {spec.dtype} expected")
    if array.ndim != len(spec.dims) or any(
        d != -1 and d != s for d, s in zip(spec.dims, array.shape, strict=True)
    ):
        shown = ["?" if d == -1 else d for d in spec.dims]
        raise RequestError(name, f"shape {list(array.shape)} given, {shown} expected")


def _scalar(inputs: dict[str, np.ndarray], name: str, default: Any) -> Any:
    return inputs[name][0] if name in inputs else default


def _number(
    inputs: dict[str, np.ndarray], name: str, default: int | float, limits: Limits
) -> int | float:
    """A numeric scalar input (or its default), checked against the shared rule table."""
    return check_range(name, _scalar(inputs, name, default), limits)


def _text(inputs: dict[str, np.ndarray], name: str, limits: Limits) -> str:
    raw = inputs[name][0]
    if not isinstance(raw, bytes):
        try:
            raw = str(raw).encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(name, f"is not valid Unicode ({err.reason})") from None
    check_text_bytes(name, len(raw), limits)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(name, f"is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _seed(inputs: dict[str, np.ndarray], num_images: int) -> int:
    if "seed" not in inputs:
        return secrets.randbelow(MAX_SEED - num_images + 1)
    return check_seed(int(inputs["seed"][0]), num_images)


def _scheduler(inputs: dict[str, np.ndarray], limits: Limits, allowed: Sequence[str]) -> str | None:
    if "scheduler" not in inputs:
        return None
    name = _text(inputs, "scheduler", limits).strip().lower()
    if name not in allowed:
        raise RequestError(
            "scheduler", f"{name!r} is unknown to this model; valid: {', '.join(allowed)}"
        )
    return name


def _outpaint(inputs: dict[str, np.ndarray], limits: Limits) -> tuple[int, int, int, int] | None:
    if "outpaint" not in inputs:
        return None
    return check_outpaint(inputs["outpaint"].tolist(), "image" in inputs, limits)


def _image_and_mask(
    inputs: dict[str, np.ndarray], limits: Limits, mask_required: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    image, mask = inputs.get("image"), inputs.get("mask")
    if mask is not None:
        check_mask_has_image(has_image=image is not None)
    if image is None:
        return None, None
    height, width, channels = image.shape
    if channels != 3:
        raise RequestError("image", f"shape {list(image.shape)} given, [H, W, 3] RGB expected")
    check_pixels("image", height, width, limits)
    if mask is None:
        if mask_required:
            raise RequestError("mask", "is required with an image (unless outpainting)")
        return image, None
    if mask.shape != (height, width):
        raise RequestError(
            "mask", f"size {list(mask.shape)} differs from image size {[height, width]}"
        )
    return image, mask


def _size(
    inputs: dict[str, np.ndarray], image: np.ndarray | None, limits: Limits, default_size: int
) -> tuple[int, int]:
    for name in ("height", "width"):
        if name in inputs:
            check_size_needs_no_image(name, has_image=image is not None)
    if image is not None:
        return int(image.shape[0]), int(image.shape[1])
    height = int(_number(inputs, "height", default_size, limits))
    width = int(_number(inputs, "width", default_size, limits))
    check_pixels("height" if "height" in inputs else "width", height, width, limits)
    return height, width
