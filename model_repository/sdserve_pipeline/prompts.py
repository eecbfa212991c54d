"""Long and weighted prompts: compel parses, chunks and weights; our text encoders encode.

compel (`Compel`, as `CompelForSD` / `CompelForSDXL` configure it: `truncate_long_prompts=False`,
SDXL's penultimate hidden states and pooled embeddings of `text_encoder_2`) turns a prompt into
embeddings by calling a PyTorch text encoder, synchronously. Here that encoder is a
`_RecordedEncoder`: it answers from the outputs of component calls the plan has already made,
and otherwise stops compel (`_NeedCall`) with the token ids it asked for. The plan then makes
that call (`yield Call(...)`, batched with other requests' calls like any other) and runs
compel again from the start, one answer further; compel is deterministic, so each run asks for
the same calls in the same order. The parsing, chunking, weighting and padding arithmetic are
compel's own; only the forward passes are ours (the exported ONNX / TensorRT encoders).

Two differences from compel's defaults, both forced by the exported encoders, which take token
ids only (no attention mask):

- weights below 1 use compel's `DownweightMode.REMOVE` (the reference embedding leaves the
  fragment's tokens out) instead of `MASK` (which masks them in the encoder's attention);
- the all-ones attention mask compel passes is not applied (the encoder attends to every
  token, as diffusers' own `encode_prompt` does).

A plain prompt (weighting off, at most one window of tokens) never comes here: it keeps the
pipeline's own one-call encoding (`GenerationLoop.encode_prompt`), so its images are unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from compel import Compel, DownweightMode, ReturnedEmbeddingsType
from compel.prompt_parser import (
    Blend,
    Conjunction,
    CrossAttentionControlSubstitute,
    FlattenedPrompt,
    PromptParser,
)

from sdserve_pipeline.assets import TOKENIZER_LOCK, PipelineAssets
from sdserve_pipeline.executor import Call, Plan
from sdserve_protocol.rules import RequestError

T = TypeVar("T")

# A1111's weighting syntax, which compel reads as plain text: refused with a hint.
_A1111 = re.compile(r"\([^()]*:\s*[-+]?\d*\.?\d+\s*\)|\[[^\[\]]*\]")


class _NeedCall(Exception):  # noqa: N818 (a signal, not an error)
    def __init__(self, component: str, input_ids: torch.Tensor) -> None:
        super().__init__(component)
        self.component = component
        self.input_ids = input_ids


@dataclass
class _CallLog:
    """Outputs of the calls made so far, answered in order on each run of compel."""

    answers: list[tuple[str, torch.Tensor, tuple[torch.Tensor, ...]]] = field(default_factory=list)
    position: int = 0

    def answer(self, component: str, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.position == len(self.answers):
            raise _NeedCall(component, input_ids)
        asked, ids, outputs = self.answers[self.position]
        if asked != component or not torch.equal(ids, input_ids):
            raise RuntimeError("compel asked for other calls on a rerun (not deterministic)")
        self.position += 1
        return outputs


class _RecordedEncoder:
    """A text encoder for compel whose forward passes are the plan's component calls.

    Args:
        component: the text encoder's component name (`text_encoder`, `text_encoder_2`).
        outputs: its outputs' names in spec order (`last_hidden_state`,
            `penultimate_hidden_state`, `text_embeds`).
        log: the call outputs of this request so far.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, component: str, outputs: Sequence[str], log: _CallLog) -> None:
        self.component = component
        self.outputs = tuple(outputs)
        self.log = log

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> SimpleNamespace:
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise RuntimeError("the exported text encoders take no attention mask")
        named = dict(
            zip(self.outputs, self.log.answer(self.component, input_ids.long()), strict=True)
        )
        result = SimpleNamespace()
        if "last_hidden_state" in named:
            result.last_hidden_state = named["last_hidden_state"]
        if "penultimate_hidden_state" in named:  # compel reads hidden_states[-2]
            result.hidden_states = (named["penultimate_hidden_state"], None)
        if "text_embeds" in named:
            result.text_embeds = named["text_embeds"]
        return result


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> Conjunction:
    """compel's parse of a weighted prompt, cached: pyparsing took 0.3 s for 420 characters
    on the 2-core dev machine, and a prompt is parsed when the request is checked
    (`PromptEncoder.check`, in the submitting thread) and again when it is encoded (in the
    batcher's loop, which must not stall). compel only reads the result."""
    return PromptParser().parse_conjunction(text)


