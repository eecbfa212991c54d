"""Hypothesis drives the request decoder; it never raises anything but `RequestError`.

Requests are random subsets of the wire inputs (plus unknown names) with random dtypes (the
contract's and others), ranks, small shapes and values (NaN, inf, extremes, random bytes for
text). `decode_request` must either return `GenerationParams` within the limits or raise a
`RequestError` naming an input the request holds (or one it lacks but needs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sdserve_protocol.contract import INPUTS, GenerationParams, decode_request
from sdserve_protocol.rules import MAX_SEED, Limits, RequestError
from sdserve_protocol.settings import SCHEDULER_NAMES

LIMITS = Limits(
    max_pixels=48 * 48, max_steps=60, max_images=3, max_prompt_bytes=32, max_outpaint=16,
    max_canvas_pixels=56 * 56,
)  # fmt: skip
DEFAULT_SIZE = 32
UNKNOWN_NAMES = ["sharpness", "Prompt", "", "images", "seeds", "prompt "]
NUMERIC_DTYPES = [np.uint8, np.int8, np.int32, np.int64, np.uint64, np.float16, np.float32,
                  np.float64, np.bool_]  # fmt: skip
SPEC_DTYPES = {t.name: t.numpy_dtype for t in INPUTS}

# --- values ---------------------------------------------------------------------------------

texts = st.one_of(
    st.binary(max_size=40),  # random bytes: often not UTF-8, sometimes over max_prompt_bytes
    st.sampled_from(SCHEDULER_NAMES).map(str.encode),
    st.text(max_size=40).map(str.encode),
    st.text(max_size=40),  # `str` items: in-process callers (no lone surrogates, see below)
)


def object_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """BYTES tensors as the Python backend hands them over: object arrays of bytes."""

    def to_array(items: list) -> np.ndarray:
        out = np.empty(len(items), dtype=np.object_)
        out[:] = items
        return out.reshape(shape)

    count = math.prod(shape)
    return st.lists(texts, min_size=count, max_size=count).map(to_array)


def byte_string_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """BYTES tensors as numpy `S` arrays (accepted too; numpy drops trailing NULs)."""
    items = st.binary(max_size=8).map(lambda b: b.rstrip(b"\0"))
    return arrays(np.dtype("S8"), shape, elements=items)


def noise_arrays(dtype, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """Larger numeric tensors from seeded random bytes: fast, and any bit pattern (NaN, inf)."""

    np_dtype = np.dtype(dtype)

    def make(seed: int) -> np.ndarray:
        raw = np.random.default_rng(seed).bytes(math.prod(shape) * np_dtype.itemsize)
        if np_dtype.kind == "b":
            return np.frombuffer(raw, np.uint8).astype(bool).reshape(shape)
        return np.frombuffer(raw, np_dtype).reshape(shape).copy()

    return st.integers(0, 2**32 - 1).map(make)


def tensor_of(dtype, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    if dtype is np.object_ and math.prod(shape) > 16:  # a text tensor of image size
        return st.just(np.full(shape, b"x", dtype=np.object_))  # (beyond Hypothesis' list sizes)
    if dtype is np.object_:
        return object_arrays(shape)
    if dtype == "S":
        return byte_string_arrays(shape)
    if math.prod(shape) > 16:  # images and masks: their values never matter to the decoder
        return noise_arrays(dtype, shape)
    return arrays(dtype, shape)  # elements include NaN, ±inf, extremes and negative values


def one_in(n: int) -> st.SearchStrategy[bool]:
    return st.integers(1, n).map(lambda v: v == 1)


# --- shapes ---------------------------------------------------------------------------------

sides = st.integers(0, 6) | st.integers(40, 60)  # empty, tiny, around the pixel limit


@st.composite
def shapes_for(draw, name: str, image_size: tuple[int, int]) -> tuple[int, ...]:
    """Mostly the contract's shape (image and mask share a size); sometimes any small shape."""
    if draw(one_in(8)):
        return tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    height, width = image_size if draw(st.booleans()) else (draw(sides), draw(sides))
    return {"image": (height, width, 3), "mask": (height, width), "outpaint": (4,)}.get(name, (1,))


