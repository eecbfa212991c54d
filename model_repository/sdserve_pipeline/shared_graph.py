"""Checkpoints that share another checkpoint's graph: their weights, found and checked.

A checkpoint exported with `--share-graph-with A` has no component models of its own: its
pipeline calls A's, naming itself in each call (`CHECKPOINT_PARAMETER`), and A's runner runs
a session of its own ONNX file with every initializer overridden by the checkpoint's
(`variants.VariantSessions`, cached in the same LRU as the LoRA variants). Its weights are
ONNX files in its pipeline folder:

    <repository>/<checkpoint>/1/weights/<component model>/model.onnx (+ model.onnx.data)

A component model takes inference from any client, so a checkpoint name is checked before it
becomes a path (`WeightsResolver`): a plain model name, a folder inside the repository, and a
file whose graph is the runner's own (`graph_signature`).

Imports no torch: the runner models' backend stubs load only ONNX Runtime and numpy.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

from sdserve_pipeline.assets import VERSION

CHECKPOINT_PARAMETER = "checkpoint"
"""The BLS request parameter naming the checkpoint (its pipeline model) whose weights a call
runs on: a shared-graph pipeline sends its own name."""

WEIGHTS_DIR = "weights"
"""The folder of a shared-graph checkpoint's weights, in its pipeline's version folder."""

WEIGHTS_REFUSED = "checkpoint refused: "
"""How a runner's error message (code INVALID_ARG) starts when it cannot use a call's
checkpoint (a bad name, no weights file, weights of another graph)."""

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class CheckpointWeightsError(ValueError):
    """A checkpoint whose weights a runner cannot use, with the reason."""


def weights_path(repository: Path, checkpoint: str, model_name: str, onnx_file: str) -> Path:
    """Where checkpoint `checkpoint` keeps its weights for component model `model_name`."""
    return repository / checkpoint / VERSION / WEIGHTS_DIR / model_name / onnx_file


def check_checkpoint_name(checkpoint: str) -> None:
    """Raises `CheckpointWeightsError` unless `checkpoint` is a plain model name (letters,
    digits, `_.-`; not `.` or `..`): never a path."""
    if not _NAME.fullmatch(checkpoint) or checkpoint in (".", ".."):
        raise CheckpointWeightsError(
            f"checkpoint {checkpoint[:140]!r}: not a model name (letters, digits, '_', '.', '-')"
        )


def graph_signature(onnx_file: str | Path) -> str:
    """A digest of an ONNX file's graph without its weights' values: its nodes (op types,
    inputs, outputs, attributes, constants), inputs and outputs, and each initializer's name,
    shape and dtype. Two files with one signature are one graph with other weights."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    initializers = [(t.name, tuple(t.dims), t.data_type) for t in graph.initializer]
    del graph.initializer[:]
    digest = hashlib.sha256(graph.SerializeToString(deterministic=True))
    digest.update(repr(initializers).encode())
    return digest.hexdigest()


def file_stamp(onnx_file: Path) -> tuple[int, ...]:
    """Modification times and sizes of an ONNX file and its external data (a rebuilt
    checkpoint is a new variant)."""
    stamp: list[int] = []
    for path in (onnx_file, onnx_file.with_name(onnx_file.name + ".data")):
        if path.is_file():
            stat = path.stat()
            stamp += [stat.st_mtime_ns, stat.st_size]
    return tuple(stamp)


class WeightsResolver:
    """A runner's view of the shared-graph checkpoints' weights for its component model.

    Args:
        version_dir: the runner model's version folder (`<repository>/<model>/1`).
        onnx_file: its ONNX file's name there.
    """

    def __init__(self, version_dir: Path, onnx_file: str) -> None:
        self.repository = version_dir.parent.parent.resolve()
        self.model_name = version_dir.parent.name
        self.onnx_file = onnx_file
        self.own_file = version_dir / onnx_file
        self._signature: str | None = None
        self._checked: dict[Path, tuple[int, ...]] = {}  # files whose graph matched, stamped
        self._lock = threading.Lock()

    def resolve(self, checkpoint: str) -> tuple[Path, tuple[int, ...]]:
        """The weights file of `checkpoint` for this component and its stamp.

        Raises:
            CheckpointWeightsError: a bad name, no such file, or a file of another graph.
        """
        check_checkpoint_name(checkpoint)
        path = weights_path(self.repository, checkpoint, self.model_name, self.onnx_file)
        if not path.resolve().is_relative_to(self.repository) or not path.is_file():
            raise CheckpointWeightsError(
                f"checkpoint {checkpoint!r}: no weights for {self.model_name} "
                f"({WEIGHTS_DIR}/{self.model_name}/{self.onnx_file} in its version folder)"
            )
        stamp = file_stamp(path)
        with self._lock:
            if self._checked.get(path) == stamp:
                return path, stamp
        if graph_signature(path) != self.signature():
            raise CheckpointWeightsError(
                f"checkpoint {checkpoint!r}: its {self.model_name} weights belong to another "
                "graph than this model's (export it again with --share-graph-with)"
            )
        with self._lock:
            self._checked[path] = stamp
        return path, stamp

    def signature(self) -> str:
        with self._lock:
            if self._signature is None:
                self._signature = graph_signature(self.own_file)
            return self._signature
