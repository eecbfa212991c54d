"""The web UI's logic without a browser or a server: callbacks, server info, backend, wiring."""

from __future__ import annotations

import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from sdserve_client import InvalidRequestError, SdserveError
from sdserve_client.webui import callbacks as cb
from sdserve_client.webui import server_info as si
from sdserve_client.webui.backend import Backend, ServerStatus
from sdserve_protocol.events import Preview, Progress
from sdserve_protocol.rules import Limits
from sdserve_protocol.settings import PIPELINE_ROLES, SCHEDULER_NAMES

# --- fakes ------------------------------------------------------------------------------------


class FakeGenerator:
    """Records SDK calls and answers with gray images of the right size; lists `adapters`
    (the listing model's entries, or the error it raises)."""

    def __init__(
        self, error: Exception | None = None, adapters: list[dict] | Exception | None = None
    ) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.error = error
        self.adapters = adapters or []

    def list_adapters(self, *, timeout=None):
        if isinstance(self.adapters, Exception):
            raise self.adapters
        return list(self.adapters)

    def _answer(self, height: int, width: int, options: dict) -> SimpleNamespace:
        if self.error is not None:
            raise self.error
        on_event = options.get("on_event")  # streamed, as the page calls it
        if on_event is not None:
            steps, every = options.get("steps", 2), options.get("preview_every", 0)
            for step in range(1, steps + 1):
                on_event(Progress(step, steps, 0.1 * step, 0.1 * (steps - step)))
                if every and step % every == 0 and step < steps:
                    on_event(Preview(step, steps, np.zeros((1, height, width, 3), np.uint8)))
        first = options.get("seed", 1000)
        count = options.get("num_images", 1)
        images = [Image.new("RGB", (width, height), (i * 40, 128, 128)) for i in range(count)]
        return SimpleNamespace(images=images, seeds=[first + i for i in range(count)])

    def inpaint(self, image, mask, prompt, **options):
        self.calls.append(("inpaint", (image, mask, prompt), options))
        return self._answer(*image.shape[:2], options)

    def outpaint(self, image, prompt, left, top, right, bottom, **options):
        self.calls.append(("outpaint", (image, prompt, left, top, right, bottom), options))
        return self._answer(image.shape[0] + top + bottom, image.shape[1] + left + right, options)

    def text_to_image(self, prompt, height, width, **options):
        self.calls.append(("text_to_image", (prompt, height, width), options))
        return self._answer(height, width, options)

    def img2img(self, image, prompt, **options):
        self.calls.append(("img2img", (image, prompt), options))
        return self._answer(*image.shape[:2], options)


def pipeline_config(name: str = "inpaint", **params: str) -> mc.ModelConfig:
    """A pipeline's config: it names the component model of every role."""
    config = mc.ModelConfig(name=name, backend="python")
    config.input.add(name="prompt", data_type=mc.TYPE_STRING, dims=[1])
    config.input.add(name="image", data_type=mc.TYPE_UINT8, dims=[-1, -1, 3])
    for role in PIPELINE_ROLES:
        config.parameters[f"{role}_model"].string_value = role
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def component_config(name: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python")
    config.input.add(name="sample", data_type=mc.TYPE_FP32, dims=[-1, 4, -1, -1])
    return config


class FakeTriton:
    """The tritonclient.grpc calls of `server_info`, answering with real protobuf messages."""

    def __init__(self, configs: list[mc.ModelConfig], ready: bool = True) -> None:
        self.configs = {config.name: config for config in configs}
        self.ready = ready
        self.stats = service_pb2.ModelStatisticsResponse()

    def get_model_config(self, model_name, **kwargs):
        if model_name not in self.configs:
            raise InferenceServerException(
                f"Request for unknown model: '{model_name}' is not found",
                status="StatusCode.NOT_FOUND",
            )
        return service_pb2.ModelConfigResponse(config=self.configs[model_name])

    def get_model_repository_index(self, **kwargs):
        index = service_pb2.RepositoryIndexResponse()
        for name in self.configs:
            index.models.add(name=name, version="1", state="READY")
        index.models.add(name="broken", version="1", state="UNAVAILABLE")
        return index

    def get_inference_statistics(self, model_name="", **kwargs):
        return self.stats

    def is_server_ready(self, **kwargs):
        if not self.ready:
            raise InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")
        return True

    def is_model_ready(self, model_name, **kwargs):
        return model_name in self.configs


def editor(image: np.ndarray, *layers: np.ndarray) -> dict:
    return {"background": image, "layers": list(layers), "composite": image}


def rgba(height: int, width: int, painted: tuple[slice, slice] | None = None) -> np.ndarray:
    layer = np.zeros((height, width, 4), np.uint8)
    if painted is not None:
        layer[painted] = (255, 255, 255, 217)
    return layer


IMAGE = np.arange(48 * 64 * 4, dtype=np.uint32).reshape(48, 64, 4).astype(np.uint8)
IMAGE[..., 3] = 255


def test_settings_convert_slider_floats_and_leave_defaults_unsent():
    settings = cb.make_settings(" a cat ", "", cb.DEFAULT_SCHEDULER, 4.0, 7.5, 0.8, "-1", 2.0, True)
    assert settings == cb.Settings("a cat", steps=4, strength=0.8, num_images=2)
    assert settings.options(with_image=False) == {
        "steps": 4, "guidance_scale": 7.5, "num_images": 2,
    }  # fmt: skip
    image_options = cb.make_settings("x", "blurry", "euler_a", 3, 5, 0.5, "42", 1, False).options(
        with_image=True
    )
    assert image_options == {
        "steps": 3, "guidance_scale": 5.0, "num_images": 1, "negative_prompt": "blurry",
        "scheduler": "euler_a", "seed": 42, "strength": 0.5, "preserve_unmasked": False,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("-1", None), (-1, None), (-7.0, None), (0, 0), (42.0, 42),
     ("12", 12), (" 42.0 ", 42), ("9223372036854775807", 2**63 - 1), (2**63 - 1, 2**63 - 1)],
)  # fmt: skip
def test_parse_seed(value, expected):
    assert cb.parse_seed(value) == expected


