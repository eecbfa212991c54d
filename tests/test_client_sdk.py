"""Unit tests of the client SDK and CLI (no server, no network: a fake tritonclient is injected)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    triton_to_np_dtype,
)

from sdserve_client import (
    GenerationRequest,
    GenerationResult,
    InpaintClient,
    InvalidRequestError,
    SdserveError,
    add_batch_dim,
    cli,
    encode_request,
    to_mask_array,
    to_rgb_array,
)
from sdserve_client.replicas import (
    FailoverPolicy,
    Outcome,
    ReplicaPool,
    classify,
)
from sdserve_client.sdk import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV
from sdserve_client.tls import TlsSettings, explain, tls_settings
from sdserve_client.webui.backend import Backend, PoolInfoClient
from sdserve_protocol.auth import GRPC_ADMIN_KEY_HEADER
from sdserve_protocol.contract import INPUTS, OUTPUTS
from sdserve_protocol.events import (
    Preview,
    Progress,
    encode_event,
    parse_stream_error,
    stream_error_text,
)
from sdserve_protocol.settings import PIPELINE_ROLES

# name -> (numpy dtype, Triton datatype, shape without batch dim) for a 6x4 (W x H) image.
CONTRACT: dict[str, tuple[Any, str, tuple[int, ...]]] = {
    "prompt": (np.object_, "BYTES", (1,)),
    "negative_prompt": (np.object_, "BYTES", (1,)),
    "image": (np.uint8, "UINT8", (4, 6, 3)),
    "mask": (np.uint8, "UINT8", (4, 6)),
    "outpaint": (np.int32, "INT32", (4,)),
    "height": (np.int32, "INT32", (1,)),
    "width": (np.int32, "INT32", (1,)),
    "steps": (np.int32, "INT32", (1,)),
    "guidance_scale": (np.float32, "FP32", (1,)),
    "strength": (np.float32, "FP32", (1,)),
    "seed": (np.int64, "INT64", (1,)),
    "scheduler": (np.object_, "BYTES", (1,)),
    "num_images": (np.int32, "INT32", (1,)),
    "preserve_unmasked": (np.bool_, "BOOL", (1,)),
    "mask_blur": (np.int32, "INT32", (1,)),
    "preview_every": (np.int32, "INT32", (1,)),
    "prompt_weighting": (np.bool_, "BOOL", (1,)),
    "padding_mask_crop": (np.int32, "INT32", (1,)),
    "clip_skip": (np.int32, "INT32", (1,)),
    "adapters": (np.object_, "BYTES", (2,)),
    "adapter_scales": (np.float32, "FP32", (2,)),
}


def rgb(height: int = 4, width: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def full_request() -> GenerationRequest:
    """Every input the server accepts together with an image: all but `height` and `width`."""
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    return GenerationRequest(
        "a red fox",
        negative_prompt="blurry",
        image=rgb(),
        mask=mask,
        outpaint=(1, 2, 3, 4),
        steps=20,
        guidance_scale=7.5,
        strength=0.8,
        seed=1234,
        scheduler="ddim",
        num_images=2,
        preserve_unmasked=False,
        mask_blur=0,  # a blur > 0 applies to inpainting, not outpainting
        preview_every=2,
        prompt_weighting=True,
        clip_skip=0,  # a skip > 0 needs the model's limit_max_clip_skip (its layer count)
        adapters=["style", "subject"],
        adapter_scales=[0.8, -0.5],
    )


class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


class FakeTriton:
    """Stands in for `tritonclient.grpc.InferenceServerClient`; behaves like the pipeline."""

    def __init__(
        self,
        max_batch_size: int = 0,
        fail: dict[str, Exception] | None = None,
        parameters: dict[str, str] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.parameters = parameters or {}
        self.fail = fail or {}
        self.calls: list[tuple[str, Any]] = []
        self.sent: dict[str, Any] = {}
        self.outputs: dict[str, np.ndarray] | None = None  # overrides the computed outputs
        self.closed = False

    def _record(self, method: str, **kwargs: Any) -> None:
        self.calls.append((method, kwargs))
        if method in self.fail:
            raise self.fail[method]

    def get_model_config(self, model_name: str, **kwargs: Any) -> dict[str, Any]:
        self._record("get_model_config", model_name=model_name, **kwargs)
        config: dict[str, Any] = {"name": model_name, "backend": "python"}
        if self.max_batch_size:  # MessageToJson drops fields left at 0
            config["max_batch_size"] = self.max_batch_size
        if self.parameters:
            config["parameters"] = {k: {"string_value": v} for k, v in self.parameters.items()}
        return {"config": config}

    def get_model_repository_index(self, **kwargs: Any) -> dict[str, Any]:
        self._record("get_model_repository_index", **kwargs)
        return {
            "models": [
                {"name": "inpaint", "version": "1", "state": "READY"},
                {"name": "text_encoder", "version": "1", "state": "READY"},
                {"name": "text_encoder", "version": "2", "state": "READY"},
                {"name": "broken", "version": "1", "state": "UNAVAILABLE"},
                {"name": "unloaded"},
            ]
        }

    def is_server_ready(self, **kwargs: Any) -> bool:
        self._record("is_server_ready", **kwargs)
        return True

    def is_model_ready(self, model_name: str, **kwargs: Any) -> bool:
        self._record("is_model_ready", model_name=model_name, **kwargs)
        return model_name == "inpaint"

    def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> FakeResult:
        self._record("infer", model_name=model_name, **kwargs)
        return self._respond(inputs)

    def start_stream(self, callback: Any, **kwargs: Any) -> None:
        self._record("start_stream", **kwargs)
        self.stream_callback = callback

    def async_stream_infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> None:
        """Like the stream model: a progress event per step, then the result."""
        self._record("async_stream_infer", model_name=model_name, **kwargs)
        if "stream" in self.fail:  # a stream's errors come through its callback
            self.stream_callback(None, self.fail["stream"])
            return
        result = self._respond(inputs)
        steps = int(decode(self.sent["steps"]).reshape(-1)[0]) if "steps" in self.sent else 2
        batch = (lambda a: a[np.newaxis]) if self.max_batch_size else (lambda a: a)
        every = int(decode(self.sent["preview_every"]).reshape(-1)[0]) if (
            "preview_every" in self.sent) else 0  # fmt: skip
        for step in range(1, steps + 1):
            events = [Progress(step, steps, 0.1 * step, 0.1 * (steps - step))]
            if every and step % every == 0 and step < steps:
                events.append(
                    Preview(
                        step,
                        steps,
                        result.outputs["images"].reshape(-1, *result.outputs["images"].shape[-3:]),
                    )
                )
            for event in events:
                tensors = encode_event(event)
                self.stream_callback(FakeResult({k: batch(v) for k, v in tensors.items()}), None)
        kind = batch(np.array([b"result"], dtype=np.object_))
        self.stream_callback(FakeResult({**result.outputs, "event": kind}), None)

    def stop_stream(self, cancel_requests: bool = False) -> None:
        self._record("stop_stream", cancel_requests=cancel_requests)

    def _respond(self, inputs: list[Any]) -> FakeResult:
        self.sent = {i.name(): i for i in inputs}
        if self.outputs is not None:
            return FakeResult(self.outputs)
        arrays = {name: decode(i) for name, i in self.sent.items()}
        if self.max_batch_size:
            arrays = {name: array[0] for name, array in arrays.items()}
        images, seeds = self._generate(arrays)
        if self.max_batch_size:
            images, seeds = images[np.newaxis], seeds[np.newaxis]
        return FakeResult({"images": images, "seeds": seeds})

    def _generate(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        count = int(arrays.get("num_images", [1])[0])
        if "image" in arrays:
            height, width = arrays["image"].shape[:2]
            left, top, right, bottom = arrays.get("outpaint", [0, 0, 0, 0])
            height, width = height + top + bottom, width + left + right
        else:
            height, width = int(arrays.get("height", [8])[0]), int(arrays.get("width", [8])[0])
        seed = int(arrays.get("seed", [42])[0])
        images = np.full((count, height, width, 3), 7, dtype=np.uint8)
        return images, np.arange(seed, seed + count, dtype=np.int64)

    def close(self) -> None:
        self.closed = True


def decode(infer_input: Any) -> np.ndarray:
    """The array an InferInput carries (reads tritonclient's serialized content)."""
    content = infer_input._get_content()
    if infer_input.datatype() == "BYTES":
        array = deserialize_bytes_tensor(content)
    else:
        array = np.frombuffer(content, dtype=triton_to_np_dtype(infer_input.datatype()))
    return array.reshape(infer_input.shape())


def method_names(fake: FakeTriton) -> list[str]:
    return [method for method, _ in fake.calls]


# Request encoding ---------------------------------------------------------------------------


def test_request_fields_are_the_contracts_inputs() -> None:
    """`encode_request` reads each wire input from the request field of the same name."""
    assert [f.name for f in fields(GenerationRequest)] == [t.name for t in INPUTS]
    assert [t.name for t in INPUTS] == list(CONTRACT)
    assert [(t.numpy_dtype, t.dtype) for t in INPUTS] == [c[:2] for c in CONTRACT.values()]
    assert [t.name for t in OUTPUTS] == ["images", "seeds"]


def text_to_image_request() -> GenerationRequest:
    """The inputs `full_request` lacks: `height` and `width` (text-to-image only)."""
    return GenerationRequest("a red fox", height=64, width=48, seed=1234)


def test_encode_full_request_dtypes_shapes_and_values() -> None:
    tensors = encode_request(full_request())
    sizes = encode_request(text_to_image_request())
    crop = encode_request(GenerationRequest("a", image=rgb(), mask=np.full((4, 6), 255, np.uint8),
                                            padding_mask_crop=2))  # fmt: skip
    assert set(tensors) | set(sizes) | {"padding_mask_crop"} == set(CONTRACT)
    tensors |= {name: sizes[name] for name in ("height", "width")}
    tensors["padding_mask_crop"] = crop["padding_mask_crop"]
    for name, (dtype, _, shape) in CONTRACT.items():
        assert tensors[name].dtype == dtype, name
        assert tensors[name].shape == shape, name
    assert tensors["prompt"][0] == b"a red fox"
    assert tensors["scheduler"][0] == b"ddim"
    assert tensors["outpaint"].tolist() == [1, 2, 3, 4]
    assert tensors["seed"][0] == 1234
    assert tensors["preserve_unmasked"].tolist() == [False]
    assert set(np.unique(tensors["mask"]).tolist()) == {0, 255}
    assert tensors["guidance_scale"][0] == np.float32(7.5)


def test_encode_omits_options_left_none() -> None:
    tensors = encode_request(GenerationRequest("just text"))
    assert list(tensors) == ["prompt"]
    tensors = encode_request(GenerationRequest("x", seed=0, preserve_unmasked=True, strength=1))
    assert set(tensors) == {"prompt", "seed", "preserve_unmasked", "strength"}


def test_prompt_is_utf8() -> None:
    tensors = encode_request(GenerationRequest("crème brûlée 🍮"))
    assert tensors["prompt"][0].decode("utf-8") == "crème brûlée 🍮"


@pytest.mark.parametrize("batched", [False, True])
def test_batch_dimension(batched: bool) -> None:
    plain = encode_request(full_request())
    tensors = encode_request(full_request(), batched=batched)
    for name, array in tensors.items():
        expected = (1, *plain[name].shape) if batched else plain[name].shape
        assert array.shape == expected, name
        assert array.dtype == plain[name].dtype
        np.testing.assert_array_equal(array.reshape(plain[name].shape), plain[name])
    assert add_batch_dim({"x": np.zeros(3)})["x"].shape == (1, 3)


def test_request_is_frozen_and_keyword_only() -> None:
    request = GenerationRequest("x", steps=3)
    with pytest.raises(AttributeError):
        request.steps = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        GenerationRequest("x", "negative")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "quoted"),
    [
        ({"prompt": 5}, "int: 5"),
        ({"prompt": None}, "NoneType: None"),
        ({"negative_prompt": b"bytes"}, "b'bytes'"),
        ({"scheduler": "  "}, "'  '"),
        ({"steps": 0}, "steps: 0 out of range [1, "),
        ({"steps": 2.5}, "float: 2.5"),
        ({"steps": True}, "bool: True"),
        ({"height": -8}, "height: -8 out of range [1, "),
        ({"num_images": "2"}, "str: '2'"),
        ({"seed": 2**63}, str(2**63)),
        ({"guidance_scale": float("nan")}, "nan"),
        ({"guidance_scale": "7"}, "str: '7'"),
        ({"strength": 1.5}, "1.5"),
        ({"strength": 0}, "strength: 0.0 out of range (0.0, 1.0]"),
        ({"strength": 0.5}, "strength: 0.5 < 1 needs an input image"),
        ({"seed": -1}, "seed: -1 out of range [0, "),
        ({"guidance_scale": -0.5}, "guidance_scale: -0.5 out of range [0.0, "),
        ({"height": 8, "image": rgb(), "mask": np.zeros((4, 6), bool)}, "text-to-image only"),
        ({"preserve_unmasked": "false"}, "str: 'false'"),
        ({"preserve_unmasked": 0}, "int: 0"),
        ({"outpaint": (1, 2, 3), "image": rgb()}, "(1, 2, 3)"),
        ({"outpaint": (-1, 0, 0, 0), "image": rgb()}, "[-1, 0, 0, 0] given"),
        ({"outpaint": "1234", "image": rgb()}, "'1234'"),
        ({"outpaint": (8, 0, 0, 0)}, "outpaint: needs an input image"),
        ({"mask": np.zeros((4, 6), np.uint8)}, "without an image"),
    ],
)
def test_invalid_requests_are_rejected_with_the_value_quoted(
    options: dict[str, Any], quoted: str
) -> None:
    fields = {"prompt": "ok", **options}
    with pytest.raises(InvalidRequestError) as info:
        encode_request(GenerationRequest(**fields))
    assert quoted in str(info.value)
    assert isinstance(info.value, SdserveError)
    assert isinstance(info.value, ValueError)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidRequestError) as info:
        encode_request(GenerationRequest(np.zeros((512, 512, 3))))  # type: ignore[arg-type]
    assert len(str(info.value)) < 300


