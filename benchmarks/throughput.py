"""Throughput, latency and per-stage cost of the served pipeline, and how it compares.

One run measures, on the demo pipeline and (unless `--skip-full`) on the full-size
SD 1.5-inpainting architecture with random weights (see `full_size.py`):

1. **side by side**, same weights, seed, steps and request, one request at a time:
   (a) diffusers' `StableDiffusionInpaintPipeline` in-process (PyTorch), (b) our loop
   in-process on ONNX Runtime (`load_service`), (c) served by `tritonserver` over gRPC;
   plus the raw ONNX Runtime UNet step and the machine reference (fp32 GEMM GFLOP/s and
   the UNet's FLOPs per step), so UNet time is also a fraction of the GEMM peak.
2. **concurrency sweep** (demo pipeline): a closed loop of `c` clients on tritonclient's
   async gRPC API (`async_infer`) for each `c` of `--concurrency`, with a request mix; p50/p95/p99
   latency, images/s, and a per-stage breakdown from Triton's statistics API. The
   ceiling is our in-process loop denoising `max(c)` requests as one batch.

The three paths run one after another (not interleaved), so that at most one copy of the
full-size weights is in memory at a time.

Usage (from the repository root):

    .venv/bin/python benchmarks/throughput.py --skip-full
    .venv/bin/python benchmarks/throughput.py --concurrency 1,2,4,8 --mix inpaint:3,txt2img:1
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    COMPONENTS,
    GEMM_SIZE,
    PIPELINE_MODEL,
    ROOT,
    SETTLE_S,
    CpuMeter,
    Generate,
    MixEntry,
    Snapshot,
    ensure_full_size,
    environment,
    fetch_statistics,
    gemm_gflops,
    inprocess_path,
    machine_load,
    make_request,
    mix_requests,
    parse_concurrency,
    parse_mix,
    parse_size,
    served_path,
    stage_breakdown,
    start_server,
    sweep_level,
    timed,
    wait_ready,
)
from PIL import Image
from tqdm import tqdm

from sdserve_client import GenerationRequest, InpaintClient, encode_request
from sdserve_pipeline.batcher import generate_all
from sdserve_pipeline.inprocess import load_service
from sdserve_pipeline.service import PipelineService
from sdserve_pipeline.triton_server import TritonServer

DIFFUSERS, INPROCESS, SERVED = "diffusers (PyTorch)", "ours in-process (ORT)", "served (Triton)"
PATHS = (DIFFUSERS, INPROCESS, SERVED)


@dataclass(frozen=True)
class Setup:
    """One pipeline to compare the three paths on.

    Args:
        name (`str`): label in the results.
        source (`Path`): diffusers folder (for the PyTorch path).
        repository (`Path`): built Triton model repository.
        height (`int`): image height.
        width (`int`): image width.
        steps (`int`): denoising steps.
        repeats (`int`): timed requests per path.
    """

    name: str
    source: Path
    repository: Path
    height: int
    width: int
    steps: int
    repeats: int


# --- arguments -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see `--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--repository",
        type=Path,
        default=ROOT / "build" / "model_repository",
        help="demo repository (default: build/model_repository)",
    )
    add(
        "--source",
        type=Path,
        default=ROOT / "build" / "demo-pipeline",
        help="demo diffusers folder, same weights (default: build/demo-pipeline)",
    )
    add("--size", type=parse_size, default=(128, 128), help="demo WIDTHxHEIGHT (128x128)")
    add("--steps", type=int, default=10, help="denoising steps, demo and full size (10)")
    add(
        "--concurrency",
        type=parse_concurrency,
        default=[1, 2, 4, 8],
        help="concurrency levels of the sweep (1,2,4,8)",
    )
    add(
        "--mix",
        type=parse_mix,
        default=parse_mix("inpaint:3,txt2img:1"),
        help="request mix KIND[@WxH]:WEIGHT,... (inpaint:3,txt2img:1)",
    )
    add("--requests", type=int, default=48, help="timed requests per concurrency level (48)")
    add("--repeats", type=int, default=5, help="timed requests per path, demo (5)")
    add("--full-repeats", type=int, default=2, help="timed requests per path, full size (2)")
    add("--full-size", type=parse_size, default=(256, 256), help="full-size WxH (256x256)")
    add("--skip-full", action="store_true", help="skip the full-size architecture")
    add("--seed", type=int, default=7, help="generation seed (7)")
    add(
        "--out-dir",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where throughput.{json,md,png} go (benchmarks/results)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.requests < max(args.concurrency) or args.repeats < 1 or args.full_repeats < 1:
        parser.error("need --requests >= max concurrency, --repeats and --full-repeats >= 1")
    return args


# --- machine reference -----------------------------------------------------------------------


def unet_inputs(unet: Any, height: int, width: int, scale: int = 8) -> tuple[torch.Tensor, ...]:
    """A CFG-batch (2) UNet input at `height`×`width` pixels: sample, timestep, text."""
    config = unet.config
    sample = torch.randn(2, config.in_channels, height // scale, width // scale)
    text = torch.randn(2, 77, config.cross_attention_dim)
    return sample, torch.tensor([500.0, 500.0]), text


def unet_flops(unet: Any, height: int, width: int) -> int:
    """FLOPs of one UNet call (CFG batch 2) at `height`×`width`, by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    sample, timestep, text = unet_inputs(unet, height, width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, encoder_hidden_states=text)
    return int(counter.get_total_flops())


