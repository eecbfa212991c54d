"""Cross-request batching of the text-encoder, VAE-encoder and VAE-decoder calls
(`Executor.run_plans`, driven by the `ContinuousBatcher`): requests started or finished
together share one call per component and shape, and each gets exactly its images alone."""

from __future__ import annotations

import pytest
import torch
from cases import make_case, max_abs
from helpers import Spy, wire

from sdserve_pipeline import generation
from sdserve_pipeline.batcher import generate_all
from sdserve_pipeline.executor import Call
from sdserve_pipeline.service import PipelineService


def images_of(outcomes) -> list:
    """Each request's images, or the exception that ended it."""
    return [o if isinstance(o, Exception) else o["images"] for o in outcomes]


@pytest.fixture(scope="module")
def requests():
    """Two 64x64 inpaints (strength 1 and 0.6), one 48x80 inpaint, one text-to-image; each
    runs 4 UNet steps (PNDM's 3 steps take 4; the second runs 7 x 0.6 Euler steps), so all
    finish in the same turn of the batcher."""
    square, square_mask = make_case(64, 64, seed=3)
    wide, wide_mask = make_case(48, 80, seed=4)
    return [
        wire(square, square_mask, steps=3, seed=1),
        wire(square, square_mask, steps=7, seed=2, strength=0.6, scheduler="euler"),
        wire(wide, wide_mask, steps=3, seed=3, guidance_scale=1.0),
        wire(steps=3, seed=4, height=64, width=64, num_images=2),
    ]


def spy_together_matching_alone(service: PipelineService, requests) -> Spy:
    """Serves `requests` together on a spied service; each image must equal its alone run."""
    alone = [service.generate(r)["images"] for r in requests]
    spy = Spy(service)
    together = images_of(generate_all(spy.service, requests))
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
    spy = Spy(service, max_rows={"text_encoder": 4, "vae_encoder": 2, "vae_decoder": 2})
    generate_all(spy.service, requests)
    assert spy.rows["text_encoder"] == [4, 3]
    assert spy.rows["vae_encoder"] == [2, 1, 1, 1]  # 64x64: 2 + 1, 48x80, then one more
    assert spy.rows["vae_decoder"] == [2, 2, 1]  # 64x64: 1 + 1 images, 2 images; 48x80


def test_a_failed_call_fails_only_the_requests_in_it(service, requests):
    alone = [service.generate(r)["images"] for r in requests]
    spy = Spy(
        service,
        fail=lambda role, index: role == "text_encoder" and index == 2,
        max_rows={"text_encoder": 2},  # one call per CFG request
    )
    together = images_of(generate_all(spy.service, requests))
    assert isinstance(together[1], RuntimeError) and "text_encoder call 2" in str(together[1])
    for i in (0, 2, 3):
        assert max_abs(alone[i], together[i]) == 0


def test_a_request_failing_in_its_own_code_does_not_stop_the_others(service, requests, monkeypatch):
    alone = [service.generate(r)["images"] for r in requests]
    real = generation.make_scheduler

    def no_euler(name, config):  # the second request fails between two calls of its plan
        if name == "euler":
            raise RuntimeError("no euler today")
        return real(name, config)

    monkeypatch.setattr(generation, "make_scheduler", no_euler)
    together = images_of(generate_all(service, requests))
    assert isinstance(together[1], RuntimeError) and "no euler" in str(together[1])
    for i in (0, 2, 3):
        assert max_abs(alone[i], together[i]) == 0


def test_run_plans_drives_plans_of_different_lengths(service):
    """A plan may ask for more calls than another; each gets its own outputs back."""

    def plan(rows: int, calls: int):
        seen = []
        for _ in range(calls):
            (decoded,) = yield Call("vae_decoder", (torch.zeros(rows, 4, 8, 8),))
            seen.append(tuple(decoded.shape))
        return seen

    spy = Spy(service)
    results = spy.loop.executor.run_plans([plan(1, 3), plan(2, 1), plan(3, 2)])
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