def test_mask_size_must_match_image_size() -> None:
    request = GenerationRequest("x", image=rgb(4, 6), mask=np.zeros((4, 5), np.uint8))
    message = r"mask: size \[4, 5\] differs from image size \[4, 6\]"  # the server's words
    with pytest.raises(InvalidRequestError, match=message):
        encode_request(request)


# Image and mask conversion ------------------------------------------------------------------

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "F", "CMYK", "YCbCr", "I;16"]
sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))
seeds = st.integers(0, 2**32 - 1)


def pil_image(size: tuple[int, int], seed: int, mode: str) -> Image.Image:
    height, width = size
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(rgba).convert(mode)


@settings(max_examples=60, deadline=None)
@given(size=sizes, seed=seeds, mode=st.sampled_from(MODES))
def test_pil_image_of_any_mode_becomes_rgb(size: tuple[int, int], seed: int, mode: str) -> None:
    image = pil_image(size, seed, mode)
    array = to_rgb_array(image)
    assert array.shape == (*size, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous
    np.testing.assert_array_equal(array, np.asarray(image.convert("RGB")))


@settings(max_examples=60, deadline=None)
@given(size=sizes, seed=seeds)
def test_rgb_array_passes_through(size: tuple[int, int], seed: int) -> None:
    array = rgb(*size, seed=seed)
    np.testing.assert_array_equal(to_rgb_array(array), array)
    flipped = array[:, ::-1]  # not C-contiguous
    converted = to_rgb_array(flipped)
    assert converted.flags.c_contiguous
    np.testing.assert_array_equal(converted, flipped)


@settings(max_examples=60, deadline=None)
@given(size=sizes, seed=seeds, mode=st.sampled_from(MODES))
def test_pil_mask_of_any_mode_becomes_l(size: tuple[int, int], seed: int, mode: str) -> None:
    image = pil_image(size, seed, mode)
    mask = to_mask_array(image)
    assert mask.shape == size
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, np.asarray(image.convert("L")))