def ort_unet_seconds(service: PipelineService, torch_unet: Any, h: int, w: int, reps: int) -> float:
    """Median seconds of one raw ONNX Runtime UNet call (CFG batch 2), no loop around it."""
    inputs = unet_inputs(torch_unet, h, w)
    run = service.loop.components.unet
    run(*inputs)  # warm-up
    return statistics.median(timed(lambda: run(*inputs)) for _ in range(reps))


# --- side by side ----------------------------------------------------------------------------


def diffusers_path(pipe: Any) -> Generate:
    """diffusers' own pipeline in-process, drawing from the request's seed as ours does."""

    def generate(request: GenerationRequest) -> np.ndarray:
        height, width = request.mask.shape
        output = pipe(
            prompt=request.prompt,
            image=Image.fromarray(request.image),
            mask_image=Image.fromarray(request.mask),
            height=height,
            width=width,
            num_inference_steps=request.steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(request.seed),
            output_type="np",
        )
        return np.clip(np.round(output.images * 255), 0, 255).astype(np.uint8)

    return generate


def time_path(generate: Generate, request: GenerationRequest, repeats: int, label: str):
    """One warm-up then `repeats` timed requests; returns (seconds list, last images)."""
    images = generate(request)
    samples = []
    for _ in tqdm(range(repeats), desc=label, unit="req", file=sys.stderr, leave=False):
        time.sleep(SETTLE_S)
        start = time.perf_counter()
        images = generate(request)
        samples.append(time.perf_counter() - start)
    return samples, images


