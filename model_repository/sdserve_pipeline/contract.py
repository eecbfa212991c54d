"""TEMPORARY during the issue 15 move: see `sdserve_protocol.contract`."""

from sdserve_protocol.contract import INPUTS, INPUTS_BY_NAME, NUMPY_DTYPES, OUTPUTS, WireTensor

REQUIRED_INPUTS = frozenset(t.name for t in INPUTS if t.required)
__all__ = ["INPUTS", "INPUTS_BY_NAME", "NUMPY_DTYPES", "OUTPUTS", "REQUIRED_INPUTS", "WireTensor"]
