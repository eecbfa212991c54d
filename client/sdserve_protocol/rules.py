"""The request rules, once: value ranges, default limits, cross-input rules.

Both sides check requests against this one table, through the one decoder of the wire
contract (`sdserve_protocol.contract.decode_request`): the server on every wire request, the
SDK before anything is sent. Pure Python.

A rule that fails raises `RequestError` naming the wire input, the bad value and what is
allowed, e.g. `steps: 0 out of range [1, 150]`; the server answers it as INVALID_ARG and the
SDK re-raises it as `InvalidRequestError`.

Limits are per model (its config's `limit_<field>` parameters, `sdserve_protocol.settings`). A caller that does not know
them passes `limits=None`: bounds set by a limit then fall back to the wire dtype's own, so
nothing a differently configured server would accept is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

INT32_MAX = 2**31 - 1
MAX_SEED = 2**63 - 1
FP32_MAX = 3.4028234663852886e38
"""Largest finite float32: the wire bound of FP32 inputs."""

DEFAULT_STEPS = 50
"""Denoising steps of a request that gives none (capped by `Limits.max_steps`)."""

DEFAULT_NUM_IMAGES = 1
"""Images per request that gives no `num_images`."""

DEFAULT_GUIDANCE_SCALE = 7.5
"""Classifier-free guidance of a request that gives none."""

DEFAULT_IMG2IMG_STRENGTH = 0.8
"""Strength of an image-to-image request (an image, no mask) that gives none: diffusers'
`StableDiffusionImg2ImgPipeline` default."""

MAX_MASK_BLUR = 256
MAX_PREVIEW_EVERY = 1000  # steps between streamed previews (0: none)
"""Largest `mask_blur` radius in pixels (a Gaussian blur's cost grows with it)."""

MAX_ADAPTER_SCALE = 8.0
"""Largest |scale| of a LoRA adapter (`adapter_scales`); 0 turns an adapter off."""

DEFAULT_ADAPTER_SCALE = 1.0
"""Scale of each LoRA adapter of a request that gives no `adapter_scales`."""

MAX_PADDING_MASK_CROP = 65536
"""Largest `padding_mask_crop` in pixels (a padding must also be no larger than the image)."""

GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
"""Largest gRPC message tritonclient and Triton's gRPC frontend accept (both set INT32_MAX):
bounds a request's images and a response's `images` tensor."""

SIDES = ("left", "top", "right", "bottom")
"""Order of the four `outpaint` values."""


class RequestError(ValueError):
    """A request input that breaks a rule.

    Args:
        name (`str`): the wire input it concerns.
        message (`str`): what is wrong, with the bad value and what is allowed.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Per-model request limits, from the pipeline model's `limit_*` config parameters.

    Args:
        max_pixels (`int`, *optional*, defaults to 1048576): pixels of a generated image (an
            input image is generated at its own size, except with `padding_mask_crop`).
        max_input_pixels (`int`, *optional*, defaults to 12192768, a 4032x3024 phone photo):
            pixels of an input image and mask, whatever is generated from them.
        max_steps (`int`, *optional*, defaults to 150): denoising steps.
        max_images (`int`, *optional*, defaults to 8): images per request.
        max_prompt_bytes (`int`, *optional*, defaults to 4096): UTF-8 bytes of a text input.
        max_guidance_scale (`float`, *optional*, defaults to 50.0): classifier-free guidance.
        max_outpaint (`int`, *optional*, defaults to 2048): pixels added to one side.
        max_canvas_pixels (`int`, *optional*, defaults to 16777216): pixels of an outpaint canvas.
        max_prompt_chunks (`int`, *optional*, defaults to 4): text-encoder windows (75 tokens
            each) a long or weighted prompt may take, each of `prompt` and `negative_prompt`;
            TensorRT UNet engines are built for up to this many.
        max_clip_skip (`int`, *optional*, defaults to 0): text-encoder layers a request may skip
            (`clip_skip`); the export writes the checkpoint's layer count (12 for SD 1.5, 11 for
            SDXL), and the server refuses a larger value at load.
        max_adapters (`int`, *optional*, defaults to 4): LoRA adapters one request may name
            (`adapters`); each distinct adapter set is a weight variant the server builds.
    """

    max_pixels: int = 1024 * 1024
    max_input_pixels: int = 4032 * 3024
    max_steps: int = 150
    max_images: int = 8
    max_prompt_bytes: int = 4096
    max_guidance_scale: float = 50.0
    max_outpaint: int = 2048
    max_canvas_pixels: int = 4096 * 4096
    max_prompt_chunks: int = 4
    max_clip_skip: int = 0
    max_adapters: int = 4


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric input.

    Args:
        name (`str`): the wire input.
        low (`int` or `float`): the lowest allowed value.
        high (`int` or `float`): the highest allowed value by the wire dtype alone.
        limit (`str`, *optional*): the `Limits` field that lowers `high`, if any.
        low_open (`bool`, *optional*, defaults to `False`): `low` itself is not allowed.
        integer (`bool`, *optional*, defaults to `True`): whole numbers (else finite floats).
    """

    name: str
    low: int | float
    high: int | float
    limit: str | None = None
    low_open: bool = False
    integer: bool = True

    def bounds(self, limits: Limits | None) -> tuple[int | float, int | float]:
        """(low, high) under `limits`; `None` (limits unknown) keeps the wire bound."""
        high = self.high
        if self.limit is not None and limits is not None:
            high = min(high, getattr(limits, self.limit))
        if self.integer:
            return int(self.low), int(high)
        return float(self.low), float(high)

    def describe(self, limits: Limits | None) -> str:
        """The range as text: `[1, 150]`, `(0.0, 1.0]`."""
        low, high = self.bounds(limits)
        return f"{'(' if self.low_open else '['}{low}, {high}]"

    def allows(self, value: float, limits: Limits | None) -> bool:
        """Whether `value` is in range (NaN and infinities never are)."""
        low, high = self.bounds(limits)
        if not self.integer and not math.isfinite(value):
            return False
        return (low < value if self.low_open else low <= value) and value <= high

    def check(self, value: float, limits: Limits | None) -> int | float:
        """Returns `value` as int (or float); raises `RequestError` when out of range."""
        value = int(value) if self.integer else float(value)
        if not self.allows(value, limits):
            raise RequestError(self.name, f"{value} out of range {self.describe(limits)}")
        return value


def default_steps(limits: Limits) -> int:
    """Steps of a request that gives none: `DEFAULT_STEPS`, capped by the model's limit."""
    return min(DEFAULT_STEPS, limits.max_steps)


def check_strength(strength: float, steps: int | None, has_image: bool) -> None:
    """Relations of an in-range `strength`: below 1 needs an image and must leave a step.

    Args:
        strength (`float`): the strength, already within its range.
        steps (`int`, *optional*): the request's steps; `None` when not known (not checked).
        has_image (`bool`): whether the request carries an image.
    """
    if strength < 1.0 and not has_image:
        raise RequestError("strength", f"{strength} < 1 needs an input image to start from")
    if steps is not None and int(steps * strength) < 1:
        raise RequestError("strength", f"{strength} leaves no denoising step out of {steps}")


def check_text_bytes(name: str, size: int, limits: Limits | None) -> None:
    """Checks the UTF-8 length of a text input (`prompt`, `negative_prompt`, `scheduler`)."""
    if limits is not None and size > limits.max_prompt_bytes:
        raise RequestError(name, f"{size} bytes given, at most {limits.max_prompt_bytes}")


def check_pixels(name: str, height: int, width: int, limits: Limits | None) -> None:
    """Checks an image (or text-to-image output) size: not empty, at most `max_pixels`.

    Args:
        name (`str`): the input to name: `image`, `height` or `width`.
        height (`int`): rows.
        width (`int`): columns.
        limits (`Limits`, *optional*): the model's limits; `None` checks emptiness only.
    """
    if height < 1 or width < 1:
        raise RequestError(name, f"size {height}x{width} is empty")
    if limits is not None and height * width > limits.max_pixels:
        raise RequestError(
            name, f"size {height}x{width} = {height * width} pixels exceeds {limits.max_pixels}"
        )


def check_input_pixels(height: int, width: int, limits: Limits | None) -> None:
    """Checks the size of an input image (and its mask) against `max_input_pixels`."""
    if limits is not None and height * width > limits.max_input_pixels:
        raise RequestError(
            "image",
            f"size {height}x{width} = {height * width} pixels exceeds the input limit "
            f"{limits.max_input_pixels}",
        )


def check_message_bytes(height: int, width: int, num_images: int) -> None:
    """The response's `images` tensor, (num_images, height, width, 3) uint8, must fit one gRPC
    message (`GRPC_MAX_MESSAGE_BYTES`)."""
    size = num_images * height * width * 3
    if size > GRPC_MAX_MESSAGE_BYTES:
        raise RequestError(
            "num_images",
            f"{num_images} images of {height}x{width} are {size} bytes, over gRPC's message "
            f"limit of {GRPC_MAX_MESSAGE_BYTES} bytes",
        )


def check_mask_crop(
    padding: int, image_size: tuple[int, int] | None, has_mask: bool, outpainting: bool
) -> None:
    """Relations of `padding_mask_crop` (already >= 0): an inpainting request (an image and
    its mask), a padding no larger than the image.

    Args:
        padding (`int`): the crop's padding in pixels.
        image_size (`tuple[int, int]`, *optional*): the input image's (height, width).
        has_mask (`bool`): whether the request carries a mask.
        outpainting (`bool`): whether it carries `outpaint`.
    """
    name = "padding_mask_crop"
    if outpainting:
        raise RequestError(
            name, "applies to inpainting, not outpainting (outpainting already generates "
            "band by band at the model's size)",
        )  # fmt: skip
    if image_size is None or not has_mask:
        raise RequestError(
            name, "needs an image and its mask: it crops around the masked area (an image "
            "without a mask is image-to-image, generated whole)",
        )  # fmt: skip
    height, width = image_size
    if padding > max(height, width):
        raise RequestError(name, f"{padding} is larger than the image ({width}x{height})")


def check_size_needs_no_image(name: str, has_image: bool) -> None:
    """`height` or `width` given: text-to-image only; with an image, outputs keep its size."""
    if has_image:
        raise RequestError(name, "applies to text-to-image only; outputs keep the image size")


def check_mask_has_image(has_image: bool) -> None:
    """A mask says where to regenerate an image: a mask given needs that image."""
    if not has_image:
        raise RequestError("mask", "given without an image")


def check_adapters(
    names: Sequence[str], scales: Sequence[float] | None, limits: Limits | None
) -> tuple[tuple[str, float], ...]:
    """The (name, scale) pairs of a request's LoRA adapters (scales already each in range).

    Args:
        names (`Sequence[str]`): the `adapters` given, in order.
        scales (`Sequence[float]`, *optional*): `adapter_scales`, one per adapter; absent:
            `DEFAULT_ADAPTER_SCALE` each.
        limits (`Limits`, *optional*): the model's limits; `None` skips `max_adapters`.
    """
    if scales is not None and len(scales) != len(names):
        raise RequestError(
            "adapter_scales", f"{len(scales)} given for {len(names)} adapters: one per adapter"
        )
    if limits is not None and len(names) > limits.max_adapters:
        raise RequestError(
            "adapters", f"{len(names)} given, at most {limits.max_adapters} per request"
        )
    for name in names:
        if not name.strip():
            raise RequestError("adapters", "an empty adapter name")
    if len(set(names)) != len(names):
        raise RequestError("adapters", f"{list(names)} names an adapter twice")
    if scales is None:
        scales = [DEFAULT_ADAPTER_SCALE] * len(names)
    return tuple(zip(names, scales, strict=True))


def check_canvas(
    height: int, width: int, outpaint: Sequence[int], limits: Limits | None
) -> tuple[int, int]:
    """Checks the outpaint canvas (the image plus its extensions); returns its (height, width).

    Args:
        height (`int`): the input image's rows.
        width (`int`): the input image's columns.
        outpaint (`Sequence[int]`): checked (left, top, right, bottom) extensions.
        limits (`Limits`, *optional*): the model's limits; `None` skips the size cap.
    """
    left, top, right, bottom = outpaint
    canvas_h, canvas_w = height + top + bottom, width + left + right
    if limits is not None and canvas_h * canvas_w > limits.max_canvas_pixels:
        raise RequestError(
            "outpaint",
            f"canvas {canvas_h}x{canvas_w} = {canvas_h * canvas_w} pixels exceeds "
            f"{limits.max_canvas_pixels}",
        )
    return canvas_h, canvas_w
