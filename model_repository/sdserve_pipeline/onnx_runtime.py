"""ONNX Runtime sessions, shared by Triton's runner model and in-process runs.

Imports no torch: the runner models' backend stubs load only ONNX Runtime and numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from sdserve_protocol.settings import parse_flag

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
ONNX_FILE = "model.onnx"  # in the runner model's version folder


def create_session(
    onnx_file: str | Path,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int = 0,
    allow_spinning: bool = True,
) -> ort.InferenceSession:
    """An ORT session on the first available of `providers` (CPU always last resort).

    Args:
        onnx_file: model path (external data is found beside it).
        providers: execution providers in order of preference, e.g. CUDA then CPU.
        intra_op_threads: threads per op; 0 lets ORT choose (one per core).
        allow_spinning: whether idle intra-op threads busy-wait for the next op (ORT's
            default). Off when several sessions (one per component model process) share
            the cores with the pipeline: a spinning idle pool takes CPU from the others.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
    )
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or list(DEFAULT_PROVIDERS)
    return ort.InferenceSession(str(onnx_file), sess_options=options, providers=chosen)


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
    """

    onnx_file: str = ONNX_FILE
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_threads: int = 0
    allow_spinning: bool = False

    def to_parameters(self) -> dict[str, str]:
        return {
            "onnx_file": self.onnx_file,
            "execution_providers": ",".join(self.providers),
            "intra_op_threads": str(self.intra_op_threads),
            "allow_spinning": str(self.allow_spinning).lower(),
        }

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
            )
        except ValueError as err:
            raise ValueError(f"runner parameters {dict(params)}: {err}") from None

    def session(self, version_dir: Path) -> ort.InferenceSession:
        """The session of the model in `version_dir`."""
        return create_session(
            version_dir / self.onnx_file, self.providers, self.intra_op_threads, self.allow_spinning
        )
