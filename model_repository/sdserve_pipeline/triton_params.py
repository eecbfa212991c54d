"""Reading typed values from a Triton model config's `parameters` (no heavy imports).

The parameters themselves come from `sdserve_client.rules.config_parameters`.
"""

from __future__ import annotations

from collections.abc import Mapping


def flag(params: Mapping[str, str], key: str, default: bool) -> bool:
    """A boolean parameter: `true`/`1`/`yes` or `false`/`0`/`no` (any case); absent → default.

    Raises:
        ValueError: any other value, quoted.
    """
    if key not in params:
        return default
    value = params[key].strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"parameter {key}: {params[key]!r} is not a boolean (true/false)")
