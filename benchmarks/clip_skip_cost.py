"""What the per-row `clip_skip` input costs the SD 1.5 text encoder (issue 19, item 4).

Exports the full-size CLIP ViT-L/14 text tower (random weights, `common.sd15_text_encoder`)
twice, as before clip skip (`input_ids → last_hidden_state`) and as now (`TextEncoderExport`:
the stack of hidden states, the row's layer gathered, then the final norm), checks that
clip_skip 0 gives the old output bit for bit, and times both on ONNX Runtime (CPU, batch 2:
the [negative, prompt] pair), alternating calls so that load on the machine hits both alike.

Usage (from the repository root):

    .venv/bin/python benchmarks/clip_skip_cost.py

Seen on the 2-core development machine while other sessions' test suites loaded it: bit for
bit equal; two runs gave medians of 974 vs 1023 ms (x1.05) and 1531 vs 1189 ms (x0.78). The
load swamps any difference (the calls themselves take several times their idle time), so the
cost is below what this machine can measure now; rerun it on an idle one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import sd15_text_encoder
from torch import nn

from sdserve_export.onnx_export import TextEncoderExport

CALLS = 15


class _Before(nn.Module):
    """The text encoder as exported before clip skip."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


def _session(
    module: nn.Module, inputs: dict[str, torch.Tensor], path: Path
) -> ort.InferenceSession:
    with torch.no_grad():
        torch.onnx.export(
            module, tuple(inputs.values()), str(path), input_names=list(inputs),
            output_names=["hidden"], dynamic_axes={name: {0: "batch"} for name in inputs},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options)


def main() -> None:
    encoder = sd15_text_encoder().eval()
    ids = torch.randint(0, encoder.config.vocab_size, (2, 77))
    skips = torch.zeros(2, dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        before = _session(_Before(encoder), {"input_ids": ids}, Path(tmp) / "before.onnx")
        now = _session(
            TextEncoderExport(encoder),
            {"input_ids": ids, "clip_skip": skips},
            Path(tmp) / "now.onnx",
        )
    feeds_before = {"input_ids": ids.numpy()}
    feeds_now = {"input_ids": ids.numpy(), "clip_skip": skips.numpy()}
    old, new = before.run(None, feeds_before)[0], now.run(None, feeds_now)[0]
    print(f"clip_skip 0 equals the old output bit for bit: {np.array_equal(old, new)}")
    times: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(CALLS):
        for name, session, feeds in (("before", before, feeds_before), ("now", now, feeds_now)):
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    print(
        f"median before {medians['before'] * 1e3:.1f} ms, now {medians['now'] * 1e3:.1f} ms "
        f"(x{medians['now'] / medians['before']:.2f}), {CALLS} alternating calls"
    )


if __name__ == "__main__":
    main()
