"""End to end: the exported repository served by a real tritonserver on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import diffusers_inpaint, make_case, max_abs, served
from helpers import wire
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from sdserve_client import GenerationRequest, InpaintClient, SdserveError
from sdserve_export.triton_configs import parse_pbtxt

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    build = tmp_path_factory.mktemp("triton")
    with served(repository, build) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    with InpaintClient(server.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def case(diffusers_pipe):
    image, mask = make_case(64, 96, seed=3)
    return image, mask, diffusers_inpaint(diffusers_pipe, image, mask, seed=7)


def test_every_served_config_parses_and_all_models_are_ready(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    names = sorted(
        m.name
        for m in client.get_model_repository_index(headers=server.admin_key.grpc_headers).models
    )
    assert names == [
        "checkpoints",
        "inpaint",
        "inpaint_adapters",
        "inpaint_stream",
        "text_encoder",
        "unet",
        "vae_decoder",
        "vae_encoder",
    ]
    for name in names:
        assert client.is_model_ready(name)
        served = client.get_model_config(name).config
        on_disk = parse_pbtxt((server.model_repository / name / "config.pbtxt").read_text())
        assert [t.name for t in served.input] == [t.name for t in on_disk.input]


def test_sdk_inpaint_matches_diffusers_and_seed_reproduces(sdk, case):
    image, mask, reference = case
    result = sdk.inpaint(image, mask, "a red bicycle", steps=10, seed=7, preserve_unmasked=False)
    assert result.seeds == [7]
    assert result.arrays.shape == (1, 64, 96, 3)
    assert max_abs(result.arrays[0], reference) <= 2
    again = sdk.inpaint(image, mask, "a red bicycle", steps=10, seed=result.seeds[0],
                        preserve_unmasked=False)  # fmt: skip
    np.testing.assert_array_equal(again.arrays, result.arrays)


def test_unseeded_request_returns_a_seed_that_reproduces_it(sdk, case):
    image, mask, _ = case
    first = sdk.inpaint(image, mask, "a red bicycle", steps=4)
    again = sdk.inpaint(image, mask, "a red bicycle", steps=4, seed=first.seeds[0])
    np.testing.assert_array_equal(again.arrays, first.arrays)


def _raw_inputs(tensors: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """Wire items → InferInputs with the batching pipeline model's leading dim of 1."""
    inputs = []
    for name, item in tensors.items():
        array = item[np.newaxis]
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def test_raw_tritonclient_request_matches_diffusers(server, case):
    image, mask, reference = case
    client = grpcclient.InferenceServerClient(server.grpc_url)
    result = client.infer("inpaint", _raw_inputs({
        "prompt": np.array([b"a red bicycle"], dtype=np.object_),
        "image": image,
        "mask": mask,
        "steps": np.array([10], np.int32),
        "seed": np.array([7], np.int64),
        "preserve_unmasked": np.array([False]),
    }))  # fmt: skip
    assert result.as_numpy("seeds").tolist() == [[7]]
    assert max_abs(result.as_numpy("images")[0, 0], reference) <= 2


def test_preserve_unmasked_returns_input_pixels_outside_the_mask(sdk, case):
    image, mask, _ = case
    out = sdk.inpaint(image, mask, "a red bicycle", steps=4, seed=7).arrays[0]
    keep = mask < 128
    np.testing.assert_array_equal(out[keep], image[keep])


BAD_REQUESTS = {
    "missing prompt": ({"steps": np.array([4], np.int32)}, "prompt"),
    "mask size": (
        {
            "prompt": np.array([b"x"], np.object_),
            "image": np.zeros((64, 64, 3), np.uint8),
            "mask": np.zeros((64, 56), np.uint8),
        },
        "mask",
    ),  # fmt: skip
    "steps dtype": (
        {"prompt": np.array([b"x"], np.object_), "steps": np.array([4.0], np.float32)},
        "steps",
    ),
    "steps range": (
        {"prompt": np.array([b"x"], np.object_), "steps": np.array([0], np.int32)},
        "steps",
    ),
    "outpaint without image": (
        {"prompt": np.array([b"x"], np.object_), "outpaint": np.array([8, 0, 0, 0], np.int32)},
        "outpaint",
    ),
}


@pytest.mark.parametrize("case_name", list(BAD_REQUESTS))
def test_malformed_request_is_invalid_arg_and_server_keeps_serving(server, sdk, case, case_name):
    tensors, named = BAD_REQUESTS[case_name]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer("inpaint", _raw_inputs(tensors))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert named in err.value.message()
    image, mask, reference = case
    good = sdk.inpaint(image, mask, "a red bicycle", steps=10, seed=7, preserve_unmasked=False)
    assert max_abs(good.arrays[0], reference) <= 2


