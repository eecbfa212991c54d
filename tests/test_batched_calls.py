"""Cross-request batching of the text-encoder, VAE-encoder and VAE-decoder calls
(`InpaintLoop.start_many` / `finish_many` / `run_plans`): requests started or finished
together share one call per component and shape, and each gets exactly its images alone."""

from __future__ import annotations

import pytest
import torch
from cases import make_case, max_abs
from helpers import Spy, wire

from sdserve_pipeline.loop import Call, InpaintLoop
from sdserve_pipeline.request import RequestError
from sdserve_pipeline.service import PipelineService


def params_of(service: PipelineService, requests):
    return [service.parse(r) for r in requests]


def generate_together(loop: InpaintLoop, params) -> list:
    """start_many → denoise → finish_many, as the batcher's turns do."""
    started = loop.start_many([(p, None) for p in params])
    jobs = [j for j in started if not isinstance(j, Exception)]
    while not all(j.finished for j in jobs):
        loop.step_all([j for j in jobs if not j.finished])
    finished = iter(loop.finish_many(jobs))
    return [j if isinstance(j, Exception) else next(finished) for j in started]


@pytest.fixture(scope="module")
def requests():
    """Two 64x64 inpaints (strength 1 and 0.6), one 48x80 inpaint, one text-to-image."""
    square, square_mask = make_case(64, 64, seed=3)
    wide, wide_mask = make_case(48, 80, seed=4)
    return [
        wire(square, square_mask, steps=3, seed=1),
        wire(square, square_mask, steps=3, seed=2, strength=0.6, scheduler="euler"),
        wire(wide, wide_mask, steps=3, seed=3, guidance_scale=1.0),
        wire(steps=3, seed=4, height=64, width=64, num_images=2),
    ]


def spy_together_matching_alone(service: PipelineService, requests) -> Spy:
    """Generates `requests` together on a spied loop; each image must equal its alone run."""
    params = params_of(service, requests)
    alone = [service.loop(p) for p in params]
    spy = Spy(service.loop)
    together = generate_together(spy.loop, params)
    for single, batched in zip(alone, together, strict=True):
        assert max_abs(single, batched) == 0
    return spy


def test_requests_started_and_finished_together_share_calls_and_match_alone(service, requests):
    spy = spy_together_matching_alone(service, requests)
    # one text-encoder call: [neg, prompt] x3 with CFG + [prompt] without
    assert spy.rows["text_encoder"] == [2 + 2 + 1 + 2]
    # VAE encoder, first round: the 64x64 images of three requests together (the 0.6-strength
    # request's init image, the masked images of the other two, text-to-image's blank one),
    # the 48x80 one apart; second round: the 0.6-strength request's masked image
    assert spy.rows["vae_encoder"] == [3, 1, 1]
    # decoder: the 64x64 latents of three requests (1 + 1 + 2 images), the 48x80 one apart
    assert sorted(spy.rows["vae_decoder"]) == [1, 4]


def test_a_component_limit_splits_batched_calls(service, requests):
    params = params_of(service, requests)
    spy = Spy(service.loop)
    spy.loop.max_rows = {"text_encoder": 4, "vae_encoder": 2, "vae_decoder": 2}
    generate_together(spy.loop, params)
    assert spy.rows["text_encoder"] == [4, 3]
    assert spy.rows["vae_encoder"] == [2, 1, 1, 1]  # 64x64: 2 + 1, 48x80, then one more
    assert spy.rows["vae_decoder"] == [2, 2, 1]  # 64x64: 1 + 1 images, 2 images; 48x80


def test_a_failed_call_fails_only_the_requests_in_it(service, requests):
    params = params_of(service, requests)
    alone = [service.loop(p) for p in params]
    spy = Spy(service.loop, fail=lambda role, index: role == "text_encoder" and index == 2)
    spy.loop.max_rows = {"text_encoder": 2}  # one call per CFG request
    together = generate_together(spy.loop, params)
    assert isinstance(together[1], RuntimeError) and "text_encoder call 2" in str(together[1])
    for i in (0, 2, 3):
        assert max_abs(alone[i], together[i]) == 0


def test_a_request_failing_in_its_own_code_does_not_stop_the_others(service, requests):
    params = params_of(service, requests[:2])
    spy = Spy(service.loop)
    spy.loop.size_buckets = ((64, 64),)  # the 48x80 request fits no bucket
    wide = service.parse(requests[2])
    started = spy.loop.start_many([(params[0], None), (wide, None), (params[1], None)])
    assert isinstance(started[1], RequestError) and started[1].name == "image"
    assert not isinstance(started[0], Exception) and not isinstance(started[2], Exception)


def test_run_plans_drives_plans_of_different_lengths(service):
    """A plan may ask for more calls than another; each gets its own outputs back."""
    loop = service.loop

    def plan(rows: int, calls: int):
        seen = []
        for _ in range(calls):
            (decoded,) = yield Call("vae_decoder", (torch.zeros(rows, 4, 8, 8),))
            seen.append(tuple(decoded.shape))
        return seen

    spy = Spy(loop)
    results = spy.loop.run_plans([plan(1, 3), plan(2, 1), plan(3, 2)])
    assert results == [[(1, 3, 64, 64)] * 3, [(2, 3, 64, 64)], [(3, 3, 64, 64)] * 2]
    assert spy.rows["vae_decoder"] == [6, 4, 1]


@pytest.mark.slow
def test_sdxl_requests_started_together_share_both_text_encoders(xl_service):
    image, mask = make_case(64, 64, seed=6)
    requests = [
        wire(image, mask, steps=2, seed=1),
        wire(image, mask, steps=2, seed=2, guidance_scale=1.0),
    ]
    spy = spy_together_matching_alone(xl_service, requests)
    # force_zeros_for_empty_prompt: the CFG request encodes its prompt only, like the other
    assert spy.rows["text_encoder"] == spy.rows["text_encoder_2"] == [2]
    assert spy.rows["vae_decoder"] == [2]
