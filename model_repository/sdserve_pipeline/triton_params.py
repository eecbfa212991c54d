"""Reading a Triton model config's `parameters` (kept free of heavy imports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def config_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """`parameters` of a Triton model config (as JSON) → plain {key: string value}."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
