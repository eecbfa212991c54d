"""A table of bad requests, each answered INVALID_ARG naming its input, by a real server.

Tensors are built with raw `tritonclient.grpc`, so wrong dtypes, ranks and shapes reach the
server exactly as written here. After the whole table (the last tests of this module) the
server must still be live, run the same backend processes, and serve a good request that
matches diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import diffusers_inpaint, make_case, max_abs, served
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from sdserve_pipeline.triton_server import process_group_members
from sdserve_protocol.rules import MAX_SEED, Limits
from sdserve_protocol.settings import PipelineSettings

pytestmark = pytest.mark.e2e

MODEL = "inpaint"
# The exported repository's limits; checked against the served config below. The demo text
# encoder has 2 layers: clip_skip may skip both (diffusers' hidden_states[-3], the embeddings).
LIMITS = Limits(max_clip_skip=2)
NAN, INF = float("nan"), float("inf")
TIMEOUT_S = 120  # a bad request wrongly accepted must fail the test, not hang it


# --- tensor helpers -------------------------------------------------------------------------


def text(*values: str | bytes) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)


def i32(*values: int) -> np.ndarray:
    return np.array(values, np.int32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def rgb(height: int, width: int, channels: int = 3) -> np.ndarray:
    return np.zeros((height, width, channels), np.uint8)


def gray(height: int, width: int) -> np.ndarray:
    return np.full((height, width), 255, np.uint8)


@dataclass(frozen=True)
class Claimed:
    """A tensor declared with a shape its data does not fill: a huge image that costs nothing."""

    data: np.ndarray
    shape: tuple[int, ...]


def with_batch_dim(value: np.ndarray | Claimed) -> np.ndarray | Claimed:
    if isinstance(value, Claimed):
        return Claimed(value.data[np.newaxis], (1, *value.shape))
    return value[np.newaxis]


def raw_inputs(tensors: dict[str, np.ndarray | Claimed]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in tensors.items():
        array = value.data if isinstance(value, Claimed) else value
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        if isinstance(value, Claimed):
            item.set_shape(list(value.shape))
        inputs.append(item)
    return inputs


# --- the table ------------------------------------------------------------------------------

PROMPT = {"prompt": text("a red bicycle")}
INPAINT = {**PROMPT, "image": rgb(64, 64), "mask": gray(64, 64)}
TOO_BIG = (1100, 1000)  # 1.1 M pixels > max_pixels (1024 * 1024), only 3.3 MB on the wire
# 100000 x 100000 x 3 = 30 GB cannot be sent: that row declares the shape over 3 bytes of data.

STEPS_RANGE = f"[1, {LIMITS.max_steps}]"
IMAGES_RANGE = f"[1, {LIMITS.max_images}]"
GUIDANCE_RANGE = f"[0.0, {LIMITS.max_guidance_scale}]"
STRENGTH_RANGE = "(0.0, 1.0]"
SIDE_RANGE = f"[1, {LIMITS.max_pixels}]"
PIXELS = f"exceeds {LIMITS.max_pixels}"
PROMPT_BYTES = f"at most {LIMITS.max_prompt_bytes}"
OUTPAINT_RANGE = f"[0, {LIMITS.max_outpaint}]"
CANVAS = f"exceeds {LIMITS.max_canvas_pixels}"
CLIP_SKIP_RANGE = f"[0, {LIMITS.max_clip_skip}]"


def bad(case_id: str, name: str, tensors: dict, expect: str | None = None, xfail: str = ""):
    """One row: the request, the input its error must name, and a fragment it must contain."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(tensors, name, expect, id=case_id, marks=marks)


