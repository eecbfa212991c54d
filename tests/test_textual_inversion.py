"""Textual inversion (issue 19, item 6): `.safetensors` embeddings added at export
(`build_repository(..., embeddings=DIR)`), against diffusers' `load_textual_inversion` on the
same weights; refused files; served end to end.

The embeddings are random vectors of the demo text encoder's width, saved with safetensors in
the two formats `load_textual_inversion` reads from such files: diffusers' (one tensor under
its token) and A1111's (`emb_params`, named by the file), one of them multi-vector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from cases import diffusers_inpaint, make_case, max_abs, served
from helpers import wire

from sdserve_export.demo_pipeline import TEXT_HIDDEN, XL_TEXT_HIDDEN
from sdserve_export.embeddings import EmbeddingError, read_embeddings
from sdserve_export.repository import build_repository

pytestmark = pytest.mark.slow
CAT, GRUMPY = "<sks-cat>", "grumpy"  # diffusers' format (1 vector), A1111's (3 vectors)
PROMPT = f"a photo of {CAT} on a bike, {GRUMPY} style"
XL_TOKEN = "xl-style"  # an SDXL file: named by its stem


def _write_embeddings(folder: Path, width: int = TEXT_HIDDEN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    cat = torch.randn(width, generator=generator) * 0.5  # a single vector, 1-D as diffusers
    grumpy = torch.randn(3, width, generator=generator) * 0.5
    safetensors.torch.save_file({CAT: cat}, folder / "sks-cat.safetensors")
    safetensors.torch.save_file({"emb_params": grumpy}, folder / f"{GRUMPY}.safetensors")
    (folder / "README.txt").write_text("not an embedding: ignored\n")
    return folder


@pytest.fixture(scope="module")
def ti_repository(demo_pipeline_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ti")
    folder = _write_embeddings(root / "embeddings")
    out = root / "model_repository"
    build_repository(demo_pipeline_dir, out, embeddings=folder, log=lambda _msg: None)
    return out


@pytest.fixture(scope="module")
def ti_service(ti_repository):
    from sdserve_pipeline.inprocess import load_service

    return load_service(ti_repository)


@pytest.fixture(scope="module")
def diffusers_ti(demo_pipeline_dir, ti_repository):
    """diffusers' pipeline on the same weights, the same files loaded its own way."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(demo_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    folder = ti_repository / "inpaint" / "1" / "assets" / "embeddings"
    pipe.load_textual_inversion(str(folder / f"{GRUMPY}.safetensors"), token=GRUMPY)
    pipe.load_textual_inversion(str(folder / "sks-cat.safetensors"))  # files in name order
    return pipe


def test_tokens_are_added_as_diffusers_adds_them(ti_service, diffusers_ti):
    ours = ti_service.loop.assets.tokenizer
    theirs = diffusers_ti.tokenizer
    added = [GRUMPY, f"{GRUMPY}_1", f"{GRUMPY}_2", CAT]
    assert [ours.convert_tokens_to_ids(t) for t in added] == [
        theirs.convert_tokens_to_ids(t) for t in added
    ] == list(range(49408, 49412))  # fmt: skip
    assert ours(PROMPT).input_ids == theirs(PROMPT).input_ids


def test_prompt_with_the_tokens_matches_diffusers(ti_service, diffusers_ti, service):
    image, mask = make_case(64, 64, seed=2)
    tensors = wire(image, mask, steps=6, seed=4)
    tensors["prompt"] = np.array([PROMPT.encode()], dtype=object)
    ours = ti_service.generate(tensors)["images"][0]
    reference = diffusers_inpaint(diffusers_ti, image, mask, prompt=PROMPT, seed=4, steps=6)
    assert max_abs(ours, reference) <= 2
    without = service.generate(tensors)["images"][0]  # the repository without embeddings
    assert max_abs(ours, without) > 2  # the vectors mattered


def test_a_prompt_without_the_tokens_is_unchanged(ti_service, service):
    """Unknown words stay ordinary text, and the larger table changes no other token."""
    image, mask = make_case(64, 64, seed=3)
    for prompt in ("a red bicycle", "a <sks-dog> and grumpier"):
        tensors = wire(image, mask, steps=4, seed=5)
        tensors["prompt"] = np.array([prompt.encode()], dtype=object)
        assert max_abs(ti_service.generate(tensors)["images"][0],
                       service.generate(tensors)["images"][0]) == 0  # fmt: skip


