"""TEMPORARY during the issue 15 move: the decoder is `sdserve_protocol.contract.decode_request`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sdserve_protocol.contract import GenerationParams, decode_request
from sdserve_protocol.rules import MAX_SEED, Limits, RequestError
from sdserve_protocol.settings import SCHEDULER_NAMES

__all__ = ["MAX_SEED", "GenerationParams", "Limits", "RequestError", "parse_request"]


def parse_request(
    inputs: Mapping[str, np.ndarray], limits: Limits, default_size: int,
    default_strength: float = 1.0, schedulers: Sequence[str] = SCHEDULER_NAMES,
) -> GenerationParams:  # fmt: skip
    return decode_request(
        inputs, limits, default_size=default_size, default_strength=default_strength,
        schedulers=schedulers,
    )  # fmt: skip
