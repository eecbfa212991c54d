"""Validate and decode one wire request (DESIGN.md's contract) into `GenerationParams`.

Everything is checked here, before any allocation or model call; a problem raises
`RequestError` naming the input, the bad value and what is allowed. The Triton adapter
turns it into an INVALID_ARG response.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdserve_pipeline.contract import INPUTS_BY_NAME
from sdserve_pipeline.schedulers import SCHEDULER_NAMES

MAX_SEED = 2**63 - 1

# Inputs of the contract that this pipeline does not implement yet: rejected, never ignored.
NOT_YET_SUPPORTED: frozenset[str] = frozenset()


class RequestError(ValueError):
    """A bad request input; `name` is the wire input it concerns."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


@dataclass(frozen=True)
class Limits:
    """Per-model limits, from the pipeline model's config parameters."""

    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images: int = 8
    max_prompt_bytes: int = 4096
    max_guidance_scale: float = 50.0
    max_outpaint: int = 2048
    max_canvas_pixels: int = 4096 * 4096


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
    default_strength: float = 1.0,
) -> GenerationParams:  # fmt: skip
    """Check every input of a wire request and decode it.

    Args:
        inputs: wire input name → array, batch dimension already removed.
        limits: the model's limits.
        default_size: text-to-image side when height/width are absent.
        default_strength: strength of a request with an image that gives none (text-to-image
            always starts from pure noise: 1.0).
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
        height, width = _canvas_size(height, width, outpaint, limits)
    steps = _int(inputs, "steps", min(50, limits.max_steps), 1, limits.max_steps)
    num_images = _int(inputs, "num_images", 1, 1, limits.max_images)
    guidance = _float(inputs, "guidance_scale", 7.5, 0.0, limits.max_guidance_scale)
    strength_default = default_strength if image is not None else 1.0
    strength = _float(inputs, "strength", strength_default, 0.0, 1.0, low_open=True)
    if strength < 1.0 and image is None:
        raise RequestError("strength", f"{strength} < 1 needs an input image to start from")
    if int(steps * strength) < 1:
        raise RequestError("strength", f"{strength} leaves no denoising step out of {steps}")
    seed = _seed(inputs, num_images)
    scheduler = _scheduler(inputs, limits)
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
    if name in NOT_YET_SUPPORTED:
        raise RequestError(name, "is not supported by this pipeline yet")
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


def _text(inputs: dict[str, np.ndarray], name: str, limits: Limits) -> str:
    raw = inputs[name][0]
    if not isinstance(raw, bytes):
        try:
            raw = str(raw).encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(name, f"is not valid Unicode ({err.reason})") from None
    if len(raw) > limits.max_prompt_bytes:
        raise RequestError(name, f"{len(raw)} bytes given, at most {limits.max_prompt_bytes}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(name, f"is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _int(inputs: dict[str, np.ndarray], name: str, default: int, low: int, high: int) -> int:
    value = int(_scalar(inputs, name, default))
    if not low <= value <= high:
        raise RequestError(name, f"{value} out of range [{low}, {high}]")
    return value


def _float(
    inputs: dict[str, np.ndarray], name: str, default: float, low: float, high: float,
    low_open: bool = False,
) -> float:  # fmt: skip
    value = float(_scalar(inputs, name, default))
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise RequestError(name, f"{value} out of range {bracket}{low}, {high}]")
    return value


def _seed(inputs: dict[str, np.ndarray], num_images: int) -> int:
    if "seed" not in inputs:
        return secrets.randbelow(MAX_SEED - num_images + 1)
    seed = int(inputs["seed"][0])
    if not 0 <= seed <= MAX_SEED - num_images + 1:
        raise RequestError("seed", f"{seed} out of range [0, {MAX_SEED - num_images + 1}]")
    return seed


def _scheduler(inputs: dict[str, np.ndarray], limits: Limits) -> str | None:
    if "scheduler" not in inputs:
        return None
    name = _text(inputs, "scheduler", limits).strip().lower()
    if name not in SCHEDULER_NAMES:
        raise RequestError("scheduler", f"{name!r} is unknown; valid: {', '.join(SCHEDULER_NAMES)}")
    return name


def _outpaint(inputs: dict[str, np.ndarray], limits: Limits) -> tuple[int, int, int, int] | None:
    if "outpaint" not in inputs:
        return None
    if "image" not in inputs:
        raise RequestError("outpaint", "needs an input image to extend")
    values = tuple(int(v) for v in inputs["outpaint"])
    if any(not 0 <= v <= limits.max_outpaint for v in values) or not any(values):
        raise RequestError(
            "outpaint",
            f"{list(values)} given; [left, top, right, bottom] each in [0, {limits.max_outpaint}]"
            ", at least one > 0",
        )
    return values  # type: ignore[return-value]


def _canvas_size(
    height: int, width: int, outpaint: tuple[int, int, int, int], limits: Limits
) -> tuple[int, int]:
    left, top, right, bottom = outpaint
    canvas_h, canvas_w = height + top + bottom, width + left + right
    if canvas_h * canvas_w > limits.max_canvas_pixels:
        raise RequestError(
            "outpaint",
            f"canvas {canvas_h}x{canvas_w} = {canvas_h * canvas_w} pixels exceeds "
            f"{limits.max_canvas_pixels}",
        )
    return canvas_h, canvas_w


def _image_and_mask(
    inputs: dict[str, np.ndarray], limits: Limits, mask_required: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    image, mask = inputs.get("image"), inputs.get("mask")
    if image is None:
        if mask is not None:
            raise RequestError("mask", "given without an image")
        return None, None
    height, width, channels = image.shape
    if channels != 3:
        raise RequestError("image", f"shape {list(image.shape)} given, [H, W, 3] RGB expected")
    _check_pixels("image", height, width, limits)
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
    if image is not None:
        for name in ("height", "width"):
            if name in inputs:
                raise RequestError(
                    name, "applies to text-to-image only; outputs keep the image size"
                )
        return int(image.shape[0]), int(image.shape[1])
    height = _int(inputs, "height", default_size, 1, limits.max_pixels)
    width = _int(inputs, "width", default_size, 1, limits.max_pixels)
    _check_pixels("height" if "height" in inputs else "width", height, width, limits)
    return height, width


def _check_pixels(name: str, height: int, width: int, limits: Limits) -> None:
    if height < 1 or width < 1:
        raise RequestError(name, f"size {height}x{width} is empty")
    if height * width > limits.max_pixels:
        raise RequestError(
            name, f"size {height}x{width} = {height * width} pixels exceeds {limits.max_pixels}"
        )