@pytest.mark.parametrize("value", [1.5, "abc", "1e400", float("nan"), float("inf"), True])
def test_parse_seed_rejects_non_integers(value):
    with pytest.raises(cb.UIError, match="seed must be a whole number"):
        cb.parse_seed(value)


def test_custom_scheduler_passes_through_for_the_server_to_judge():
    assert cb.parse_scheduler("  warp_drive ") == "warp_drive"
    assert cb.parse_scheduler(cb.DEFAULT_SCHEDULER) is None
    assert cb.parse_scheduler("") is None


@pytest.mark.parametrize(("name", "index"), [("steps", 3), ("number of images", 7)])
def test_settings_reject_fractional_counts(name, index):
    values = ["x", "", None, 4, 7.5, 1.0, "-1", 1, True]
    values[index] = 2.5
    with pytest.raises(cb.UIError, match=name):
        cb.make_settings(*values)


def test_mask_is_the_union_of_painted_layers():
    first = rgba(48, 64, (slice(0, 10), slice(0, 10)))
    second = rgba(48, 64, (slice(40, 48), slice(60, 64)))
    mask = cb.mask_from_editor(editor(IMAGE, first, second))
    assert mask.dtype == np.uint8 and mask.shape == (48, 64)
    expected = np.zeros((48, 64), np.uint8)
    expected[0:10, 0:10] = expected[40:48, 60:64] = 255
    np.testing.assert_array_equal(mask, expected)


def test_faint_paint_counts_and_blank_layers_give_no_mask():
    faint = rgba(48, 64)
    faint[5, 5, 3] = 1  # an anti-aliased brush edge
    assert cb.mask_from_editor(editor(IMAGE, faint))[5, 5] == 255
    assert cb.mask_from_editor(editor(IMAGE, rgba(48, 64))) is None
    assert cb.mask_from_editor(editor(IMAGE)) is None
    assert cb.mask_from_editor(None) is None
    assert cb.mask_from_editor({"background": None, "layers": [], "composite": None}) is None


def test_layer_of_another_size_is_scaled_to_the_image():
    layer = rgba(24, 32, (slice(0, 12), slice(0, 32)))  # top half, at half resolution
    mask = cb.mask_from_editor(editor(IMAGE, layer))
    assert mask.shape == (48, 64)
    assert (mask[:24] == 255).all() and (mask[24:] == 0).all()


def test_inpaint_inputs_unite_painted_and_uploaded_masks():
    uploaded = np.zeros((48, 64), np.uint8)
    uploaded[20:30, 20:30] = 255
    image, mask = cb.inpaint_inputs(
        editor(IMAGE, rgba(48, 64, (slice(0, 5), slice(0, 5)))), uploaded
    )
    np.testing.assert_array_equal(image, IMAGE[..., :3])
    assert mask[0:5, 0:5].min() == 255 and mask[20:30, 20:30].min() == 255
    assert mask.sum() == 255 * (25 + 100)
    _, only_upload = cb.inpaint_inputs(editor(IMAGE), uploaded)
    np.testing.assert_array_equal(only_upload, uploaded)


def test_uploaded_transparent_mask_uses_its_alpha():
    sheet = rgba(48, 64, (slice(10, 20), slice(10, 20)))
    _, mask = cb.inpaint_inputs(editor(IMAGE), sheet)
    assert mask[10:20, 10:20].min() == 217 and mask.sum() == 217 * 100


@pytest.mark.parametrize(
    ("value", "mask", "message"),
    [
        (None, None, "Upload an image"),
        (editor(IMAGE), None, "Paint over the area"),
        (editor(IMAGE), np.zeros((48, 64), np.uint8), "Paint over the area"),
        (editor(IMAGE), np.full((64, 64), 255, np.uint8), "mask is 64×64 but the image is 64×48"),
    ],
)
def test_inpaint_inputs_explain_what_is_missing(value, mask, message):
    with pytest.raises(cb.UIError, match=message):
        cb.inpaint_inputs(value, mask)


def test_run_inpaint_sends_image_mask_and_options_and_returns_seeded_gallery():
    client = FakeGenerator()
    settings = cb.Settings("a red bicycle", steps=3, seed=7, num_images=2)
    layer = rgba(48, 64, (slice(8, 16), slice(8, 16)))
    generation = cb.run_inpaint(client, settings, editor(IMAGE, layer))
    ((mode, (image, mask, prompt), options),) = client.calls
    assert (mode, prompt) == ("inpaint", "a red bicycle")
    assert image.shape == (48, 64, 3) and mask.shape == (48, 64) and mask.max() == 255
    assert options == {"steps": 3, "guidance_scale": 7.5, "num_images": 2, "seed": 7,
                       "strength": 1.0, "preserve_unmasked": True}  # fmt: skip
    assert generation.seeds == [7, 8]
    assert [caption for _, caption in generation.gallery] == ["seed 7 · 64×48", "seed 8 · 64×48"]
    assert all(image.shape == (48, 64, 3) for image, _ in generation.gallery)
    assert generation.summary == "**inpaint**: 2 images of 64×48 · seeds `7`, `8`"


def test_run_inpaint_sends_a_mask_blur_only_when_set():
    client = FakeGenerator()
    layer = rgba(48, 64, (slice(8, 16), slice(8, 16)))
    cb.run_inpaint(client, cb.Settings("p"), editor(IMAGE, layer), mask_blur=12.0)
    cb.run_inpaint(client, cb.Settings("p"), editor(IMAGE, layer), mask_blur=0)
    assert [options.get("mask_blur") for *_, options in client.calls] == [12, None]
    with pytest.raises(cb.UIError, match="mask blur must be a whole number >= 0"):
        cb.run_inpaint(client, cb.Settings("p"), editor(IMAGE, layer), mask_blur=2.5)


def test_prompt_weighting_is_sent_only_when_checked():
    values = ("a (red)1.3 fox", "", cb.DEFAULT_SCHEDULER, 4, 7.5, 1, "-1", 1, True)
    on, off = cb.make_settings(*values, True), cb.make_settings(*values)
    assert on.options(with_image=False)["prompt_weighting"] is True
    assert "prompt_weighting" not in off.options(with_image=True)