@settings(max_examples=60, deadline=None)
@given(size=sizes, seed=seeds)
def test_array_masks(size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    flags = rng.random(size) < 0.5
    np.testing.assert_array_equal(to_mask_array(flags), np.where(flags, 255, 0))
    gray = rng.integers(0, 256, size, dtype=np.uint8)
    np.testing.assert_array_equal(to_mask_array(gray), gray)
    np.testing.assert_array_equal(to_mask_array(gray[..., np.newaxis]), gray)
    color = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(color).convert("L"))
    np.testing.assert_array_equal(to_mask_array(color), expected)
    binary = np.repeat(np.where(flags, 255, 0).astype(np.uint8)[..., np.newaxis], 3, axis=2)
    np.testing.assert_array_equal(to_mask_array(binary), np.where(flags, 255, 0))
    np.testing.assert_array_equal(to_mask_array(Image.fromarray(flags)), np.where(flags, 255, 0))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 6, 3), np.float32), "dtype uint8, got float32"),
        (np.zeros((4, 6, 4), np.uint8), "(4, 6, 4)"),
        (np.zeros((4, 6), np.uint8), "(4, 6)"),
        (np.zeros((0, 6, 3), np.uint8), "empty"),
        ([[[0, 0, 0]]], "got list"),
        (Image.new("La", (3, 2)), "mode 'La'"),
    ],
)
def test_bad_images(image: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        to_rgb_array(image)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((4, 6), np.float64), "uint8 or bool, got float64"),
        (np.zeros((4, 6, 2), np.uint8), "(4, 6, 2)"),
        (np.zeros((4,), np.uint8), "(4,)"),
        (np.zeros((4, 0), np.uint8), "empty"),
        ("mask.png", "got str"),
        (Image.new("La", (3, 2)), "mode 'La'"),
    ],
)
def test_bad_masks(mask: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        to_mask_array(mask)
    assert message in str(info.value)


def test_modes_without_a_direct_conversion_go_through_rgb() -> None:
    lab = Image.new("LAB", (3, 2), (100, 128, 128))
    expected = np.asarray(lab.convert("RGB").convert("L"))
    np.testing.assert_array_equal(to_mask_array(lab), expected)


# InpaintClient with an injected fake tritonclient -------------------------------------------


@pytest.mark.parametrize("max_batch_size", [0, 4])
def test_inpaint_sends_the_contract_and_hides_the_batch_dim(max_batch_size: int) -> None:
    fake = FakeTriton(max_batch_size)
    client = InpaintClient(model="inpaint", client=fake)
    result = client.inpaint(rgb(), Image.new("L", (6, 4), 255), "a cat", steps=5, seed=9)
    batch = (1,) if max_batch_size else ()
    assert set(fake.sent) == {"prompt", "image", "mask", "steps", "seed"}
    for name, infer_input in fake.sent.items():
        _, datatype, shape = CONTRACT[name]
        assert infer_input.datatype() == datatype, name
        assert tuple(infer_input.shape()) == batch + shape, name
    assert isinstance(result, GenerationResult)
    assert result.arrays.shape == (1, 4, 6, 3)
    assert [image.size for image in result.images] == [(6, 4)]
    assert all(image.mode == "RGB" for image in result.images)
    assert result.seeds == [9]
    assert isinstance(result.seeds[0], int)


@pytest.mark.parametrize("max_batch_size", [0, 8])
def test_values_round_trip_through_tritonclient(max_batch_size: int) -> None:
    fake = FakeTriton(max_batch_size)
    InpaintClient(client=fake).generate(full_request())
    expected = encode_request(full_request(), batched=max_batch_size > 0)
    assert set(fake.sent) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(decode(fake.sent[name]), array)


def test_model_config_is_fetched_once() -> None:
    fake = FakeTriton()
    client = InpaintClient(model="sd15", client=fake)
    client.text_to_image("a", height=16, width=24)
    result = client.text_to_image("b", num_images=3, seed=100)
    assert method_names(fake) == ["get_model_config", "infer", "infer"]
    assert fake.calls[0][1]["model_name"] == "sd15"
    assert fake.calls[1][1]["model_name"] == "sd15"
    assert result.seeds == [100, 101, 102]
    assert result.arrays.shape == (3, 8, 8, 3)


def test_text_to_image_and_outpaint() -> None:
    fake = FakeTriton()
    client = InpaintClient(client=fake)
    result = client.text_to_image("a", height=16, width=24)
    assert set(fake.sent) == {"prompt", "height", "width"}
    assert result.images[0].size == (24, 16)
    result = client.outpaint(rgb(4, 6), "b", left=2, bottom=3)
    assert decode(fake.sent["outpaint"]).tolist() == [2, 0, 0, 3]
    assert result.images[0].size == (8, 7)
    with pytest.raises(InvalidRequestError, match="left, top, right or bottom"):
        client.outpaint(rgb(), "c")


def test_invalid_request_fails_before_any_call() -> None:
    fake = FakeTriton()
    client = InpaintClient(client=fake)
    with pytest.raises(InvalidRequestError, match="mask: size"):
        client.inpaint(rgb(4, 6), np.zeros((6, 4), np.uint8), "x")
    assert fake.calls == []


def test_timeouts_are_passed_as_client_timeout() -> None:
    fake = FakeTriton()
    client = InpaintClient(timeout=30.0, client=fake)
    client.text_to_image("a")
    client.text_to_image("a", timeout=2.5)
    client.list_models(timeout=1.0)
    timeouts = [kwargs["client_timeout"] for _, kwargs in fake.calls]
    assert timeouts == [30.0, 30.0, 2.5, 1.0]


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("infer", lambda c: c.inpaint(rgb(), np.zeros((4, 6), bool), "x")),
        ("get_model_config", lambda c: c.text_to_image("x")),
        ("get_model_repository_index", lambda c: c.list_models()),
    ],
)
def test_triton_errors_become_sdserve_errors(method: str, call: Any) -> None:
    error = InferenceServerException(
        "mask must be 2-D, got shape [4, 6, 3]", status="StatusCode.INVALID_ARGUMENT"
    )
    client = InpaintClient(client=FakeTriton(fail={method: error}))
    with pytest.raises(SdserveError) as info:
        call(client)
    assert not isinstance(info.value, InferenceServerException)
    assert info.value.message == "mask must be 2-D, got shape [4, 6, 3]"
    assert info.value.status == "StatusCode.INVALID_ARGUMENT"
    assert str(info.value) == "[StatusCode.INVALID_ARGUMENT] mask must be 2-D, got shape [4, 6, 3]"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("code", "status"),
    [("INVALID_ARG", "StatusCode.INVALID_ARGUMENT"), ("UNAVAILABLE", "StatusCode.UNAVAILABLE"),
     ("SOMETHING_NEW", "StatusCode.UNKNOWN")],
)  # fmt: skip
def test_a_streamed_error_keeps_its_status(code: str, status: str) -> None:
    text = stream_error_text(code, "adapters: 'x' is not an adapter: here: no")
    error = SdserveError.from_triton(InferenceServerException(text))  # a stream's: no status
    assert error.status == status
    assert error.message == "adapters: 'x' is not an adapter: here: no"
    assert parse_stream_error("boom: not a status") == (None, "boom: not a status")


def test_error_without_status() -> None:
    client = InpaintClient(client=FakeTriton(fail={"infer": InferenceServerException("boom")}))
    with pytest.raises(SdserveError) as info:
        client.text_to_image("x")
    assert info.value.status is None
    assert str(info.value) == "boom"


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"images": np.zeros((1, 4, 4, 3), np.uint8)}, "no 'seeds' output"),
        ({"seeds": np.zeros(1, np.int64)}, "no 'images' output"),
        (
            {"images": np.zeros((4, 4, 3), np.uint8), "seeds": np.zeros(1, np.int64)},
            "(4, 4, 3)",
        ),
        (
            {"images": np.zeros((2, 4, 4, 3), np.uint8), "seeds": np.zeros(1, np.int64)},
            "got 2 images",
        ),
    ],
)
def test_malformed_responses(outputs: dict[str, np.ndarray], message: str) -> None:
    fake = FakeTriton()
    fake.outputs = outputs
    with pytest.raises(SdserveError) as info:
        InpaintClient(client=fake).text_to_image("x")
    assert message in str(info.value)


def test_batched_response_must_have_batch_size_one() -> None:
    with pytest.raises(SdserveError, match="batch size 1"):
        GenerationResult.from_outputs(
            np.zeros((2, 1, 4, 4, 3), np.uint8), np.zeros((2, 1), np.int64), batched=True
        )


def test_list_models_and_readiness() -> None:
    fake = FakeTriton()
    assert InpaintClient(client=fake).list_models() == ["inpaint", "text_encoder"]
    assert InpaintClient(client=fake).is_ready()
    assert not InpaintClient(model="missing", client=fake).is_ready()
    down = FakeTriton(fail={"is_server_ready": InferenceServerException("unavailable")})
    assert not InpaintClient(client=down).is_ready()


def test_context_manager_closes() -> None:
    fake = FakeTriton()
    with InpaintClient(client=fake) as client:
        assert "inpaint" in repr(client)
    assert fake.closed


def test_real_tritonclient_is_built_lazily_without_a_server() -> None:
    client = InpaintClient("127.0.0.1:1", timeout=0.5)  # nothing listens; gRPC connects lazily
    assert not client.is_ready()
    with pytest.raises(SdserveError):
        client.list_models()
    client.close()


# CLI ----------------------------------------------------------------------------------------


