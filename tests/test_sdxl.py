"""SDXL inpainting: export parity, loop parity with StableDiffusionXLInpaintPipeline,
and `inpaint_xl` served beside `inpaint` from one repository by a real tritonserver."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cases import diffusers_inpaint, make_case, max_abs, served
from helpers import wire

from sdserve_export.triton_configs import parse_pbtxt
from sdserve_pipeline.components import SDXL_COMPONENTS
from sdserve_pipeline.schedulers import SCHEDULERS
from sdserve_protocol.canvas import Extension, build_canvas
from sdserve_protocol.contract import decode_request

pytestmark = pytest.mark.slow
PROMPT = "a red bicycle"


@pytest.fixture
def xl_pipe(diffusers_xl_pipe):
    """diffusers' SDXL pipeline; its scheduler restored after each test."""
    original = diffusers_xl_pipe.scheduler
    yield diffusers_xl_pipe
    diffusers_xl_pipe.scheduler = original


# Export


def test_every_sdxl_component_passes_parity(xl_export):
    _, reports = xl_export
    assert [r.component for r in reports] == [s.name for s in SDXL_COMPONENTS]
    assert all(r.ok for r in reports), [str(r) for r in reports]


def test_repository_holds_both_pipelines_with_their_own_components(xl_repository):
    names = {p.name for p in xl_repository.iterdir()}
    sd15 = {"inpaint", "inpaint_stream", "inpaint_adapters", "text_encoder", "unet",
            "vae_encoder", "vae_decoder"}  # fmt: skip
    xl = {"inpaint_xl", "inpaint_xl_stream", "inpaint_xl_adapters", "xl_text_encoder",
          "xl_text_encoder_2", "xl_unet", "xl_vae_encoder", "xl_vae_decoder"}  # fmt: skip
    assert names == sd15 | xl | {"checkpoints"}  # the repository's checkpoint listing
    pipeline = parse_pbtxt((xl_repository / "inpaint_xl/config.pbtxt").read_text())
    params = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert params["text_encoder_2_model"] == "xl_text_encoder_2"
    assert params["unet_model"] == "xl_unet"
    unet = parse_pbtxt((xl_repository / "xl_unet/config.pbtxt").read_text())
    assert [t.name for t in unet.input] == [t.name for t in SDXL_COMPONENTS[2].inputs]
    assert list(unet.input[4].dims) == [-1, 6]  # time_ids
    te2 = parse_pbtxt((xl_repository / "xl_text_encoder_2/config.pbtxt").read_text())
    assert [t.name for t in te2.output] == ["penultimate_hidden_state", "text_embeds"]
    facts = json.loads((xl_repository / "inpaint_xl/1/assets/pipeline.json").read_text())
    assert facts["architecture"] == "sdxl" and facts["default_strength"] == 0.9999
    assert facts["vae_scaling_factor"] == 0.13025 and facts["default_size"] == 128
    sd15_facts = json.loads((xl_repository / "inpaint/1/assets/pipeline.json").read_text())
    assert sd15_facts["architecture"] == "sd15"


# Loop parity, in-process on ONNX Runtime, against StableDiffusionXLInpaintPipeline


@pytest.mark.parametrize("name", [None, "ddim", "dpmpp_2m", "euler_a", "unipc"])
def test_schedulers_match_diffusers_at_a_non_square_size(xl_service, xl_pipe, name):
    if name is not None:
        cls, overrides = SCHEDULERS[name]
        xl_pipe.scheduler = cls.from_config(xl_pipe.scheduler.config, **overrides)
    controls = {} if name is None else {"scheduler": name}
    image, mask = make_case(64, 96, seed=3)
    ours = xl_service.generate(wire(image, mask, steps=8, seed=11, **controls))["images"][0]
    reference = diffusers_inpaint(xl_pipe, image, mask, seed=11, steps=8)  # strength 0.9999
    assert ours.shape == (64, 96, 3)
    assert max_abs(ours, reference) <= 2