@st.composite
def wire_tensor(draw, name: str, image_size: tuple[int, int]) -> np.ndarray:
    """A tensor for input `name`: mostly of its contract dtype, sometimes of another."""
    shape = draw(shapes_for(name, image_size))
    expected = SPEC_DTYPES.get(name)
    wrong = expected is None or draw(one_in(8))
    dtype = draw(st.sampled_from([*NUMERIC_DTYPES, np.object_, "S"])) if wrong else expected
    if dtype is not np.object_ and dtype != "S" and math.prod(shape) == 1 and draw(st.booleans()):
        return draw(small_scalars(dtype, shape))
    return draw(tensor_of(dtype, shape))


def small_scalars(dtype, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """Values near the limits, so that some requests get through to `GenerationParams`."""
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "b":
        values = st.booleans()
    elif np_dtype.kind == "f":
        values = st.sampled_from([0.0, 0.01, 0.5, 1.0, 7.5, 50.0, 51.0, -1.0, math.nan])
    else:
        low, high = np.iinfo(np_dtype).min, np.iinfo(np_dtype).max
        values = st.integers(-2, 60).filter(lambda v: low <= v <= high)
    return values.map(lambda v: np.full(shape, v, dtype=np_dtype))


@st.composite
def requests(draw) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.sampled_from(list(SPEC_DTYPES)), unique=True))
    if not draw(one_in(6)):  # a prompt most of the time, so later checks are reached
        names = ["prompt", *[n for n in names if n != "prompt"]]
    if draw(one_in(8)):
        names.append(draw(st.sampled_from(UNKNOWN_NAMES)))
    image_size = (draw(sides), draw(sides))
    return {name: draw(wire_tensor(name, image_size)) for name in names}


# --- the property ---------------------------------------------------------------------------


def allowed_error_names(inputs: dict[str, np.ndarray]) -> set[str]:
    """The inputs an error may name: those given, plus those the request lacks but needs."""
    allowed = set(inputs)
    if "prompt" not in inputs:
        allowed.add("prompt")
    if "image" in inputs and "outpaint" not in inputs:
        allowed.add("mask")  # an image needs a mask (unless outpainting)
    return allowed


def assert_within_limits(params: GenerationParams) -> None:
    assert len(params.prompt.encode()) <= LIMITS.max_prompt_bytes
    assert len(params.negative_prompt.encode()) <= LIMITS.max_prompt_bytes
    assert 1 <= params.steps <= LIMITS.max_steps
    assert 1 <= params.num_images <= LIMITS.max_images
    assert 0.0 <= params.guidance_scale <= LIMITS.max_guidance_scale
    assert 0.0 < params.strength <= 1.0 and int(params.steps * params.strength) >= 1
    assert params.seeds[0] >= 0 and params.seeds[-1] <= MAX_SEED
    assert params.scheduler is None or params.scheduler in SCHEDULER_NAMES
    assert params.height >= 1 and params.width >= 1
    assert params.height * params.width <= LIMITS.max_canvas_pixels
    if params.image is not None:
        assert params.image.dtype == np.uint8 and params.image.shape[2] == 3
        assert params.image.shape[0] * params.image.shape[1] <= LIMITS.max_pixels
        assert params.mask is None or params.mask.shape == params.image.shape[:2]
    else:
        assert params.height * params.width <= LIMITS.max_pixels


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_decode_request_returns_params_or_names_an_input(inputs):
    try:
        params = decode_request(
            dict(inputs), LIMITS, default_size=DEFAULT_SIZE, schedulers=SCHEDULER_NAMES
        )
    except RequestError as err:
        event(f"RequestError naming {err.name}")  # the outcome mix: --hypothesis-show-statistics
        assert err.name in allowed_error_names(inputs), (err.name, str(err), sorted(inputs))
        assert str(err).startswith(f"{err.name}: ")
    else:
        event("GenerationParams")
        assert isinstance(params, GenerationParams)
        assert_within_limits(params)


@pytest.mark.parametrize("name", ["prompt", "negative_prompt", "scheduler"])
def test_str_item_that_is_not_encodable_is_a_request_error(name):
    inputs = {"prompt": np.array(["ok"], np.object_), name: np.array(["\ud800"], np.object_)}
    with pytest.raises(RequestError) as caught:
        decode_request(inputs, LIMITS, default_size=DEFAULT_SIZE, schedulers=SCHEDULER_NAMES)
    assert caught.value.name == name