def run_diffusers(setup: Setup, request: GenerationRequest) -> dict[str, Any]:
    """Path (a), plus the UNet's FLOPs per step measured on the very same torch UNet."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(setup.source)
    pipe.set_progress_bar_config(disable=True)
    flops = unet_flops(pipe.unet, setup.height, setup.width)
    samples, images = time_path(diffusers_path(pipe), request, setup.repeats, "diffusers")
    return {"samples_s": samples, "images": images, "unet_flops": flops, "unet": pipe.unet}


def run_inprocess(setup: Setup, request: GenerationRequest, torch_unet: Any) -> dict[str, Any]:
    """Path (b), plus the raw ORT UNet call time."""
    service = load_service(setup.repository)
    samples, images = time_path(inprocess_path(service), request, setup.repeats, "in-process")
    unet_s = ort_unet_seconds(service, torch_unet, setup.height, setup.width, setup.repeats)
    return {"samples_s": samples, "images": images, "ort_unet_call_s": unet_s}


def run_served(
    setup: Setup, request: GenerationRequest, then: Callable[[TritonServer], Any] | None
) -> dict[str, Any]:
    """Path (c), plus Triton's per-model statistics over the timed requests.

    Args:
        setup (`Setup`): what to serve.
        request (`GenerationRequest`): the request to time.
        then (`Callable[[TritonServer], Any]`, *optional*): run on the same server afterwards
            (the sweep), so the server starts once; its result goes under `"then"`.
    """
    started = time.perf_counter()
    with start_server(setup.repository) as server:
        ready_s = wait_ready(server, started)
        with InpaintClient(server.grpc_url) as client:
            generate = served_path(client)
            generate(request)  # warm-up outside the statistics window
            before = fetch_statistics(server.grpc_url, headers=server.admin_key.grpc_headers)
            window = time.perf_counter()
            samples, images = time_path(generate, request, setup.repeats, "served")
            window = time.perf_counter() - window
            after = fetch_statistics(server.grpc_url, headers=server.admin_key.grpc_headers)
        extra = then(server) if then is not None else None
    # the window holds time_path's warm-up too, and its settle pauses
    stages = stage_breakdown(before, after, setup.repeats + 1, window, setup.steps)
    return {
        "samples_s": samples, "images": images, "server_ready_s": ready_s, "stages": stages,
        "then": extra,
    }  # fmt: skip


def side_by_side(
    setup: Setup, seed: int, then: Callable[[TritonServer], Any] | None = None
) -> dict[str, Any]:
    """Paths (a), (b), (c) on one setup, one after another; medians, ratios.

    `then` runs on the served path's server once it is measured (see `run_served`).
    """
    request = make_request("inpaint", setup.height, setup.width, setup.steps, seed)
    tqdm.write(f"[{setup.name}] diffusers in-process ...")
    torch_side = run_diffusers(setup, request)
    tqdm.write(f"[{setup.name}] ours in-process ...")
    ours = run_inprocess(setup, request, torch_side.pop("unet"))
    gc.collect()
    tqdm.write(f"[{setup.name}] served (starting tritonserver) ...")
    served = run_served(setup, request, then)
    results = {DIFFUSERS: torch_side, INPROCESS: ours, SERVED: served}
    images = {path: results[path].pop("images") for path in PATHS}
    medians = {path: statistics.median(results[path]["samples_s"]) for path in PATHS}
    return {
        "setup": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(setup).items()},
        "paths": results,
        "median_s": medians,
        "ratios": {
            "ours_inprocess_over_diffusers": medians[INPROCESS] / medians[DIFFUSERS],
            "served_over_inprocess": medians[SERVED] / medians[INPROCESS],
            "served_over_diffusers": medians[SERVED] / medians[DIFFUSERS],
        },
        "serving_overhead_ms_per_step": (medians[SERVED] - medians[INPROCESS]) * 1e3 / setup.steps,
        "max_abs_pixel_difference": {
            "ours_vs_diffusers": _max_diff(images[INPROCESS], images[DIFFUSERS]),
            "served_vs_ours": _max_diff(images[SERVED], images[INPROCESS]),
        },
    }


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def add_peak_fraction(result: dict[str, Any], peak_gflops: float) -> None:
    """UNet time per step as a fraction of the GEMM peak (raw ORT call and served)."""
    flops = result["paths"][DIFFUSERS]["unet_flops"]
    ort_s = result["paths"][INPROCESS]["ort_unet_call_s"]
    served_s = result["paths"][SERVED]["stages"]["per_call_ms"]["unet"] / 1e3
    result["unet"] = {
        "gflop_per_step": flops / 1e9,
        "ort_call_ms": ort_s * 1e3,
        "ort_fraction_of_peak": flops / ort_s / 1e9 / peak_gflops,
        "served_call_ms": served_s * 1e3,
        "served_fraction_of_peak": flops / served_s / 1e9 / peak_gflops,
    }


# --- concurrency sweep -----------------------------------------------------------------------


def run_sweep(server: TritonServer, args: argparse.Namespace, mix: list[MixEntry]) -> dict:
    """The concurrency sweep against a running server, with the machine's load meanwhile."""
    requests = mix_requests(mix, args.requests, args.steps, args.seed)
    total = sum(args.requests + c for c in args.concurrency)
    assert server.pid is not None  # started by the caller's `with`
    cpu = CpuMeter(server.pid)
    before = Snapshot.take(cpu)
    levels = []
    with tqdm(total=total, desc="sweep", unit="req", file=sys.stderr) as bar:
        for concurrency in args.concurrency:
            bar.set_postfix_str(f"concurrency {concurrency}")
            levels.append(
                sweep_level(
                    server.grpc_url,
                    requests,
                    concurrency,
                    bar,
                    args.steps,
                    server.metrics_url,
                    server.admin_key.grpc_headers,
                )
            )
    return {"levels": levels, "machine_load": machine_load(before, Snapshot.take(cpu))}


def batch_ceiling(args: argparse.Namespace, mix: list[MixEntry], repeats: int = 3) -> dict:
    """Our in-process batcher denoising `max(concurrency)` mix requests as one batch."""
    service = load_service(args.repository)
    batch = max(args.concurrency)
    wire = [encode_request(r) for r in mix_requests(mix, batch, args.steps, args.seed)]
    generate_all(service, wire)  # warm-up
    best = min(timed(lambda: generate_all(service, wire)) for _ in range(repeats))
    return {"batch": batch, "seconds": best, "images_per_s": batch / best}