def test_run_img2img_sends_the_image_and_its_strength_without_a_mask():
    client = FakeGenerator()
    generation = cb.run_img2img(client, cb.Settings("oil", steps=2, strength=0.6), IMAGE)
    ((mode, (image, prompt), options),) = client.calls
    assert (mode, prompt, image.shape) == ("img2img", "oil", IMAGE.shape[:2] + (3,))
    assert options["strength"] == 0.6 and "mask" not in options
    assert generation.summary.startswith("**img2img**: 1 image of")
    with pytest.raises(cb.UIError, match="Upload an image to redraw"):
        cb.run_img2img(client, cb.Settings("oil"), None)


def test_run_inpaint_crops_a_large_photo_only_when_asked():
    """The "only the masked area" box sends `padding_mask_crop` with the padding slider's value; the
    photo goes as it is (4032x3024, upright as the editor shows it) and comes back whole."""
    client = FakeGenerator()
    photo = np.zeros((3024, 4032, 4), np.uint8)
    photo[..., 3] = 255
    layer = rgba(3024, 4032, (slice(1500, 1564), slice(2000, 2064)))
    generation = cb.run_inpaint(client, cb.Settings("p"), editor(photo, layer), crop=True,
                                crop_padding=48.0)  # fmt: skip
    cb.run_inpaint(client, cb.Settings("p"), editor(photo, layer), crop=False, crop_padding=48)
    (_, (image, mask, _), options), (*_, plain) = client.calls
    assert image.shape == (3024, 4032, 3) and mask.shape == (3024, 4032)
    assert options["padding_mask_crop"] == 48 and "padding_mask_crop" not in plain
    assert generation.images[0].shape == (3024, 4032, 3)
    with pytest.raises(cb.UIError, match="crop padding must be a whole number >= 0"):
        cb.run_inpaint(client, cb.Settings("p"), editor(photo, layer), crop=True, crop_padding=-1)


def test_run_outpaint_and_text_to_image():
    client = FakeGenerator()
    settings = cb.Settings("sky", steps=2)
    out = cb.run_outpaint(client, settings, IMAGE[..., :3], 16.0, 0, 8, 0)
    assert client.calls[0][1][2:] == (16, 0, 8, 0)
    assert out.images[0].shape == (48, 88, 3) and out.mode == "outpaint"
    t2i = cb.run_text_to_image(client, settings, 64.0, 96.0)
    assert client.calls[1][1] == ("sky", 64, 96)
    assert "strength" not in client.calls[1][2]  # no image: strength would be rejected
    assert t2i.images[0].shape == (64, 96, 3)
    assert t2i.summary == "**text-to-image**: 1 image of 96×64 · seed `1000`"


def test_outpaint_needs_an_image_and_a_side():
    with pytest.raises(cb.UIError, match="Upload an image to extend"):
        cb.run_outpaint(FakeGenerator(), cb.Settings("x"), None, 8, 0, 0, 0)
    with pytest.raises(cb.UIError, match="at least one side"):
        cb.run_outpaint(FakeGenerator(), cb.Settings("x"), IMAGE, 0, 0, 0, 0)
    with pytest.raises(cb.UIError, match="left must be a whole number >= 0"):
        cb.outpaint_sides(-8, 0, 0, 0)


def test_server_errors_propagate_from_runs():
    error = SdserveError("steps: 500 out of range [1, 150]", "StatusCode.INVALID_ARGUMENT")
    with pytest.raises(SdserveError) as raised:
        cb.run_text_to_image(FakeGenerator(error), cb.Settings("x"), 64, 64)
    assert cb.error_message(raised.value) == (
        "The server rejected the request: steps: 500 out of range [1, 150]"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (SdserveError("scheduler: 'x' is unknown", "StatusCode.INVALID_ARGUMENT"),
         "The server rejected the request: scheduler: 'x' is unknown"),
        (SdserveError("failed to connect to all addresses", "StatusCode.UNAVAILABLE"),
         "Cannot reach the Triton server at 127.0.0.1:8001: failed to connect to all addresses"),
        (SdserveError("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED"),
         "The server did not answer in time at 127.0.0.1:8001: Deadline Exceeded"),
        (SdserveError("boom", "StatusCode.INTERNAL"), "Server error (INTERNAL): boom"),
        (SdserveError("odd"), "Server error: odd"),
        (InvalidRequestError("strength must be in [0, 1]"),
         "Invalid setting: strength must be in [0, 1]"),
        (cb.UIError("Upload an image first."), "Upload an image first."),
        (RuntimeError("bad"), "Unexpected error: RuntimeError: bad"),
    ],
)  # fmt: skip
def test_error_message_keeps_the_server_text(error, expected):
    assert cb.error_message(error, "127.0.0.1:8001") == expected


def test_outpaint_preview_tints_the_generated_area():
    image = np.full((32, 40, 3), 200, np.uint8)
    preview, caption = cb.outpaint_preview(image, 8, 0, 16, 4)
    assert preview.shape == (36, 64, 3)
    assert caption.startswith("40×32 → **64×36**")
    assert tuple(preview[0, 0]) != (200, 200, 200)  # new area: tinted red
    assert preview[0, 0, 0] > preview[0, 0, 1]
    np.testing.assert_array_equal(preview[0, 8 + 20], (200, 200, 200))  # deep inside: kept
    assert cb.outpaint_preview(None, 8, 0, 0, 0) == (None, "Upload an image to extend.")
    _, unchanged = cb.outpaint_preview(image, 0, 0, 0, 0)
    assert "set at least one side" in unchanged


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 24), width=st.integers(1, 24),
    sides=st.tuples(*(st.integers(0, 16) for _ in range(4))),
)  # fmt: skip
def test_outpaint_canvas_has_the_enlarged_size_and_keeps_the_original(height, width, sides):
    rng = np.random.default_rng(height * 100 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    canvas, mask = cb.outpaint_canvas(image, sides)
    left, top, right, bottom = sides
    assert canvas.shape == (height + top + bottom, width + left + right, 3)
    assert mask.shape == canvas.shape[:2]
    np.testing.assert_array_equal(canvas[top : top + height, left : left + width], image)
    new_area = np.ones(mask.shape, bool)
    new_area[top : top + height, left : left + width] = False
    assert (mask[new_area] == 255).all()


def test_use_as_input_and_reuse_seed_pick_the_selected_result():
    images = [np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)]
    assert cb.pick_result(images, 1) is images[1]
    assert cb.pick_result(images, None) is images[0]
    assert cb.pick_result(images, 5) is images[0]
    assert cb.reuse_seed([11, 12], 1) == "12" and cb.reuse_seed([11, 12], None) == "11"
    assert cb.parse_seed(cb.reuse_seed([2**63 - 2], None)) == 2**63 - 2  # exact, no float
    with pytest.raises(cb.UIError, match="Generate an image first"):
        cb.pick_result([], None)
    with pytest.raises(cb.UIError, match="No seed to reuse"):
        cb.reuse_seed(None, None)
    value = cb.editor_value(images[1])
    assert value["background"] is images[1] and value["layers"] == []
    assert cb.editor_value(None) is None


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1), (8, 8, 3), (8, 8, 4)])
def test_to_rgb_accepts_every_gradio_image_shape(shape):
    assert cb.to_rgb(np.full(shape, 7, np.uint8)).shape == (8, 8, 3)
    assert cb.to_rgb(Image.new("L", (8, 8))).shape == (8, 8, 3)