# fmt: off
BAD_REQUESTS = [
    # prompt
    bad("prompt-missing", "prompt", {"steps": i32(2)}),
    bad("prompt-missing-with-image", "prompt", {k: v for k, v in INPAINT.items() if k != "prompt"}),
    bad("prompt-int32", "prompt", {"prompt": i32(1)}, "BYTES"),
    bad("prompt-rank-2", "prompt", {"prompt": text("a", "b").reshape(1, 2)}),
    bad("prompt-two-strings", "prompt", {"prompt": text("a", "b")}),
    bad("prompt-zero-strings", "prompt", {"prompt": text()}),
    bad("prompt-not-utf8", "prompt", {"prompt": text(b"\xff\xfe\xfa bicycle")}, "UTF-8"),
    bad("prompt-100kB", "prompt", {"prompt": text("x" * 100_000)}, PROMPT_BYTES),
    # negative_prompt
    bad("negative-fp32", "negative_prompt", {**PROMPT, "negative_prompt": f32(1.0)}, "BYTES"),
    bad("negative-not-utf8", "negative_prompt", {**PROMPT, "negative_prompt": text(b"\xc3\x28")},
        "UTF-8"),
    bad("negative-100kB", "negative_prompt", {**PROMPT, "negative_prompt": text("n" * 100_000)},
        PROMPT_BYTES),
    # image
    bad("image-fp32", "image", {**INPAINT, "image": rgb(64, 64).astype(np.float32)}, "UINT8"),
    bad("image-rank-2", "image", {**INPAINT, "image": gray(64, 64)}),
    bad("image-rgba", "image", {**INPAINT, "image": rgb(64, 64, channels=4)}),
    bad("image-0x0", "image", {**PROMPT, "image": rgb(0, 0), "mask": gray(0, 0)}, "empty"),
    bad("image-0x64", "image", {**PROMPT, "image": rgb(0, 64), "mask": gray(0, 64)}, "empty"),
    bad("image-over-max-pixels", "image", {**PROMPT, "image": rgb(*TOO_BIG), "mask": gray(*TOO_BIG)},
        PIXELS),
    bad("image-11x100000", "image", {**PROMPT, "image": rgb(11, 100_000), "mask": gray(11, 100_000)},
        PIXELS),
    bad("image-100000x100000-claimed", "image",
        {**INPAINT, "image": Claimed(rgb(1, 1), (100_000, 100_000, 3))}),
    # mask
    bad("mask-without-image", "mask", {**PROMPT, "mask": gray(64, 64)}),
    bad("mask-size-differs", "mask", {**INPAINT, "mask": gray(64, 56)}),
    bad("mask-transposed", "mask", {**PROMPT, "image": rgb(64, 32), "mask": gray(32, 64)}),
    bad("mask-three-channels", "mask", {**INPAINT, "mask": rgb(64, 64)}),
    bad("mask-fp32", "mask", {**INPAINT, "mask": gray(64, 64).astype(np.float32)}, "UINT8"),
    bad("mask-0x0", "mask", {**INPAINT, "mask": gray(0, 0)}),
    # outpaint
    bad("outpaint-without-image", "outpaint", {**PROMPT, "outpaint": i32(8, 0, 8, 0)}),
    bad("outpaint-three-values", "outpaint", {**INPAINT, "outpaint": i32(8, 0, 8)}),
    bad("outpaint-int64", "outpaint", {**INPAINT, "outpaint": i64(8, 0, 8, 0)}, "INT32"),
    bad("outpaint-all-zero", "outpaint", {**INPAINT, "outpaint": i32(0, 0, 0, 0)}, OUTPAINT_RANGE),
    bad("outpaint-negative", "outpaint", {**INPAINT, "outpaint": i32(-8, 0, 0, 0)}, OUTPAINT_RANGE),
    bad("outpaint-over-limit", "outpaint",
        {**INPAINT, "outpaint": i32(0, LIMITS.max_outpaint + 1, 0, 0)}, OUTPAINT_RANGE),
    bad("outpaint-int32-max", "outpaint", {**INPAINT, "outpaint": i32(2**31 - 1, 0, 0, 0)},
        OUTPAINT_RANGE),
    bad("outpaint-canvas-over-limit", "outpaint",  # (64 + 2 * 2048)² = 17.3 M > 4096² pixels
        {**INPAINT, "outpaint": i32(*[LIMITS.max_outpaint] * 4)}, CANVAS),
    # height / width
    bad("height-zero", "height", {**PROMPT, "height": i32(0)}, SIDE_RANGE),
    bad("height-negative", "height", {**PROMPT, "height": i32(-64)}, SIDE_RANGE),
    bad("height-int32-max", "height", {**PROMPT, "height": i32(2**31 - 1)}, SIDE_RANGE),
    bad("height-int64", "height", {**PROMPT, "height": i64(64)}, "INT32"),
    bad("height-with-image", "height", {**INPAINT, "height": i32(64)}),
    bad("width-zero", "width", {**PROMPT, "width": i32(0)}, SIDE_RANGE),
    bad("width-negative", "width", {**PROMPT, "width": i32(-1)}, SIDE_RANGE),
    bad("width-rank-0", "width", {**PROMPT, "width": np.array(64, np.int32)}),
    bad("width-with-image", "width", {**INPAINT, "width": i32(64)}),
    bad("size-over-max-pixels", "height", {**PROMPT, "height": i32(2048), "width": i32(2048)},
        PIXELS),
    bad("width-alone-over-max-pixels", "width", {**PROMPT, "width": i32(LIMITS.max_pixels)}, PIXELS),
    # steps
    bad("steps-zero", "steps", {**PROMPT, "steps": i32(0)}, STEPS_RANGE),
    bad("steps-negative", "steps", {**PROMPT, "steps": i32(-5)}, STEPS_RANGE),
    bad("steps-over-limit", "steps", {**PROMPT, "steps": i32(LIMITS.max_steps + 1)}, STEPS_RANGE),
    bad("steps-int32-max", "steps", {**PROMPT, "steps": i32(2**31 - 1)}, STEPS_RANGE),
    bad("steps-fp32-nan", "steps", {**PROMPT, "steps": f32(NAN)}, "INT32"),
    bad("steps-no-value", "steps", {**PROMPT, "steps": i32()}),
    bad("steps-rank-2", "steps", {**PROMPT, "steps": i32(4).reshape(1, 1)}),
    # guidance_scale
    bad("guidance-nan", "guidance_scale", {**PROMPT, "guidance_scale": f32(NAN)}, GUIDANCE_RANGE),
    bad("guidance-inf", "guidance_scale", {**PROMPT, "guidance_scale": f32(INF)}, GUIDANCE_RANGE),
    bad("guidance-minus-inf", "guidance_scale", {**PROMPT, "guidance_scale": f32(-INF)},
        GUIDANCE_RANGE),
    bad("guidance-negative", "guidance_scale", {**PROMPT, "guidance_scale": f32(-1.0)},
        GUIDANCE_RANGE),
    bad("guidance-huge", "guidance_scale", {**PROMPT, "guidance_scale": f32(3e38)},
        GUIDANCE_RANGE),
    bad("guidance-fp64", "guidance_scale", {**PROMPT, "guidance_scale": np.array([7.5])}, "FP32"),
    bad("guidance-two-values", "guidance_scale", {**PROMPT, "guidance_scale": f32(7.5, 7.5)}),
    # strength
    bad("strength-zero", "strength", {**INPAINT, "strength": f32(0.0)}, STRENGTH_RANGE),
    bad("strength-negative", "strength", {**INPAINT, "strength": f32(-0.5)}, STRENGTH_RANGE),
    bad("strength-over-one", "strength", {**INPAINT, "strength": f32(1.5)}, STRENGTH_RANGE),
    bad("strength-nan", "strength", {**INPAINT, "strength": f32(NAN)}, STRENGTH_RANGE),
    bad("strength-inf", "strength", {**INPAINT, "strength": f32(INF)}, STRENGTH_RANGE),
    bad("strength-below-one-without-image", "strength", {**PROMPT, "strength": f32(0.5)}),
    bad("strength-leaves-no-step", "strength",
        {**INPAINT, "strength": f32(0.01), "steps": i32(10)}),
    # seed
    bad("seed-negative", "seed", {**PROMPT, "seed": i64(-1)}, f"[0, {MAX_SEED}]"),
    bad("seed-int64-min", "seed", {**PROMPT, "seed": i64(-(2**63))}, f"[0, {MAX_SEED}]"),
    bad("seed-overflows-with-two-images", "seed",
        {**PROMPT, "seed": i64(MAX_SEED), "num_images": i32(2)}, f"[0, {MAX_SEED - 1}]"),
    bad("seed-int32", "seed", {**PROMPT, "seed": i32(7)}, "INT64"),
    # scheduler
    bad("scheduler-unknown", "scheduler", {**PROMPT, "scheduler": text("warp_drive")}, "unknown"),
    bad("scheduler-empty", "scheduler", {**PROMPT, "scheduler": text("")}, "unknown"),
    bad("scheduler-not-utf8", "scheduler", {**PROMPT, "scheduler": text(b"\xffddim")}, "UTF-8"),
    bad("scheduler-int32", "scheduler", {**PROMPT, "scheduler": i32(1)}, "BYTES"),
    # num_images
    bad("num-images-zero", "num_images", {**PROMPT, "num_images": i32(0)}, IMAGES_RANGE),
    bad("num-images-negative", "num_images", {**PROMPT, "num_images": i32(-3)}, IMAGES_RANGE),
    bad("num-images-over-limit", "num_images", {**PROMPT, "num_images": i32(LIMITS.max_images + 1)},
        IMAGES_RANGE),
    bad("num-images-int32-max", "num_images", {**PROMPT, "num_images": i32(2**31 - 1)},
        IMAGES_RANGE),
    # preserve_unmasked
    bad("preserve-uint8", "preserve_unmasked",
        {**INPAINT, "preserve_unmasked": np.array([1], np.uint8)}, "BOOL"),
    bad("preserve-bytes-false", "preserve_unmasked",
        {**INPAINT, "preserve_unmasked": text("false")}, "BOOL"),
    bad("preserve-two-values", "preserve_unmasked",
        {**INPAINT, "preserve_unmasked": np.array([True, False])}),
    # clip_skip
    bad("clip-skip-beyond-the-layers", "clip_skip",
        {**INPAINT, "clip_skip": i32(LIMITS.max_clip_skip + 1)}, CLIP_SKIP_RANGE),
    bad("clip-skip-negative", "clip_skip", {**PROMPT, "clip_skip": i32(-1)}, CLIP_SKIP_RANGE),
    bad("clip-skip-int64", "clip_skip", {**PROMPT, "clip_skip": i64(1)}, "INT32"),
    # names outside the contract
    bad("unknown-input", "sharpness", {**PROMPT, "sharpness": f32(1.0)}),
    bad("input-name-wrong-case", "Prompt", {"Prompt": text("a red bicycle")}),
]
# fmt: on