def with_calls(run: Callable[[_CallLog], T]) -> Plan[T]:
    """`run(log)`'s result, where `run` is synchronous compel code whose text encoders answer
    from `log`: each call it stops for is made (one `Call`) and `run` is started again."""
    log = _CallLog()
    while True:
        log.position = 0
        try:
            return run(log)
        except _NeedCall as need:
            no_skip = torch.zeros(len(need.input_ids), dtype=torch.int64)  # clip_skip 0
            outputs = yield Call(need.component, (need.input_ids, no_skip))
            log.answers.append((need.component, need.input_ids, tuple(outputs)))


class PromptEncoder:
    """Long and weighted prompts of one pipeline, with compel over the component calls.

    Args:
        assets: the checkpoint's tokenizers and facts (architecture, text window).
        encoder_outputs: text encoder component name → its output names in spec order.
    """

    def __init__(self, assets: PipelineAssets, encoder_outputs: dict[str, Sequence[str]]) -> None:
        self.assets = assets
        self.window = assets.facts.text_max_length
        self.encoder_outputs = encoder_outputs
        self.xl = assets.facts.architecture == "sdxl"

    def applies(self, texts: Sequence[str], weighting: bool) -> bool:
        """Whether `texts` need compel: weighting asked for, or a text over one window."""
        return weighting or any(self._token_count(t) > self.window for t in texts)

    def check(self, prompt: str, negative: str, weighting: bool, max_chunks: int) -> None:
        """Refuses, before any model call, a prompt whose weighting compel cannot parse or
        that takes more than `max_chunks` text-encoder windows.

        Raises:
            RequestError: naming `prompt` or `negative_prompt`.
        """
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if not weighting and self._token_count(text) <= self.window:
                continue  # a plain prompt: one window
            chunks = self._chunks(self.conjunction(name, text, weighting))
            if chunks > max_chunks:
                raise RequestError(
                    name,
                    f"takes {chunks} text-encoder windows of {self.window - 2} tokens, at most "
                    f"{max_chunks} (limit_max_prompt_chunks)",
                )

    def conjunction(self, name: str, text: str, weighting: bool) -> Conjunction:
        """compel's parse of `text` (weighting on), or the whole text as one fragment of
        weight 1 (off: parentheses and the like are plain text).

        Raises:
            RequestError: compel cannot parse it, or it uses what sdserve does not serve.
        """
        if not weighting:
            return Conjunction([FlattenedPrompt([(text, 1.0)])], [1.0])
        if match := _A1111.search(text):
            raise RequestError(
                name,
                f"{match.group(0)!r} is A1111 weighting syntax; compel's is (word)1.3 for "
                "(word:1.3) and (word)0.9 or word- for [word]",
            )
        try:
            conjunction = _parse(text)
        except Exception as err:  # noqa: BLE001 (pyparsing's and compel's own errors)
            raise RequestError(name, f"weighting cannot be parsed: {err}") from None
        if not conjunction.prompts:
            raise RequestError(name, "weighting cannot be parsed: nothing left to encode")
        if conjunction.lora_weights:
            raise RequestError(name, "withLora()/useLora() is not served; LoRAs are inputs")
        for prompt in conjunction.prompts:
            parts = prompt.prompts if isinstance(prompt, Blend) else [prompt]
            if any(
                isinstance(c, CrossAttentionControlSubstitute) for p in parts for c in p.children
            ):
                raise RequestError(name, ".swap() (cross-attention control) is not served")
        return conjunction

    def encode(
        self, texts: Sequence[str], weighting: bool
    ) -> Plan[tuple[torch.Tensor, torch.Tensor | None]]:
        """(B, k * window, D) embeddings of `texts` padded to one length as compel pads
        (windows of the empty prompt), and SDXL's (B, P) pooled embeddings (else None)."""
        conjunctions = [self.conjunction("prompt", t, weighting) for t in texts]
        if not self.xl:
            return (yield from with_calls(lambda log: (self._sd15(log, conjunctions), None)))
        return (yield from with_calls(lambda log: self._sdxl(log, texts, conjunctions)))

    def _compel(self, log: _CallLog, component: str, tokenizer: Any, **kwargs: Any) -> Compel:
        encoder = _RecordedEncoder(component, self.encoder_outputs[component], log)
        return Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=False,
                      downweight_mode=DownweightMode.REMOVE, device="cpu", **kwargs)  # fmt: skip

    def _sd15(self, log: _CallLog, conjunctions: list[Conjunction]) -> torch.Tensor:
        """As `CompelForSD` (`Compel.__call__` on [negative, prompt])."""
        compel = self._compel(log, "text_encoder", self.assets.tokenizer)
        with TOKENIZER_LOCK:
            embeds = [compel.build_conditioning_tensor_for_conjunction(c)[0] for c in conjunctions]
            return torch.cat(compel.pad_conditioning_tensors_to_same_length(embeds))

    def _sdxl(
        self, log: _CallLog, texts: Sequence[str], conjunctions: list[Conjunction]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `CompelForSDXL`: each encoder's penultimate states padded, concatenated on the
        feature axis; pooled embeddings of `text_encoder_2` from each whole text."""
        penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        compel_1 = self._compel(log, "text_encoder", self.assets.tokenizer,
                                returned_embeddings_type=penultimate)  # fmt: skip
        compel_2 = self._compel(log, "text_encoder_2", self.assets.tokenizer_2,
                                returned_embeddings_type=penultimate,
                                requires_pooled=True)  # fmt: skip
        halves = []
        with TOKENIZER_LOCK:
            for compel in (compel_1, compel_2):
                embeds = [
                    compel.build_conditioning_tensor_for_conjunction(c)[0] for c in conjunctions
                ]
                halves.append(torch.cat(compel.pad_conditioning_tensors_to_same_length(embeds)))
            provider = compel_2.conditioning_provider
            pooled = torch.cat([provider.get_pooled_embeddings([t], device="cpu") for t in texts])
        if halves[0].shape[1] != halves[1].shape[1]:
            raise RuntimeError(f"the two tokenizers chunked differently: {halves[0].shape}")
        return torch.cat(halves, dim=-1), pooled

    def _chunks(self, conjunction: Conjunction) -> int:
        """Windows compel's embeddings of `conjunction` take: a conjunction's prompts are
        concatenated, a blend's padded to its longest (compel's own tokenization)."""
        compel = self._compel(_CallLog(), "text_encoder", self.assets.tokenizer)
        provider = compel.conditioning_provider

        def windows(prompt: FlattenedPrompt) -> int:
            fragments = [x.text for x in prompt.children]
            weights = [x.weight for x in prompt.children]
            tokens = provider.get_token_ids_and_expand_weights(fragments, weights, device="cpu")[0]
            return len(tokens) // self.window

        with TOKENIZER_LOCK:
            return sum(
                max(windows(p) for p in prompt.prompts)
                if isinstance(prompt, Blend)
                else windows(prompt)
                for prompt in conjunction.prompts
            )

    def _token_count(self, text: str) -> int:
        """Tokens of `text` with its start and end markers, untruncated."""
        with TOKENIZER_LOCK:
            return len(self.assets.tokenizer(text, truncation=False).input_ids)