# --- server info --------------------------------------------------------------------------------


def test_schedulers_and_limits_come_from_the_config_parameters():
    config = pipeline_config(
        schedulers="pndm, euler_a,,dpmpp_2m_karras", limit_max_steps="60",
        limit_max_images="4", limit_max_guidance_scale="20.0", limit_max_pixels="not a number",
    )  # fmt: skip
    info = si.model_info_from_config(config)
    limits = Limits(max_steps=60, max_images=4, max_guidance_scale=20.0)  # bad max_pixels: default
    assert info == si.ModelInfo("inpaint", ("pndm", "euler_a", "dpmpp_2m_karras"), limits)
    assert (info.max_steps, info.max_images, info.max_guidance_scale) == (60, 4, 20.0)
    assert info.max_pixels == Limits().max_pixels == 1024 * 1024
    assert si.model_info_from_config(pipeline_config()).schedulers == SCHEDULER_NAMES  # absent
    assert si.fetch_model_info(FakeTriton([config]), "inpaint") == info


def test_unknown_model_raises_the_sdk_error_with_the_server_text():
    with pytest.raises(SdserveError, match="'sd99' is not found") as raised:
        si.fetch_model_info(FakeTriton([]), "sd99")
    assert raised.value.status == "StatusCode.NOT_FOUND"


def test_pipeline_models_are_the_ready_models_naming_their_components():
    triton = FakeTriton([pipeline_config("inpaint"), component_config("unet"),
                         pipeline_config("sd15_base")])  # fmt: skip
    assert si.pipeline_models(triton) == ["inpaint", "sd15_base"]


# What Triton 2.51's metrics endpoint serves next to the pipeline's custom metrics: Triton's
# own queue metrics stay ~0 for the pipeline (its batcher holds the queue, not Triton's).
METRICS = """
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="inpaint",version="1"} 3
nv_inference_request_success{model="inpaint",version="2"} 1
nv_inference_request_success{model="unet",version="1"} 99
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="inpaint",version="1"} 40
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="inpaint",version="1"} 0
# HELP sdserve_queue_pending_requests Requests waiting in the pipeline's queue to start
# TYPE sdserve_queue_pending_requests gauge
sdserve_queue_pending_requests{model="inpaint"} 2
sdserve_queue_pending_requests{model="inpaint_xl"} 5
# HELP sdserve_queue_duration_us Cumulative microseconds requests waited in the pipeline's queue before starting
# TYPE sdserve_queue_duration_us counter
sdserve_queue_duration_us{model="inpaint"} 50000
sdserve_queue_duration_us{model="inpaint_xl"} 7
"""  # noqa: E501
# The same endpoint of a server from before the pipeline's batcher: no sdserve_* metrics.
OLD_METRICS = "\n".join(line for line in METRICS.splitlines() if "sdserve_" not in line)
# A server counting every outcome (sdserve_requests_total): the metrics above plus these.
OUTCOME_METRICS = (
    METRICS
    + """
# HELP sdserve_requests_total Requests answered by the pipeline, by outcome
# TYPE sdserve_requests_total counter
sdserve_requests_total{model="inpaint",outcome="success"} 40
sdserve_requests_total{model="inpaint",outcome="invalid"} 2
sdserve_requests_total{model="inpaint",outcome="cancelled"} 0
sdserve_requests_total{model="inpaint",outcome="timeout"} 1
sdserve_requests_total{model="inpaint",outcome="overloaded"} 3
sdserve_requests_total{model="inpaint",outcome="failed"} 0
sdserve_requests_total{model="inpaint_xl",outcome="failed"} 9
# HELP sdserve_queue_wait_us Microseconds requests waited in the pipeline's queue before starting
# TYPE sdserve_queue_wait_us histogram
sdserve_queue_wait_us_count{model="inpaint"} 41
sdserve_queue_wait_us_sum{model="inpaint"} 82000
sdserve_queue_wait_us_bucket{model="inpaint",le="1000"} 20
sdserve_queue_wait_us_bucket{model="inpaint",le="+Inf"} 41
# TYPE sdserve_outstanding_steps gauge
sdserve_outstanding_steps{model="inpaint"} 340
# TYPE sdserve_memory_reserved_bytes gauge
sdserve_memory_reserved_bytes{model="inpaint"} 3221225472
# TYPE sdserve_memory_budget_bytes gauge
sdserve_memory_budget_bytes{model="inpaint"} 12884901888
"""
)


def test_queue_state_reads_the_pipeline_queue_metrics():
    # 2 waiting; 50 000 us waited over 4 requests taken (both versions) = 12.5 ms each
    assert si.queue_state_from_metrics("inpaint", METRICS) == si.QueueState(
        "inpaint", True, avg_queue_ms=12.5, pending=2
    )
    assert si.pipeline_queue_from_metrics(METRICS, "inpaint") == (2, 12.5)
    assert si.metric_value(METRICS, si.PENDING_METRIC, "inpaint_xl") == 5.0
    assert si.metric_value(METRICS, si.SUCCESS_METRIC, "inpaint") == 4.0
    assert si.metric_value(METRICS, si.PENDING_METRIC, "sd15_base") is None


