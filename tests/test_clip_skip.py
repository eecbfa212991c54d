"""`clip_skip` (issue 19, item 4): the exported text encoders against transformers' hidden
states, and SD 1.5 (9- and 4-channel) and SDXL generation against diffusers' `clip_skip`,
in-process on ONNX Runtime; bad values and the recorded layer count.

diffusers 0.42.1 reads SD 1.5's final norm as `text_encoder.text_model.final_layer_norm`,
which transformers >= 5.6 no longer has (CLIPTextModel was flattened; diffusers issue #14124):
the reference runs with `text_model` pointing at the model itself, for these tests only."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from cases import diffusers_inpaint, make_case, max_abs
from helpers import Spy, wire
from transformers import CLIPTextModel

from sdserve_pipeline.batcher import generate_all
from sdserve_pipeline.generation import tokenize
from sdserve_pipeline.inprocess import load_service, read_parameters
from sdserve_pipeline.onnx_runtime import ONNX_FILE, create_session
from sdserve_protocol.rules import RequestError
from sdserve_protocol.settings import PipelineSettings

pytestmark = pytest.mark.slow
PROMPT = "a red bicycle"


@pytest.fixture
def flat_clip(monkeypatch):
    """diffusers' SD 1.5 clip_skip path on transformers >= 5.6 (see the module docstring)."""
    monkeypatch.setattr(CLIPTextModel, "text_model", property(lambda self: self), raising=False)