def names_input(message: str, name: str) -> bool:
    """Triton core quotes the input (`... input 'steps' ...`); the pipeline leads with it."""
    return f"'{name}'" in message or message.startswith(f"{name}: ")


# --- the server and the tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    build = tmp_path_factory.mktemp("triton-bad-requests")
    with served(repository, build) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def send(client):
    """Sends wire items as one request, adding the batch dim when the served config has one."""
    batched = client.get_model_config(MODEL).config.max_batch_size > 0

    def infer(tensors: dict[str, np.ndarray | Claimed]) -> grpcclient.InferResult:
        if batched:
            tensors = {name: with_batch_dim(value) for name, value in tensors.items()}
        return client.infer(MODEL, raw_inputs(tensors), client_timeout=TIMEOUT_S)

    return infer


@pytest.fixture(scope="module")
def processes_at_start(server, client):
    """The server's process group (server + backend stubs) before any bad request."""
    assert client.is_server_ready()
    return sorted(process_group_members(server.pid))


def test_served_limits_are_the_ones_this_table_assumes(client, processes_at_start):
    params = client.get_model_config(MODEL).config.parameters
    served = {key: params[key].string_value for key in params}
    assert PipelineSettings.from_parameters(served).limits == LIMITS


@pytest.mark.parametrize(("tensors", "name", "expect"), BAD_REQUESTS)
def test_bad_request_is_invalid_arg_naming_the_input(
    send, processes_at_start, tensors, name, expect
):
    with pytest.raises(InferenceServerException) as caught:
        send(tensors)
    err = caught.value
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err
    assert names_input(err.message(), name), err
    if expect is not None:
        assert expect in err.message(), err


