"""What `padding_mask_crop` saves: a small mask on a large image, with and without the crop.

One 1024x1024 image with a 64x64 mask goes through the in-process pipeline
(`sdserve_pipeline.inprocess.load_service`: the served loop on ONNX Runtime sessions) twice
per repeat, in alternating order so the machine's drift hits both alike:

* **whole image**: the request as it is, generated at 1024x1024;
* **crop**: the same request with `padding_mask_crop` (the box around the mask plus the
  padding, generated at the model's default size, as diffusers does, and pasted back).

Both answer with the whole image; the table gives the generated size, the median wall time,
the memory the admission estimate reserves, and the ratios, from one run. A variant whose
estimate exceeds the memory budget (`auto`: half the machine's memory, as the server) is
reported as refused, not run: the server would refuse it too. The whole 1024x1024 image is
such a case on a 23 GB machine (its UNet's first self-attention alone is 8 heads x 16384²
scores per row); 512x512 is run as well so that a time ratio exists where both fit.

Usage (from the repository root; without `--repository`, the tiny demo pipeline is built
into `build/bench/demo_repository` on first use):

    .venv/bin/python benchmarks/mask_crop.py
    .venv/bin/python benchmarks/mask_crop.py --sizes 1024x1024,512x512 --mask 64 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    ROOT,
    SETTLE_S,
    Snapshot,
    environment,
    machine_load,
    parse_size,
    process_cpu_seconds,
)

from sdserve_pipeline.admission import MemoryModel, budget_bytes
from sdserve_pipeline.inprocess import load_service
from sdserve_pipeline.service import PipelineService

MB = 2**20
DEMO_REPOSITORY = ROOT / "build" / "bench" / "demo_repository"


def ensure_demo_repository(path: Path) -> Path:
    """The tiny demo pipeline exported into `path`, built once."""
    if not (path / "inpaint" / "config.pbtxt").exists():
        from sdserve_export.demo_pipeline import save_demo_pipeline
        from sdserve_export.repository import build_repository

        folder = save_demo_pipeline(path.parent / "demo-pipeline")
        build_repository(folder, path, log=print)
    return path


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parses `1024x1024,512x512` into (height, width) pairs."""
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see `--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--repository", type=Path, default=DEMO_REPOSITORY, help="built repository (the demo)")
    add("--model", default="inpaint", help="pipeline model name (inpaint)")
    add("--sizes", type=parse_sizes, default=parse_sizes("1024x1024,512x512"),
        help="image sizes WIDTHxHEIGHT, comma-separated (1024x1024,512x512)")  # fmt: skip
    add("--mask", type=int, default=64, help="side of the square mask, in pixels (64)")
    add("--padding", type=int, default=32, help="padding_mask_crop in pixels (32)")
    add("--steps", type=int, default=10, help="denoising steps (10)")
    add("--repeats", type=int, default=3, help="timed requests per variant (3)")
    add("--budget-mb", default="auto", help="memory budget of the admission check (auto)")
    add("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def request(
    image: np.ndarray, mask: np.ndarray, steps: int, padding: int | None
) -> dict[str, np.ndarray]:
    """The wire request, with `padding_mask_crop` when `padding` is given."""
    tensors = {
        "prompt": np.array([b"a red bicycle"], dtype=object),
        "image": image,
        "mask": mask,
        "steps": np.array([steps], np.int32),
        "seed": np.array([7], np.int64),
    }
    if padding is not None:
        tensors["padding_mask_crop"] = np.array([padding], np.int32)
    return tensors


def measure(
    service: PipelineService, args: argparse.Namespace, size: tuple[int, int], budget: int
) -> dict[str, Any]:
    """Both variants at one image size: figures and raw samples. A variant whose admission
    estimate exceeds the budget is not run (the server would refuse it; run in-process
    anyway, the whole 1024² image was killed for want of memory on the 23 GB machine)."""
    height, width = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    top, left = (height - args.mask) // 2, (width - args.mask) // 2
    mask[top : top + args.mask, left : left + args.mask] = 255
    variants = {
        "whole image": request(image, mask, args.steps, None),
        "crop": request(image, mask, args.steps, args.padding),
    }
    memory = MemoryModel(bytes_per_pixel=700)  # the tiny demo's measured per-pixel cost
    rows: dict[str, dict[str, Any]] = {}
    for name, tensors in variants.items():
        params = service.parse(tensors)
        generated = service.loop.sizing.generation_size(params)
        estimate = memory.request_bytes_of(service, params)
        rows[name] = {
            "generated": f"{generated.width}x{generated.height}",
            "crop_box": None if params.crop is None else list(params.crop.box),
            "memory_estimate_mb": round(estimate / MB, 1),
            "admitted": budget == 0 or estimate <= budget,
            "wall_s": [],
        }
        if rows[name]["admitted"]:
            output = service.generate(tensors)["images"]  # warm-up, untimed
            rows[name]["output"] = f"{output.shape[2]}x{output.shape[1]}"
    runnable = [name for name in variants if rows[name]["admitted"]]

    def cpu() -> float:
        return process_cpu_seconds(os.getpid())

    before = Snapshot.take(cpu)
    for repeat in range(args.repeats):
        for name in runnable if repeat % 2 == 0 else list(reversed(runnable)):
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            service.generate(variants[name])
            rows[name]["wall_s"].append(time.perf_counter() - start)
    load = machine_load(before, Snapshot.take(cpu))
    for row in rows.values():
        row["median_s"] = round(statistics.median(row["wall_s"]), 3) if row["wall_s"] else None
    whole, crop = rows["whole image"], rows["crop"]
    ratios = {
        "memory_whole_over_crop": round(
            whole["memory_estimate_mb"] / crop["memory_estimate_mb"], 1
        ),
        "time_whole_over_crop": (
            round(whole["median_s"] / crop["median_s"], 1) if whole["median_s"] else None
        ),
    }
    return {"size": f"{width}x{height}", "rows": rows, "ratios": ratios, "machine_load": load}


def table(results: list[dict[str, Any]], args: argparse.Namespace, budget: int) -> str:
    """The markdown table of one run."""
    lines = [
        f"{args.mask}x{args.mask} mask in the middle, {args.steps} steps, "
        f"padding_mask_crop={args.padding}, median of {args.repeats}; admission budget "
        f"{budget / MB:.0f} MB",
        "",
        "| image | variant | generated | output | median wall (s) | memory estimate (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, row in result["rows"].items():
            wall = row["median_s"] if row["admitted"] else "refused: over the budget"
            lines.append(
                f"| {result['size']} | {name} | {row['generated']} | {row.get('output', '-')} "
                f"| {wall} | {row['memory_estimate_mb']} |"
            )
    lines.append("")
    for result in results:
        ratios = result["ratios"]
        time_ratio = ratios["time_whole_over_crop"]
        timing = "not run" if time_ratio is None else f"{time_ratio}x the time"
        lines.append(
            f"- {result['size']}: whole image / crop = {timing}, "
            f"{ratios['memory_whole_over_crop']}x the memory estimate"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repository == DEMO_REPOSITORY:
        ensure_demo_repository(DEMO_REPOSITORY)
    service = load_service(args.repository, args.model)
    budget = budget_bytes(args.budget_mb)
    results = [measure(service, args, size, budget) for size in args.sizes]
    text = table(results, args, budget)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {"environment": environment(), "arguments": _jsonable(vars(args)),
              "budget_mb": round(budget / MB), "results": results}  # fmt: skip
    (args.out_dir / "mask_crop.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out_dir / "mask_crop.md").write_text(text + "\n")
    return 0


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if k != "sizes"}


if __name__ == "__main__":
    sys.exit(main())
