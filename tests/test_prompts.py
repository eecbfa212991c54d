"""Long and weighted prompts (issue 19, item 5): compel over the exported text encoders.

Parity, in-process on ONNX Runtime: our embeddings equal compel's on the PyTorch text encoders
(SD 1.5; SDXL with both encoders and pooled embeddings), and our images equal diffusers called
with those `prompt_embeds` / `negative_prompt_embeds` (and pooled, SDXL). Plain prompts keep
the one-call path; requests with different text lengths never share a UNet call; bad prompts
are refused before any model call. Served end to end: tests/test_prompts_e2e.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from cases import diffusers_inpaint, make_case, max_abs
from compel import Compel, CompelForSD, CompelForSDXL, DownweightMode, ReturnedEmbeddingsType
from helpers import Spy, variant, wire

from sdserve_pipeline.batcher import generate_all
from sdserve_protocol.rules import RequestError

pytestmark = pytest.mark.slow

# 87 tokens with its start and end markers: 2 windows
LONG = (
    "a red bicycle leaning on a weathered brick wall in a narrow cobblestone street of an old "
    "european town at dawn, soft golden light, long shadows, wet stones after the rain, "
    "flower boxes under the windows, a sleeping cat on a doorstep, pigeons on the roof, "
    "highly detailed photograph, 35mm film grain, shallow depth of field, muted colors, "
    "a faded poster on the wall, laundry hanging between the houses"
)
UPWEIGHTED = "a (red bicycle)1.4 on a street++, (photograph)1.2"  # weights >= 1 only
DOWNWEIGHTED = "a red bicycle, (rain)0.5, street-"  # weights < 1: compel's REMOVE mode
BLEND = '("a red bicycle", "a blue car").blend(0.7, 0.3)'
AND = '("a red bicycle", "a foggy street").and()'  # two prompts: 2 windows
ATOL = 1e-4  # the text encoders' own ONNX-vs-PyTorch tolerance (components.py)


def _ours(service, texts, weighting):
    loop = service.loop
    return loop.executor.run(loop.prompts.encode(texts, weighting))


def _reference_sd15(pipe, texts, weighting, mode=DownweightMode.REMOVE):
    """compel on diffusers' PyTorch text encoder; [negative, prompt] padded as compel pads."""
    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                    truncate_long_prompts=False, downweight_mode=mode)  # fmt: skip
    with torch.no_grad():
        if weighting:
            embeds = [compel.build_conditioning_tensor(t) for t in texts]
        else:  # the whole text as one fragment
            embeds = [compel.conditioning_provider.get_embeddings_for_weighted_prompt_fragments(
                [[t]], [[1.0]], device="cpu") for t in texts]  # fmt: skip
        return torch.cat(compel.pad_conditioning_tensors_to_same_length(embeds))


# SD 1.5: embeddings


@pytest.mark.parametrize(
    "prompt", [LONG, UPWEIGHTED, DOWNWEIGHTED, BLEND, AND, LONG + ", (fog)0.7"]
)
def test_sd15_embeddings_equal_compel_on_the_pytorch_encoder(service, diffusers_pipe, prompt):
    texts = ["blurry, (low quality)1.3", prompt]
    ours, pooled = _ours(service, texts, weighting=True)
    reference = _reference_sd15(diffusers_pipe, texts, weighting=True)
    assert pooled is None and ours.shape == reference.shape
    assert ours.shape[1] % 77 == 0
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_sd15_upweighted_and_long_prompts_equal_compel_for_sd(service, diffusers_pipe):
    """compel's own diffusers wrapper (MASK mode: no token is masked without weights < 1)."""
    for prompt in (LONG, UPWEIGHTED):
        ours, _ = _ours(service, ["ugly", prompt], weighting=True)
        with torch.no_grad():
            labelled = CompelForSD(diffusers_pipe)(prompt, negative_prompt="ugly")
        reference = torch.cat([labelled.negative_embeds, labelled.embeds])
        torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_weighting_off_chunks_long_text_and_keeps_parentheses_as_text(service, diffusers_pipe):
    text = LONG + ", (red)1.5"
    ours, _ = _ours(service, ["", text], weighting=False)
    reference = _reference_sd15(diffusers_pipe, ["", text], weighting=False)
    assert ours.shape[1] == 154
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    weighted, _ = _ours(service, ["", text], weighting=True)
    assert (weighted - ours).abs().max() > 1e-2  # on: "(red)1.5" is weighted, not text


# SD 1.5: images equal diffusers called with compel's embeddings