# Batch-dimension mistakes, for a served config with a batch dim (max_batch_size > 0): each
# row is the items of one request, then the batch size every input is sent with.
ONE_STEP = {**PROMPT, "steps": i32(1)}

# fmt: off
BAD_BATCHES = [
    pytest.param(ONE_STEP, {"prompt": 2, "steps": 2}, None, id="batch-of-two"),  # max is 1
    pytest.param(ONE_STEP, {"prompt": 1, "steps": 2}, "prompt", id="batch-sizes-differ"),
    pytest.param(ONE_STEP, {"prompt": 1, "steps": 0}, "steps", id="batch-dim-missing"),
    pytest.param(ONE_STEP, {"prompt": 9, "steps": 9}, None, id="batch-over-max-batch-size"),
]
# fmt: on


def batch_of(array: np.ndarray, size: int) -> np.ndarray:
    """`size` copies of one item stacked on a new batch dim; 0 sends the item without one."""
    return array if size == 0 else np.stack([array] * size)


@pytest.mark.parametrize(("items", "sizes", "name"), BAD_BATCHES)
def test_bad_batch_dim_is_invalid_arg(client, processes_at_start, items, sizes, name):
    if client.get_model_config(MODEL).config.max_batch_size == 0:
        pytest.skip("the served pipeline model has no batch dimension")
    tensors = {key: batch_of(value, sizes[key]) for key, value in items.items()}
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, raw_inputs(tensors), client_timeout=TIMEOUT_S)
    err = caught.value
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err
    # Too large a batch is Triton's own check of the whole request: no one input to name.
    assert names_input(err.message(), name) if name else "batch" in err.message(), err


