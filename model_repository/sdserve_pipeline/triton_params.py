"""Reading a Triton model config's `parameters` (kept free of heavy imports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def config_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """`parameters` of a Triton model config (as JSON) → plain {key: string value}."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


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