@pytest.mark.parametrize("prompt", [LONG, DOWNWEIGHTED])
def test_sd15_image_equals_diffusers_with_compel_embeddings(service, diffusers_pipe, prompt):
    image, mask = make_case(64, 64, seed=4)
    negative = "blurry, (low quality)1.3"
    request = wire(image, mask, prompt=prompt, negative_prompt=negative, steps=6, seed=5,
                   prompt_weighting=True)  # fmt: skip
    ours = service.generate(request)["images"][0]
    negative_embeds, embeds = _reference_sd15(diffusers_pipe, [negative, prompt], True).chunk(2)
    reference = diffusers_inpaint(
        diffusers_pipe, image, mask, prompt=None, seed=5, steps=6,
        prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
    )  # fmt: skip
    assert max_abs(ours, reference) <= 2
    plain = service.generate(wire(image, mask, prompt=prompt, negative_prompt=negative,
                                  steps=6, seed=5))["images"][0]  # fmt: skip
    assert max_abs(ours, plain) > 2 or prompt == LONG  # weighting changes the image


def test_a_plain_prompt_keeps_the_one_call_path(service):
    """Weighting off and one window: one text-encoder call of [negative, prompt] at 77 tokens,
    compel not involved, whatever parentheses the text holds; the image is today's."""
    spy = Spy(service)
    image, mask = make_case(64, 64, seed=4)
    request = wire(image, mask, prompt="a (red) bicycle++", steps=2, seed=1)
    assert not service.loop.prompts.applies(["", "a (red) bicycle++"], weighting=False)
    assert np.array_equal(
        spy.service.generate(request)["images"], service.generate(request)["images"]
    )
    assert spy.rows["text_encoder"] == [2]


def test_weighted_requests_batch_by_text_length(service):
    """Requests whose embeddings differ in length never share a UNet call; equal lengths do,
    and each image equals the request served alone."""
    shapes: list[tuple[int, ...]] = []
    unet = service.loop.components.unet

    def recording(*inputs):
        shapes.append(tuple(inputs[2].shape))
        return unet(*inputs)

    watched = variant(service, unet=recording)
    image, mask = make_case(64, 64, seed=2)
    requests = [
        wire(image, mask, prompt=p, steps=3, seed=s, prompt_weighting=True)
        for p, s in ((LONG, 1), (UPWEIGHTED, 2), (LONG, 3), ("a red bicycle", 4))
    ]
    batched = generate_all(watched, requests)
    # each step: one call of the two 154-token requests, one of the two 77-token ones (4 rows:
    # two requests x [uncond, cond]); PNDM's warm-up makes 4 UNet steps of 3
    assert Counter(shape[:2] for shape in shapes) == {(4, 77): 4, (4, 154): 4}
    for request, outputs in zip(requests, batched, strict=True):
        assert np.array_equal(outputs["images"], service.generate(request)["images"])


# SDXL


def _reference_sdxl(pipe, texts, mode=DownweightMode.REMOVE):
    """As CompelForSDXL, with `mode`: (embeds, pooled) of `texts`."""
    penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    compel_1 = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                      returned_embeddings_type=penultimate, truncate_long_prompts=False,
                      downweight_mode=mode)  # fmt: skip
    compel_2 = Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2,
                      returned_embeddings_type=penultimate, truncate_long_prompts=False,
                      requires_pooled=True, downweight_mode=mode)  # fmt: skip
    with torch.no_grad():
        left = compel_1(list(texts))
        right, pooled = compel_2(list(texts))
    return torch.cat([left, right], dim=-1), pooled


@pytest.mark.parametrize("prompt", [LONG, DOWNWEIGHTED, BLEND])
def test_sdxl_embeddings_and_pooled_equal_compel(xl_service, diffusers_xl_pipe, prompt):
    texts = ["ugly", prompt]
    ours, pooled = _ours(xl_service, texts, weighting=True)
    embeds, reference_pooled = _reference_sdxl(diffusers_xl_pipe, texts)
    torch.testing.assert_close(ours, embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, reference_pooled, atol=ATOL, rtol=0)


