"""What switching LoRA adapters per request costs (issue 17): in-process on ONNX Runtime, the
time of a denoising run with a new adapter set (its weight variants built), with a cached set,
and with the base weights, against diffusers' own `load_lora_weights` + `set_adapters` +
`fuse_lora` / `unfuse_lora` + `unload_lora_weights` cycle on the same weights.

Usage (from the repository root; builds the tiny demo pipeline, its repository and four
adapters in a temporary folder unless given):

    .venv/bin/python benchmarks/lora_switch.py [--pipeline DIR --repository DIR] [--steps 4]

Writes `benchmarks/results/lora_switch.json`. On the demo pipeline the runs are tiny, so the
ratios say more than the times; rerun with a full-size export (`full_size.py`) for real ones.

Seen on the 2-core development machine (shared with other sessions' tests), demo pipeline,
4 steps, 64x64: a run on a new adapter set (UNet convs + attention and text encoder) 1.90 s,
of which about 1.76 s build its variants (the adapter read with diffusers, the ONNX file's
base weights read, two sessions made); a run on a cached set 0.133 s against 0.121 s on the
base weights; diffusers' load + set_adapters + fuse + unfuse + unload cycle 1.12 s. Building
a variant reads the whole ONNX file and makes a new session: for a full-size UNet that is
seconds, not measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import ROOT, environment, make_inputs, repository_with_adapters

from sdserve_pipeline.inprocess import load_service

ADAPTERS = ("a0", "a1", "a2", "a3")


def _wire(steps: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    image, mask = make_inputs(64, 64)
    tensors = {
        "prompt": np.array([b"a red bicycle"], dtype=object), "image": image, "mask": mask,
        "steps": np.array([steps], np.int32), "seed": np.array([1], np.int64),
    }  # fmt: skip
    if names:
        tensors["adapters"] = np.array([n.encode() for n in names], dtype=object)
    return tensors


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, help="diffusers folder (default: demo)")
    parser.add_argument("--repository", type=Path, help="its built repository")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pipeline, repository, folder = repository_with_adapters(
        args.pipeline, args.repository, ADAPTERS, "lora-bench-"
    )
    service = load_service(repository)
    service.generate(_wire(args.steps, ()))  # warm
    new_set = [_time(lambda n=n: service.generate(_wire(args.steps, (n,)))) for n in ADAPTERS]
    cached, base = [], []
    for _ in range(args.repeats):
        for name in ADAPTERS:
            cached.append(_time(lambda n=name: service.generate(_wire(args.steps, (n,)))))
        base.append(_time(lambda: service.generate(_wire(args.steps, ()))))

    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(pipeline)
    cycles = []
    for name in ADAPTERS:

        def cycle(n: str = name) -> None:
            pipe.load_lora_weights(str(folder / f"{n}.safetensors"), adapter_name=n)
            pipe.set_adapters([n], adapter_weights=[1.0])
            pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=[n])
            pipe.unfuse_lora(components=["unet", "text_encoder"])
            pipe.unload_lora_weights()

        cycles.append(_time(cycle))
    result = {
        "environment": environment(),
        "steps": args.steps,
        "seconds": {
            "run_new_set_median": statistics.median(new_set),
            "run_cached_set_median": statistics.median(cached),
            "run_base_median": statistics.median(base),
            "diffusers_load_fuse_unfuse_unload_median": statistics.median(cycles),
        },
    }
    seconds = result["seconds"]
    seconds["variant_build_estimate"] = (
        seconds["run_new_set_median"] - seconds["run_cached_set_median"]
    )
    out = ROOT / "benchmarks" / "results" / "lora_switch.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(seconds, indent=1))


if __name__ == "__main__":
    main()
