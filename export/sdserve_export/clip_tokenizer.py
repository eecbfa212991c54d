"""The real CLIP BPE tokenizer (49,408 tokens), built offline from open-clip's vocabulary file.

open-clip-torch ships `bpe_simple_vocab_16e6.txt.gz`; it is installed with `--no-deps`
(its dependencies pull a CUDA torch), so `import open_clip` fails for want of torchvision
and the file is located through the package metadata instead.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sdserve_pipeline.components import CLIP_VOCAB_SIZE

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # byte tokens, byte</w> tokens, start/end of text


def bpe_vocab_path() -> Path:
    """Path of open-clip's BPE merges file inside the installed open-clip-torch wheel."""
    try:
        files = importlib.metadata.files("open-clip-torch") or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "open-clip-torch is not installed; `pip install --no-deps open-clip-torch` "
            f"provides {BPE_FILE}"
        ) from None
    for file in files:
        if file.name == BPE_FILE:
            return Path(str(file.locate()))
    raise FileNotFoundError(f"{BPE_FILE} not found in the open-clip-torch installation")


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77) -> CLIPTokenizer:
    """CLIP's tokenizer with its real vocabulary, as open-clip's SimpleTokenizer builds it.

    Args:
        pad_token: "<|endoftext|>" for SD 1.5's tokenizer, "!" for SDXL's second one.
        max_length: the text encoder's context length.
    """
    with gzip.open(bpe_vocab_path()) as file:
        lines = file.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length
    )
