"""The wire contract of the pipeline model (README.md, "Wire contract"): names, dtypes, dims.

The pipeline's Triton config is generated from these tuples and requests are checked
against them, so the config and the checks cannot drift. The SDK keeps its own copy of the
names (`sdserve_client.request`); a test compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUMPY_DTYPES: dict[str, type] = {
    "BYTES": np.object_,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class WireTensor:
    """A tensor of the wire contract; -1 marks a variable dim."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]


INPUTS: tuple[WireTensor, ...] = (
    WireTensor("prompt", "BYTES", (1,)),
    WireTensor("negative_prompt", "BYTES", (1,)),
    WireTensor("image", "UINT8", (-1, -1, 3)),
    WireTensor("mask", "UINT8", (-1, -1)),
    WireTensor("outpaint", "INT32", (4,)),
    WireTensor("height", "INT32", (1,)),
    WireTensor("width", "INT32", (1,)),
    WireTensor("steps", "INT32", (1,)),
    WireTensor("guidance_scale", "FP32", (1,)),
    WireTensor("strength", "FP32", (1,)),
    WireTensor("seed", "INT64", (1,)),
    WireTensor("scheduler", "BYTES", (1,)),
    WireTensor("num_images", "INT32", (1,)),
    WireTensor("preserve_unmasked", "BOOL", (1,)),
)
REQUIRED_INPUTS = frozenset({"prompt"})
OUTPUTS: tuple[WireTensor, ...] = (
    WireTensor("images", "UINT8", (-1, -1, -1, 3)),
    WireTensor("seeds", "INT64", (-1,)),
)
INPUTS_BY_NAME = {t.name: t for t in INPUTS}
