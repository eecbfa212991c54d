"""Long and weighted prompts served end to end: a real tritonserver serving the SD 1.5 and
SDXL demo pipelines, requests through the SDK and raw tritonclient over gRPC. Images equal
diffusers called with compel's embeddings of the PyTorch text encoders (test_prompts.py
builds those references); bad prompts come back as INVALID_ARG naming the input."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
from cases import diffusers_inpaint, infer_inputs, make_case, max_abs, served
from helpers import wire
from test_prompts import LONG, _reference_sd15, _reference_sdxl
from tritonclient.utils import InferenceServerException

from sdserve_client import InpaintClient, SdserveError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PROMPT = LONG + ", (fog)0.6, (red bicycle)1.3"  # 2 windows, weights above and below 1
NEGATIVE = "blurry, (low quality)1.2"


@pytest.fixture(scope="module")
def server(xl_repository, tmp_path_factory):
    with served(xl_repository, tmp_path_factory.mktemp("triton-prompts")) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    with InpaintClient(server.grpc_url) as client:
        yield client


def test_sd15_weighted_long_prompt_served_equals_diffusers_with_compel_embeds(
    sdk, service, diffusers_pipe
):
    image, mask = make_case(64, 64, seed=5)
    result = sdk.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, steps=6, seed=3,
                         prompt_weighting=True, preserve_unmasked=False)  # fmt: skip
    negative_embeds, embeds = _reference_sd15(diffusers_pipe, [NEGATIVE, PROMPT], True).chunk(2)
    reference = diffusers_inpaint(
        diffusers_pipe, image, mask, prompt=None, seed=3, steps=6,
        prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
    )  # fmt: skip
    assert max_abs(result.arrays[0], reference) <= 2
    local = service.generate(wire(image, mask, prompt=PROMPT, negative_prompt=NEGATIVE,
                                  steps=6, seed=3, prompt_weighting=True))["images"][0]  # fmt: skip
    assert max_abs(result.arrays[0], local) <= 1
    plain = sdk.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, steps=6, seed=3,
                        preserve_unmasked=False)  # fmt: skip
    assert max_abs(plain.arrays[0], result.arrays[0]) > 2  # weighting off: another image


def test_sdxl_weighted_long_prompt_served_equals_diffusers_with_compel_embeds(
    server, diffusers_xl_pipe
):
    image, mask = make_case(64, 96, seed=3)
    with InpaintClient(server.grpc_url, model="inpaint_xl") as client:
        result = client.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, steps=6, seed=11,
                                prompt_weighting=True, preserve_unmasked=False)  # fmt: skip
    embeds, pooled = _reference_sdxl(diffusers_xl_pipe, [NEGATIVE, PROMPT])
    reference = diffusers_inpaint(
        diffusers_xl_pipe, image, mask, prompt=None, seed=11, steps=6,
        prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1],
        pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=pooled[:1],
    )  # fmt: skip
    assert max_abs(result.arrays[0], reference) <= 2


@pytest.mark.parametrize(
    ("controls", "message"),
    [
        ({"prompt": '("a", "b").blend(0.5)'},
         "prompt: weighting cannot be parsed: while parsing Blend: mismatched"),
        ({"prompt": "a (red:1.3) bicycle"}, "prompt: '(red:1.3)' is A1111 weighting syntax"),
        ({"negative_prompt": ", ".join([LONG] * 4)},
         "negative_prompt: takes 5 text-encoder windows of 75 tokens, at most 4"),
    ],
)  # fmt: skip
def test_bad_prompts_are_invalid_arg_naming_the_input(server, sdk, controls, message):
    request = wire(steps=2, seed=1, prompt_weighting=True, **controls)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as raw:
        client.infer("inpaint", infer_inputs(request))
    assert raw.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in raw.value.message() and "Traceback" not in raw.value.message()
    prompt = controls.get("prompt", "a red bicycle")
    options = {k: v for k, v in controls.items() if k != "prompt"}
    with pytest.raises(SdserveError, match="INVALID_ARGUMENT") as caught:
        sdk.text_to_image(prompt, height=64, width=64, steps=2, prompt_weighting=True, **options)
    assert message in str(caught.value)
    after = sdk.text_to_image("a red bicycle", height=64, width=64, steps=2, seed=1)
    assert after.arrays.shape == (1, 64, 64, 3)  # the server is unharmed
