"""One rule table (`sdserve_protocol`) behind both the SDK and the server checks.

Each case is one set of request fields, sent through the SDK's `encode_request` (which raises
`InvalidRequestError`) and, as wire tensors, through the server's decoder `decode_request`
(which raises `RequestError`): both must give the same verdict, word for word. The range cases
are generated from the table itself, at both ends of every range: a value just outside is
refused with the table's message by both sides, a value just inside is refused by neither for
its range.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from sdserve_client import GenerationRequest, InvalidRequestError, encode_request
from sdserve_client.webui import server_info
from sdserve_protocol import rules
from sdserve_protocol.contract import INPUTS_BY_NAME, RANGES, decode_request
from sdserve_protocol.rules import Limits, Range, RequestError

LIMITS = Limits(
    max_pixels=64 * 64, max_steps=100, max_images=4, max_prompt_bytes=64,
    max_guidance_scale=20.0, max_outpaint=32, max_canvas_pixels=48 * 48,
)  # fmt: skip
DEFAULT_SIZE = 16


def rgb(height: int = 8, width: int = 8) -> np.ndarray:
    return np.zeros((height, width, 3), np.uint8)


def white(height: int = 8, width: int = 8) -> np.ndarray:
    return np.full((height, width), 255, np.uint8)


def wire_of(fields: dict[str, Any]) -> dict[str, np.ndarray]:
    """The request fields as the server receives them: contract dtypes, no batch dim."""
    tensors = {}
    for name, value in fields.items():
        dtype = INPUTS_BY_NAME[name].numpy_dtype
        if isinstance(value, str):
            tensors[name] = np.array([value.encode()], dtype=np.object_)
        elif isinstance(value, np.ndarray):
            tensors[name] = value
        elif isinstance(value, list | tuple):  # outpaint, adapters, adapter_scales
            items = [v.encode() if isinstance(v, str) else v for v in value]
            tensors[name] = np.array(items, dtype=dtype)
        else:
            tensors[name] = np.array([value], dtype=dtype)
    return tensors


def sdk_verdict(fields: dict[str, Any]) -> str | None:
    try:
        encode_request(GenerationRequest(**fields), limits=LIMITS)
    except InvalidRequestError as err:
        return str(err)
    return None


def server_verdict(fields: dict[str, Any]) -> str | None:
    try:
        decode_request(wire_of(fields), LIMITS, default_size=DEFAULT_SIZE)
    except RequestError as err:
        return str(err)
    return None


# --- the range cases, from the table ----------------------------------------------------------


def context(name: str, value: Any) -> dict[str, Any]:
    """A request that is valid but for `value` of input `name`."""
    text_to_image = {"prompt": "a red bicycle"}
    inpaint = {**text_to_image, "image": rgb(), "mask": white()}
    if name == "height":
        return {**text_to_image, "height": value, "width": 1}
    if name == "width":
        return {**text_to_image, "height": 1, "width": value}
    if name == "strength":
        return {**inpaint, "steps": LIMITS.max_steps, "strength": value}
    if name == "seed":
        return {**text_to_image, "num_images": LIMITS.max_images, "seed": value}
    if name == "outpaint":
        return {**text_to_image, "image": rgb(), "outpaint": (value, 0, 0, 1)}
    if name in ("mask_blur", "padding_mask_crop"):
        return {**inpaint, name: value}
    if name == "adapter_scales":
        return {**text_to_image, "adapters": ["style"], name: [value]}
    return {**text_to_image, name: value}


def seed_rule(rule: Range) -> Range:
    """The seed's range when `LIMITS.max_images` images are asked for (seed + i fits int64)."""
    return replace(rule, high=rule.high - LIMITS.max_images + 1) if rule.name == "seed" else rule


def step(value: int | float, rule: Range, up: bool) -> int | float:
    """The next value the wire can carry above (or below) `value`."""
    if rule.integer:
        return value + (1 if up else -1)
    return float(np.nextafter(np.float32(value), np.float32(math.inf if up else -math.inf)))


