"""The wire contract of the pipeline model (README.md, "Wire contract"), declared once.

Each input is declared here with its dtype, dims, default and range rule; the pipeline's
Triton config is generated from these declarations, the SDK encodes requests from them, and
`decode_request` checks and decodes a request in one pass over them, then applies the rules
that relate inputs to each other. The server decodes every wire request with it; the SDK runs
the same decoder on the tensors it is about to send, so both refuse a request alike, with the
same message.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from .rules import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMG2IMG_STRENGTH,
    DEFAULT_NUM_IMAGES,
    DEFAULT_STEPS,
    FP32_MAX,
    INT32_MAX,
    MAX_ADAPTER_SCALE,
    MAX_MASK_BLUR,
    MAX_PADDING_MASK_CROP,
    MAX_PREVIEW_EVERY,
    MAX_SEED,
    SIDES,
    Limits,
    Range,
    RequestError,
    check_adapters,
    check_canvas,
    check_input_pixels,
    check_mask_crop,
    check_mask_has_image,
    check_message_bytes,
    check_pixels,
    check_size_needs_no_image,
    check_strength,
    check_text_bytes,
    default_steps,
)

Array = npt.NDArray[Any]

NUMPY_DTYPES: dict[str, type] = {
    "BYTES": np.object_,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class WireTensor:
    """A tensor of the wire contract; -1 marks a variable dim."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]


@dataclass(frozen=True)
class WireInput(WireTensor):
    """An input of the wire contract.

    Args:
        required (`bool`): the request must carry it.
        default (`Any`): its value when absent; `None` when that depends on the model or the
            rest of the request (see `decode_request`).
        rule (`Range`, *optional*): the allowed values of a numeric input (of each element of
            `outpaint`).
    """

    required: bool = False
    default: Any = None
    rule: Range | None = None


INPUTS: tuple[WireInput, ...] = (
    WireInput("prompt", "BYTES", (1,), required=True),
    WireInput("negative_prompt", "BYTES", (1,), default=""),
    WireInput("image", "UINT8", (-1, -1, 3)),
    WireInput("mask", "UINT8", (-1, -1)),
    WireInput("outpaint", "INT32", (4,), rule=Range("outpaint", 0, INT32_MAX, "max_outpaint")),
    WireInput("height", "INT32", (1,), rule=Range("height", 1, INT32_MAX, "max_pixels")),
    WireInput("width", "INT32", (1,), rule=Range("width", 1, INT32_MAX, "max_pixels")),
    WireInput("steps", "INT32", (1,), default=DEFAULT_STEPS,
              rule=Range("steps", 1, INT32_MAX, "max_steps")),
    WireInput("guidance_scale", "FP32", (1,), default=DEFAULT_GUIDANCE_SCALE,
              rule=Range("guidance_scale", 0.0, FP32_MAX, "max_guidance_scale", integer=False)),
    WireInput("strength", "FP32", (1,), default=1.0,
              rule=Range("strength", 0.0, 1.0, low_open=True, integer=False)),
    WireInput("seed", "INT64", (1,), rule=Range("seed", 0, MAX_SEED)),
    WireInput("scheduler", "BYTES", (1,)),
    WireInput("num_images", "INT32", (1,), default=DEFAULT_NUM_IMAGES,
              rule=Range("num_images", 1, INT32_MAX, "max_images")),
    WireInput("preserve_unmasked", "BOOL", (1,), default=True),
    WireInput("mask_blur", "INT32", (1,), default=0,
              rule=Range("mask_blur", 0, MAX_MASK_BLUR)),
    WireInput("preview_every", "INT32", (1,), default=0,
              rule=Range("preview_every", 0, MAX_PREVIEW_EVERY)),
    WireInput("prompt_weighting", "BOOL", (1,), default=False),
    WireInput("padding_mask_crop", "INT32", (1,),
              rule=Range("padding_mask_crop", 0, MAX_PADDING_MASK_CROP)),
    WireInput("clip_skip", "INT32", (1,), default=0,
              rule=Range("clip_skip", 0, INT32_MAX, "max_clip_skip")),
    WireInput("adapters", "BYTES", (-1,)),
    WireInput("adapter_scales", "FP32", (-1,),
              rule=Range("adapter_scales", -MAX_ADAPTER_SCALE, MAX_ADAPTER_SCALE, integer=False)),
)  # fmt: skip
LIST_INPUTS = frozenset({"adapters", "adapter_scales"})
"""Inputs of one value per item (k items), not one value."""
OUTPUTS: tuple[WireTensor, ...] = (
    WireTensor("images", "UINT8", (-1, -1, -1, 3)),
    WireTensor("seeds", "INT64", (-1,)),
)
IMAGES, SEEDS = OUTPUTS
INPUTS_BY_NAME: dict[str, WireInput] = {t.name: t for t in INPUTS}
RANGES: dict[str, Range] = {t.name: t.rule for t in INPUTS if t.rule is not None}
"""The range rule of every numeric input, by name."""