# fmt: off
TINY_BUT_VALID = [
    pytest.param({**PROMPT, "image": rgb(1, 1), "mask": gray(1, 1)}, (1, 1), id="image-1x1"),
    pytest.param({**PROMPT, "height": i32(1), "width": i32(1)}, (1, 1), id="text-to-image-1x1"),
    pytest.param({**INPAINT, "prompt": text("")}, (64, 64), id="empty-prompt"),
    pytest.param({**INPAINT, "scheduler": text(" DDIM ")}, (64, 64), id="scheduler-case-spaces"),
]
# fmt: on


@pytest.mark.parametrize(("tensors", "size"), TINY_BUT_VALID)
def test_tiny_but_valid_requests_are_served(send, tensors, size):
    result = send({**tensors, "steps": i32(1), "seed": i64(1)})
    assert result.as_numpy("images").shape[-3:] == (*size, 3)
    assert result.as_numpy("seeds").ravel().tolist() == [1]


def test_table_is_large_and_distinct():
    assert len(BAD_REQUESTS) >= 45
    assert len({row.id for row in BAD_REQUESTS}) == len(BAD_REQUESTS)


def test_after_the_table_server_is_healthy_and_same_processes(server, client, processes_at_start):
    assert server.is_running
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert sorted(process_group_members(server.pid)) == processes_at_start


def test_after_the_table_good_request_matches_diffusers(send, diffusers_pipe):
    image, mask = make_case(64, 64)
    reference = diffusers_inpaint(diffusers_pipe, image, mask, seed=7, steps=10)
    good = {**PROMPT, "image": image, "mask": mask, "steps": i32(10), "seed": i64(7),
            "preserve_unmasked": np.array([False])}  # fmt: skip
    result = send(good)
    images = result.as_numpy("images").reshape(-1, 64, 64, 3)  # (N, H, W, 3) without batch dim
    assert result.as_numpy("seeds").ravel().tolist() == [7]
    assert images.shape == (1, 64, 64, 3)
    assert max_abs(images[0], reference) <= 2