def boundary_cases(inside: bool) -> list[Any]:
    cases = []
    for rule in RANGES.values():
        rule = seed_rule(rule)
        low, high = rule.bounds(LIMITS)
        if inside:
            values = [step(low, rule, up=True) if rule.low_open else low, high]
        else:
            below = low if rule.low_open else step(low, rule, up=False)
            values = [below, step(high, rule, up=True)]
        cases += [pytest.param(rule, v, id=f"{rule.name}={v}") for v in values]
    return cases


def table_verdict(rule: Range, value: int | float) -> str | None:
    """What the table alone says of `value` (for outpaint: of the sides of its context)."""
    if rule.name == "outpaint":
        if rule.allows(value, LIMITS):
            return None
        return (f"outpaint: {[value, 0, 0, 1]} given; [left, top, right, bottom] each in "
                f"{rule.describe(LIMITS)}, at least one > 0")  # fmt: skip
    try:
        rule.check(value, LIMITS)
    except RequestError as err:
        return str(err)
    return None


@pytest.mark.parametrize(("rule", "value"), boundary_cases(inside=False))
def test_value_just_outside_a_range_is_refused_by_both_sides(rule: Range, value: Any) -> None:
    fields = context(rule.name, value)
    expected = table_verdict(rule, value)
    assert expected is not None and expected.startswith(f"{rule.name}: ")
    assert rule.describe(LIMITS) in expected
    assert sdk_verdict(fields) == server_verdict(fields) == expected


@pytest.mark.parametrize(("rule", "value"), boundary_cases(inside=True))
def test_value_just_inside_a_range_is_refused_by_neither(rule: Range, value: Any) -> None:
    fields = context(rule.name, value)
    assert table_verdict(rule, value) is None
    verdict = sdk_verdict(fields)
    assert verdict == server_verdict(fields)
    if rule.name == "strength" and value < 1:
        # The smallest strength above 0 is in range, but leaves no step: both say so alike.
        assert verdict == f"strength: {value} leaves no denoising step out of {LIMITS.max_steps}"
    elif rule.name == "padding_mask_crop" and value > 8:
        # In range, but larger than the 8x8 image of its context: both say so alike.
        assert verdict == f"padding_mask_crop: {value} is larger than the image (8x8)"
    else:
        assert verdict is None


def test_every_numeric_input_of_the_contract_has_a_rule() -> None:
    numeric = {n for n, t in INPUTS_BY_NAME.items() if t.dtype in ("INT32", "INT64", "FP32")}
    assert set(RANGES) == numeric


# --- the relations between inputs ---------------------------------------------------------------

PROMPT = {"prompt": "a red bicycle"}
INPAINT = {**PROMPT, "image": rgb(), "mask": white()}

