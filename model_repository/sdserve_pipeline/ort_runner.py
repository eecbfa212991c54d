"""A component as a torch callable over an ONNX Runtime session (in-process runs, parity)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from sdserve_pipeline.components import ComponentSpec


class OrtRunner:
    """A component as a callable: torch tensors in spec order → torch tensors in spec order.

    Args:
        spec: the component.
        session: its base session.
        variants: its weight variants (`variants.VariantSessions`), or None: no adapters.
    """

    def __init__(
        self, spec: ComponentSpec, session: ort.InferenceSession, variants: Any = None
    ) -> None:
        self.spec = spec
        self.session = session
        self.variants = variants

    def __call__(
        self, *inputs: torch.Tensor, adapters: Sequence[tuple[str, float]] = ()
    ) -> tuple[torch.Tensor, ...]:
        feeds = {
            t.name: np.ascontiguousarray(x.detach().cpu().numpy())
            for t, x in zip(self.spec.inputs, inputs, strict=True)
        }
        if not adapters:
            outputs = self.session.run(self.spec.output_names, feeds)
        elif self.variants is None:
            raise RuntimeError(f"{self.spec.name}: serves no adapters")
        else:
            with self.variants.session(tuple(adapters)) as session:
                outputs = session.run(self.spec.output_names, feeds)
        return tuple(torch.from_numpy(o) for o in outputs)
