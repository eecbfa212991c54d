"""ONNX Runtime sessions, shared by Triton's runner model and in-process runs.

Imports no torch: the runner models' backend stubs load only ONNX Runtime and numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnxruntime as ort

from sdserve_protocol.rules import MAX_ADAPTER_SCALE
from sdserve_protocol.settings import parse_flag

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
ONNX_FILE = "model.onnx"  # in the runner model's version folder


def create_session(
    onnx_file: str | Path,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int = 0,
    allow_spinning: bool = True,
    overrides: Mapping[str, npt.NDArray[Any]] | None = None,
) -> ort.InferenceSession:
    """An ORT session on the first available of `providers` (CPU always last resort).

    Args:
        onnx_file: model path (external data is found beside it).
        providers: execution providers in order of preference, e.g. CUDA then CPU.
        intra_op_threads: threads per op; 0 lets ORT choose (one per core).
        allow_spinning: whether idle intra-op threads busy-wait for the next op (ORT's
            default). Off when several sessions (one per component model process) share
            the cores with the pipeline: a spinning idle pool takes CPU from the others.
        overrides: initializer name → value to use instead of the file's (a weight variant,
            `sdserve_pipeline.variants`); the arrays must outlive the session.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if overrides:
        # Seen with onnxruntime 1.31.1 (CPU): at ORT_ENABLE_ALL the layout transformations
        # (NCHWc convs) read the file's weights, not the overriding ones: a LoRA variant of
        # the demo UNet then differed from PyTorch's by 1.69; at EXTENDED, by 5e-5.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
    )
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (overrides or {}).values()]
    for name, value in zip(overrides or {}, values, strict=True):
        options.add_initializer(name, value)
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or list(DEFAULT_PROVIDERS)
    session = ort.InferenceSession(str(onnx_file), sess_options=options, providers=chosen)
    session.sdserve_overrides = values  # the OrtValues must outlive the session
    return session


@dataclass(frozen=True)
class RunnerSettings:
    """The parameters of an ONNX Runtime runner model's config (its session's options).

    Args:
        onnx_file (parameter `onnx_file`): the model file in the version folder.
        providers (parameter `execution_providers`, comma-separated): in order of preference.
        intra_op_threads (parameter `intra_op_threads`): threads per op; 0: ORT chooses.
        allow_spinning (parameter `allow_spinning`, true/false): idle ORT threads busy-wait.
            Off by default: each component is its own process, and the pipeline works between
            their calls (benchmarks/results/ort_tuning.md: +14 % images/s at concurrency 1,
            +23 % at 8 on the demo, 2 cores).
        adapters_dir (parameter `adapters_dir`): the LoRA adapter folder, relative to this
            runner's model folder (`../inpaint/adapters`); empty: no adapters.
        lora_component (parameter `lora_component`): the component's name in LoRA files
            (`unet`, `text_encoder`, `text_encoder_2`).
        architecture (parameter `architecture`): the checkpoint's (`sd15`, `sdxl`).
        adapter_cache_mb (parameter `adapter_cache_mb`): memory budget of this component's
            weight variants (each about the ONNX file's size): LoRA sets, and the weights of
            the checkpoints that share its graph (`shared_graph`).
    """

    onnx_file: str = ONNX_FILE
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_threads: int = 0
    allow_spinning: bool = False
    adapters_dir: str = ""
    lora_component: str = ""
    architecture: str = ""
    adapter_cache_mb: int = 4096

    def to_parameters(self) -> dict[str, str]:
        params = {
            "onnx_file": self.onnx_file,
            "execution_providers": ",".join(self.providers),
            "intra_op_threads": str(self.intra_op_threads),
            "allow_spinning": str(self.allow_spinning).lower(),
        }
        if self.adapters_dir:
            params |= {
                "adapters_dir": self.adapters_dir,
                "lora_component": self.lora_component,
                "architecture": self.architecture,
                "adapter_cache_mb": str(self.adapter_cache_mb),
            }
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> RunnerSettings:
        """Settings from a runner config's parameters; an absent one keeps its default.

        Raises:
            ValueError: a value that is not valid, naming the parameter.
        """
        default = cls()
        try:
            return cls(
                onnx_file=params.get("onnx_file", default.onnx_file),
                providers=tuple(
                    p.strip() for p in params["execution_providers"].split(",") if p.strip()
                )
                if "execution_providers" in params
                else default.providers,
                intra_op_threads=int(params.get("intra_op_threads", default.intra_op_threads)),
                allow_spinning=parse_flag(params["allow_spinning"])
                if "allow_spinning" in params
                else default.allow_spinning,
                adapters_dir=params.get("adapters_dir", default.adapters_dir),
                lora_component=params.get("lora_component", default.lora_component),
                architecture=params.get("architecture", default.architecture),
                adapter_cache_mb=int(params.get("adapter_cache_mb", default.adapter_cache_mb)),
            )
        except ValueError as err:
            raise ValueError(f"runner parameters {dict(params)}: {err}") from None

    def session(
        self, version_dir: Path, overrides: Mapping[str, npt.NDArray[Any]] | None = None
    ) -> ort.InferenceSession:
        """The session of the model in `version_dir` (with initializers overridden)."""
        return create_session(
            version_dir / self.onnx_file,
            self.providers,
            self.intra_op_threads,
            self.allow_spinning,
            overrides,
        )

    def variants(self, version_dir: Path, base: ort.InferenceSession) -> Any:
        """The weight variants of this runner (`variants.VariantSessions`): LoRA adapter sets
        when it serves adapters (`adapters_dir` and a weight map), and the weights of
        checkpoints that share its graph (`shared_graph`), all under `adapter_cache_mb`.

        Raises:
            VariantBudgetError: `adapter_cache_mb` cannot hold one LoRA variant.
        """
        from sdserve_pipeline.shared_graph import WeightsResolver
        from sdserve_pipeline.variants import VariantSessions
        from sdserve_pipeline.weight_map import load_weight_map

        weight_map = load_weight_map(version_dir)
        catalog = None
        if self.adapters_dir and weight_map is not None:
            from sdserve_pipeline.adapters import AdapterCatalog

            folder = (version_dir.parent / self.adapters_dir).resolve()
            catalog = AdapterCatalog(folder, self.architecture, {self.lora_component: weight_map})
        return VariantSessions(
            self.lora_component or version_dir.parent.name, base, version_dir / self.onnx_file,
            weight_map if catalog is not None else None, catalog,
            lambda overrides: self.session(version_dir, overrides),
            self.adapter_cache_mb * 2**20, WeightsResolver(version_dir, self.onnx_file),
        )  # fmt: skip


