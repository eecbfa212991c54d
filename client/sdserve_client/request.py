"""The request dataclass and its encoding into the pipeline model's input tensors."""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import rules
from .errors import InvalidRequestError
from .images import ImageLike, MaskLike, size_text, to_mask_array, to_rgb_array
from .rules import Limits, RequestError

# Tensor names of the pipeline model's wire contract (README.md, "Wire contract"). The server
# declares them again, with dtypes and dims, in `sdserve_pipeline.contract`; a test compares both.
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


def encode_request(
    request: GenerationRequest, batched: bool = False, *, limits: Limits | None = None
) -> dict[str, Array]:
    """Validates a request and turns it into the pipeline model's input tensors.

    Args:
        request (`GenerationRequest`): the request to encode.
        batched (`bool`, *optional*, defaults to `False`):
            Prepend a batch dimension of 1 to every tensor (models with `max_batch_size > 0`).
        limits (`Limits`, *optional*):
            The model's limits when known (`rules.limits_from_parameters` of its config);
            `None` checks only what holds for every model.

    Returns:
        `dict[str, np.ndarray]`: input name to array, with the contract's dtypes and shapes;
        options left `None` are absent.
    """
    check_request(request, limits)
    image = None if request.image is None else to_rgb_array(request.image)
    mask = None if request.mask is None else to_mask_array(request.mask)
    if mask is not None and image is not None and mask.shape != image.shape[:2]:
        raise InvalidRequestError(
            f"mask size {size_text(mask)} does not match image size {size_text(image)}"
        )
    if image is not None:
        with _sdk_errors():
            _check_image_size(_image_size(image), request.outpaint, limits)
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


def check_request(
    request: GenerationRequest, limits: Limits | None = None, *, image: Array | None = None
) -> None:
    """Checks every option (and, given `image`, its size); raises `InvalidRequestError`.

    Python types are checked here; values by the rule table the server checks wire requests
    with (`sdserve_client.rules`), so both refuse a value alike, with the same message. Rules
    the client cannot evaluate (the model's scheduler names, its default size) are left to
    the server.

    Args:
        request (`GenerationRequest`): the request to check.
        limits (`Limits`, *optional*):
            The model's limits when known; `None` checks only what holds for every model.
        image (`np.ndarray`, *optional*):
            The request's image as `encode_request` made it, (H, W, 3): its size and its
            outpaint canvas are checked too (against `max_pixels`, `max_canvas_pixels`).
    """
    _check_types(request)
    with _sdk_errors():
        _check_texts(request, limits)
        _check_values(request, limits, None if image is None else _image_size(image))


@contextmanager
def _sdk_errors() -> Iterator[None]:
    """Re-raises a broken rule (`rules.RequestError`) as the SDK's `InvalidRequestError`."""
    try:
        yield
    except RequestError as err:
        raise InvalidRequestError(str(err)) from None


def _check_types(request: GenerationRequest) -> None:
    if not isinstance(request.prompt, str):
        raise _bad_type("prompt", request.prompt, "a str")
    for name in ("negative_prompt", "scheduler"):
        value = getattr(request, name)
        if value is not None and not isinstance(value, str):
            raise _bad_type(name, value, "a str")
    if request.scheduler is not None and not request.scheduler.strip():
        raise InvalidRequestError(f"scheduler must not be blank, got {_quote(request.scheduler)}")
    for name in ("height", "width", "steps", "num_images", "seed"):
        value = getattr(request, name)
        if value is not None and not _is_int(value):
            raise _bad_type(name, value, "an int")
    for name in ("guidance_scale", "strength"):
        value = getattr(request, name)
        if value is not None and not _is_real(value):
            raise _bad_type(name, value, "a float")
    if request.preserve_unmasked is not None and not isinstance(
        request.preserve_unmasked, (bool, np.bool_)
    ):
        raise _bad_type("preserve_unmasked", request.preserve_unmasked, "a bool")
    if request.outpaint is not None:
        _check_outpaint_type(request.outpaint)


def _check_outpaint_type(value: Any) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _bad_type("outpaint", value, "a sequence of 4 ints (left, top, right, bottom)")
    if len(value) != len(rules.SIDES) or not all(_is_int(v) for v in value):
        raise InvalidRequestError(
            f"outpaint must be 4 ints (left, top, right, bottom), got {_quote(value)}"
        )


def _check_texts(request: GenerationRequest, limits: Limits | None) -> None:
    for name in (PROMPT, NEGATIVE_PROMPT, SCHEDULER):
        value = getattr(request, name)
        if value is not None:
            rules.check_text_bytes(name, len(_utf8(name, value)), limits)


def _check_values(
    request: GenerationRequest, limits: Limits | None, image_size: tuple[int, int] | None
) -> None:
    """The shared rules, in the order the server applies them."""
    has_image = request.image is not None
    if request.outpaint is not None:
        rules.check_outpaint(request.outpaint, has_image, limits)
    if request.mask is not None:
        rules.check_mask_has_image(has_image)
    if image_size is not None:
        _check_image_size(image_size, request.outpaint, limits)
    _check_output_size(request, limits)
    for name in (STEPS, NUM_IMAGES):
        if getattr(request, name) is not None:
            rules.check_range(name, getattr(request, name), limits)
    for name in (GUIDANCE_SCALE, STRENGTH):
        if getattr(request, name) is not None:
            rules.check_range(name, _as_sent(getattr(request, name)), limits)
    if request.strength is not None:
        steps = request.steps
        if steps is None and limits is not None:
            steps = rules.default_steps(limits)
        rules.check_strength(_as_sent(request.strength), steps, has_image)
    if request.seed is not None:
        num_images = rules.DEFAULT_NUM_IMAGES if request.num_images is None else request.num_images
        rules.check_seed(request.seed, num_images)


def _check_output_size(request: GenerationRequest, limits: Limits | None) -> None:
    """`height` and `width`: text-to-image only, each in range, together within `max_pixels`."""
    for name in (HEIGHT, WIDTH):
        if getattr(request, name) is not None:
            rules.check_size_needs_no_image(name, request.image is not None)
            rules.check_range(name, getattr(request, name), limits)
    if request.height is not None and request.width is not None:
        rules.check_pixels(HEIGHT, request.height, request.width, limits)


def _image_size(image: Array) -> tuple[int, int]:
    """(height, width) of an (H, W, 3) image array."""
    return int(image.shape[0]), int(image.shape[1])


def _check_image_size(
    size: tuple[int, int], outpaint: Sequence[int] | None, limits: Limits | None
) -> None:
    """The size rules of an input image (and its outpaint canvas), once its array is known."""
    rules.check_pixels(IMAGE, *size, limits)
    if outpaint is not None:
        rules.check_canvas(*size, [int(v) for v in outpaint], limits)


def _as_sent(value: float) -> float:
    """An FP32 input as the server will read it: rounded to float32 (huge values become inf)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _utf8(name: str, value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(name, f"is not valid Unicode ({err.reason})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _bad_type(name: str, value: Any, expected: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{name} must be {expected}, got {type(value).__name__}: {_quote(value)}"
    )


def _text(value: str | None) -> Array | None:
    return None if value is None else np.array([value.encode("utf-8")], dtype=np.object_)


def _scalar(value: Any, dtype: type[np.generic]) -> Array | None:
    return None if value is None else np.array([value], dtype=dtype)
