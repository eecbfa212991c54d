"""The request dataclass and its encoding into the pipeline model's input tensors."""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidRequestError
from .images import ImageLike, MaskLike, size_text, to_mask_array, to_rgb_array

# Tensor names of the pipeline model's wire contract (DESIGN.md), defined here only.
PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
IMAGE = "image"
MASK = "mask"
OUTPAINT = "outpaint"
HEIGHT = "height"
WIDTH = "width"
STEPS = "steps"
GUIDANCE_SCALE = "guidance_scale"
STRENGTH = "strength"
SEED = "seed"
SCHEDULER = "scheduler"
NUM_IMAGES = "num_images"
PRESERVE_UNMASKED = "preserve_unmasked"
OUTPUT_IMAGES = "images"
OUTPUT_SEEDS = "seeds"

INPUT_NAMES: tuple[str, ...] = (
    PROMPT,
    NEGATIVE_PROMPT,
    IMAGE,
    MASK,
    OUTPAINT,
    HEIGHT,
    WIDTH,
    STEPS,
    GUIDANCE_SCALE,
    STRENGTH,
    SEED,
    SCHEDULER,
    NUM_IMAGES,
    PRESERVE_UNMASKED,
)
OUTPUT_NAMES: tuple[str, ...] = (OUTPUT_IMAGES, OUTPUT_SEEDS)

_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Array = npt.NDArray[Any]

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80


