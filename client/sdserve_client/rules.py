"""The request rules, once: value ranges, default limits and the `limit_*` config parameters.

Both sides check requests against this one table: the server's `parse_request`
(`sdserve_pipeline.request`) on every wire request, and the SDK's `check_request` before
anything is sent (the web UI reads a model's limits with `limits_from_parameters` too). Pure
Python, no numpy, so the client package stays light and the server imports it as is.

A rule that fails raises `RequestError` naming the wire input, the bad value and what is
allowed, e.g. `steps: 0 out of range [1, 150]`; the server answers it as INVALID_ARG and the
SDK re-raises it as `InvalidRequestError`.

Limits are per model (its config's `limit_<field>` parameters). A caller that does not know
them passes `limits=None`: bounds set by a limit then fall back to the wire dtype's own, so
nothing a differently configured server would accept is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

INT32_MAX = 2**31 - 1
MAX_SEED = 2**63 - 1
FP32_MAX = 3.4028234663852886e38
"""Largest finite float32: the wire bound of FP32 inputs."""

DEFAULT_STEPS = 50
"""Denoising steps of a request that gives none (capped by `Limits.max_steps`)."""

DEFAULT_NUM_IMAGES = 1
"""Images per request that gives no `num_images`."""

LIMIT_PREFIX = "limit_"
"""Config parameter `limit_<field>` sets the `Limits` field `<field>`."""

SIDES = ("left", "top", "right", "bottom")
"""Order of the four `outpaint` values."""

SCHEDULERS_PARAMETER = "schedulers"
"""Pipeline config parameter: the scheduler names the model accepts, comma-separated (read by
`scheduler_names`); the server refuses any other, the web UI lists them."""

ADMIN_KEY_HEADER = "sdserve-admin-key"
"""HTTP header carrying the operator's key, which opens Triton's control APIs (model
repository, shared memory, statistics, trace, logging) on an sdserve server."""

GRPC_ADMIN_KEY_HEADER = "triton-grpc-protocol-" + ADMIN_KEY_HEADER
"""The same over gRPC: Triton's gRPC frontend expects restricted-protocol headers with the
`triton-grpc-protocol-` prefix."""


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
        max_pixels (`int`, *optional*, defaults to 1048576): pixels of an input or output image.
        max_steps (`int`, *optional*, defaults to 150): denoising steps.
        max_images (`int`, *optional*, defaults to 8): images per request.
        max_prompt_bytes (`int`, *optional*, defaults to 4096): UTF-8 bytes of a text input.
        max_guidance_scale (`float`, *optional*, defaults to 50.0): classifier-free guidance.
        max_outpaint (`int`, *optional*, defaults to 2048): pixels added to one side.
        max_canvas_pixels (`int`, *optional*, defaults to 16777216): pixels of an outpaint canvas.
    """

    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images: int = 8
    max_prompt_bytes: int = 4096
    max_guidance_scale: float = 50.0
    max_outpaint: int = 2048
    max_canvas_pixels: int = 4096 * 4096


DEFAULT_LIMITS = Limits()


def limit_parameter(field: str) -> str:
    """The config parameter name of a `Limits` field (`max_steps` → `limit_max_steps`)."""
    return f"{LIMIT_PREFIX}{field}"


def config_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """`parameters` of a Triton model config in its JSON form (`get_model_config(as_json=True)`,
    or the `model_config` a Python backend receives) → {key: string value}.

    JSON leaves out an empty `string_value`: such a parameter reads as "".
    """
    params = model_config.get("parameters", {})
    return {key: value.get("string_value", "") for key, value in params.items()}


def limit_parameters(limits: Limits) -> dict[str, str]:
    """`limits` as config parameters, {`limit_<field>`: value as text}."""
    return {limit_parameter(name): str(value) for name, value in asdict(limits).items()}