def test_queue_state_reads_outcomes_steps_memory_and_the_wait_histogram():
    state = si.queue_state_from_metrics("inpaint", OUTCOME_METRICS)
    assert state.outcomes == {"success": 40, "invalid": 2, "cancelled": 0, "timeout": 1,
                              "overloaded": 3, "failed": 0}  # fmt: skip
    assert (state.succeeded, state.failed) == (40, 6)
    assert state.avg_queue_ms == 2.0  # the histogram: 82 000 us over 41 waits
    assert state.outstanding_steps == 340 and state.pending == 2
    assert (state.memory_reserved, state.memory_budget) == (3 << 30, 12 << 30)
    assert si.outcome_counts(OUTCOME_METRICS, "inpaint_xl") == dict.fromkeys(si.OUTCOMES, 0) | {
        "failed": 9
    }
    assert si.metric_value(OUTCOME_METRICS, si.REQUESTS_METRIC, "inpaint", outcome="timeout") == 1


def test_queue_state_says_nothing_about_load_without_the_pipeline_metrics():
    # no metrics endpoint, or an older server: Triton's misleading numbers are not shown instead
    for metrics in (OLD_METRICS, ""):
        assert si.queue_state_from_metrics("inpaint", metrics) == si.QueueState("inpaint", True)
    # counters without the success count (model metrics off): pending only
    no_success = "\n".join(line for line in METRICS.splitlines() if "request_success" not in line)
    assert si.pipeline_queue_from_metrics(no_success, "inpaint") == (2, None)
    assert si.fetch_metrics("http://127.0.0.1:9/metrics", timeout=0.5) is None


def test_mean_queue_wait_is_per_request():
    assert si.mean_queue_ms(50_000.0, 4.0) == 12.5
    assert si.mean_queue_ms(0.0, 0.0) == 0.0  # a fresh server
    assert si.mean_queue_ms(900.0, 0.0) is None  # waited, none counted: no mean
    assert si.mean_queue_ms(None, 4.0) is None and si.mean_queue_ms(1.0, None) is None


def test_metrics_parser_matches_the_model_label_exactly():
    text = """
sdserve_queue_pending_requests{model="inpaint_xl"} 5
sdserve_queue_pending_requests{submodel="inpaint"} 6
sdserve_queue_pending_requests_total{model="inpaint"} 7
sdserve_queue_pending_requests{model="inpaint", instance="a"} 1 1700000000000
sdserve_queue_pending_requests{instance="b",model="inpaint"} 2.0
sdserve_queue_pending_requests{model="inpaint",instance="c"} NaN
sdserve_queue_pending_requests 9
"""
    assert si.metric_value(text, si.PENDING_METRIC, "inpaint") == 3.0
    assert si.metric_value(text, si.PENDING_METRIC, "inpaint", instance="b") == 2.0
    assert si.metric_value(text, si.PENDING_METRIC, "inpaint", instance="z") is None


def test_fetch_queue_state_reads_only_open_apis_and_the_metrics_endpoint(monkeypatch):
    class Locked(FakeTriton):  # statistics need the operator's key
        def get_inference_statistics(self, model_name="", **kwargs):
            raise AssertionError("the statistics API is restricted: never asked")

    triton = Locked([pipeline_config()])
    urls = []
    monkeypatch.setattr(
        si, "fetch_metrics", lambda url, timeout=None: urls.append(url) or OUTCOME_METRICS
    )
    state = si.fetch_queue_state(triton, "inpaint", "http://h:8002/metrics")
    assert state == si.queue_state_from_metrics("inpaint", OUTCOME_METRICS)
    assert urls == ["http://h:8002/metrics"]
    assert si.fetch_queue_state(triton, "inpaint") == si.QueueState("inpaint", True)
    assert urls == ["http://h:8002/metrics"]  # no endpoint given: not asked
    monkeypatch.setattr(si, "fetch_metrics", lambda url, timeout=None: None)  # unreachable
    assert si.fetch_queue_state(triton, "inpaint", "http://h:8002/metrics").pending is None


def test_recent_outcomes_are_the_counts_added_within_the_window():
    recent = si.RecentOutcomes(window_s=300)
    counts = dict.fromkeys(si.OUTCOMES, 0)
    assert recent.update(None) == {}  # no counter on this server
    assert recent.update(counts | {"success": 10, "failed": 2}, now=0) == counts  # baseline
    assert recent.update(counts | {"success": 12, "failed": 3}, now=100)["failed"] == 1
    later = recent.update(counts | {"success": 15, "failed": 3}, now=350)
    assert later["failed"] == 1 and later["success"] == 5  # since the sample at 0 + ...
    last = recent.update(counts | {"success": 15, "failed": 3}, now=700)
    assert last["failed"] == 0 and last["success"] == 0  # nothing in the last 5 minutes
    restarted = recent.update(counts | {"success": 1}, now=710)  # a new server
    assert restarted == counts


def test_unreachable_server_is_not_ready_rather_than_an_error():
    state = si.fetch_queue_state(FakeTriton([pipeline_config()], ready=False), "inpaint")
    assert state == si.QueueState("inpaint", ready=False)
    assert si.fetch_queue_state(FakeTriton([pipeline_config()]), "gone").ready is False


# --- backend ------------------------------------------------------------------------------------


def test_backend_makes_one_client_per_model_and_counts_requests_in_flight():
    made = []
    backend = Backend("h:1", client_factory=lambda url, model: made.append(model) or model,
                      info_client=FakeTriton([pipeline_config()]))  # fmt: skip
    assert backend.client("inpaint") == backend.client("inpaint") == "inpaint"
    backend.client("sd15_base")
    assert made == ["inpaint", "sd15_base"]
    with backend.track(), backend.track():
        assert backend.in_flight == 2
    assert backend.in_flight == 0
    assert backend.models() == ["inpaint"]
    assert backend.model_info("inpaint").name == "inpaint"
    assert backend.status("inpaint").queue.ready