def test_sdk_raises_its_one_error_type_with_the_server_message(sdk):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(SdserveError, match="steps"):
        sdk.inpaint(image, np.zeros((64, 64), np.uint8), "x", steps=100000)


# Issue 3 controls, served: one repository with the 9-channel and the 4-channel checkpoint.


@pytest.fixture(scope="module")
def combined_server(combined_repository, tmp_path_factory):
    build = tmp_path_factory.mktemp("triton-combined")
    with served(combined_repository, build) as srv:
        yield srv


def test_clients_discover_models_and_schedulers(combined_server):
    from sdserve_pipeline.schedulers import SCHEDULER_NAMES

    key = combined_server.admin_key.value  # the repository index is the operator's
    with InpaintClient(combined_server.grpc_url, admin_key=key) as client:
        assert {"inpaint", "sd15_base"} <= set(client.list_models())
    raw = grpcclient.InferenceServerClient(combined_server.grpc_url)
    config = raw.get_model_config("inpaint").config
    assert config.parameters["schedulers"].string_value.split(",") == list(SCHEDULER_NAMES)


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras", "unipc"])
def test_served_schedulers_match_in_process(combined_server, service, scheduler):
    image, mask = make_case(64, 64, seed=12)
    with InpaintClient(combined_server.grpc_url) as client:
        served = client.inpaint(image, mask, "a red bicycle", steps=6, seed=5,
                                scheduler=scheduler, preserve_unmasked=False)  # fmt: skip
    local = service.generate({
        "prompt": np.array([b"a red bicycle"], object), "image": image, "mask": mask,
        "steps": np.array([6], np.int32), "seed": np.array([5], np.int64),
        "scheduler": np.array([scheduler.encode()], object),
        "preserve_unmasked": np.array([False]),
    })  # fmt: skip
    assert max_abs(served.arrays[0], local["images"][0]) <= 1


def test_served_mask_blur_matches_in_process_and_is_diffusers_blur(combined_server, service):
    """The CLI's `--mask-blur` reaches the server, which blurs the mask as diffusers does
    (parity with diffusers: test_generation_controls)."""
    image, mask = make_case(64, 64, seed=14)
    with InpaintClient(combined_server.grpc_url) as client:
        served = client.inpaint(image, mask, "a red bicycle", steps=4, seed=6, mask_blur=9,
                                preserve_unmasked=False).arrays[0]  # fmt: skip
    local = service.generate(wire(image, mask, steps=4, seed=6, mask_blur=9))["images"][0]
    unblurred = service.generate(wire(image, mask, steps=4, seed=6))["images"][0]
    assert max_abs(served, local) <= 1 and max_abs(served, unblurred) > 2


@pytest.mark.parametrize("model", ["sd15_base", "inpaint"])
def test_served_img2img_matches_in_process(combined_server, service, base_service, model):
    """`img2img` (an image, no mask) on both checkpoints; parity with diffusers:
    test_four_channel (StableDiffusionImg2ImgPipeline), test_generation_controls (9-channel)."""
    image, _ = make_case(64, 96, seed=15)
    with InpaintClient(combined_server.grpc_url, model=model) as client:
        served = client.img2img(image, "a red bicycle", steps=5, seed=8, strength=0.6)
    local = {"sd15_base": base_service, "inpaint": service}[model]
    expected = local.generate(wire(image, steps=5, seed=8, strength=0.6))["images"][0]
    assert served.seeds == [8] and max_abs(served.arrays[0], expected) <= 1


@pytest.mark.parametrize("model", ["inpaint", "sd15_base"])
def test_served_clip_skip_matches_in_process_and_shares_the_text_encoder_call(
    combined_server, service, base_service, model
):
    """`clip_skip` from the SDK reaches each checkpoint's exported text encoder (parity with
    diffusers' clip_skip: test_clip_skip); two requests skipping different layers, sent
    together, each equal their in-process result."""
    local_service = service if model == "inpaint" else base_service
    image, mask = make_case(64, 64, seed=15)
    controls = dict(steps=4, seed=8, preserve_unmasked=False)
    with InpaintClient(combined_server.grpc_url, model=model) as client:
        handles = [client.submit(GenerationRequest("a red bicycle", image=image, mask=mask,
                                                   clip_skip=k, **controls))
                   for k in (1, 2)]  # fmt: skip
        served = [handle.result(300).arrays[0] for handle in handles]
    for k, image_served in zip((1, 2), served, strict=True):
        local = local_service.generate(wire(image, mask, clip_skip=k, **controls))["images"][0]
        assert max_abs(image_served, local) <= 1
    assert max_abs(served[0], served[1]) > 2