@pytest.fixture(scope="module")
def diffusers_base(base_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The exported text encoders, one row per clip_skip in one call


def _hidden_states(encoder, ids):
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states


def test_sd15_text_encoder_gives_each_row_its_own_layer(repository, diffusers_pipe):
    session = create_session(repository / "text_encoder" / "1" / ONNX_FILE)
    ids = tokenize(diffusers_pipe.tokenizer, ["", PROMPT, "blurry", PROMPT])
    skips = np.array([0, 1, 2, 0], np.int64)
    (ours,) = session.run(None, {"input_ids": ids.numpy(), "clip_skip": skips})
    encoder = diffusers_pipe.text_encoder
    states = _hidden_states(encoder, ids)
    with torch.no_grad():
        last = encoder(ids).last_hidden_state
        for row, skip in enumerate(skips):
            want = encoder.final_layer_norm(states[-(int(skip) + 1)][row])
            np.testing.assert_allclose(ours[row], want.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours[0], last[0].numpy(), atol=1e-5)  # 0: last_hidden_state
    assert np.abs(ours[1] - ours[3]).max() > 0.1  # same prompt, other layer


def test_sdxl_text_encoders_give_each_row_its_own_layer(xl_repository, diffusers_xl_pipe):
    pipe = diffusers_xl_pipe
    skips = np.array([2, 0, 1], np.int64)
    for name, encoder, tokenizer in (
        ("xl_text_encoder", pipe.text_encoder, pipe.tokenizer),
        ("xl_text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        session = create_session(xl_repository / name / "1" / ONNX_FILE)
        ids = tokenize(tokenizer, [PROMPT, PROMPT, "blurry"])
        hidden, *pooled = session.run(None, {"input_ids": ids.numpy(), "clip_skip": skips})
        states = _hidden_states(encoder, ids)
        for row, skip in enumerate(skips):
            want = states[-(int(skip) + 2)][row].numpy()
            np.testing.assert_allclose(hidden[row], want, atol=1e-5)
        if pooled:  # text_encoder_2's pooled output ignores clip_skip
            with torch.no_grad():
                np.testing.assert_allclose(pooled[0], encoder(ids).text_embeds, atol=1e-5)


# Generation against diffusers' clip_skip


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd15_inpainting_matches_diffusers(service, diffusers_pipe, flat_clip, clip_skip):
    image, mask = make_case(64, 64, seed=6)
    controls = dict(steps=6, seed=3, negative_prompt="blurry", preserve_unmasked=False)
    ours = service.generate(wire(image, mask, clip_skip=clip_skip, **controls))["images"][0]
    reference = diffusers_inpaint(
        diffusers_pipe, image, mask, seed=3, steps=6, negative_prompt="blurry",
        clip_skip=clip_skip,
    )  # fmt: skip
    assert max_abs(ours, reference) <= 2
    plain = service.generate(wire(image, mask, **controls))["images"][0]
    assert max_abs(ours, plain) > 2  # the skipped layers mattered


def test_sd15_clip_skip_zero_is_the_default(service, diffusers_pipe, flat_clip):
    image, mask = make_case(64, 64, seed=7)
    plain = service.generate(wire(image, mask, steps=4, seed=2))["images"][0]
    zero = service.generate(wire(image, mask, steps=4, seed=2, clip_skip=0))["images"][0]
    assert max_abs(plain, zero) == 0
    reference = diffusers_inpaint(diffusers_pipe, image, mask, seed=2, steps=4, clip_skip=0)
    unmasked = service.generate(wire(image, mask, steps=4, seed=2, preserve_unmasked=False))
    assert max_abs(unmasked["images"][0], reference) <= 2


def test_four_channel_text_to_image_matches_diffusers(base_service, diffusers_base, flat_clip):
    ours = base_service.generate(wire(steps=8, seed=3, height=64, width=96, clip_skip=1))
    reference = diffusers_base(
        PROMPT, height=64, width=96, num_inference_steps=8, clip_skip=1,
        generator=torch.Generator().manual_seed(3),
    ).images[0]  # fmt: skip
    assert max_abs(ours["images"][0], np.asarray(reference)) <= 2
    plain = base_service.generate(wire(steps=8, seed=3, height=64, width=96))["images"][0]
    assert max_abs(ours["images"][0], plain) > 2


@pytest.mark.parametrize(("clip_skip", "negative"), [(1, ""), (2, "blurry")])
def test_sdxl_matches_diffusers(xl_service, diffusers_xl_pipe, clip_skip, negative):
    """Both encoders read `hidden_states[-(clip_skip + 2)]` for the prompt; the negative prompt
    (zeroed when empty) and text_encoder_2's pooled embedding are as without clip skip."""
    image, mask = make_case(64, 96, seed=3)
    controls = dict(steps=6, seed=11, preserve_unmasked=False, negative_prompt=negative)
    ours = xl_service.generate(wire(image, mask, clip_skip=clip_skip, **controls))["images"][0]
    options = {"negative_prompt": negative} if negative else {}
    reference = diffusers_inpaint(
        diffusers_xl_pipe, image, mask, seed=11, steps=6, clip_skip=clip_skip, **options
    )
    assert max_abs(ours, reference) <= 2
    plain = xl_service.generate(wire(image, mask, **controls))["images"][0]
    assert max_abs(ours, plain) > 2


def test_requests_with_different_clip_skip_share_one_text_encoder_call(service):
    image, mask = make_case(64, 64, seed=4)
    requests = [wire(image, mask, steps=3, seed=5, clip_skip=k) for k in (0, 2, 1)]
    alone = [service.generate(r)["images"] for r in requests]
    spy = Spy(service)
    together = generate_all(spy.service, requests)
    assert spy.rows["text_encoder"] == [6]  # three [negative, prompt] pairs in one call
    for single, batched in zip(alone, together, strict=True):
        assert max_abs(single, batched["images"]) == 0
    assert max_abs(alone[0], alone[1]) > 2


# Bad input and the recorded layer count


def test_layer_count_is_recorded_from_the_checkpoint(service, xl_service, base_service):
    # the demo SD 1.5 encoder has 2 layers: hidden_states[-(2 + 1)] is the embeddings' output;
    # the demo SDXL encoders have 3: hidden_states[-(2 + 2)] is
    for svc in (service, base_service, xl_service):
        assert svc.loop.facts.max_clip_skip == 2
        assert svc.limits.max_clip_skip == 2


@pytest.mark.parametrize("svc", ["service", "xl_service"])
def test_clip_skip_beyond_the_layers_is_refused(request, svc):
    svc = request.getfixturevalue(svc)
    image, mask = make_case(64, 64, seed=1)
    with pytest.raises(RequestError, match=r"^clip_skip: 3 out of range \[0, 2\]$"):
        svc.parse(wire(image, mask, clip_skip=3))
    with pytest.raises(RequestError, match=r"^clip_skip: -1 out of range \[0, 2\]$"):
        svc.parse(wire(image, mask, clip_skip=-1))


def test_a_limit_beyond_the_layers_is_refused_at_load(repository, tmp_path):
    shutil.copytree(repository, tmp_path / "repo")
    config = tmp_path / "repo" / "inpaint" / "config.pbtxt"
    assert (
        PipelineSettings.from_parameters(read_parameters(config.parent)).limits.max_clip_skip == 2
    )
    text = config.read_text()
    raised = re.sub(r'(limit_max_clip_skip"\s*value\s*\{\s*string_value:\s*)"2"', r'\1"5"', text)
    assert raised != text
    config.write_text(raised)
    with pytest.raises(ValueError, match="limit_max_clip_skip: 5, but the text encoders"):
        load_service(tmp_path / "repo")
