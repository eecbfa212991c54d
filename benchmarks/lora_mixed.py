"""Images/s of a mixed-adapter workload against the same workload on one adapter (issue 17).

In-process on ONNX Runtime through the serving batcher (`batcher.generate_all`, the code that
serves): 8 requests at once (concurrency 8, all denoised together), either all on adapter a0
("one") or two on each of a0..a3 ("mixed"), and the same 8 on the base weights. Requests on
one adapter set share each UNet call; the mixed batch makes four UNet calls of 2 requests per
step. Their ratio bounds what one UNet call carrying several adapters (per-row low-rank
deltas beside the shared base weights, the multi-LoRA design) could gain: at best the mixed
workload's images/s would reach the one-adapter workload's.

Usage (from the repository root; builds the demo pipeline, its repository and four adapters
in a temporary folder unless given):

    .venv/bin/python benchmarks/lora_mixed.py [--pipeline DIR --repository DIR] [--size 128]

Writes `benchmarks/results/lora_mixed.json`. Runs alternate (one, mixed, base) per round, so
drift on this shared machine touches all three alike; the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from common import ROOT, environment, make_inputs, repository_with_adapters

from sdserve_pipeline.batcher import generate_all
from sdserve_pipeline.inprocess import load_service

ADAPTERS = ("a0", "a1", "a2", "a3")
CONCURRENCY = 8


def _wire(size: int, steps: int, adapter: str | None, seed: int) -> dict[str, np.ndarray]:
    image, mask = make_inputs(size, size)
    tensors = {
        "prompt": np.array([b"a red bicycle"], dtype=object), "image": image, "mask": mask,
        "steps": np.array([steps], np.int32), "seed": np.array([seed], np.int64),
    }  # fmt: skip
    if adapter is not None:
        tensors["adapters"] = np.array([adapter.encode()], dtype=object)
        tensors["adapter_scales"] = np.array([0.8], np.float32)
    return tensors


def _images_per_s(service, requests) -> float:
    started = time.perf_counter()
    outcomes = generate_all(service, requests)
    elapsed = time.perf_counter() - started
    failed = [o for o in outcomes if isinstance(o, Exception)]
    if failed:
        raise failed[0]
    return len(requests) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, help="diffusers folder (default: demo)")
    parser.add_argument("--repository", type=Path, help="its built repository")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    _, repository, _ = repository_with_adapters(
        args.pipeline, args.repository, ADAPTERS, "lora-mixed-"
    )
    service = load_service(repository)
    workloads = {
        "one": [_wire(args.size, args.steps, "a0", s) for s in range(CONCURRENCY)],
        "mixed": [
            _wire(args.size, args.steps, ADAPTERS[s % len(ADAPTERS)], s) for s in range(CONCURRENCY)
        ],
        "base": [_wire(args.size, args.steps, None, s) for s in range(CONCURRENCY)],
    }
    for requests in workloads.values():  # warm: every variant built, sessions warmed
        _images_per_s(service, requests)
    rates: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(args.rounds):
        for name, requests in workloads.items():
            rates[name].append(_images_per_s(service, requests))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "what": f"{CONCURRENCY} requests at once through the batcher, in-process ORT, "
        f"{args.size}x{args.size} inpainting, {args.steps} steps; 'one': all on adapter a0, "
        "'mixed': two on each of a0..a3, 'base': no adapter",
        "pipeline": str(args.pipeline) if args.pipeline else "demo (tiny, random weights)",
        "images_per_s": rates,
        "images_per_s_median": {k: round(v, 3) for k, v in medians.items()},
        "mixed_over_one": round(medians["mixed"] / medians["one"], 3),
        "one_over_base": round(medians["one"] / medians["base"], 3),
        "environment": environment(),
    }
    out = ROOT / "benchmarks" / "results" / "lora_mixed.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
