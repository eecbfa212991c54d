"""The request dataclass and its encoding into the pipeline model's input tensors."""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sdserve_protocol.contract import INPUTS, WireInput, decode_request
from sdserve_protocol.rules import SIDES, Limits, RequestError

from .errors import InvalidRequestError
from .images import ImageLike, MaskLike, to_mask_array, to_rgb_array

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
            Input image, any PIL mode or uint8 (H, W, 3). Absent: text-to-image; without a
            mask or `outpaint`: image-to-image.
        mask (`PIL.Image.Image` or `np.ndarray`, *optional*):
            Same size as `image`; white (255) is regenerated, black (0) kept.
        outpaint (`Sequence[int]`, *optional*): pixels to add (left, top, right, bottom).
        height (`int`, *optional*): text-to-image height in pixels; with `padding_mask_crop`,
            the height the crop is generated at (server default: the model's size).
        width (`int`, *optional*): likewise, the width.
        steps (`int`, *optional*): number of denoising steps.
        guidance_scale (`float`, *optional*): classifier-free guidance scale (server default 7.5).
        strength (`float`, *optional*): in (0, 1]: how much of the image to destroy first
            (server default 1.0; image-to-image 0.8).
        seed (`int`, *optional*): random seed; the seed used is returned either way.
        scheduler (`str`, *optional*): scheduler name, e.g. `"ddim"` or `"euler_a"`.
        num_images (`int`, *optional*): images per prompt (server default 1).
        preserve_unmasked (`bool`, *optional*):
            Paste the input's pixels back outside the mask (server default `True`).
        mask_blur (`int`, *optional*):
            Gaussian blur radius in pixels applied to the mask before inpainting, as
            diffusers' `VaeImageProcessor.blur` (server default 0: none). Inpainting only.
        preview_every (`int`, *optional*):
            Streamed requests (`SdserveClient.stream`): a preview every this many steps
            (server default 0: none). A unary call ignores it.
        prompt_weighting (`bool`, *optional*):
            Read `prompt` and `negative_prompt` in compel's weighting syntax, e.g.
            `"a (red)1.3 bicycle++"` (server default `False`: parentheses are plain text).
            Prompts over 75 tokens are encoded in chunks either way.
        padding_mask_crop (`int`, *optional*):
            Inpaint only the masked area, as diffusers' `padding_mask_crop`: the box around
            the mask plus this many pixels, widened to the aspect of height x width, is
            generated at that size and pasted back into the image, which keeps its size
            (absent: the whole image is generated). Inpainting only.
        clip_skip (`int`, *optional*):
            Text-encoder layers to skip for the prompt, as diffusers' `clip_skip` (server
            default 0: none; at most the model's `limit_max_clip_skip`, its layer count).
        adapters (`Sequence[str]`, *optional*):
            LoRA adapters to generate with, by name (files in the server's adapter folder;
            `InpaintClient.list_adapters()` lists them); absent: the base weights.
        adapter_scales (`Sequence[float]`, *optional*):
            One scale per adapter, as diffusers' `set_adapters(..., adapter_weights=...)`
            (server default 1.0 each).
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
    mask_blur: int | None = None
    preview_every: int | None = None
    prompt_weighting: bool | None = None
    padding_mask_crop: int | None = None
    clip_skip: int | None = None
    adapters: Sequence[str] | None = None
    adapter_scales: Sequence[float] | None = None


def encode_request(
    request: GenerationRequest, batched: bool = False, *, limits: Limits | None = None
) -> dict[str, Array]:
    """Validates a request and turns it into the pipeline model's input tensors.

    Args:
        request (`GenerationRequest`): the request to encode.
        batched (`bool`, *optional*, defaults to `False`):
            Prepend a batch dimension of 1 to every tensor (models with `max_batch_size > 0`).
        limits (`Limits`, *optional*):
            The model's limits when known (`PipelineSettings.from_parameters(...).limits`);
            `None` checks only what holds for every model.

    Returns:
        `dict[str, np.ndarray]`: input name to array, with the contract's dtypes and shapes;
        options left `None` are absent.

    Raises:
        InvalidRequestError: a field of the wrong Python type, or a request the server would
            refuse (the same decoder, `sdserve_protocol.contract.decode_request`, checks it).
    """
    _check_types(request)
    tensors: dict[str, Array] = {}
    with _sdk_errors():
        for spec in INPUTS:  # the request's fields are named as the wire inputs
            value = getattr(request, spec.name)
            if value is not None:
                tensors[spec.name] = _encode(spec, value, limits)
    check_tensors(tensors, limits)
    return add_batch_dim(tensors) if batched else tensors


def add_batch_dim(tensors: dict[str, Array]) -> dict[str, Array]:
    """Prepends a batch dimension of 1 to every tensor (models with `max_batch_size > 0`)."""
    return {name: array[np.newaxis] for name, array in tensors.items()}


def check_tensors(
    tensors: Mapping[str, Array],
    limits: Limits | None,
    schedulers: Sequence[str] | None = None,
) -> None:
    """Checks encoded tensors (no batch dim) as the server will; raises `InvalidRequestError`.

    Args:
        tensors (`Mapping[str, np.ndarray]`): `encode_request`'s output, unbatched.
        limits (`Limits`, *optional*): the model's limits; `None` when unknown.
        schedulers (`Sequence[str]`, *optional*): the model's scheduler names; `None` when
            unknown.
    """
    with _sdk_errors():
        decode_request(tensors, limits, schedulers=schedulers)


def _encode(spec: WireInput, value: Any, limits: Limits | None) -> Array:
    """One field as its wire tensor, (1,)-shaped unless the contract says otherwise."""
    if spec.name == "image":
        return to_rgb_array(value)
    if spec.name == "mask":
        return to_mask_array(value)
    if spec.name == "adapters":
        return np.array([_utf8(spec.name, v) for v in value], dtype=np.object_)
    if spec.dtype == "BYTES":
        return np.array([_utf8(spec.name, value)], dtype=np.object_)
    values = list(value) if spec.name in ("outpaint", "adapter_scales") else [value]
    if spec.rule is not None and spec.rule.integer:
        info: Any = np.iinfo(spec.numpy_dtype)  # type: ignore[type-var]
        for v in values:  # a value the dtype cannot hold is out of the input's range
            if not info.min <= v <= info.max:
                spec.rule.check(v, limits)
    with np.errstate(over="ignore"):  # FP32: huge values become inf, refused by the decoder
        return np.array(values, dtype=spec.numpy_dtype)


@contextmanager
def _sdk_errors() -> Iterator[None]:
    """Re-raises a broken rule (`RequestError`) as the SDK's `InvalidRequestError`."""
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
    for name in ("height", "width", "steps", "num_images", "seed", "mask_blur",
                 "preview_every", "padding_mask_crop", "clip_skip"):  # fmt: skip
        value = getattr(request, name)
        if value is not None and not _is_int(value):
            raise _bad_type(name, value, "an int")
    for name in ("guidance_scale", "strength"):
        value = getattr(request, name)
        if value is not None and not _is_real(value):
            raise _bad_type(name, value, "a float")
    for name in ("preserve_unmasked", "prompt_weighting"):
        value = getattr(request, name)
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise _bad_type(name, value, "a bool")
    if request.outpaint is not None:
        _check_outpaint_type(request.outpaint)
    if request.adapters is not None and (
        isinstance(request.adapters, (str, bytes))
        or not all(isinstance(a, str) for a in request.adapters)
    ):
        raise _bad_type("adapters", request.adapters, "a sequence of str")
    if request.adapter_scales is not None and (
        isinstance(request.adapter_scales, (str, bytes))
        or not all(_is_real(s) for s in request.adapter_scales)
    ):
        raise _bad_type("adapter_scales", request.adapter_scales, "a sequence of float")


def _check_outpaint_type(value: Any) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _bad_type("outpaint", value, "a sequence of 4 ints (left, top, right, bottom)")
    if len(value) != len(SIDES) or not all(_is_int(v) for v in value):
        raise InvalidRequestError(
            f"outpaint must be 4 ints (left, top, right, bottom), got {_quote(value)}"
        )


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
