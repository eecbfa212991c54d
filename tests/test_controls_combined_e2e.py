"""Several inpainting controls in one request, through a real tritonserver (issue 19): a
weighted prompt, only the masked area (`padding_mask_crop`) and a blurred mask together, unary
and streamed, equal diffusers given compel's embeddings, the blurred mask and
`padding_mask_crop`; clip skip with a weighted prompt is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import max_abs, served
from PIL import Image
from test_mask_crop import photo
from test_prompts import _reference_sd15

from sdserve_client import GenerationRequest, InpaintClient, SdserveError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PROMPT = "a (red bicycle)1.3 on a wet street, (fog)0.6"
NEGATIVE = "blurry, (low quality)1.2"


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    with served(repository, tmp_path_factory.mktemp("triton-combined")) as srv:
        yield srv


def test_weighted_prompt_crop_and_blur_together_equal_diffusers(server, diffusers_pipe):
    image, mask = photo(96, 128, (60, 40, 80, 56), seed=4)
    request = GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, image=image, mask=mask, prompt_weighting=True,
        padding_mask_crop=6, mask_blur=5, height=64, width=64, steps=5, seed=1,
        preserve_unmasked=False,
    )  # fmt: skip
    with InpaintClient(server.grpc_url) as client:
        unary = client.generate(request)
        streamed = list(client.stream(request))[-1]
    assert unary.arrays.shape == (1, 96, 128, 3)  # the photo's size back
    assert np.array_equal(streamed.arrays, unary.arrays)
    negative_embeds, embeds = _reference_sd15(diffusers_pipe, [NEGATIVE, PROMPT], True).chunk(2)
    blurred = diffusers_pipe.mask_processor.blur(Image.fromarray(mask), 5)
    reference = diffusers_pipe(
        prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
        image=Image.fromarray(image), mask_image=blurred, height=64, width=64,
        padding_mask_crop=6, num_inference_steps=5, generator=torch.Generator().manual_seed(1),
    ).images[0]  # fmt: skip
    assert max_abs(unary.arrays[0], np.asarray(reference)) <= 2


def test_clip_skip_with_a_weighted_prompt_is_refused_by_name(server):
    image, mask = photo(64, 64, (16, 16, 48, 48), seed=2)
    request = GenerationRequest(PROMPT, image=image, mask=mask, prompt_weighting=True,
                                clip_skip=1, steps=2)  # fmt: skip
    with (
        InpaintClient(server.grpc_url) as client,
        pytest.raises(SdserveError, match="clip_skip: applies to plain prompts"),
    ):
        client.generate(request)