def test_status_line_shows_readiness_load_and_queue():
    ready = si.QueueState("inpaint", True, 5, 1, 12.4, pending=2)
    line = cb.status_markdown("127.0.0.1:8001", ready, in_flight=1)
    assert line.startswith("**Ready**: `inpaint` at `127.0.0.1:8001`")
    assert "**Busy: 2 requests waiting in the server queue**" in line
    assert "1 from this page running" in line and "mean queue wait 12 ms" in line
    assert "2 of 3 servers ready" in cb.status_markdown("a,b,c", ready, replicas=(2, 3))
    idle = cb.status_markdown("h:1", si.QueueState("inpaint", True, avg_queue_ms=0.0, pending=0))
    assert "idle" in idle and "Busy" not in idle and "mean queue wait 0 ms" in idle
    unknown = cb.status_markdown("h:1", si.QueueState("inpaint", True))
    assert unknown == "**Ready**: `inpaint` at `h:1`"  # no pipeline metrics: nothing guessed
    down = cb.status_markdown("h:1", si.QueueState("inpaint", False))
    assert down.startswith("**Server not ready** at `h:1`")
    assert ServerStatus("h:1", ready, in_flight=1).markdown() == cb.status_markdown(
        "h:1", ready, in_flight=1
    )  # one renderer


def test_status_line_shows_steps_memory_outcomes_and_recent_problems():
    state = si.queue_state_from_metrics("inpaint", OUTCOME_METRICS)
    recent = dict.fromkeys(si.OUTCOMES, 0) | {"success": 9, "overloaded": 2, "invalid": 1}
    line = cb.status_markdown("h:1", state, recent=recent)
    assert "340 denoising steps to go" in line
    assert "memory 3.0 of 12.0 GB reserved" in line
    assert "40 served, 2 invalid, 1 timed out in the queue, 3 refused (busy)" in line
    assert "**lately: 2 refused (busy)**" in line  # the server's problems, not the client's
    quiet = cb.status_markdown("h:1", state, recent=dict.fromkeys(si.OUTCOMES, 0))
    assert "lately" not in quiet
    no_budget = replace(state, memory_budget=0)
    assert "memory" not in cb.status_markdown("h:1", no_budget)


def test_status_line_from_the_metrics_endpoint(monkeypatch):
    backend = Backend("h:1", metrics_url="http://h:8002/metrics",
                      info_client=FakeTriton([pipeline_config()]))  # fmt: skip
    monkeypatch.setattr(si, "fetch_metrics", lambda url, timeout=None: METRICS)
    status = backend.status("inpaint")
    line = cb.status_markdown(status.url, status.queue, status.in_flight)
    assert "**Busy: 2 requests waiting in the server queue**" in line
    assert line.endswith("mean queue wait 12 ms") and "served" not in line
    monkeypatch.setattr(si, "fetch_metrics", lambda url, timeout=None: OLD_METRICS)
    old = backend.status("inpaint").queue
    assert cb.status_markdown("h:1", old) == "**Ready**: `inpaint` at `h:1`"


# --- wiring (needs gradio, not a server) --------------------------------------------------------


@pytest.fixture
def app_module():
    pytest.importorskip("gradio", reason="the [ui] extra is not installed")
    from sdserve_client.webui import app

    return app


def test_page_builds_without_a_server(app_module):
    backend = Backend("127.0.0.1:9", info_client=FakeTriton([pipeline_config()], ready=False))
    demo = app_module.build_app(app_module.AppConfig("127.0.0.1:9"), backend)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"inpaint-editor", "outpaint-preview", "t2i-generate", "scheduler", "model",
            "seed", "seed-reuse", "results", "seeds", "use-as-input", "busy",
            "server-status", "adapters-section", "adapters", "adapter-scales", "adapters-note",
            "adapters-refresh"} <= ids  # fmt: skip


def test_handlers_turn_server_errors_into_readable_toasts(app_module):
    import gradio as gr

    error = SdserveError("scheduler: 'warp' is unknown; valid: pndm", "StatusCode.INVALID_ARGUMENT")
    backend = Backend("h:1", client_factory=lambda url, model: FakeGenerator(error),
                      info_client=FakeTriton([pipeline_config()]))  # fmt: skip
    handlers = app_module._Handlers(backend, app_module.AppConfig("h:1"))
    # weighting, clip skip, adapters, their scales
    common = ("inpaint", "x", "", "warp", 2, 7.5, 1.0, "-1", 1, True, False, 0, [], [])
    with pytest.raises(gr.Error) as raised:
        list(handlers.text_to_image(*common, 64, 64, "session"))
    assert raised.value.message == (
        "The server rejected the request: scheduler: 'warp' is unknown; valid: pndm"
    )
    assert backend.in_flight == 0
    with pytest.raises(gr.Error, match="Paint over the area"):
        list(handlers.inpaint(*common, editor(IMAGE), None, 0, "s"))  # mask upload, mask blur


def test_handlers_return_gallery_summary_and_state(app_module):
    info = FakeTriton([pipeline_config(schedulers="ddim,euler")])
    backend = Backend("h:1", client_factory=lambda url, model: FakeGenerator(), info_client=info)
    handlers = app_module._Handlers(backend, app_module.AppConfig("h:1"))
    *updates, final = handlers.text_to_image(
        "inpaint",
        "x",
        "",
        cb.DEFAULT_SCHEDULER,
        2,
        7.5,
        1.0,
        "5",
        2,
        True,
        False,
        0,
        [],
        [],
        64,
        72,
        "session",
    )
    gallery, _, images, seeds, selected, _ = final
    assert [caption for _, caption in gallery] == ["seed 5 · 72×64", "seed 6 · 72×64"]
    bars = [update[-1] for update in updates if isinstance(update[-1], str)]
    assert len(bars) == 2 and "Step 2/2" in bars[-1] and "--done: 100%" in bars[-1]
    previews = [update[0] for update in updates if isinstance(update[0], list)]
    assert [caption for _, caption in previews[0]] == ["preview · step 1/2"]
    assert seeds == [5, 6] and selected is None and images[1].shape == (64, 72, 3)
    assert handlers.reuse_seed(seeds, 1) == "6"
    value, image = handlers.use_as_input(images, 1)
    assert image is images[1] and value["background"] is images[1]
    _, scheduler, steps, *_ = handlers.refresh("inpaint", "euler", 500, 1)
    assert scheduler["choices"] == [cb.DEFAULT_SCHEDULER, "ddim", "euler"]
    assert scheduler["value"] == "euler" and steps["maximum"] == 150 and steps["value"] == 150