def _quote(value: Any) -> str:
    """`repr` shortened for error messages (long prompts, arrays passed by mistake)."""
    return _repr.repr(value)


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One request to the pipeline model. Options left `None` are not sent (server default).

    Args:
        prompt (`str`): the text to guide generation.
        negative_prompt (`str`, *optional*): text to steer away from (server default `""`).
        image (`PIL.Image.Image` or `np.ndarray`, *optional*):
            Input image, any PIL mode or uint8 (H, W, 3). Absent: text-to-image.
        mask (`PIL.Image.Image` or `np.ndarray`, *optional*):
            Same size as `image`; white (255) is regenerated, black (0) kept.
        outpaint (`Sequence[int]`, *optional*): pixels to add (left, top, right, bottom).
        height (`int`, *optional*): text-to-image height in pixels.
        width (`int`, *optional*): text-to-image width in pixels.
        steps (`int`, *optional*): number of denoising steps.
        guidance_scale (`float`, *optional*): classifier-free guidance scale (server default 7.5).
        strength (`float`, *optional*): in [0, 1] (server default 1.0).
        seed (`int`, *optional*): random seed; the seed used is returned either way.
        scheduler (`str`, *optional*): scheduler name, e.g. `"ddim"` or `"euler_a"`.
        num_images (`int`, *optional*): images per prompt (server default 1).
        preserve_unmasked (`bool`, *optional*):
            Paste the input's pixels back outside the mask (server default `True`).
    """

    prompt: str
    _: KW_ONLY
    negative_prompt: str | None = None
    image: ImageLike | None = None
    mask: MaskLike | None = None
    outpaint: Sequence[int] | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    num_images: int | None = None
    preserve_unmasked: bool | None = None


def encode_request(request: GenerationRequest, batched: bool = False) -> dict[str, Array]:
    """Validates a request and turns it into the pipeline model's input tensors.

    Args:
        request (`GenerationRequest`): the request to encode.
        batched (`bool`, *optional*, defaults to `False`):
            Prepend a batch dimension of 1 to every tensor (models with `max_batch_size > 0`).

    Returns:
        `dict[str, np.ndarray]`: input name to array, with the contract's dtypes and shapes;
        options left `None` are absent.
    """
    check_request(request)
    image = None if request.image is None else to_rgb_array(request.image)
    mask = None if request.mask is None else to_mask_array(request.mask)
    if mask is not None and image is not None and mask.shape != image.shape[:2]:
        raise InvalidRequestError(
            f"mask size {size_text(mask)} does not match image size {size_text(image)}"
        )
    tensors: dict[str, Array | None] = {
        PROMPT: _text(request.prompt),
        NEGATIVE_PROMPT: _text(request.negative_prompt),
        IMAGE: image,  # (H, W, 3) uint8
        MASK: mask,  # (H, W) uint8
        OUTPAINT: None if request.outpaint is None else np.array(request.outpaint, np.int32),
        HEIGHT: _scalar(request.height, np.int32),
        WIDTH: _scalar(request.width, np.int32),
        STEPS: _scalar(request.steps, np.int32),
        GUIDANCE_SCALE: _scalar(request.guidance_scale, np.float32),
        STRENGTH: _scalar(request.strength, np.float32),
        SEED: _scalar(request.seed, np.int64),
        SCHEDULER: _text(request.scheduler),
        NUM_IMAGES: _scalar(request.num_images, np.int32),
        PRESERVE_UNMASKED: _scalar(request.preserve_unmasked, np.bool_),
    }
    present = {name: array for name, array in tensors.items() if array is not None}
    return add_batch_dim(present) if batched else present


def add_batch_dim(tensors: dict[str, Array]) -> dict[str, Array]:
    """Prepends a batch dimension of 1 to every tensor (models with `max_batch_size > 0`)."""
    return {name: array[np.newaxis] for name, array in tensors.items()}


def check_request(request: GenerationRequest) -> None:
    """Checks every option but the image and mask arrays; raises `InvalidRequestError`."""
    if not isinstance(request.prompt, str):
        raise _bad_type("prompt", request.prompt, "a str")
    for name in ("negative_prompt", "scheduler"):
        value = getattr(request, name)
        if value is not None and not isinstance(value, str):
            raise _bad_type(name, value, "a str")
    if request.scheduler is not None and not request.scheduler.strip():
        raise InvalidRequestError(f"scheduler must not be blank, got {_quote(request.scheduler)}")
    for name in ("height", "width", "steps", "num_images"):
        _check_int(name, getattr(request, name), 1, _INT32_MAX)
    _check_int("seed", request.seed, _INT64_MIN, _INT64_MAX)
    _check_float("guidance_scale", request.guidance_scale)
    _check_float("strength", request.strength, 0.0, 1.0)
    if request.preserve_unmasked is not None and not isinstance(
        request.preserve_unmasked, (bool, np.bool_)
    ):
        raise _bad_type("preserve_unmasked", request.preserve_unmasked, "a bool")
    if request.mask is not None and request.image is None:
        raise InvalidRequestError("mask was given without an image to inpaint")
    if request.outpaint is not None:
        _check_outpaint(request)


def _check_outpaint(request: GenerationRequest) -> None:
    value = request.outpaint
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _bad_type("outpaint", value, "a sequence of 4 ints (left, top, right, bottom)")
    if len(value) != 4 or not all(_is_int(v) and 0 <= v <= _INT32_MAX for v in value):
        raise InvalidRequestError(
            f"outpaint must be 4 non-negative ints (left, top, right, bottom), got {_quote(value)}"
        )
    if request.image is None:
        raise InvalidRequestError(f"outpaint={_quote(value)} was given without an image to extend")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if value is None:
        return
    if not _is_int(value):
        raise _bad_type(name, value, "an int")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {_quote(value)}")


def _check_float(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> None:
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise _bad_type(name, value, "a float")
    if not math.isfinite(float(value)) or not low <= float(value) <= high:
        bounds = f" in [{low}, {high}]" if math.isfinite(low) else ""
        raise InvalidRequestError(f"{name} must be a finite number{bounds}, got {_quote(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _bad_type(name: str, value: Any, expected: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{name} must be {expected}, got {type(value).__name__}: {_quote(value)}"
    )


def _text(value: str | None) -> Array | None:
    return None if value is None else np.array([value.encode("utf-8")], dtype=np.object_)


def _scalar(value: Any, dtype: type[np.generic]) -> Array | None:
    return None if value is None else np.array([value], dtype=dtype)
