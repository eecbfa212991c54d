"""A component as a torch callable over an ONNX Runtime session (in-process runs, parity)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from sdserve_pipeline.components import ComponentSpec
from sdserve_pipeline.onnx_runtime import AdapterError, AdapterSet
from sdserve_protocol.rules import RequestError


class OrtRunner:
    """A component as a callable: torch tensors in spec order → torch tensors in spec order.

    Args:
        spec: the component.
        session: its base session.
        variants: its weight variants (`variants.VariantSessions`), or None: no adapters.
        checkpoint: the checkpoint sharing this component's graph whose weights every call
            runs on (`shared_graph`); "": the component's own.
    """

    def __init__(
        self, spec: ComponentSpec, session: ort.InferenceSession, variants: Any = None,
        checkpoint: str = "",
    ) -> None:  # fmt: skip
        self.spec = spec
        self.session = session
        self.variants = variants
        self.checkpoint = checkpoint

    def __call__(
        self,
        *inputs: torch.Tensor,
        adapters: Sequence[tuple[str, float]] = (),
        held: Sequence[AdapterSet] = (),
    ) -> tuple[torch.Tensor, ...]:
        """Run the component on the variant of `adapters` (the base weights without), its
        variant cache keeping the `held` sets' (`variants.VariantSessions.session`).

        Raises:
            RequestError: an adapter of the set is no longer usable (removed, or replaced by
                a bad file, since the request was checked), as the pipeline model answers it.
        """
        feeds = {
            t.name: np.ascontiguousarray(x.detach().cpu().numpy())
            for t, x in zip(self.spec.inputs, inputs, strict=True)
        }
        if not adapters and not self.checkpoint:
            outputs = self.session.run(self.spec.output_names, feeds)
        elif self.variants is None:
            raise RuntimeError(f"{self.spec.name}: serves no weight variants")
        else:
            try:
                with self.variants.session(tuple(adapters), held, self.checkpoint) as session:
                    outputs = session.run(self.spec.output_names, feeds)
            except AdapterError as err:  # raised choosing the variant, never by ORT
                raise RequestError("adapters", str(err)) from None
        return tuple(torch.from_numpy(o) for o in outputs)