def test_clip_skip_is_sent_when_set_and_its_slider_follows_the_models_layers(app_module):
    import gradio as gr

    generator = FakeGenerator()
    info = FakeTriton([pipeline_config(limit_max_clip_skip="2")])
    backend = Backend("h:1", client_factory=lambda url, model: generator, info_client=info)
    handlers = app_module._Handlers(backend, app_module.AppConfig("h:1"))
    common = ("inpaint", "x", "", cb.DEFAULT_SCHEDULER, 2, 7.5, 1.0, "5", 1, True, False)
    list(handlers.text_to_image(*common, 2.0, [], [], 64, 64, "s"))
    list(handlers.text_to_image(*common, 0, [], [], 64, 64, "s"))
    assert [options.get("clip_skip") for *_, options in generator.calls] == [2, None]
    with pytest.raises(gr.Error, match="clip skip"):
        list(handlers.text_to_image(*common, 1.5, [], [], 64, 64, "s"))
    *_, clip_skip, _ = handlers.refresh("inpaint", "euler", 4, 1, 5)
    assert clip_skip["maximum"] == 2 and clip_skip["value"] == 2 and clip_skip["interactive"]
    bare = FakeTriton([pipeline_config()])  # no limit_max_clip_skip: no layer may be skipped
    handlers = app_module._Handlers(Backend("h:1", info_client=bare), app_module.AppConfig("h:1"))
    *_, clip_skip, _ = handlers.refresh("inpaint", "euler", 4, 1, 5)
    assert clip_skip["value"] == 0 and not clip_skip["interactive"]


def test_handlers_status_line_shows_the_problems_since_the_last_polls(app_module, monkeypatch):
    backend = Backend("h:1", metrics_url="http://h:8002/metrics",
                      info_client=FakeTriton([pipeline_config()]))  # fmt: skip
    handlers = app_module._Handlers(backend, app_module.AppConfig("h:1"))
    monkeypatch.setattr(si, "fetch_metrics", lambda url, timeout=None: OUTCOME_METRICS)
    first = handlers.status("inpaint")
    assert "340 denoising steps to go" in first and "3 refused (busy)" in first
    assert "lately" not in first  # the counts so far happened before this page looked
    more = OUTCOME_METRICS.replace('outcome="failed"} 0', 'outcome="failed"} 2')
    monkeypatch.setattr(si, "fetch_metrics", lambda url, timeout=None: more)
    assert "**lately: 2 failed**" in handlers.status("")  # "": the configured model


def test_busy_refusals_do_not_read_as_an_unreachable_server():
    for message in ("Exceeds maximum queue size", "Request timeout expired",
                    "Not enough memory: the request needs about 900 MB, the memory budget is "
                    "512 MB and requests in progress hold 0 MB"):  # fmt: skip
        error = SdserveError(message, "StatusCode.UNAVAILABLE")
        assert cb.error_message(error, "h:1") == f"The server is busy at h:1: {message}"


def test_command_line_defaults():
    from sdserve_client.webui.__main__ import parse_args

    args = parse_args([])
    assert (args.server, args.host, args.port, args.model) == (
        "127.0.0.1:8001", "127.0.0.1", 7860, "inpaint",
    )  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args(["--concurrency", "0"])


def test_cancel_stops_the_running_generation_at_its_next_event(app_module):

    class Stepping(FakeGenerator):
        """Tells a step, then waits to be let go: the page cancels meanwhile."""

        def text_to_image(self, prompt, height, width, **options):
            on_event = options["on_event"]
            for step in range(1, 101):
                on_event(Progress(step, 100, 0.0, 0.0))
                self.calls.append(("step", (step,), {}))
                let_go.wait(10)
            return self._answer(height, width, options)

    let_go = threading.Event()
    fake = Stepping()
    info = FakeTriton([pipeline_config()])
    backend = Backend("h:1", client_factory=lambda url, model: fake, info_client=info)
    handlers = app_module._Handlers(backend, app_module.AppConfig("h:1"))
    run = handlers.text_to_image(
        "inpaint",
        "x",
        "",
        cb.DEFAULT_SCHEDULER,
        100,
        7.5,
        1.0,
        "5",
        1,
        True,
        False,
        0,
        [],
        [],
        64,
        64,
        "page",
    )
    next(run)  # the first step's bar
    assert handlers.cancel("page") == ("", "Cancelled.")
    let_go.set()
    *_, last = run  # the run ends quietly: no error toast
    assert last[1] == "Cancelled." and last[-1] == ""
    assert len([c for c in fake.calls if c[0] == "step"]) == 1  # the next event stopped it
    assert backend.in_flight == 0


# --- LoRA adapters ------------------------------------------------------------------------------

# What `InpaintClient.list_adapters()` returns: usable files, and one the server refuses.
LISTING = [
    {"name": "style", "architecture": "sd15", "rank": 4,
     "targets": {"unet": 128, "text_encoder": 8}},
    {"name": "subject", "architecture": "sd15", "rank": 2, "targets": {"unet": 172}},
    {"name": "old", "error": "only .safetensors adapter files are read (pickle is unsafe)"},
]  # fmt: skip
T2I = ("inpaint", "x", "", cb.DEFAULT_SCHEDULER, 2, 7.5, 1.0, "5", 1, True, False, 0)
SCALE_REFUSED = r"LoRA scale of 'style' must be a number in \[-8.0, 8.0\]"  # the rule table's


def adapter_handlers(app_module, generator: FakeGenerator, **params: str):
    """Page handlers over `generator`, the model's limits read as the page load does."""
    info = FakeTriton([pipeline_config(**params)])
    backend = Backend("h:1", client_factory=lambda url, model: generator, info_client=info)
    handlers = app_module._Handlers(backend, app_module.AppConfig("h:1"))
    handlers.refresh("inpaint", cb.DEFAULT_SCHEDULER, 2, 1)
    return handlers


