"""The checkpoint listing model (`checkpoints`): one per repository, names and wire tensors.

It answers a request (its `LIST_QUERY`, reserved: send `""`) with `LIST_OUTPUT`, a JSON
object: `budget_mb` (the server's budget for checkpoints loaded on demand; 0: none) and
`checkpoints`, one object per pipeline model in the repository: `name`, `architecture`,
`on_demand`, `state` (`loaded`, `loading`, `unloading` or `on disk`), `requests` (running
now, on-demand checkpoints only), `size_mb` (its component models' weights on disk) and
`components`, one object per component model: `name`, `ready`, `size_mb`, `rss_mb` (the
resident memory of the process serving it, when the server can see it) and `variants` (its
weight variants: `adapters` [[name, scale], ...] of a LoRA set, `checkpoint` when they are
the weights of a checkpoint sharing its graph, and `size_mb` each).
"""

from __future__ import annotations

CHECKPOINTS_MODEL = "checkpoints"
LIST_QUERY = "query"  # BYTES [1]
LIST_OUTPUT = "checkpoints"  # BYTES [1]: JSON
ON_DISK = "on disk"