@dataclass(frozen=True)
class MaskCrop:
    """Where the generated crop of a `padding_mask_crop` request goes back.

    Args:
        box: (x1, y1, x2, y2) of the crop on the image (diffusers' `get_crop_region`).
        image: (H, W, 3) uint8, the image as sent.
        overlay_mask: (H, W) uint8, the mask as diffusers sees it (blurred by `mask_blur`):
            what the paste-back (diffusers' `apply_overlay`) blends with.
        keep_mask: (H, W) uint8, the mask as sent: with `preserve_unmasked`, every pixel
            outside it is the input's.
    """

    box: tuple[int, int, int, int]
    image: Array = field(repr=False)
    overlay_mask: Array = field(repr=False)
    keep_mask: Array = field(repr=False)

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) of the box."""
        x1, y1, x2, y2 = self.box
        return slice(y1, y2), slice(x1, x2)


@dataclass(frozen=True)
class GenerationParams:
    """One decoded, valid generation request.

    Args:
        prompt: text to condition on.
        height: generated height: the output's (the canvas's when outpainting), except with
            `padding_mask_crop`, where the crop is generated at this size and the output keeps
            the image's; 0 when the decoder did not know the model's default size.
        width: generated width (likewise).
        seed: seed of the first image; image i uses seed + i.
        negative_prompt: text for the unconditional branch.
        image: (H, W, 3) uint8 RGB, or None for text-to-image.
        mask: (H, W) uint8, >= 128 regenerates; None for text-to-image, outpainting without
            a mask of the original, and image-to-image (an image without a mask).
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale; <= 1 disables CFG.
        strength: how much of the image to destroy (1.0: start from pure noise).
        scheduler: scheduler name (lower case), or None for the checkpoint's own.
        num_images: images per request.
        preserve_unmasked: paste input pixels back outside the mask.
        outpaint: pixels added (left, top, right, bottom), or None.
        mask_blur: Gaussian blur radius in pixels applied to the mask before it is used
            (diffusers' `VaeImageProcessor.blur`); 0: none.
        preview_every: a streamed request gets a preview every this many steps (0: none);
            a unary call ignores it.
        prompt_weighting: read `prompt` and `negative_prompt` in compel's weighting syntax
            (`(word)1.3`, `word++`, `(a, b).blend(...)`); off, parentheses are plain text.
            Prompts longer than one text-encoder window are chunked either way.
        padding_mask_crop: inpaint only the masked area (diffusers' `padding_mask_crop`): the
            box around the mask plus this padding, widened to the aspect of height x width, is
            generated at height x width and pasted back; None: the whole image.
        crop: set by the server when it crops (`sdserve_pipeline.crop`): `image`, `mask`,
            `height` and `width` are then the crop's, as generated; None before or without.
        clip_skip: text-encoder layers to skip for the prompt (diffusers' `clip_skip`; the
            negative prompt keeps the default layer, as in diffusers); 0: none.
        adapters: LoRA adapters and their scales, in the request's order; empty: the base
            weights.
    """

    prompt: str
    height: int
    width: int
    seed: int
    negative_prompt: str = ""
    image: Array | None = field(default=None, repr=False)
    mask: Array | None = field(default=None, repr=False)
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    strength: float = 1.0
    scheduler: str | None = None
    num_images: int = DEFAULT_NUM_IMAGES
    preserve_unmasked: bool = True
    outpaint: tuple[int, int, int, int] | None = None
    mask_blur: int = 0
    preview_every: int = 0
    prompt_weighting: bool = False
    padding_mask_crop: int | None = None
    crop: MaskCrop | None = None
    clip_skip: int = 0
    adapters: tuple[tuple[str, float], ...] = ()

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


def decode_request(
    inputs: Mapping[str, Array],
    limits: Limits | None,
    *,
    default_size: int | None = None,
    default_strength: float = 1.0,
    schedulers: Sequence[str] | None = None,
) -> GenerationParams:
    """Checks every input of a request and decodes it; raises `RequestError` on the first
    broken rule, naming the input, the bad value and what is allowed.

    Args:
        inputs: wire input name → array, batch dimension already removed.
        limits: the model's limits; `None` (a client that does not know them) checks only
            what holds for every model.
        default_size: text-to-image side when height/width are absent; `None` when unknown
            (such a side is then not checked and decodes as 0).
        default_strength: strength of an inpainting or outpainting request that gives none
            (text-to-image always starts from pure noise: 1.0; image-to-image, an image without
            a mask, defaults to `DEFAULT_IMG2IMG_STRENGTH`).
        schedulers: the scheduler names the model accepts, in lower case; `None`: unknown,
            not checked.
    """
    for name, array in inputs.items():
        _check_wire(name, array)
    values: dict[str, Any] = {}
    for spec in INPUTS:  # one pass over the declarations: each input alone
        if spec.name in inputs:
            values[spec.name] = _decode(spec, inputs[spec.name], limits)
        elif spec.required:
            raise RequestError(spec.name, "is required")
    return _relate(values, limits, default_size, default_strength, schedulers)


def check_seed(seed: int, num_images: int) -> int:
    """Checks a seed so that the last image's seed (seed + num_images - 1) still fits int64."""
    rule = RANGES["seed"]
    return int(replace(rule, high=rule.high - num_images + 1).check(seed, None))


def _check_wire(name: str, array: Array) -> None:
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


def _decode(spec: WireInput, array: Array, limits: Limits | None) -> Any:
    """One input alone, of the declared dtype and dims: its value, checked against its rule."""
    if spec.name in LIST_INPUTS:
        if spec.dtype == "BYTES":
            return [_text(spec.name, item, limits) for item in array.tolist()]
        assert spec.rule is not None
        return [spec.rule.check(v, limits) for v in array.tolist()]
    if spec.dtype == "BYTES":
        return _text(spec.name, array[0], limits)
    if spec.name == "outpaint":
        return _sides(spec, [int(v) for v in array.tolist()], limits)
    if spec.name == "seed":
        return int(array[0])  # its range depends on num_images: checked with it (`check_seed`)
    if spec.rule is not None:
        return spec.rule.check(array[0], limits)
    if spec.dtype == "BOOL":
        return bool(array[0])
    return array  # image, mask


def _text(name: str, raw: Any, limits: Limits | None) -> str:
    if not isinstance(raw, bytes):  # str items from in-process callers
        try:
            raw = str(raw).encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(name, f"is not valid Unicode ({err.reason})") from None
    check_text_bytes(name, len(raw), limits)
    try:
        return str(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RequestError(name, f"is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _sides(spec: WireInput, sides: list[int], limits: Limits | None) -> tuple[int, int, int, int]:
    """The four `outpaint` sides: each in range, at least one extended."""
    rule = spec.rule
    assert rule is not None
    if not all(rule.allows(v, limits) for v in sides) or not any(sides):
        raise RequestError(
            spec.name,
            f"{sides} given; [{', '.join(SIDES)}] each in {rule.describe(limits)}"
            ", at least one > 0",
        )
    left, top, right, bottom = sides
    return left, top, right, bottom


def _relate(
    values: dict[str, Any],
    limits: Limits | None,
    default_size: int | None,
    default_strength: float,
    schedulers: Sequence[str] | None,
) -> GenerationParams:
    """The rules between inputs, once each input is valid alone."""
    image, mask, outpaint = values.get("image"), values.get("mask"), values.get("outpaint")
    if mask is not None:
        check_mask_has_image(has_image=image is not None)
    if outpaint is not None and image is None:
        raise RequestError("outpaint", "needs an input image to extend")
    crop = values.get("padding_mask_crop")
    if crop is not None:
        size = None if image is None else (int(image.shape[0]), int(image.shape[1]))
        check_mask_crop(crop, size, mask is not None, outpaint is not None)
    for name in ("height", "width"):
        if name in values and crop is None:  # with a crop: the size the crop is generated at
            check_size_needs_no_image(name, has_image=image is not None)
    height: int | None
    width: int | None
    if image is not None:
        height, width = int(image.shape[0]), int(image.shape[1])
        if crop is None:  # generated at its own size
            check_pixels("image", height, width, limits)
        check_input_pixels(height, width, limits)
        if mask is not None and mask.shape != (height, width):
            raise RequestError(
                "mask", f"size {list(mask.shape)} differs from image size {[height, width]}"
            )
        if crop is not None:
            _check_crop_mask(mask)
            check_message_bytes(height, width, values.get("num_images", DEFAULT_NUM_IMAGES))
            height, width = (values.get(n, default_size) for n in ("height", "width"))
            if height is not None and width is not None:
                check_pixels("height" if "height" in values else "width", height, width, limits)
    else:
        height, width = (values.get(n, default_size) for n in ("height", "width"))
        if height is not None and width is not None:
            check_pixels("height" if "height" in values else "width", height, width, limits)
    if outpaint is not None and height is not None and width is not None:
        height, width = check_canvas(height, width, outpaint, limits)
    if height is not None and width is not None:
        check_message_bytes(height, width, values.get("num_images", DEFAULT_NUM_IMAGES))
    steps_known = "steps" in values or limits is not None
    steps = values.get("steps", DEFAULT_STEPS if limits is None else default_steps(limits))
    num_images = values.get("num_images", DEFAULT_NUM_IMAGES)
    if image is None:
        strength_default = 1.0  # text-to-image starts from pure noise
    elif mask is None and outpaint is None:
        strength_default = DEFAULT_IMG2IMG_STRENGTH  # image to image
    else:
        strength_default = default_strength
    strength = values.get("strength", strength_default)
    check_strength(strength, steps if steps_known else None, has_image=image is not None)
    if "seed" in values:
        seed = check_seed(values["seed"], num_images)
    else:
        seed = secrets.randbelow(MAX_SEED - num_images + 1)
    mask_blur = values.get("mask_blur", 0)
    if mask_blur and (mask is None or outpaint is not None):
        raise RequestError("mask_blur", "applies to inpainting: an image and its mask")
    scheduler = values.get("scheduler")
    if scheduler is not None:
        scheduler = scheduler.strip().lower()
        if schedulers is not None and scheduler not in schedulers:
            raise RequestError(
                "scheduler",
                f"{scheduler!r} is unknown to this model; valid: {', '.join(schedulers)}",
            )
    defaults = {n: INPUTS_BY_NAME[n].default for n in ("negative_prompt", "guidance_scale")}
    return GenerationParams(
        prompt=values["prompt"],
        negative_prompt=values.get("negative_prompt", defaults["negative_prompt"]),
        image=image, mask=mask, outpaint=outpaint,
        height=height or 0, width=width or 0,
        steps=steps, guidance_scale=values.get("guidance_scale", defaults["guidance_scale"]),
        strength=strength, seed=seed, scheduler=scheduler, num_images=num_images,
        preserve_unmasked=values.get("preserve_unmasked", True), mask_blur=mask_blur,
        preview_every=values.get("preview_every", 0),
        prompt_weighting=values.get("prompt_weighting", False),
        padding_mask_crop=crop,
        clip_skip=values.get("clip_skip", 0),
        adapters=_adapters(values, limits),
    )  # fmt: skip


def _adapters(values: dict[str, Any], limits: Limits | None) -> tuple[tuple[str, float], ...]:
    names, scales = values.get("adapters"), values.get("adapter_scales")
    if names is None:
        if scales is not None:
            raise RequestError("adapter_scales", "given without adapters")
        return ()
    return check_adapters([n.strip() for n in names], scales, limits)


def _check_crop_mask(mask: Array | None) -> None:
    """`padding_mask_crop` crops around the mask's non-zero pixels: there must be some."""
    if mask is not None and not mask.any():
        raise RequestError("mask", "is empty (all 0): padding_mask_crop crops around the mask")