AdapterSet = tuple[tuple[str, float], ...]  # (adapter name, scale) pairs, as a request names them


class AdapterError(ValueError):
    """An adapter (file, name or set) that cannot be used, with the reason.

    Declared here, free of torch, so that a runner model can tell it from its other errors
    (`sdserve_pipeline.adapters` raises it when reading files)."""


ADAPTERS_PARAMETER = "adapters"
"""The BLS request parameter that names a component call's adapter set: JSON
`[[name, scale], ...]`."""

HELD_PARAMETER = "held_adapters"
"""The BLS request parameter that names the adapter sets of this component that the
pipeline's running requests hold (`adapter_holds.AdapterHolds`), which the runner's variant
cache keeps: JSON `[[[name, scale], ...], ...]`."""

ADAPTER_REFUSED = "adapter refused: "
"""How a runner's error message (code INVALID_ARG) starts when it cannot use a call's adapter
set (a file removed or replaced by a bad one since the request was checked); the pipeline
answers that request with the rest of the message as a `RequestError` on `adapters`."""


def encode_adapter_set(adapters: Sequence[tuple[str, float]]) -> str:
    return json.dumps([[name, float(scale)] for name, scale in adapters])


def encode_held_sets(held: Sequence[Sequence[tuple[str, float]]]) -> str:
    return json.dumps([[[name, float(scale)] for name, scale in s] for s in held])


MAX_ADAPTERS_PER_CALL = 16
"""Most adapters one component call may name (a pipeline allows `limit_max_adapters`)."""

MAX_HELD_SETS = 256
"""Most held sets one call may name (a pipeline holds at most one per running request)."""


def decode_adapter_set(text: str) -> AdapterSet:
    """A call's adapter set, checked again here: a component model is reachable by any
    client's inference request, not only by its pipeline's BLS calls.

    Raises:
        AdapterError: not `[[name, scale], ...]`, a name twice, more than
            `MAX_ADAPTERS_PER_CALL`, or a scale not finite or beyond `MAX_ADAPTER_SCALE`.
    """
    try:
        return _adapter_set(json.loads(text))
    except (TypeError, ValueError) as err:  # JSON, shape and value errors alike
        raise AdapterError(str(err)) from None


def decode_held_sets(text: str) -> tuple[AdapterSet, ...]:
    """The held sets a call names, each checked as `decode_adapter_set` checks a set.

    Raises:
        AdapterError: not `[[[name, scale], ...], ...]`, more than `MAX_HELD_SETS`, or a bad set.
    """
    try:
        sets = json.loads(text)
        if not isinstance(sets, list) or len(sets) > MAX_HELD_SETS:
            raise ValueError(f"held adapter sets: a list of at most {MAX_HELD_SETS}")
        return tuple(_adapter_set(s) for s in sets)
    except (TypeError, ValueError) as err:
        raise AdapterError(str(err)) from None


def _adapter_set(pairs_json: Any) -> AdapterSet:
    pairs = tuple((str(name), float(scale)) for name, scale in pairs_json)
    names = {name for name, _ in pairs}
    if len(names) != len(pairs) or len(pairs) > MAX_ADAPTERS_PER_CALL:
        raise ValueError(f"adapters: at most {MAX_ADAPTERS_PER_CALL}, each once")
    if not all(math.isfinite(s) and abs(s) <= MAX_ADAPTER_SCALE for _, s in pairs):
        raise ValueError(f"adapter scales: finite, within ±{MAX_ADAPTER_SCALE:g}")
    return pairs
