"""Which ONNX initializer holds which weight of the PyTorch module it was exported from.

The TorchScript exporter keeps a parameter's name for some initializers (`conv_in.weight`)
but stores a Linear weight it feeds to `MatMul` transposed, under a generated name
(`onnx::MatMul_1234`). The map is built once at export, by matching values: each Linear or
Conv weight of the module against every initializer, as is and transposed. It is saved as
`WEIGHT_MAP_FILE` beside the ONNX file, and read by the runner to patch weights (LoRA).

Imports neither torch nor onnx: the runner reads the map with json alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

WEIGHT_MAP_FILE = "weights.json"  # in the runner model's version folder
FORMAT = 1


@dataclass(frozen=True)
class WeightSlot:
    """Where a module weight lives in the ONNX graph.

    Args:
        initializer: the initializer's name.
        transposed: stored as the weight's transpose (a 2-D Linear weight fed to MatMul).
    """

    initializer: str
    transposed: bool = False


def save_weight_map(slots: Mapping[str, WeightSlot], version_dir: Path) -> Path:
    path = version_dir / WEIGHT_MAP_FILE
    data = {
        "format": FORMAT,
        "weights": {
            name: {"initializer": s.initializer, "transposed": s.transposed}
            for name, s in sorted(slots.items())
        },
    }
    path.write_text(json.dumps(data, indent=1))
    return path


def load_weight_map(version_dir: Path) -> dict[str, WeightSlot] | None:
    """The map beside a runner's ONNX file; None when the export wrote none."""
    path = version_dir / WEIGHT_MAP_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, {FORMAT} expected")
    return {
        name: WeightSlot(entry["initializer"], bool(entry["transposed"]))
        for name, entry in data["weights"].items()
    }