def test_adapter_listing_separates_usable_and_refused_files():
    listing = si.adapter_listing(LISTING)
    assert listing.names == ["style", "subject"]
    assert listing.usable[0] == si.AdapterInfo("style", "sd15", 4, {"unet": 128, "text_encoder": 8})
    assert [a.label for a in listing.usable] == ["style (rank 4; unet, text_encoder)",
                                                 "subject (rank 2; unet)"]  # fmt: skip
    assert listing.refused == (("old", LISTING[2]["error"]),) and not listing.unavailable
    backend = Backend("h:1", client_factory=lambda url, model: FakeGenerator(adapters=LISTING),
                      info_client=FakeTriton([pipeline_config()]))  # fmt: skip
    assert backend.adapters("inpaint") == listing


def test_chosen_adapters_reach_the_generation_request_unary_and_streamed(app_module):
    from sdserve_client import GenerationRequest
    from sdserve_client.request import encode_request

    table = [["style", 0.8], ["subject", "-0.5"], ["not chosen", 3]]
    settings = cb.make_settings(*T2I[1:], ["style", "subject"], table, Limits())
    assert settings.adapters == (("style", 0.8), ("subject", -0.5))
    unary = FakeGenerator()
    cb.run_text_to_image(unary, settings, 64, 64)  # the SDK call as such
    generator = FakeGenerator(adapters=LISTING)
    handlers = adapter_handlers(app_module, generator)
    list(handlers.text_to_image(*T2I, ["style", "subject"], table, 64, 64, "s"))  # streamed
    list(handlers.text_to_image(*T2I, [], [], 64, 64, "s"))  # none chosen: none sent
    (*_, sent), (*_, streamed), (*_, plain) = unary.calls + generator.calls
    assert "on_event" not in sent and "on_event" in streamed
    for options in (sent, streamed):
        options.pop("on_event", None)
        request = GenerationRequest("x", height=64, width=64, **options)
        assert (request.adapters, request.adapter_scales) == (["style", "subject"], [0.8, -0.5])
        tensors = encode_request(request)
        assert tensors["adapters"].tolist() == [b"style", b"subject"]
        np.testing.assert_array_equal(tensors["adapter_scales"], np.float32([0.8, -0.5]))
    assert "adapters" not in plain and "adapter_scales" not in plain
    just_chosen = cb.make_settings(*T2I[1:], ["style"], [])  # its row not yet in the table
    assert just_chosen.adapters == (("style", cb.DEFAULT_ADAPTER_SCALE),)


@pytest.mark.parametrize("scale", [8.5, -9, float("nan"), float("inf"), "abc", "", None])
def test_adapter_scale_outside_the_rule_tables_range_is_refused(scale):
    with pytest.raises(cb.UIError, match=SCALE_REFUSED):
        cb.parse_adapters(["style"], [["style", scale]])
    assert cb.parse_adapters(["style"], [["style", -8]]) == (("style", -8.0),)  # bounds included


def test_too_many_adapters_are_refused_before_anything_is_sent(app_module):
    import gradio as gr

    names = ["style", "subject", "third"]
    with pytest.raises(cb.UIError, match="LoRA adapters: 3 given, at most 2 per request"):
        cb.parse_adapters(names, [], Limits(max_adapters=2))
    generator = FakeGenerator(adapters=LISTING)
    handlers = adapter_handlers(app_module, generator, limit_max_adapters="2")
    with pytest.raises(gr.Error, match="at most 2 per request"):
        list(handlers.text_to_image(*T2I, names, [], 64, 64, "s"))
    with pytest.raises(gr.Error, match=SCALE_REFUSED):
        list(handlers.text_to_image(*T2I, ["style"], [["style", 12]], 64, 64, "s"))
    assert generator.calls == []  # refused in the page: nothing reached the SDK


def test_adapter_rows_keep_the_scales_of_adapters_still_chosen():
    table = [["subject", 0.3], ["gone", 2.0]]
    assert cb.adapter_rows(["style", "subject"], table) == [["style", 1.0], ["subject", 0.3]]
    assert cb.adapter_rows([], table) == [] and cb.adapter_rows(None, None) == []


def test_adapter_section_offers_only_usable_adapters_and_says_why_others_are_refused(app_module):
    generator = FakeGenerator(adapters=LISTING)
    handlers = adapter_handlers(app_module, generator, limit_max_adapters="3")
    chosen, table = ["subject", "old"], [["subject", 0.5], ["old", 2.0]]
    controls, adapters, rows, note = handlers.adapters("inpaint", chosen, table)
    assert controls["visible"] is True
    assert adapters["choices"] == [("style (rank 4; unet, text_encoder)", "style"),
                                   ("subject (rank 2; unet)", "subject")]  # fmt: skip
    assert adapters["value"] == ["subject"] and adapters["max_choices"] == 3  # "old": not offered
    assert rows == [["subject", 0.5]]
    assert note.startswith("2 adapters available, at most 3 per request; scales in [-8.0, 8.0]")
    assert "1 refused by the server: `old`: only .safetensors" in note
    # a file added to the server's folder shows at the next Refresh adapters (no restart)
    generator.adapters = [*LISTING, {"name": "added", "rank": 1, "targets": {"unet": 4}}]
    _, adapters, *_ = handlers.adapters("inpaint", ["subject"], [["subject", 0.5]])
    assert [value for _, value in adapters["choices"]] == ["style", "subject", "added"]


@pytest.mark.parametrize(
    ("listing", "says"),
    [
        ([], "No usable LoRA adapters: add `.safetensors` files to "
             "`<repository>/inpaint/adapters/`, then press Refresh adapters."),
        (LISTING[2:], "No usable LoRA adapters"),
        (SdserveError("Request for unknown model: 'inpaint_adapters' is not found",
                      "StatusCode.NOT_FOUND"),
         "No LoRA adapters from `inpaint`: Request for unknown model: 'inpaint_adapters' is "
         "not found"),
    ],
)  # fmt: skip
def test_adapter_section_is_hidden_when_the_model_serves_none(app_module, listing, says):
    handlers = adapter_handlers(app_module, FakeGenerator(adapters=listing))
    controls, adapters, rows, note = handlers.adapters("inpaint", ["style"], [["style", 1.0]])
    assert controls["visible"] is False
    assert adapters["choices"] == [] and adapters["value"] == [] and rows == []
    assert note.startswith(says)
    if listing == LISTING[2:]:  # every file refused: say why
        assert note.endswith("1 refused by the server: `old`: " + LISTING[2]["error"] + ".")
