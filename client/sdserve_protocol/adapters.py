"""The adapter listing model of a pipeline (`<pipeline>_adapters`): names and wire tensors.

It answers a request (its `LIST_QUERY`, reserved: send `""`) with `LIST_OUTPUT`, a JSON list
with one object per file in the pipeline's adapter folder: `name`, `architecture`, `rank`
(the largest) and `targets` (component → modules changed), or `name` and `error` for a file
the server refuses.
"""

from __future__ import annotations

ADAPTERS_SUFFIX = "_adapters"
LIST_QUERY = "query"  # BYTES [1]
LIST_OUTPUT = "adapters"  # BYTES [1]: JSON


def adapters_model_name(pipeline: str) -> str:
    """The model that lists `pipeline`'s LoRA adapters."""
    return pipeline + ADAPTERS_SUFFIX