def test_default_strength_and_size_are_diffusers_sdxl_defaults(xl_service):
    facts, limits = xl_service.loop.facts, xl_service.limits
    image, mask = make_case(32, 32)
    defaults = dict(default_size=facts.default_size, default_strength=facts.default_strength)
    with_image = decode_request(wire(image, mask), limits, **defaults)
    assert with_image.strength == 0.9999
    text_only = decode_request(wire(), limits, **defaults)
    assert text_only.strength == 1.0
    assert (text_only.height, text_only.width) == (128, 128)  # unet sample_size * vae scale


def test_strength_matches_diffusers(xl_service, xl_pipe):
    image, mask = make_case(96, 64, seed=6)
    ours = xl_service.generate(wire(image, mask, steps=10, seed=3, strength=0.6))["images"][0]
    reference = diffusers_inpaint(xl_pipe, image, mask, seed=3, steps=10, strength=0.6)
    assert max_abs(ours, reference) <= 2


def test_text_to_image_equals_diffusers_with_a_full_mask(xl_service, xl_pipe):
    ours = xl_service.generate(wire(steps=8, seed=5, height=64, width=96))["images"][0]
    image = np.full((64, 96, 3), 255, np.uint8)  # only enters as image * 0 (see SD 1.5 test)
    full = np.full((64, 96), 255, np.uint8)
    reference = diffusers_inpaint(xl_pipe, image, full, seed=5, steps=8, strength=1.0)
    assert ours.shape == (64, 96, 3)
    assert max_abs(ours, reference) <= 2


def test_negative_prompt_is_encoded_not_zeroed(xl_service, xl_pipe):
    image, mask = make_case(64, 64, seed=8)
    tensors = wire(image, mask, steps=6, seed=4)
    tensors["negative_prompt"] = np.array([b"blurry"], dtype=object)
    ours = xl_service.generate(tensors)["images"][0]
    reference = diffusers_inpaint(xl_pipe, image, mask, seed=4, steps=6, negative_prompt="blurry")
    zeroed = diffusers_inpaint(xl_pipe, image, mask, seed=4, steps=6)
    assert max_abs(ours, reference) <= 2
    assert max_abs(reference, zeroed) > 2  # the negative prompt mattered


def test_guidance_one_skips_cfg_like_diffusers(xl_service, xl_pipe):
    image, mask = make_case(64, 64, seed=9)
    ours = xl_service.generate(wire(image, mask, steps=6, seed=2, guidance_scale=1.0))["images"][0]
    reference = diffusers_inpaint(xl_pipe, image, mask, seed=2, steps=6, guidance_scale=1.0)
    assert max_abs(ours, reference) <= 2


def test_num_images_each_reproducible_alone(xl_service):
    # Not diffusers' generator-list semantics (its batch-1 masked image is encoded with the
    # first generator only): image i is what seed + i gives alone, as for SD 1.5.
    image, mask = make_case(64, 64, seed=10)
    batch = xl_service.generate(wire(image, mask, steps=6, seed=20, num_images=2))
    assert batch["seeds"].tolist() == [20, 21]
    for i, seed in enumerate(batch["seeds"].tolist()):
        alone = xl_service.generate(wire(image, mask, steps=6, seed=seed))["images"][0]
        assert max_abs(batch["images"][i], alone) <= 1


def outpaint_wire(image, extension, seed=7, steps=8):
    return {
        "prompt": np.array([PROMPT.encode()], dtype=object),
        "image": image,
        "outpaint": np.array(extension, np.int32),
        "steps": np.array([steps], np.int32),
        "seed": np.array([seed], np.int64),
        "preserve_unmasked": np.array([False]),
    }


def test_single_band_outpaint_equals_diffusers_on_our_canvas(xl_service, xl_pipe):
    image, _ = make_case(48, 64, seed=3)
    extension = (16, 8, 24, 0)
    out = xl_service.generate(outpaint_wire(image, extension))["images"][0]
    canvas = build_canvas(image, Extension(*extension), overlap=xl_service.outpaint.overlap)
    assert out.shape == canvas.image.shape == (56, 104, 3)
    reference = diffusers_inpaint(xl_pipe, canvas.image, canvas.mask, seed=7, steps=8)
    assert max_abs(out, reference) <= 2


