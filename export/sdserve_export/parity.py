"""Parity of each exported ONNX model against its PyTorch module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdserve_export.onnx_export import CHECK_SIZES, ExportTarget
from sdserve_pipeline.onnx_runtime import create_session
from sdserve_pipeline.ort_runner import OrtRunner


class ParityError(RuntimeError):
    """An exported model drifted past its component's tolerance."""


@dataclass(frozen=True)
class ParityReport:
    component: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.component}: max |onnx - torch| = {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:.0e}) {verdict}"
        )


def check_parity(target: ExportTarget, onnx_file: Path) -> ParityReport:
    """Max abs difference of ONNX Runtime vs PyTorch over a few batch/spatial sizes."""
    runner = OrtRunner(target.spec, create_session(onnx_file))
    worst = 0.0
    for size in CHECK_SIZES:
        inputs = target.example(*size)
        with torch.no_grad():
            expected = target.module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for got, want in zip(runner(*inputs), expected, strict=True):
            worst = max(worst, (got - want).abs().max().item())
    return ParityReport(target.spec.name, worst, target.spec.atol)


def require_parity(report: ParityReport) -> ParityReport:
    if not report.ok:
        raise ParityError(str(report))
    return report