class Factory:
    def __init__(self, fake: FakeTriton) -> None:
        self.fake = fake
        self.kwargs: dict[str, Any] = {}

    def __call__(self, **kwargs: Any) -> InpaintClient:
        self.kwargs = kwargs
        return InpaintClient(**kwargs, connect=lambda url: self.fake)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(rgb(4, 6)).save(image)
    Image.new("1", (6, 4), 1).save(mask)
    return image, mask


def test_cli_inpaint_writes_one_png_per_image(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, mask = files
    out = tmp_path / "results" / "out.png"
    factory = Factory(FakeTriton(max_batch_size=1))
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "a dog"]
    argv += ["--negative-prompt", "cat", "--steps", "12", "--guidance-scale", "5.5"]
    argv += ["--seed", "7", "--num-images", "3", "--no-preserve-unmasked", "--out", str(out)]
    argv += ["--url", "10.0.0.1:9001", "--model", "sd", "--timeout", "60"]
    assert cli.main(argv, client_factory=factory) == 0
    assert factory.kwargs == {
        "url": "10.0.0.1:9001", "model": "sd", "timeout": 60.0, "ssl": False,
        "admin_key": None, "retry_started": False,
    }  # fmt: skip
    paths = [out, out.with_name("out-1.png"), out.with_name("out-2.png")]
    assert capsys.readouterr().out.splitlines() == [
        f"{path}\tseed={seed}" for path, seed in zip(paths, [7, 8, 9], strict=True)
    ]
    for path in paths:
        with Image.open(path) as written:
            assert (written.format, written.size, written.mode) == ("PNG", (6, 4), "RGB")
    sent = {name: decode(i)[0] for name, i in factory.fake.sent.items()}  # strip batch dim
    assert sent["negative_prompt"][0] == b"cat"
    assert sent["steps"][0] == 12
    assert sent["guidance_scale"][0] == np.float32(5.5)
    assert sent["preserve_unmasked"][0] == np.False_
    assert set(np.unique(sent["mask"]).tolist()) == {255}
    assert "strength" not in sent
    assert "scheduler" not in sent


def test_cli_inpaint_sends_the_mask_blur(files: tuple[Path, Path], tmp_path: Path) -> None:
    image, mask = files
    factory = Factory(FakeTriton())
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p"]
    argv += ["--mask-blur", "6", "--out", str(tmp_path / "o.png")]
    assert cli.main(argv, client_factory=factory) == 0
    assert decode(factory.fake.sent["mask_blur"]).tolist() == [6]


def test_cli_sends_the_clip_skip(files: tuple[Path, Path], tmp_path: Path) -> None:
    factory = Factory(FakeTriton(parameters={"limit_max_clip_skip": "2"}))
    argv = ["txt2img", "--prompt", "p", "--clip-skip", "2", "--out", str(tmp_path / "o.png")]
    assert cli.main(argv, client_factory=factory) == 0
    assert decode(factory.fake.sent["clip_skip"]).tolist() == [2]


def test_cli_sends_each_lora_with_its_scale(tmp_path: Path) -> None:
    factory = Factory(FakeTriton())
    argv = ["txt2img", "--prompt", "p", "--lora", "style:0.8", "--lora", "sub:ject"]
    with pytest.raises(SystemExit):  # "ject" is no scale
        cli.main([*argv, "--out", str(tmp_path / "o.png")], client_factory=factory)
    argv = ["txt2img", "--prompt", "p", "--lora", "style:0.8", "--lora", "subject"]
    assert cli.main([*argv, "--out", str(tmp_path / "o.png")], client_factory=factory) == 0
    assert decode(factory.fake.sent["adapters"]).tolist() == [b"style", b"subject"]
    assert decode(factory.fake.sent["adapter_scales"]).tolist() == [np.float32(0.8), 1.0]


def test_cli_img2img_sends_the_image_without_a_mask(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, _ = files
    factory = Factory(FakeTriton())
    argv = ["img2img", "--image", str(image), "--prompt", "p", "--strength", "0.6"]
    assert cli.main([*argv, "--out", str(tmp_path / "o.png")], client_factory=factory) == 0
    assert set(factory.fake.sent) == {"prompt", "image", "strength"}
    assert decode(factory.fake.sent["strength"]).tolist() == [np.float32(0.6)]


def test_cli_sends_prompt_weighting_only_when_asked(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, mask = files
    sent = []
    for extra in ([], ["--prompt-weighting"]):
        factory = Factory(FakeTriton())
        argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "a (red)1.3 fox"]
        assert cli.main([*argv, *extra, "--out", str(tmp_path / "o.png")], factory) == 0
        sent.append(factory.fake.sent.get("prompt_weighting"))
    assert sent[0] is None and decode(sent[1]).tolist() == [True]
    with pytest.raises(InvalidRequestError, match="prompt_weighting must be a bool, got str"):
        encode_request(GenerationRequest("p", prompt_weighting="yes"))  # type: ignore[arg-type]


def test_cli_inpaint_sends_the_crop_and_its_size(files: tuple[Path, Path], tmp_path: Path) -> None:
    image, mask = files
    factory = Factory(FakeTriton())
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p"]
    argv += ["--padding-mask-crop", "2", "--height", "64", "--width", "48"]
    assert cli.main([*argv, "--out", str(tmp_path / "o.png")], client_factory=factory) == 0
    sent = {name: decode(factory.fake.sent[name]).tolist() for name in ("height", "width")}
    assert decode(factory.fake.sent["padding_mask_crop"]).tolist() == [2]
    assert sent == {"height": [64], "width": [48]}


def test_sdk_refuses_a_crop_without_a_mask_before_sending() -> None:
    with pytest.raises(InvalidRequestError, match="^padding_mask_crop: needs an image and its"):
        encode_request(GenerationRequest("p", image=rgb(), padding_mask_crop=4))
    with pytest.raises(InvalidRequestError, match="^padding_mask_crop: -1 out of range"):
        encode_request(
            GenerationRequest("p", image=rgb(), mask=rgb()[..., 0], padding_mask_crop=-1)
        )


def test_phone_photos_are_turned_upright_by_their_exif_orientation(tmp_path: Path) -> None:
    """A photo stored sideways with EXIF orientation 6 ("rotate 90° clockwise to show") is
    sent as it is shown, and its mask drawn on the shown photo matches it."""
    stored = rgb(4, 6)
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "photo.png"
    photo.save(path, exif=exif.tobytes())
    with Image.open(path) as loaded:
        assert loaded.size == (6, 4)  # as stored
        shown = to_rgb_array(loaded)
    assert np.array_equal(shown, np.rot90(stored, k=-1))  # (6, 4, 3): turned clockwise
    request = GenerationRequest("p", image=Image.open(path), mask=np.full((6, 4), 255, np.uint8))
    assert encode_request(request)["image"].shape == (6, 4, 3)


def test_sixteen_bit_images_keep_their_top_eight_bits() -> None:
    wide = Image.fromarray(np.array([[0, 65535], [256, 32768]], dtype=np.uint16))
    assert wide.mode.startswith("I;16")
    assert to_mask_array(wide).tolist() == [[0, 255], [1, 128]]
    assert to_rgb_array(wide)[..., 1].tolist() == [[0, 255], [1, 128]]


def test_cli_inpaint_defaults(files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    image, mask = files
    monkeypatch.chdir(image.parent)
    factory = Factory(FakeTriton())
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p"]
    assert cli.main(argv, client_factory=factory) == 0
    assert factory.kwargs == {
        "url": "127.0.0.1:8001", "model": "inpaint", "timeout": None, "ssl": False,
        "admin_key": None, "retry_started": False,
    }  # fmt: skip
    assert set(factory.fake.sent) == {"prompt", "image", "mask"}
    assert (image.parent / "out.png").is_file()


def test_cli_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--url", "h:1"], client_factory=Factory(FakeTriton())) == 0
    assert capsys.readouterr().out == "inpaint\ntext_encoder\n"


def test_cli_models_lists_checkpoints_with_their_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    listing = {
        "budget_mb": 512.0,
        "checkpoints": [
            {"name": "inpaint", "architecture": "sd15", "on_demand": True, "state": "loaded",
             "requests": 2, "size_mb": 40.5, "components": [
                 {"name": "unet", "ready": True, "size_mb": 30.0, "rss_mb": 120.5,
                  "variants": [{"adapters": [["pixel", 0.8], ["ink", -0.5]], "size_mb": 30.0},
                               {"adapters": [], "checkpoint": "ds", "size_mb": 30.0}]},
             ]},
            {"name": "other", "architecture": "sdxl", "on_demand": True, "state": "on disk",
             "requests": 0, "size_mb": 80.0, "components": [
                 {"name": "other_unet", "ready": False, "size_mb": 80.0, "rss_mb": None,
                  "variants": []},
             ]},
        ],
    }  # fmt: skip
    fake = FakeTriton()
    fake.outputs = {"checkpoints": np.array([[json.dumps(listing).encode()]], dtype=np.object_)}
    assert cli.main(["models", "--url", "h:1"], client_factory=Factory(fake)) == 0
    assert [c[1]["model_name"] for c in fake.calls if c[0] == "infer"] == ["checkpoints"]
    assert capsys.readouterr().out.splitlines() == [
        "checkpoint budget: 512 MB",
        "inpaint\tsd15\tloaded\ton demand\t40.5 MB\trequests=2",
        "  unet\tready\t30 MB\tresident 120.5 MB",
        "    lora pixel:0.8,ink:-0.5\t30 MB",
        "    weights of ds\t30 MB",
        "other\tsdxl\ton disk\ton demand\t80 MB\trequests=0",
        "  other_unet\tnot loaded\t80 MB",
    ]


@pytest.mark.parametrize("call", ["stream", "infer"])
def test_cli_server_error_exits_1_without_traceback(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], call: str
) -> None:
    image, mask = files
    error = InferenceServerException("steps must be >= 1, got 0", "StatusCode.INVALID_ARGUMENT")
    factory = Factory(FakeTriton(fail={call: error}))
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p"]
    argv += ["--no-progress"] if call == "infer" else []
    assert cli.main([*argv, "--out", str(tmp_path / "o.png")], client_factory=factory) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "sdserve-client: error: [StatusCode.INVALID_ARGUMENT] steps must be >= 1, got 0\n"
    )
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "extra",
    [["--mask", "missing.png"], ["--mask", "{image}", "--strength", "2"]],
)
def test_cli_client_side_errors_exit_1(
    files: tuple[Path, Path], extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    image, _ = files
    extra = [arg.format(image=image) for arg in extra]
    argv = ["inpaint", "--image", str(image), "--prompt", "p", *extra]
    assert cli.main(argv, client_factory=Factory(FakeTriton())) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdserve-client: error: ")
    assert "Traceback" not in err


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["inpaint", "--image", "a.png", "--mask", "b.png"])
    assert info.value.code == 2
    assert "--prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