def test_an_embedding_of_the_wrong_width_is_refused(demo_pipeline_dir, tmp_path):
    folder = _write_embeddings(tmp_path / "wide", width=TEXT_HIDDEN + 16)
    with pytest.raises(EmbeddingError, match=r"grumpy.safetensors: vectors of width 80, but "
                       r"this checkpoint's text encoder takes 64"):  # fmt: skip
        build_repository(demo_pipeline_dir, tmp_path / "repo", embeddings=folder,
                         log=lambda _msg: None)  # fmt: skip
    assert not (tmp_path / "repo").exists()


def test_pickle_and_malformed_files_are_refused(tmp_path):
    folder = _write_embeddings(tmp_path / "pickled")
    torch.save({"string_to_param": {"*": torch.zeros(1, TEXT_HIDDEN)}}, folder / "old.pt")
    with pytest.raises(EmbeddingError, match=r"old.pt: pickle files are refused"):
        read_embeddings(folder)
    (folder / "old.pt").unlink()
    (folder / "fake.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(EmbeddingError, match=r"fake.safetensors: not a readable"):
        read_embeddings(folder)
    (folder / "fake.safetensors").unlink()
    safetensors.torch.save_file(
        {"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, folder / "ab.safetensors"
    )
    with pytest.raises(EmbeddingError, match=r"ab.safetensors: holds \['a', 'b'\]"):
        read_embeddings(folder)


def test_files_for_the_other_architecture_are_refused(demo_pipeline_dir, tmp_path):
    folder = _write_xl_embeddings(tmp_path / "xl")
    with pytest.raises(EmbeddingError, match=r"an SDXL embedding \(clip_l and clip_g\), but the "
                       r"checkpoint is SD 1.5"):  # fmt: skip
        build_repository(demo_pipeline_dir, tmp_path / "repo", embeddings=folder,
                         log=lambda _msg: None)  # fmt: skip


# SDXL: one file holds both encoders' vectors


def _write_xl_embeddings(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    keys = ("clip_l", "clip_g")
    vectors = {key: torch.randn(2, width, generator=generator) * 0.5
               for key, width in zip(keys, XL_TEXT_HIDDEN, strict=True)}  # fmt: skip
    safetensors.torch.save_file(vectors, folder / f"{XL_TOKEN}.safetensors")
    return folder


def test_sdxl_prompt_with_the_token_matches_diffusers(
    demo_xl_pipeline_dir, diffusers_xl_pipe, xl_service, tmp_path
):
    from diffusers import StableDiffusionXLInpaintPipeline

    from sdserve_pipeline.inprocess import load_service

    folder = _write_xl_embeddings(tmp_path / "embeddings")
    out = tmp_path / "model_repository"
    build_repository(demo_xl_pipeline_dir, out, pipeline_name="inpaint_xl", embeddings=folder,
                     log=lambda _msg: None)  # fmt: skip
    ours = load_service(out, "inpaint_xl")
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(demo_xl_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    state = safetensors.torch.load_file(folder / f"{XL_TOKEN}.safetensors")
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):  # fmt: skip
        pipe.load_textual_inversion(
            state[key], token=XL_TOKEN, text_encoder=encoder, tokenizer=tokenizer
        )
    image, mask = make_case(64, 64, seed=2)
    prompt = f"a {XL_TOKEN} bicycle"
    tensors = wire(image, mask, steps=6, seed=4)
    tensors["prompt"] = np.array([prompt.encode()], dtype=object)
    got = ours.generate(tensors)["images"][0]
    reference = diffusers_inpaint(pipe, image, mask, prompt=prompt, seed=4, steps=6)
    assert max_abs(got, reference) <= 2
    assert max_abs(got, xl_service.generate(tensors)["images"][0]) > 2


@pytest.mark.e2e
def test_served_prompt_with_the_tokens_matches_in_process(
    ti_repository, ti_service, tmp_path_factory
):
    from sdserve_client import InpaintClient

    image, mask = make_case(64, 64, seed=2)
    build = tmp_path_factory.mktemp("triton-ti")
    with served(ti_repository, build) as server, InpaintClient(server.grpc_url) as client:
        result = client.inpaint(image, mask, PROMPT, steps=6, seed=4, preserve_unmasked=False)
    tensors = wire(image, mask, steps=6, seed=4)
    tensors["prompt"] = np.array([PROMPT.encode()], dtype=object)
    assert max_abs(result.arrays[0], ti_service.generate(tensors)["images"][0]) <= 1