# End to end: one tritonserver, both pipelines


@pytest.fixture(scope="module")
def xl_server(xl_repository, tmp_path_factory):

    build = tmp_path_factory.mktemp("triton-xl")
    with served(xl_repository, build) as srv:
        yield srv


@pytest.mark.e2e
def test_served_side_by_side_and_listed(xl_server):
    from sdserve_client import InpaintClient

    key = xl_server.admin_key.value  # the repository index is the operator's
    with InpaintClient(xl_server.grpc_url, model="inpaint_xl", admin_key=key) as client:
        assert {"inpaint", "inpaint_xl", "xl_text_encoder_2"} <= set(client.list_models())
        assert client.is_ready()


@pytest.mark.e2e
def test_served_sdxl_inpaint_matches_diffusers(xl_server, diffusers_xl_pipe):
    from sdserve_client import InpaintClient

    image, mask = make_case(64, 96, seed=3)
    with InpaintClient(xl_server.grpc_url, model="inpaint_xl") as client:
        result = client.inpaint(image, mask, PROMPT, steps=8, seed=11, preserve_unmasked=False)
    assert result.seeds == [11] and result.arrays.shape == (1, 64, 96, 3)
    reference = diffusers_inpaint(diffusers_xl_pipe, image, mask, seed=11, steps=8)
    assert max_abs(result.arrays[0], reference) <= 2


@pytest.mark.e2e
def test_served_sdxl_clip_skip_matches_diffusers(xl_server, xl_service, diffusers_xl_pipe):
    from sdserve_client import InpaintClient

    image, mask = make_case(64, 96, seed=4)
    with InpaintClient(xl_server.grpc_url, model="inpaint_xl") as client:
        result = client.inpaint(image, mask, PROMPT, steps=6, seed=12, clip_skip=1,
                                preserve_unmasked=False)  # fmt: skip
    local = xl_service.generate(wire(image, mask, steps=6, seed=12, clip_skip=1))["images"][0]
    assert max_abs(result.arrays[0], local) <= 1
    reference = diffusers_inpaint(diffusers_xl_pipe, image, mask, seed=12, steps=6, clip_skip=1)
    assert max_abs(result.arrays[0], reference) <= 2


@pytest.mark.e2e
def test_served_sdxl_outpaint_matches_in_process_and_diffusers(
    xl_server, xl_service, diffusers_xl_pipe
):
    from sdserve_client import InpaintClient

    image, _ = make_case(48, 64, seed=3)
    extension = (16, 8, 24, 0)
    with InpaintClient(xl_server.grpc_url, model="inpaint_xl") as client:
        served = client.outpaint(image, PROMPT, *extension, steps=8, seed=7,
                                 preserve_unmasked=False).arrays[0]  # fmt: skip
    local = xl_service.generate(outpaint_wire(image, extension))["images"][0]
    assert max_abs(served, local) <= 1
    canvas = build_canvas(image, Extension(*extension), overlap=xl_service.outpaint.overlap)
    reference = diffusers_inpaint(diffusers_xl_pipe, canvas.image, canvas.mask, seed=7, steps=8)
    assert max_abs(served, reference) <= 2


@pytest.mark.e2e
def test_sd15_pipeline_still_served_beside_sdxl(xl_server, service):
    from sdserve_client import InpaintClient

    image, mask = make_case(64, 64, seed=12)
    with InpaintClient(xl_server.grpc_url) as client:  # model "inpaint"
        served = client.inpaint(image, mask, PROMPT, steps=4, seed=5, preserve_unmasked=False)
    local = service.generate(wire(image, mask, steps=4, seed=5))["images"][0]
    assert max_abs(served.arrays[0], local) <= 1