def test_output_paths() -> None:
    assert cli.output_paths(Path("d/out.png"), 1) == [Path("d/out.png")]
    assert cli.output_paths(Path("x.png"), 3) == [Path("x.png"), Path("x-1.png"), Path("x-2.png")]


def test_the_models_own_limits_are_checked_before_inference() -> None:
    """The SDK reads the served model's `limit_*` parameters and applies the shared rules."""
    fake = FakeTriton(1, parameters={"limit_max_steps": "10", "limit_max_images": "2"})
    client = InpaintClient(model="inpaint", client=fake)
    with pytest.raises(InvalidRequestError, match=r"steps: 20 out of range \[1, 10\]"):
        client.inpaint(rgb(), Image.new("L", (6, 4), 255), "a cat", steps=20)
    with pytest.raises(InvalidRequestError, match="num_images"):
        client.inpaint(rgb(), Image.new("L", (6, 4), 255), "a cat", steps=5, num_images=3)
    assert [method for method, _ in fake.calls] == ["get_model_config"]  # never inferred
    client.inpaint(rgb(), Image.new("L", (6, 4), 255), "a cat", steps=10, num_images=2)
    assert [method for method, _ in fake.calls][-1] == "infer"


def test_clip_skip_beyond_the_models_layers_is_refused_before_inference() -> None:
    """`limit_max_clip_skip` (the export writes the text encoder's layer count) bounds
    `clip_skip` with the server's own message; a config without it allows no skip."""
    fake = FakeTriton(1, parameters={"limit_max_clip_skip": "12"})
    client = InpaintClient(model="inpaint", client=fake)
    with pytest.raises(InvalidRequestError, match=r"^clip_skip: 13 out of range \[0, 12\]$"):
        client.text_to_image("a cat", 64, 64, clip_skip=13)
    assert [method for method, _ in fake.calls] == ["get_model_config"]  # never inferred
    client.text_to_image("a cat", 64, 64, clip_skip=12)
    assert [method for method, _ in fake.calls][-1] == "infer"
    bare = InpaintClient(model="inpaint", client=FakeTriton(1))
    with pytest.raises(InvalidRequestError, match=r"^clip_skip: 1 out of range \[0, 0\]$"):
        bare.text_to_image("a cat", 64, 64, clip_skip=1)
    with pytest.raises(InvalidRequestError, match="clip_skip must be an int"):
        encode_request(GenerationRequest("a cat", clip_skip=1.5))  # type: ignore[arg-type]


def test_the_models_image_and_canvas_limits_are_checked_before_inference() -> None:
    """`limit_max_pixels` and `limit_max_canvas_pixels` too, with the rule table's messages."""
    limits = {"limit_max_pixels": "20", "limit_max_canvas_pixels": "30"}
    fake = FakeTriton(1, parameters=limits)
    client = InpaintClient(model="inpaint", client=fake)
    with pytest.raises(InvalidRequestError) as err:
        client.inpaint(rgb(4, 6), Image.new("L", (6, 4), 255), "a cat")
    assert err.value.message == "image: size 4x6 = 24 pixels exceeds 20"
    with pytest.raises(InvalidRequestError) as err:
        client.outpaint(rgb(4, 4), "a cat", right=4)
    assert err.value.message == "outpaint: canvas 4x8 = 32 pixels exceeds 30"
    assert [method for method, _ in fake.calls] == ["get_model_config"]  # never inferred
    client.outpaint(rgb(4, 4), "a cat", right=3)  # 4x7 = 28 pixels
    client.inpaint(rgb(4, 5), Image.new("L", (5, 4), 255), "a cat")  # 20 pixels
    assert [method for method, _ in fake.calls][-2:] == ["infer", "infer"]


def test_the_models_schedulers_are_checked_before_inference() -> None:
    """The served `schedulers` list, as the server reads it (a newer server's names too)."""
    fake = FakeTriton(1, parameters={"schedulers": "DDIM, warp_drive"})
    client = InpaintClient(model="inpaint", client=fake)
    with pytest.raises(InvalidRequestError) as err:
        client.text_to_image("a cat", scheduler="euler")
    assert (
        err.value.message == "scheduler: 'euler' is unknown to this model; valid: ddim, warp_drive"
    )
    assert [method for method, _ in fake.calls] == ["get_model_config"]  # never inferred
    client.text_to_image("a cat", scheduler="warp_drive")  # unknown to this SDK, served there
    client.text_to_image("a cat", scheduler=" Ddim")
    assert [method for method, _ in fake.calls][-2:] == ["infer", "infer"]


@pytest.fixture(autouse=True)
def _no_admin_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv(ADMIN_KEY_FILE_ENV, raising=False)


# Replicas: spreading, failing over, backoff and re-probe ------------------------------------

# gRPC's and Triton's own wording, as seen from grpcio 1.85 against tritonserver 2.51.
REFUSED_CONNECTION = InferenceServerException(
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
    "Failed to connect to remote host: Connection refused",
    "StatusCode.UNAVAILABLE",
)
QUEUE_FULL = InferenceServerException("Exceeds maximum queue size", "StatusCode.UNAVAILABLE")
UNLOADING = InferenceServerException(
    "Request for unknown model: 'inpaint' has no available versions", "StatusCode.NOT_FOUND"
)
RESET = InferenceServerException(
    "Stream removed (recvmsg:Connection reset by peer (104))", "StatusCode.UNAVAILABLE"
)
SOCKET_CLOSED_AT_SETUP = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:50341: "
    "Socket closed"
)
WRONG_CA = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50341: Tls "
    "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
    "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
)
NOT_TLS = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:43635: Tls "
    "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
    "routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context"
)
RESTRICTED = InferenceServerException(
    "This protocol is restricted, expecting header 'sdserve-admin-key'", "StatusCode.UNAVAILABLE"
)


