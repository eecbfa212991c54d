"""Textual inversion embeddings, added to a checkpoint before its text encoder is exported.

Every `.safetensors` file of a folder is read as diffusers' `load_textual_inversion` reads it:
diffusers' format holds one tensor under its token; A1111's (`emb_params`) is named by its
file's stem; an SDXL file holds `clip_l` and `clip_g`, one per text encoder, and is named by its
stem (as diffusers' documentation loads one: each tensor into its encoder, with `token=`); a
tensor of several rows is a multi-vector embedding (`tok`, `tok_1`, ...). The
tokens are added to the tokenizer and their vectors appended to the text encoder's token table,
diffusers' own steps, so the export traces the text encoder with the larger table: the served
encoder reads the new tokens like any other, with no input or cost added per call, and the
pipeline expands a multi-vector token in a prompt as diffusers' `maybe_convert_prompt` does.

Embeddings are picked up when the repository is built (`--embeddings DIR`), not at model
load: the exported encoder's table is fixed, so adding one means exporting again. Pickle
files (`.pt`, `.bin`, `.ckpt`) and vectors of another width than the text encoder's are
refused before anything is exported.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
A1111_KEY = "emb_params"  # A1111 saves a .safetensors embedding under this key
SDXL_KEYS = ("clip_l", "clip_g")  # text_encoder's and text_encoder_2's vectors
EMBEDDINGS_DIR = "embeddings"  # copies of the files, beside the pipeline's other assets


class EmbeddingError(ValueError):
    """An embedding file that cannot be added to this checkpoint."""


@dataclass(frozen=True)
class Embedding:
    """One file's token and vectors.

    Args:
        path: the `.safetensors` file.
        token: the prompt word that calls it.
        vectors: (n, D): one row per token it becomes (`token`, `token_1`, ...).
        vectors_2: (n, D2): SDXL's second text encoder's (`clip_g`); None for SD 1.5.
    """

    path: Path
    token: str
    vectors: torch.Tensor
    vectors_2: torch.Tensor | None = None


def read_embeddings(folder: Path) -> list[Embedding]:
    """The embeddings of a folder, in file name order.

    Raises:
        EmbeddingError: a pickle file, a file safetensors cannot read, or one in neither
            diffusers' nor A1111's format.
    """
    embeddings = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise EmbeddingError(
                f"{path}: pickle files are refused (loading one can run code); save the "
                "embedding as .safetensors"
            )
        if path.suffix.lower() != ".safetensors":
            continue
        try:
            state = safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 (any unreadable file is the user's to fix)
            raise EmbeddingError(f"{path}: not a readable .safetensors file ({err})") from None
        if sorted(state) == sorted(SDXL_KEYS):
            first, second = (_rows(state[key]) for key in SDXL_KEYS)
            embeddings.append(Embedding(path, path.stem, first, second))
            continue
        if len(state) != 1:
            raise EmbeddingError(
                f"{path}: holds {sorted(state)}; a textual inversion file holds one tensor, "
                f"under its token (diffusers) or {A1111_KEY!r} (A1111), or SDXL's "
                f"{' and '.join(SDXL_KEYS)}"
            )
        ((key, tensor),) = state.items()
        token = path.stem if key == A1111_KEY else key
        embeddings.append(Embedding(path, token, _rows(tensor)))
    return embeddings


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def check_architecture(embeddings: list[Embedding], sdxl: bool) -> None:
    """SDXL checkpoints take SDXL files (`clip_l` and `clip_g`), SD 1.5 ones single tensors.

    Raises:
        EmbeddingError: a file made for the other architecture.
    """
    for embedding in embeddings:
        if sdxl and embedding.vectors_2 is None:
            raise EmbeddingError(
                f"{embedding.path}: one text encoder's vectors, but an SDXL checkpoint needs "
                f"both ({' and '.join(SDXL_KEYS)})"
            )
        if not sdxl and embedding.vectors_2 is not None:
            raise EmbeddingError(
                f"{embedding.path}: an SDXL embedding ({' and '.join(SDXL_KEYS)}), but the "
                "checkpoint is SD 1.5"
            )


def add_embeddings(
    embeddings: list[Embedding], text_encoder: Any, tokenizer: Any, second: bool = False
) -> list[str]:
    """Adds each embedding's tokens to `tokenizer` and its vectors to `text_encoder`'s token
    table, as `load_textual_inversion` does. Returns the tokens added.

    Args:
        second: SDXL's text_encoder_2 (the files' `clip_g` vectors).

    Raises:
        EmbeddingError: a vector of another width than the encoder's, or a token the
            tokenizer already has.
    """
    width = int(text_encoder.get_input_embeddings().weight.shape[-1])
    rows = [e.vectors_2 if second else e.vectors for e in embeddings]
    for embedding, vectors in zip(embeddings, rows, strict=True):
        if vectors is None or vectors.shape[-1] != width:
            got = "none" if vectors is None else vectors.shape[-1]
            raise EmbeddingError(
                f"{embedding.path}: vectors of width {got}, but this checkpoint's "
                f"text encoder{'_2' if second else ''} takes {width}"
            )
    loader = TextualInversionLoaderMixin
    try:
        tokens, vectors = loader._retrieve_tokens_and_embeddings(
            [e.token for e in embeddings],
            [{e.token: v} for e, v in zip(embeddings, rows, strict=True)],
            tokenizer,
        )
        tokens, vectors = loader._extend_tokens_and_embeddings(tokens, vectors, tokenizer)
    except ValueError as err:
        raise EmbeddingError(str(err)) from None
    text_encoder.resize_token_embeddings(len(tokenizer) + len(tokens))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, vector in zip(tokens, vectors, strict=True):
            tokenizer.add_tokens(token)
            table[tokenizer.convert_tokens_to_ids(token)] = vector.to(table.dtype)
    return list(tokens)


def copy_embeddings(embeddings: list[Embedding], assets_dir: Path) -> None:
    """Keeps the files beside the pipeline's assets (`assets/embeddings/`), as a record."""
    if not embeddings:
        return
    folder = assets_dir / EMBEDDINGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for embedding in embeddings:
        shutil.copyfile(embedding.path, folder / embedding.path.name)