# --- output ----------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def side_by_side_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per setup, median latency per path and the ratios."""
    lines = [
        (
            "| pipeline | size, steps | diffusers (ms) | ours in-process (ms) | served (ms) "
            "| ours / diffusers | served / in-process | served / diffusers "
            "| serving overhead (ms/step) | UNet GFLOP/step | ORT UNet call (ms) | % of GEMM peak |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, m, q, u = r["setup"], r["median_s"], r["ratios"], r["unet"]
        lines.append(
            f"| {s['name']} | {s['width']}x{s['height']}, {s['steps']} "
            f"| {_ms(m[DIFFUSERS])} | {_ms(m[INPROCESS])} | {_ms(m[SERVED])} "
            f"| {q['ours_inprocess_over_diffusers']:.2f} | {q['served_over_inprocess']:.2f} "
            f"| {q['served_over_diffusers']:.2f} | {r['serving_overhead_ms_per_step']:+.2f} "
            f"| {u['gflop_per_step']:.1f} | {u['ort_call_ms']:.1f} "
            f"| {u['ort_fraction_of_peak'] * 100:.0f}% |"
        )
    return lines


def sweep_table(sweep: dict[str, Any], ceiling: dict[str, Any]) -> list[str]:
    """Markdown: one row per concurrency level."""
    lines = [
        (
            "| concurrency | images/s | × c=1 | % of ceiling | p50 (ms) | p95 (ms) | p99 (ms) "
            "| p99/p50 | UNet calls per request-step |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = sweep["levels"][0]["images_per_s"]
    for level in sweep["levels"]:
        lat, stages = level["latency_ms"], level["stages"]
        lines.append(
            f"| {level['concurrency']} | {level['images_per_s']:.2f} "
            f"| {level['images_per_s'] / base:.2f} "
            f"| {level['images_per_s'] / ceiling['images_per_s'] * 100:.0f}% "
            f"| {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} "
            f"| {lat['p99'] / lat['p50']:.2f} | {stages['unet_calls_per_request_step']:.2f} |"
        )
    return lines


def stage_table(sweep: dict[str, Any]) -> list[str]:
    """Markdown: amortised ms per request in each component vs the pipeline itself."""
    header = " | ".join(f"{name} (ms)" for name in COMPONENTS)
    lines = [
        (
            f"| concurrency | wall per request (ms) | {header} | pipeline's own + idle: loop, "
            "scheduler, CFG, BLS (ms) | queued before joining (ms) |"
        ),
        "|---:|---:|" + "---:|" * len(COMPONENTS) + "---:|---:|",
    ]
    for level in sweep["levels"]:
        s = level["stages"]
        cells = " | ".join(f"{s['component_ms_per_request'][n]:.1f}" for n in COMPONENTS)
        lines.append(
            f"| {level['concurrency']} | {s['window_ms_per_request']:.1f} | {cells} "
            f"| {s['pipeline_own_ms_per_request']:.1f} "
            f"| {s['pipeline_queue_ms_per_request']:.1f} |"
        )
    return lines


def render_markdown(payload: dict[str, Any]) -> str:
    """The results as markdown: context, side-by-side, sweep and stage tables."""
    env, args, load = payload["environment"], payload["args"], payload["sweep"]["machine_load"]
    ceiling = payload["ceiling"]
    lines = [
        "## Throughput and latency",
        "",
        (
            f"Command: `{payload['command']}`. {env['cpu_count']} CPUs ({env['processor']}), "
            f"onnxruntime {env['onnxruntime']}, torch {payload['torch']}, fp32 GEMM "
            f"{payload['gemm_gflops']:.0f} GFLOP/s ({GEMM_SIZE}² matmul, best of 3); commit "
            f"`{env['git_commit']}`, {env['timestamp_utc']}."
        ),
        "",
        "### Side by side (one request at a time, medians)",
        "",
        *side_by_side_table(payload["side_by_side"]),
        "",
        "Max pixel difference (same weights, seed, steps): "
        + "; ".join(
            f"{r['setup']['name']}: ours vs diffusers "
            f"{r['max_abs_pixel_difference']['ours_vs_diffusers']}, served vs ours "
            f"{r['max_abs_pixel_difference']['served_vs_ours']}"
            for r in payload["side_by_side"]
        )
        + ".",
        "",
        (
            f"### Concurrency sweep (demo pipeline, {args['steps']} steps, mix "
            f"`{payload['mix']}`, {args['requests']} timed requests per level)"
        ),
        "",
        (
            f"Ceiling: our in-process loop denoising {ceiling['batch']} requests as one batch, "
            f"{ceiling['images_per_s']:.2f} images/s (the better of before and after the sweep: "
            + ", ".join(f"{v:.2f}" for v in ceiling.get("measured_images_per_s", []))
            + ")."
        ),
        "",
        *sweep_table(payload["sweep"], ceiling),
        "",
        (
            "Amortised per request (each component's busy time in the window ÷ requests; "
            "batched calls are shared), from Triton's statistics:"
        ),
        "",
        *stage_table(payload["sweep"]),
        "",
        (
            f"Other processes kept {load['foreign_cores']:.2f} cores busy on average during the "
            f"sweep (steal {load['steal_cores']:.2f})."
        ),
        "",
    ]
    return "\n".join(lines)


def plot(sweep: dict[str, Any], ceiling: dict[str, Any], path: Path) -> None:
    """Latency percentiles and images/s vs concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sweep["levels"]
    conc = [level["concurrency"] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50", "p95", "p99"):
        left.plot(conc, [level["latency_ms"][key] for level in levels], marker="o", label=key)
    left.set(
        xlabel="concurrency", ylabel="latency (ms)", title="Latency", xscale="log", xticks=conc
    )
    left.set_xticklabels(conc)
    left.minorticks_off()
    left.legend()
    right.plot(conc, [level["images_per_s"] for level in levels], marker="o", label="served")
    right.axhline(ceiling["images_per_s"], linestyle="--", color="gray", label="in-process batch")
    right.set(xlabel="concurrency", ylabel="images/s", title="Throughput", xscale="log")
    right.set_xticks(conc)
    right.set_xticklabels(conc)
    right.minorticks_off()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir: Path, payload: dict[str, Any], markdown: str) -> list[Path]:
    """Writes throughput.json, throughput.md and throughput.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"throughput.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths[1].write_text(markdown)
    plot(payload["sweep"], payload["ceiling"], paths[2])
    return paths


# --- main ------------------------------------------------------------------------------------


def setups(args: argparse.Namespace) -> list[Setup]:
    """The demo setup and, unless skipped, the full-size one (built or reused)."""
    height, width = args.size
    demo = Setup("demo", args.source, args.repository, height, width, args.steps, args.repeats)
    if args.skip_full:
        return [demo]
    source, repository = ensure_full_size(log=tqdm.write)
    fh, fw = args.full_size
    return [demo, Setup("full-size SD 1.5", source, repository, fh, fw, args.steps,
                        args.full_repeats)]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: machine reference, side by side, sweep; print and write the results."""
    args = parse_args(argv)
    if not (args.repository / PIPELINE_MODEL / "config.pbtxt").is_file():
        sys.exit(f"{args.repository} is not a built repository; run `make repository` first")
    height, width = args.size
    mix = [MixEntry(k, w, *(size or (height, width))) for k, w, size in args.mix]
    tqdm.write("[reference] fp32 GEMM ...")
    peak = gemm_gflops()

    def ceiling_and_sweep(server: TritonServer) -> dict[str, Any]:
        # The ceiling is measured before and after the sweep (server idle both times) and the
        # better one kept: on a shared machine one slow moment would flatter the sweep.
        tqdm.write("[sweep] in-process batch ceiling (server idle) ...")
        before = batch_ceiling(args, mix)
        sweep = run_sweep(server, args, mix)
        tqdm.write("[sweep] in-process batch ceiling again ...")
        after = batch_ceiling(args, mix)
        ceiling = max(before, after, key=lambda c: c["images_per_s"])
        ceiling["measured_images_per_s"] = [before["images_per_s"], after["images_per_s"]]
        return {"ceiling": ceiling, "sweep": sweep}

    compared: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "mix": ",".join(f"{e.kind}@{e.width}x{e.height}:{e.weight}" for e in mix),
        "environment": environment(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gemm_gflops": peak,
        "side_by_side": compared,
    }
    for index, setup in enumerate(setups(args)):
        result = side_by_side(setup, args.seed, then=ceiling_and_sweep if index == 0 else None)
        add_peak_fraction(result, peak)
        extra = result["paths"][SERVED].pop("then")
        if extra is not None:
            payload.update(extra)
        compared.append(result)
        # Written after every setup, so a slow full-size part cannot lose the demo's figures.
        markdown = render_markdown(payload)
        written = write_results(args.out_dir, payload, markdown)
    print(markdown)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