class Context:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ReplicaFake(FakeTriton):
    """A fake server whose next infer calls fail with the queued errors, then succeed."""

    def __init__(self, name: str, errors: list[Exception] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.errors = list(errors or [])
        self.ready = True
        self.contexts: list[Context] = []

    def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> FakeResult:
        if self.errors:
            self._record("infer", model_name=model_name, **kwargs)
            raise self.errors.pop(0)
        return super().infer(model_name, inputs, **kwargs)

    def async_infer(
        self, model_name: str, inputs: list[Any], callback: Any, **kwargs: Any
    ) -> Context:
        context = Context()
        self.contexts.append(context)
        try:
            result = self.infer(model_name, inputs, **kwargs)
        except InferenceServerException as error:
            callback(result=None, error=error)
        else:
            callback(result=result, error=None)
        return context

    def is_server_ready(self, **kwargs: Any) -> bool:
        self._record("is_server_ready", **kwargs)
        if not self.ready:
            raise REFUSED_CONNECTION
        return True

    def infers(self) -> int:
        return method_names(self).count("infer")


def replica_client(*fakes: ReplicaFake, **kwargs: Any) -> InpaintClient:
    servers = {fake.name: fake for fake in fakes}
    return InpaintClient(list(servers), connect=servers.__getitem__, **kwargs)


def t2i(client: InpaintClient, **options: Any) -> GenerationResult:
    return client.text_to_image("a", height=8, width=8, **options)


@pytest.mark.parametrize(
    ("status", "message", "outcome"),
    [
        (REFUSED_CONNECTION.status(), REFUSED_CONNECTION.message(), Outcome.NOT_SENT),
        ("StatusCode.UNAVAILABLE", WRONG_CA, Outcome.NOT_SENT),
        ("StatusCode.UNAVAILABLE", SOCKET_CLOSED_AT_SETUP, Outcome.NOT_SENT),
        ("StatusCode.UNAVAILABLE", "errors resolving h:1: Domain name not found", Outcome.NOT_SENT),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", Outcome.REFUSED),
        ("StatusCode.UNAVAILABLE", "Request timeout expired", Outcome.REFUSED),
        (UNLOADING.status(), UNLOADING.message(), Outcome.REFUSED),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found", Outcome.REFUSED),
        (RESET.status(), RESET.message(), Outcome.BROKEN),
        ("StatusCode.UNAVAILABLE", "Socket closed", Outcome.BROKEN),
        ("StatusCode.UNAVAILABLE", RESTRICTED.message(), Outcome.FINAL),
        ("StatusCode.INVALID_ARGUMENT", "steps: 0 out of range", Outcome.FINAL),
        ("StatusCode.CANCELLED", "Locally cancelled by application!", Outcome.FINAL),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", Outcome.FINAL),
        ("StatusCode.INTERNAL", "unet: Stub process 'unet_0_0' is not healthy.", Outcome.BROKEN),
        ("StatusCode.INTERNAL", "RuntimeError: boom", Outcome.FINAL),
        (
            "StatusCode.UNAVAILABLE",
            "Not enough memory: the request needs about 900 MB, the memory budget is 800 MB "
            "and requests in progress hold 0 MB; retry later, or ask for fewer or smaller images",
            Outcome.REFUSED,
        ),
        (None, "boom", Outcome.FINAL),
    ],
)
def test_failures_are_classified_by_what_they_say_about_the_request(
    status: str | None, message: str, outcome: Outcome
) -> None:
    assert classify(status, message) is outcome


def test_requests_spread_over_replicas_round_robin() -> None:
    a, b = ReplicaFake("a:1"), ReplicaFake("b:1")
    client = replica_client(a, b)
    assert client.url == "a:1,b:1" and client.urls == ("a:1", "b:1")
    for seed in range(6):
        assert t2i(client, seed=seed).seeds == [seed]
    assert (a.infers(), b.infers()) == (3, 3)
    assert [(r.url, r.healthy, r.outstanding) for r in client.replicas] == [
        ("a:1", True, 0), ("b:1", True, 0),
    ]  # fmt: skip


def test_comma_separated_addresses() -> None:
    a, b = ReplicaFake("a:1"), ReplicaFake("b:1")
    client = InpaintClient(" a:1, b:1 ,a:1", connect={"a:1": a, "b:1": b}.__getitem__)
    assert client.urls == ("a:1", "b:1")
    with pytest.raises(SdserveError, match="no server address"):
        InpaintClient(" , ")
    with pytest.raises(SdserveError, match="connect="):
        InpaintClient("a:1,b:1", client=a)


def test_the_least_loaded_replica_is_chosen() -> None:
    pool = ReplicaPool([("a", ReplicaFake("a")), ("b", ReplicaFake("b"))], "inpaint")
    a, b = pool.acquire(), pool.acquire()  # round robin: a, then b
    assert a is not None and b is not None and (a.url, b.url) == ("a", "b")
    pool.release(a)  # a: 0 outstanding, b: 1
    again = pool.acquire()
    assert again is not None and again.url == "a"
    assert [state.outstanding for state in pool.states()] == [1, 1]


def test_an_unreachable_replica_is_skipped_and_left_out_until_its_backoff_ends() -> None:
    a, b = ReplicaFake("a:1", [REFUSED_CONNECTION]), ReplicaFake("b:1")
    a.ready = False
    client = replica_client(a, b, failover=FailoverPolicy(backoff_s=60, max_backoff_s=60))
    for seed in range(4):  # the first goes to a, fails before sending, and moves to b
        assert t2i(client, seed=seed).seeds == [seed]
    assert (a.infers(), b.infers()) == (1, 4)
    state = client.replicas[0]
    assert (state.healthy, state.failures) == (False, 1)
    assert "Connection refused" in (state.last_error or "")
    assert "is_server_ready" not in method_names(a)  # backoff not over: not even probed


def test_a_failed_replica_is_probed_after_its_backoff_and_rejoins_when_ready() -> None:
    now = [0.0]
    a, b = ReplicaFake("a"), ReplicaFake("b")
    pool = ReplicaPool(
        [("a", a), ("b", b)], "inpaint", FailoverPolicy(1.0, 4.0), clock=lambda: now[0]
    )
    first = pool.acquire()
    assert first is not None and first.url == "a"
    assert pool.release(first, REFUSED_CONNECTION) is Outcome.NOT_SENT
    a.ready = False
    seen = []
    for step in (0.5, 1.0, 2.9, 3.0, 6.9, 7.0):  # backoff 1 s, then 2 s, then 4 s (the cap)
        now[0] = step
        if step == 6.9:
            a.ready = True
        chosen = pool.acquire()
        assert chosen is not None
        pool.release(chosen)
        seen.append((chosen.url, pool.states()[0].failures))
    assert seen == [("b", 1), ("b", 2), ("b", 2), ("b", 3), ("b", 3), ("a", 0)]
    assert method_names(a).count("is_server_ready") == 3  # probed at 1.0, 3.0 and 7.0 only
    assert pool.states()[0].healthy


OVER_BUDGET = InferenceServerException(
    "Not enough memory: the request needs about 900 MB, the memory budget is 800 MB and "
    "requests in progress hold 0 MB; retry later, or ask for fewer or smaller images",
    "StatusCode.UNAVAILABLE",
)


@pytest.mark.parametrize("busy", [QUEUE_FULL, OVER_BUDGET])
def test_a_busy_replica_moves_the_request_but_stays_in_rotation(
    busy: InferenceServerException,
) -> None:
    a, b = ReplicaFake("a:1", [busy]), ReplicaFake("b:1")
    client = replica_client(a, b)
    assert t2i(client).seeds == [42]  # no seed: not started, so moving it is always safe
    assert (a.infers(), b.infers()) == (1, 1)
    assert client.replicas[0].healthy
    t2i(client)
    assert a.infers() == 2


def test_an_unloading_model_moves_the_request_and_marks_the_replica() -> None:
    a, b = ReplicaFake("a:1", [UNLOADING]), ReplicaFake("b:1")
    client = replica_client(a, b)
    assert t2i(client).seeds == [42]
    assert not client.replicas[0].healthy


@pytest.mark.parametrize(
    ("seed", "allowed", "retried"),
    [(7, True, True), (7, False, False), (None, True, False), (None, False, False)],
)
def test_a_broken_call_is_resent_only_when_seeded_and_allowed(
    seed: int | None, allowed: bool, retried: bool
) -> None:
    a, b = ReplicaFake("a:1", [RESET]), ReplicaFake("b:1")
    client = replica_client(a, b, retry_started=allowed)
    if retried:
        assert t2i(client, seed=seed).seeds == [seed]
        assert b.infers() == 1
        return
    with pytest.raises(SdserveError) as info:
        t2i(client, seed=seed)
    assert b.infers() == 0
    assert info.value.status == "StatusCode.UNAVAILABLE"
    assert "Connection reset by peer" in str(info.value)
    assert "may have started generating" in str(info.value)
    assert "retry_started=True" in str(info.value)


def test_retry_started_can_be_given_per_call() -> None:
    a, b = ReplicaFake("a:1", [RESET]), ReplicaFake("b:1")
    client = replica_client(a, b)
    request = GenerationRequest("a", height=8, width=8, seed=5)
    assert client.generate(request, retry_started=True).seeds == [5]


def test_a_final_answer_is_not_sent_elsewhere() -> None:
    error = InferenceServerException("steps: 0 out of range", "StatusCode.INVALID_ARGUMENT")
    a, b = ReplicaFake("a:1", [error]), ReplicaFake("b:1")
    client = replica_client(a, b, retry_started=True)
    with pytest.raises(SdserveError) as info:
        t2i(client, seed=1)
    assert str(info.value) == "[StatusCode.INVALID_ARGUMENT] steps: 0 out of range"
    assert b.infers() == 0 and client.replicas[0].healthy


def test_every_replica_down_names_each_failure() -> None:
    a, b = ReplicaFake("a:1", [REFUSED_CONNECTION]), ReplicaFake("b:1", [QUEUE_FULL])
    client = replica_client(a, b)
    with pytest.raises(SdserveError) as info:
        t2i(client)
    message = str(info.value)
    assert message.startswith("[StatusCode.UNAVAILABLE] no replica could serve the call: a:1: ")
    assert "Connection refused" in message and "b:1: [StatusCode.UNAVAILABLE] Exceeds" in message
    assert (a.infers(), b.infers()) == (1, 1)  # each tried once: bounded


def test_a_single_replica_reports_its_error_as_it_is() -> None:
    client = replica_client(ReplicaFake("a:1", [QUEUE_FULL]))
    with pytest.raises(SdserveError) as info:
        t2i(client)
    assert str(info.value) == "[StatusCode.UNAVAILABLE] Exceeds maximum queue size"


def test_a_retry_gets_what_is_left_of_the_timeout() -> None:
    a, b = ReplicaFake("a:1", [QUEUE_FULL]), ReplicaFake("b:1")
    client = replica_client(a, b, timeout=30.0)
    t2i(client)
    first = [kw for m, kw in a.calls if m == "infer"][0]["client_timeout"]
    second = [kw for m, kw in b.calls if m == "infer"][0]["client_timeout"]
    assert first == 30.0 and 29.0 < second < 30.0


def test_metadata_calls_fail_over() -> None:
    a, b = ReplicaFake("a:1"), ReplicaFake("b:1")
    a.fail = {"get_model_config": REFUSED_CONNECTION}
    client = replica_client(a, b)
    assert t2i(client).seeds == [42]
    assert method_names(b)[:2] == ["get_model_config", "infer"]


def test_submit_fails_over_and_cancel_reaches_the_attempt_in_flight() -> None:
    a, b = ReplicaFake("a:1", [REFUSED_CONNECTION]), ReplicaFake("b:1")
    client = replica_client(a, b)
    pending = client.submit(GenerationRequest("a", height=8, width=8, seed=3))
    assert pending.result(timeout=10).seeds == [3]
    assert (a.infers(), b.infers()) == (1, 1)

    c, d = ReplicaFake("c:1", [RESET]), ReplicaFake("d:1")
    pending = replica_client(c, d).submit(GenerationRequest("a", height=8, width=8))
    with pytest.raises(SdserveError, match="may have started"):
        pending.result(timeout=10)
    assert d.infers() == 0

    e = ReplicaFake("e:1")
    pending = replica_client(e).submit(GenerationRequest("a", height=8, width=8))
    pending.cancel()
    assert e.contexts[0].cancelled


def test_list_models_sends_the_admin_key_and_explains_a_locked_server() -> None:
    fake = FakeTriton()
    InpaintClient(client=fake, admin_key="k3y").list_models()
    assert fake.calls[-1][1]["headers"] == {"triton-grpc-protocol-sdserve-admin-key": "k3y"}
    locked = FakeTriton(fail={"get_model_repository_index": RESTRICTED})
    with pytest.raises(SdserveError) as info:
        InpaintClient(client=locked).list_models()
    assert "keeps its model-repository API closed" in str(info.value)
    assert "admin_key" in str(info.value) and ADMIN_KEY_ENV in str(info.value)
    locked.calls.clear()
    InpaintClient(client=locked).text_to_image("x")  # generating needs no key
    assert method_names(locked) == ["get_model_config", "infer"]


def test_is_ready_probes_every_replica() -> None:
    a, b = ReplicaFake("a:1"), ReplicaFake("b:1")
    a.ready = False
    client = replica_client(a, b)
    assert client.is_ready()
    assert [r.healthy for r in client.replicas] == [False, True]
    b.ready = False
    assert not client.is_ready()


# TLS ----------------------------------------------------------------------------------------


def test_tls_settings(tmp_path: Path) -> None:
    assert tls_settings(False) is None and tls_settings(True) == TlsSettings()
    with pytest.raises(SdserveError, match="both a client key and a client certificate"):
        TlsSettings(private_key="k.pem")
    with pytest.raises(SdserveError, match="cannot read the TLS root certificates.*missing.pem"):
        TlsSettings(root_certificates=tmp_path / "missing.pem").credentials()
    with pytest.raises(SdserveError, match="cannot read the TLS root certificates"):
        InpaintClient("h:1", ssl=TlsSettings(root_certificates=tmp_path / "missing.pem"))
    assert TlsSettings(private_key="k", certificate_chain="c").mutual


def test_tls_failures_are_explained() -> None:
    roots = TlsSettings(root_certificates="/certs/ca.pem")
    message = explain("h:1", WRONG_CA, roots)
    assert message.startswith(
        "TLS handshake with h:1 failed: the server's certificate is not signed by a CA in "
        "the root certificates in /certs/ca.pem ("
    )
    assert message.endswith(WRONG_CA + ")")
    assert "the server does not use TLS" in explain("h:1", NOT_TLS, roots)
    assert "may require TLS" in explain("h:1", SOCKET_CLOSED_AT_SETUP, None)
    assert "client certificate" in explain("h:1", SOCKET_CLOSED_AT_SETUP, roots)
    assert explain("h:1", "Exceeds maximum queue size", roots) == "Exceeds maximum queue size"


def test_a_tls_failure_reaches_the_caller_explained() -> None:
    error = InferenceServerException(WRONG_CA, "StatusCode.UNAVAILABLE")
    fake = ReplicaFake("h:1")
    fake.fail = {"get_model_config": error}
    client = InpaintClient("h:1", connect={"h:1": fake}.__getitem__, ssl=TlsSettings("ca.pem"))
    with pytest.raises(SdserveError) as info:
        t2i(client)
    assert info.value.status == "StatusCode.UNAVAILABLE"
    assert info.value.message.startswith("TLS handshake with h:1 failed: the server's certificate")


def test_cli_tls_failover_and_admin_key_options(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    factory = Factory(FakeTriton())
    argv = ["models", "--server", "a:1,b:1", "--root-certs", "ca.pem", "--client-key", "c.key"]
    argv += ["--client-cert", "c.pem", "--ssl-target-name", "sd.example", "--admin-key-file"]
    assert cli.main([*argv, str(key_file)], client_factory=factory) == 0
    assert factory.kwargs == {
        "url": "a:1,b:1", "timeout": None, "admin_key": "s3cret",
        "ssl": TlsSettings(Path("ca.pem"), Path("c.key"), Path("c.pem"), "sd.example"),
    }  # fmt: skip
    assert cli.main(["models", "--ssl"], client_factory=factory) == 0
    assert factory.kwargs["ssl"] is True


def test_cli_retry_started_and_admin_key_from_the_environment(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, mask = files
    monkeypatch.setenv(ADMIN_KEY_ENV, "from-env")
    factory = Factory(FakeTriton())
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p", "--seed", "1"]
    argv += ["--retry-started", "--out", str(tmp_path / "o.png")]
    assert cli.main(argv, client_factory=factory) == 0
    assert factory.kwargs["retry_started"] is True and factory.kwargs["admin_key"] == "from-env"


def test_cli_bad_tls_options_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--client-key", "k.pem"], client_factory=Factory(FakeTriton())) == 1
    assert "both a client key and a client certificate" in capsys.readouterr().err


# Web UI: replicas, TLS and the operator's key -------------------------------------------------


class InfoFake:
    """The web UI's info calls of one locked server (repository index and statistics closed
    without the key), answering with tritonclient's protobuf messages."""

    def __init__(self, key: str = "k3y", up: bool = True) -> None:
        self.key = key
        self.up = up
        self.headers: list[Any] = []

    def _check(self, headers: dict[str, str] | None, restricted: bool = False) -> None:
        self.headers.append(headers)
        if not self.up:
            raise REFUSED_CONNECTION
        if restricted and (headers or {}).get(GRPC_ADMIN_KEY_HEADER) != self.key:
            raise RESTRICTED

    def get_model_config(self, model_name: str, headers: Any = None, **kwargs: Any) -> Any:
        self._check(headers)
        config = model_config_pb2.ModelConfig(name=model_name)
        for role in PIPELINE_ROLES:
            config.parameters[f"{role}_model"].string_value = role
        return service_pb2.ModelConfigResponse(config=config)

    def get_model_repository_index(self, headers: Any = None, **kwargs: Any) -> Any:
        self._check(headers, restricted=True)
        index = service_pb2.RepositoryIndexResponse()
        index.models.add(name="inpaint", version="1", state="READY")
        index.models.add(name="inpaint_xl", version="1", state="READY")
        return index

    def get_inference_statistics(self, model_name: str = "", headers: Any = None, **kw: Any) -> Any:
        self._check(headers, restricted=True)
        return service_pb2.ModelStatisticsResponse()

    def is_server_ready(self, headers: Any = None, **kwargs: Any) -> bool:
        self._check(headers)
        return True

    def is_model_ready(self, model_name: str, headers: Any = None, **kwargs: Any) -> bool:
        self._check(headers)
        return True

    def close(self) -> None:
        pass


def ui_backend(admin_key: str | None, *fakes: InfoFake) -> Backend:
    pool = ReplicaPool([(f"h{i}:1", fake) for i, fake in enumerate(fakes)], "inpaint")
    urls = ",".join(pool.urls)
    return Backend(urls, info_client=PoolInfoClient(pool, admin_key), admin_key=admin_key)


def test_webui_offers_its_own_model_on_a_locked_server_and_all_with_the_key() -> None:
    assert ui_backend(None, InfoFake()).models() == ["inpaint"]
    fake = InfoFake()
    assert ui_backend("k3y", fake).models() == ["inpaint", "inpaint_xl"]
    assert fake.headers[0] == {"triton-grpc-protocol-sdserve-admin-key": "k3y"}
    with pytest.raises(SdserveError, match="restricted"):
        ui_backend("wrong", InfoFake()).models()  # a wrong key is reported, not papered over


def test_webui_info_calls_fail_over_and_the_status_counts_ready_servers() -> None:
    down, up = InfoFake(up=False), InfoFake()
    backend = ui_backend("k3y", down, up)
    assert backend.url == "h0:1,h1:1"
    assert backend.model_info("inpaint").name == "inpaint"
    status = backend.status("inpaint")
    assert status.queue.ready and status.replicas == (1, 2)
    assert "**Ready**: `inpaint` at `h0:1,h1:1` · 1 of 2 servers ready" in status.markdown()


def test_webui_generation_clients_get_the_connection_options() -> None:
    backend = Backend("127.0.0.1:1,127.0.0.1:2", ssl=True, retry_started=True, admin_key="k")
    client = backend.client("inpaint_xl")
    assert isinstance(client, InpaintClient)
    assert client.urls == ("127.0.0.1:1", "127.0.0.1:2") and client.model == "inpaint_xl"
    assert client.tls == TlsSettings() and client.retry_started and client.admin_key == "k"
    backend.close()


def test_webui_command_line_connection_options(tmp_path: Path) -> None:
    from sdserve_client.webui.__main__ import parse_args

    key_file = tmp_path / "key"
    key_file.write_text("s3cret")
    args = parse_args(
        ["--server", "a:1,b:1", "--root-certs", "ca.pem", "--client-key", "k.pem",
         "--client-cert", "c.pem", "--retry-started", "--admin-key-file", str(key_file)]
    )  # fmt: skip
    assert args.server == "a:1,b:1" and args.retry_started and args.admin_key == "s3cret"
    assert args.ssl_option == TlsSettings(Path("ca.pem"), Path("k.pem"), Path("c.pem"))
    defaults = parse_args([])
    assert defaults.ssl_option is False and defaults.admin_key is None
    assert parse_args(["--ssl"]).ssl_option is True
    with pytest.raises(SystemExit):
        parse_args(["--client-cert", "c.pem"])


def test_the_admin_key_is_read_as_the_server_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.admin_key_from(None) is None
    key_file = tmp_path / "admin-key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv(ADMIN_KEY_FILE_ENV, str(key_file))
    assert cli.admin_key_from(None) == "from-file"
    monkeypatch.setenv(ADMIN_KEY_ENV, "from-env")
    assert cli.admin_key_from(None) == "from-env"
    other = tmp_path / "other"
    other.write_text("given\n")
    assert cli.admin_key_from(other) == "given"
    other.write_text("\n")
    with pytest.raises(SdserveError, match="is empty"):
        cli.admin_key_from(other)


def test_cli_streams_with_a_progress_bar_and_saves_previews(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, mask = files
    fake = FakeTriton(max_batch_size=1)
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p", "--steps", "4"]
    argv += ["--previews", str(tmp_path / "previews"), "--preview-every", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "o.png")], client_factory=Factory(fake)) == 0
    assert [kw["model_name"] for m, kw in fake.calls if m == "async_stream_infer"] == [
        "inpaint_stream"
    ]
    assert "infer" not in [m for m, _ in fake.calls]
    assert int(decode(fake.sent["preview_every"])[0, 0]) == 2
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step-2.png"]
    assert "4/4" in capsys.readouterr().err  # the bar reached the last step
    assert Image.open(tmp_path / "o.png").size == (6, 4)


def test_cli_no_progress_is_a_plain_unary_call(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, mask = files
    fake = FakeTriton()
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p"]
    argv += ["--no-progress", "--out", str(tmp_path / "o.png")]
    assert cli.main(argv, client_factory=Factory(fake)) == 0
    assert [m for m, _ in fake.calls if "infer" in m] == ["infer"]
    assert capsys.readouterr().err == ""


def test_sdk_stream_generate_on_event_and_submit_on_event_agree() -> None:
    fake = FakeTriton(max_batch_size=1)
    request = GenerationRequest("p", height=8, width=8, steps=3, seed=5, preview_every=1)
    with InpaintClient(client=fake, connect=lambda url: fake) as client:
        events = list(client.stream(request))
        heard: list[Any] = []
        generated = client.generate(request, on_event=heard.append)
        pending = client.submit(request, on_event=heard.append)
        submitted = pending.result(timeout=30)
    *steps, result = events
    assert [type(e).__name__ for e in steps] == ["Progress", "Preview", "Progress", "Preview",
                                                 "Progress"]  # fmt: skip
    assert result.seeds == generated.seeds == submitted.seeds == [5]
    assert np.array_equal(result.arrays, generated.arrays)
    assert [e.step for e in heard if isinstance(e, Progress)] == [1, 2, 3, 1, 2, 3]
    assert ("stop_stream", {"cancel_requests": False}) in fake.calls  # closed once done


def test_streams_reuse_a_connection_that_ended_with_its_result_and_close_others() -> None:
    made: list[FakeTriton] = []

    def connect(url: str) -> FakeTriton:
        made.append(FakeTriton())
        return made[-1]

    request = GenerationRequest("p", height=8, width=8, steps=2, seed=1)
    with InpaintClient(client=FakeTriton(), connect=connect) as client:
        for _ in range(3):  # one after the other: one connection for all
            assert list(client.stream(request))[-1].seeds == [1]
        assert len(made) == 1 and not made[0].closed
        first, second = client.stream(request), client.stream(request)  # at once: two
        assert len(made) == 2
        for _event in first:  # left early: cancelled, its connection closed
            break
        assert made[0].closed and ("stop_stream", {"cancel_requests": True}) in made[0].calls
        second.cancel()
        assert made[1].closed
        list(client.stream(request))  # a new connection, kept idle when done
        assert len(made) == 3 and not made[2].closed
    assert made[2].closed  # closing the client closes its idle connections


def test_sdk_stream_works_with_async_for() -> None:
    import asyncio

    fake = FakeTriton()
    request = GenerationRequest("p", height=8, width=8, steps=2)

    async def collect() -> list[Any]:
        with InpaintClient(client=fake, connect=lambda url: fake) as client:
            return [event async for event in client.stream(request)]

    events = asyncio.run(collect())
    assert [type(e).__name__ for e in events] == ["Progress", "Progress", "GenerationResult"]


def test_cli_falls_back_to_a_unary_call_on_a_server_without_stream_models(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, mask = files
    missing = InferenceServerException("Request for unknown model: 'inpaint_stream' is not found")
    fake = FakeTriton(fail={"stream": missing})
    argv = ["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "p"]
    assert cli.main([*argv, "--out", str(tmp_path / "o.png")], client_factory=Factory(fake)) == 0
    assert [m for m, _ in fake.calls if "infer" in m] == ["async_stream_infer", "infer"]
    assert (tmp_path / "o.png").exists()
