"""Can this CPU do bf16 matrix work faster than fp32 (issue 16's premise: AMX-BF16)?

Measures torch's matmul peak in fp32 and bf16 (`common.gemm_gflops`, best of a few calls after
a warm-up) and records the CPU's model and its bf16-related flags, in one run.

Usage (from the repository root):

    .venv/bin/python benchmarks/matmul_peak.py            # 1024², 5 calls each
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from common import ROOT, gemm_gflops

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """The CPU's model name and which of `FLAGS` it has."""
    model, flags = "", set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": {flag: flag in flags for flag in FLAGS}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="matrix side (1024)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per dtype (5)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/matmul_peak.json")
    args = parser.parse_args(argv)
    import torch

    peaks = {dtype: gemm_gflops(args.size, args.reps, dtype) for dtype in ("float32", "bfloat16")}
    result = {
        "cpu": cpu_facts(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size,
        "gflops": peaks,
        "bf16_over_fp32": peaks["bfloat16"] / peaks["float32"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