# fmt: off
RELATIONS = [
    pytest.param({**PROMPT, "mask": white()}, "mask: given without an image", id="mask-alone"),
    pytest.param({**INPAINT, "height": 8}, "height: applies to text-to-image", id="height-image"),
    pytest.param({**INPAINT, "width": 8}, "width: applies to text-to-image", id="width-image"),
    pytest.param({**PROMPT, "strength": 0.5}, "strength: 0.5 < 1 needs an input image",
                 id="strength-without-image"),
    pytest.param({**INPAINT, "strength": 0.25, "steps": 3}, "strength: 0.25 leaves no denoising",
                 id="strength-leaves-no-step"),
    pytest.param({**PROMPT, "outpaint": (8, 0, 0, 0)}, "outpaint: needs an input image",
                 id="outpaint-without-image"),
    pytest.param({**PROMPT, "image": rgb(), "outpaint": (0, 0, 0, 0)},
                 "outpaint: [0, 0, 0, 0] given", id="outpaint-all-zero"),
    pytest.param({**PROMPT, "image": rgb(), "outpaint": (32, 32, 32, 32)},
                 "outpaint: canvas 72x72 = 5184 pixels exceeds 2304", id="canvas-over-limit"),
    pytest.param({**PROMPT, "image": rgb(65, 64), "mask": white(65, 64)},
                 "image: size 65x64 = 4160 pixels exceeds 4096", id="image-over-limit"),
    pytest.param({**PROMPT, "height": 64, "width": 65},
                 "height: size 64x65 = 4160 pixels exceeds 4096", id="size-over-limit"),
    pytest.param({**PROMPT, "seed": rules.MAX_SEED, "num_images": 2},
                 f"seed: {rules.MAX_SEED} out of range [0, {rules.MAX_SEED - 1}]",
                 id="seed-overflows-with-two-images"),
    pytest.param({"prompt": "x" * 65}, "prompt: 65 bytes given, at most 64", id="prompt-bytes"),
    pytest.param({**PROMPT, "mask_blur": 4}, "mask_blur: applies to inpainting",
                 id="mask-blur-without-mask"),
    pytest.param({**PROMPT, "image": rgb(), "outpaint": (8, 0, 0, 0), "mask_blur": 4},
                 "mask_blur: applies to inpainting", id="mask-blur-outpainting"),
    pytest.param({**PROMPT, "negative_prompt": "é" * 33}, "negative_prompt: 66 bytes given",
                 id="negative-prompt-bytes"),
    pytest.param({**INPAINT, "strength": 0.015625}, "strength: 0.015625 leaves no denoising step "
                 "out of 50", id="strength-with-default-steps"),
]
# fmt: on


@pytest.mark.parametrize(("fields", "message"), RELATIONS)
def test_relation_is_checked_alike_by_both_sides(fields: dict[str, Any], message: str) -> None:
    sdk = sdk_verdict(fields)
    assert sdk is not None and sdk.startswith(message)
    assert sdk == server_verdict(fields)


def test_a_valid_request_passes_both_sides() -> None:
    fields = {**INPAINT, "negative_prompt": "blurry", "outpaint": (8, 0, 8, 0), "steps": 10,
              "guidance_scale": 20.0, "strength": 0.1, "seed": 7, "num_images": 4}  # fmt: skip
    assert sdk_verdict(fields) is None and server_verdict(fields) is None


# --- unknown limits, the limit parameters ---------------------------------------------------


def test_without_limits_the_sdk_keeps_only_the_wire_bounds() -> None:
    """A client that has not read the model's config refuses nothing another config allows."""
    big = GenerationRequest(
        "x", steps=10_000, num_images=16, guidance_scale=1000.0, height=5000, width=5000,
        seed=rules.MAX_SEED - 15,
    )  # fmt: skip
    assert set(encode_request(big)) == {"prompt", "steps", "num_images", "guidance_scale",
                                        "height", "width", "seed"}  # fmt: skip
    with pytest.raises(InvalidRequestError, match=r"num_images: 64 images of 5000x5000 are 4800"):
        encode_request(GenerationRequest("x", num_images=64, height=5000, width=5000))  # gRPC's
    with pytest.raises(InvalidRequestError, match=r"steps: 0 out of range \[1, 2147483647\]"):
        encode_request(GenerationRequest("x", steps=0))
    with pytest.raises(InvalidRequestError, match=r"steps: 2147483648 out of range"):
        encode_request(GenerationRequest("x", steps=2**31))
    with pytest.raises(InvalidRequestError, match=r"guidance_scale: inf out of range \[0.0, 3.4"):
        encode_request(GenerationRequest("x", guidance_scale=1e39))  # sent as float32: inf


def test_default_limits() -> None:
    assert Limits() == Limits(
        max_pixels=1024**2, max_steps=150, max_images=8, max_prompt_bytes=4096,
        max_guidance_scale=50.0, max_outpaint=2048, max_canvas_pixels=4096**2,
    )  # fmt: skip
    assert server_info.ModelInfo("inpaint").limits == Limits()