def limits_from_parameters(params: Mapping[str, str], *, strict: bool = True) -> Limits:
    """`Limits` from a pipeline config's parameters; a limit not set keeps its default.

    Args:
        params (`Mapping[str, str]`): config parameters, {key: string value}.
        strict (`bool`, *optional*, defaults to `True`):
            Raise `ValueError` naming the parameter when a value is not a number (the server,
            at load time); `False` keeps the default instead (a client reading any server).
    """
    values: dict[str, Any] = {}
    for f in fields(Limits):
        key = limit_parameter(f.name)
        if key not in params:
            continue
        kind = type(getattr(DEFAULT_LIMITS, f.name))
        try:
            values[f.name] = kind(params[key])
        except ValueError:
            if strict:
                raise ValueError(f"{key}: {params[key]!r} is not a valid {kind.__name__}") from None
    return Limits(**values)


def scheduler_names(text: str) -> tuple[str, ...]:
    """The names in a `schedulers` parameter value: comma-separated, blanks dropped, in lower
    case (requests are matched in lower case)."""
    names = (name.strip().lower() for name in text.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


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


# The table: every numeric input of the wire contract and what it allows.
RANGES: dict[str, Range] = {
    rule.name: rule
    for rule in (
        Range("height", 1, INT32_MAX, limit="max_pixels"),
        Range("width", 1, INT32_MAX, limit="max_pixels"),
        Range("steps", 1, INT32_MAX, limit="max_steps"),
        Range("num_images", 1, INT32_MAX, limit="max_images"),
        Range("guidance_scale", 0.0, FP32_MAX, limit="max_guidance_scale", integer=False),
        Range("strength", 0.0, 1.0, low_open=True, integer=False),
        Range("seed", 0, MAX_SEED),
        Range("outpaint", 0, INT32_MAX, limit="max_outpaint"),  # each of the four sides
    )
}


def check_range(name: str, value: float, limits: Limits | None) -> int | float:
    """Checks one numeric input against its `RANGES` rule; returns it as int or float.

    Args:
        name (`str`): a key of `RANGES`.
        value (`int` or `float`): the value given.
        limits (`Limits`, *optional*): the model's limits; `None` when unknown.
    """
    return RANGES[name].check(value, limits)


def seed_range(num_images: int) -> Range:
    """The seed rule of a request for `num_images` images (image i uses seed + i)."""
    seed = RANGES["seed"]
    return replace(seed, high=seed.high - num_images + 1)


def check_seed(seed: int, num_images: int) -> int:
    """Checks a seed so that the last image's seed (seed + num_images - 1) still fits int64."""
    return int(seed_range(num_images).check(seed, None))


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


def check_size_needs_no_image(name: str, has_image: bool) -> None:
    """`height` or `width` given: text-to-image only; with an image, outputs keep its size."""
    if has_image:
        raise RequestError(name, "applies to text-to-image only; outputs keep the image size")


def check_mask_has_image(has_image: bool) -> None:
    """A mask says where to regenerate an image: a mask given needs that image."""
    if not has_image:
        raise RequestError("mask", "given without an image")


def check_outpaint(
    values: Sequence[int], has_image: bool, limits: Limits | None
) -> tuple[int, int, int, int]:
    """Checks the four `outpaint` sides: an image to extend, each in range, one extended.

    Args:
        values (`Sequence[int]`): (left, top, right, bottom), four ints.
        has_image (`bool`): whether the request carries an image.
        limits (`Limits`, *optional*): the model's limits; `None` when unknown.

    Returns:
        `tuple[int, int, int, int]`: the sides as Python ints.
    """
    if not has_image:
        raise RequestError("outpaint", "needs an input image to extend")
    rule = RANGES["outpaint"]
    sides = [int(v) for v in values]
    if len(sides) != len(SIDES) or not all(rule.allows(v, limits) for v in sides) or not any(sides):
        raise RequestError(
            "outpaint",
            f"{sides} given; [{', '.join(SIDES)}] each in {rule.describe(limits)}"
            ", at least one > 0",
        )
    left, top, right, bottom = sides
    return left, top, right, bottom


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
