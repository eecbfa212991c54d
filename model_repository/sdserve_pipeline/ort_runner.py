"""A component as a torch callable over an ONNX Runtime session (in-process runs, parity)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from sdserve_pipeline.components import ComponentSpec


class OrtRunner:
    """A component as a callable: torch tensors in spec order → torch tensors in spec order."""

    def __init__(self, spec: ComponentSpec, session: ort.InferenceSession) -> None:
        self.spec = spec
        self.session = session

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {
            t.name: np.ascontiguousarray(x.detach().cpu().numpy())
            for t, x in zip(self.spec.inputs, inputs, strict=True)
        }
        outputs = self.session.run(self.spec.output_names, feeds)
        return tuple(torch.from_numpy(o) for o in outputs)