def test_sdxl_upweighted_long_prompt_equals_compel_for_sdxl(xl_service, diffusers_xl_pipe):
    prompt = LONG + ", (fog)1.3"
    ours, pooled = _ours(xl_service, ["ugly", prompt], weighting=True)
    with torch.no_grad():
        labelled = CompelForSDXL(diffusers_xl_pipe)(prompt, negative_prompt="ugly")
    assert ours.shape[1] == 154
    torch.testing.assert_close(ours, torch.cat([labelled.negative_embeds, labelled.embeds]),
                               atol=ATOL, rtol=0)  # fmt: skip
    torch.testing.assert_close(
        pooled,
        torch.cat([labelled.negative_pooled_embeds, labelled.pooled_embeds]),
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize("negative", ["", "blurry, (low quality)1.3"])
def test_sdxl_image_equals_diffusers_with_compel_embeddings(xl_service, diffusers_xl_pipe,
                                                            negative):  # fmt: skip
    """Empty negative: zeros (`force_zeros_for_empty_prompt`), as diffusers makes them."""
    image, mask = make_case(64, 96, seed=3)
    prompt = LONG + ", (fog)0.6"
    request = wire(image, mask, prompt=prompt, negative_prompt=negative, steps=6, seed=11,
                   prompt_weighting=True)  # fmt: skip
    ours = xl_service.generate(request)["images"][0]
    texts = [negative, prompt] if negative else [prompt]
    embeds, pooled = _reference_sdxl(diffusers_xl_pipe, texts)
    kwargs = {"prompt_embeds": embeds[-1:], "pooled_prompt_embeds": pooled[-1:]}
    if negative:
        kwargs |= {
            "negative_prompt_embeds": embeds[:1],
            "negative_pooled_prompt_embeds": pooled[:1],
        }
    reference = diffusers_inpaint(diffusers_xl_pipe, image, mask, prompt=None, seed=11, steps=6,
                                  **kwargs)  # fmt: skip
    assert max_abs(ours, reference) <= 2


# Bad prompts: refused before any model call, naming the input


@pytest.mark.parametrize(
    ("controls", "message"),
    [
        (
            {"prompt": '("a", "b").blend(0.5)'},
            "prompt: weighting cannot be parsed: while parsing Blend: mismatched prompts/weights",
        ),
        (
            {"negative_prompt": '("a", "b").and(1, 2, 3)'},
            "negative_prompt: weighting cannot be parsed: while parsing Conjunction",
        ),
        (
            {"prompt": "a (red:1.3) bicycle"},
            "prompt: '(red:1.3)' is A1111 weighting syntax; compel's is (word)1.3",
        ),
        ({"prompt": "a [red] bicycle"}, "prompt: '[red]' is A1111 weighting syntax"),
        ({"prompt": "a cat.swap(dog)"}, "prompt: .swap() (cross-attention control) is not served"),
        ({"prompt": "()"}, "prompt: weighting cannot be parsed: nothing left to encode"),
        ({"prompt": "withLora(style, 0.5) a cat"}, "prompt: withLora()/useLora() is not served"),
        (
            {"prompt": ", ".join([LONG] * 4)},
            "prompt: takes 5 text-encoder windows of 75 tokens, at most 4 "
            "(limit_max_prompt_chunks)",
        ),
    ],
)
def test_bad_prompts_are_refused_before_any_call(service, controls, message):
    spy = Spy(service)
    with pytest.raises(RequestError) as caught:
        spy.service.generate(wire(steps=2, seed=1, prompt_weighting=True, **controls))
    assert str(caught.value).startswith(message)
    assert not spy.rows


def test_the_chunk_limit_holds_without_weighting_and_plain_syntax_is_text(service):
    with pytest.raises(RequestError, match="^negative_prompt: takes 5 text-encoder windows"):
        service.parse(wire(negative_prompt=", ".join([LONG] * 4)))
    service.parse(wire(prompt='("a", "b").blend(0.5) a [red] (cat:1.3)'))  # off: plain text


def test_checking_a_request_while_the_loop_tokenizes_gives_no_ragged_ids(service):
    """A request is checked in the submitting thread (an untruncated token count) while the
    batcher's thread tokenizes others (padded, truncated) with the same fast tokenizer, whose
    settings live on one shared object: without `TOKENIZER_LOCK` the loop got ragged ids
    ("Unable to create tensor", seen in the 500-request soak)."""
    import threading

    from sdserve_pipeline.generation import tokenize

    tokenizer = service.loop.assets.tokenizer
    errors: list[Exception] = []
    done = threading.Event()

    def check_many() -> None:
        try:
            while not done.is_set():
                service.parse(wire(prompt=LONG, prompt_weighting=False))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    checker = threading.Thread(target=check_many)
    checker.start()
    try:
        for _ in range(300):
            assert tokenize(tokenizer, ["", "a red bicycle"]).shape == (2, 77)
    finally:
        done.set()
        checker.join()
    assert not errors