def test_clip_skip_beyond_the_layers_is_refused_alike_by_server_and_sdk(combined_server):
    """The export recorded the demo encoder's 2 layers: 3 is INVALID_ARG naming `clip_skip`,
    and the SDK refuses it before sending, with the same message."""
    tensors = {"prompt": np.array([b"x"], np.object_), "clip_skip": np.array([3], np.int32)}
    raw = grpcclient.InferenceServerClient(combined_server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        raw.infer("inpaint", _raw_inputs(tensors))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    with InpaintClient(combined_server.grpc_url) as client, pytest.raises(SdserveError) as sdk:
        client.text_to_image("x", 64, 64, clip_skip=3)
    assert sdk.value.message == "clip_skip: 3 out of range [0, 2]"
    assert sdk.value.message in err.value.message()


def test_served_num_images_two_each_reproducible(combined_server):
    image, mask = make_case(64, 64, seed=13)
    with InpaintClient(combined_server.grpc_url) as client:
        both = client.inpaint(image, mask, "a red bicycle", steps=4, seed=30, num_images=2)
        assert both.seeds == [30, 31] and both.arrays.shape == (2, 64, 64, 3)
        second = client.inpaint(image, mask, "a red bicycle", steps=4, seed=31)
    assert max_abs(both.arrays[1], second.arrays[0]) <= 1


def test_served_text_to_image_on_both_checkpoints_and_odd_size(
    combined_server, base_service, service
):
    with InpaintClient(combined_server.grpc_url, model="sd15_base") as base:
        t2i = base.text_to_image("a red bicycle", height=64, width=96, steps=4, seed=2)
    local = base_service.generate({
        "prompt": np.array([b"a red bicycle"], object), "height": np.array([64], np.int32),
        "width": np.array([96], np.int32), "steps": np.array([4], np.int32),
        "seed": np.array([2], np.int64),
    })  # fmt: skip
    assert max_abs(t2i.arrays[0], local["images"][0]) <= 1
    image, mask = make_case(75, 130, seed=14)
    with InpaintClient(combined_server.grpc_url) as client:
        odd = client.inpaint(image, mask, "a red bicycle", steps=3, seed=1)
        assert odd.arrays.shape == (1, 75, 130, 3)
        np.testing.assert_array_equal(odd.arrays[0][mask < 128], image[mask < 128])
        t2i_odd = client.text_to_image("x", height=75, width=130, steps=3, seed=1)
        assert t2i_odd.arrays.shape == (1, 75, 130, 3)
    with InpaintClient(combined_server.grpc_url, model="sd15_base") as base:
        blended = base.inpaint(image, mask, "a red bicycle", steps=3, seed=1)
        assert blended.arrays.shape == (1, 75, 130, 3)


def test_served_outpaint_keeps_the_original_outside_the_seam(sdk, service):
    image, _ = make_case(48, 64, seed=21)
    result = sdk.outpaint(image, "a red bicycle", left=16, right=24, bottom=8, steps=4, seed=3)
    assert result.arrays.shape == (1, 56, 104, 3)
    overlap = service.outpaint.overlap
    kept = result.arrays[0, : 48 - overlap, 16 + overlap : 16 + 64 - overlap]
    np.testing.assert_array_equal(kept, image[: 48 - overlap, overlap : 64 - overlap])


def test_cli_outpaint_writes_result_and_the_canvas_it_sent(server, tmp_path):
    from PIL import Image

    from sdserve_client.cli import main

    image, _ = make_case(32, 32, seed=22)
    Image.fromarray(image).save(tmp_path / "in.png")
    code = main([
        "outpaint", "--url", server.grpc_url, "--image", str(tmp_path / "in.png"),
        "--prompt", "x", "--right", "16", "--steps", "2", "--seed", "1",
        "--out", str(tmp_path / "out.png"), "--save-canvas", str(tmp_path / "canvas.png"),
    ])  # fmt: skip
    assert code == 0
    assert Image.open(tmp_path / "out.png").size == (48, 32)
    assert Image.open(tmp_path / "canvas.png").size == (48, 32)
    assert Image.open(tmp_path / "canvas-mask.png").size == (48, 32)
