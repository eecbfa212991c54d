"""Does ONNX Runtime's transformer optimiser speed up our exported UNet on this CPU?

Runs `onnxruntime.transformers.optimizer.optimize_model(model_type="unet")` with the fusions
the CPU execution provider has kernels for (attention, layer norm; GroupNorm, NHWC conv and
the packed/bias variants are CUDA-only contrib ops), then times one UNet call (CFG batch 2)
of the exported and the optimised model, same session options as served (all graph
optimisations, no spinning), and checks they agree.

Usage (from the repository root):

    .venv/bin/python benchmarks/unet_optimizer.py                       # demo UNet, 128²
    .venv/bin/python benchmarks/unet_optimizer.py \\
        --onnx build/bench/full_repository/unet/1/model.onnx --size 256 --reps 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.fusion_options import FusionOptions

from sdserve_export.built_repository import read_repository
from sdserve_pipeline.components import example_inputs, image_dims
from sdserve_pipeline.onnx_runtime import create_session

ROOT = Path(__file__).resolve().parent.parent
CUDA_ONLY = ("group_norm", "nhwc_conv", "bias_splitgelu", "packed_qkv", "packed_kv", "bias_add")


def optimise(source: Path, out: Path) -> dict[str, int]:
    """Write the optimised model to `out` (weights in one external file); fused op counts."""
    options = FusionOptions("unet")
    for name in CUDA_ONLY:
        setattr(options, f"enable_{name}", False)
    model = optimizer.optimize_model(
        str(source), model_type="unet", opt_level=0, optimization_options=options, use_gpu=False
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(out), use_external_data_format=True, all_tensors_to_one_file=True)
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items()}


def unet_feeds(onnx_file: Path, size: int) -> dict[str, np.ndarray]:
    """Fixed random inputs of one UNet call (CFG batch 2) at `size`², from the spec of the
    repository model the file belongs to (`<repository>/<model>/1/model.onnx`)."""
    model_dir = onnx_file.parent.parent
    repository = read_repository(model_dir.parent)
    (model,) = (c for c in repository.components if c.name == model_dir.name)
    vae_scale = repository.pipeline_of(model.name).vae_scale_factor
    dims = {**model.sizes, **image_dims(2, size, size, vae_scale)}
    return example_inputs(model.spec, dims, np.random.default_rng(0))


def time_unet(
    onnx_file: Path, feeds: dict[str, np.ndarray], reps: int
) -> tuple[list[float], np.ndarray]:
    """Seconds per call (after one warm-up) and the output, on `feeds`."""
    session = create_session(onnx_file, allow_spinning=False)
    output = session.run(None, feeds)[0]
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - start)
    return samples, output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--onnx", type=Path, default=ROOT / "build/model_repository/unet/1/model.onnx"
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (128)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per model (10)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/unet_optimizer.json")
    args = parser.parse_args(argv)
    optimised = ROOT / "build" / "optimised" / args.onnx.parent.parent.parent.name / "unet.onnx"
    fused = optimise(args.onnx, optimised)
    feeds = unet_feeds(args.onnx, args.size)
    exported_s, exported_out = time_unet(args.onnx, feeds, args.reps)
    optimised_s, optimised_out = time_unet(optimised, feeds, args.reps)
    result = {
        "onnx": str(args.onnx),
        "size": args.size,
        "fused_operators": fused,
        "exported_ms": {
            "best": min(exported_s) * 1e3,
            "median": float(np.median(exported_s)) * 1e3,
        },
        "optimised_ms": {
            "best": min(optimised_s) * 1e3,
            "median": float(np.median(optimised_s)) * 1e3,
        },
        "speed_up_best": min(exported_s) / min(optimised_s),
        "max_abs_difference": float(np.abs(exported_out - optimised_out).max()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
