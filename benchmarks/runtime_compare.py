"""Is any fp32 CPU runtime faster than ONNX Runtime on our exported components?

For each exported component of the full-size SD 1.5-inpainting repository (random weights,
real architecture; see `full_size.py`), the same inputs go through three runtimes in one
process, with 2 threads each:

* **PyTorch**: the very module we export (`sdserve_export.onnx_export`'s wrappers around
  the diffusers / transformers components), under `torch.no_grad`;
* **ONNX Runtime**: our exported `model.onnx`, in a session made as served
  (`create_session`: all graph optimisations, 2 intra-op threads, no spinning);
* **OpenVINO** (optional, not in `requirements.txt`): the same `model.onnx`, compiled for
  CPU with `INFERENCE_PRECISION_HINT=f32`. f32 is essential: on CPUs with AMX or
  AVX512-BF16 OpenVINO defaults to bf16, which would break our pixel-exact promise.

Each runtime gets one untimed warm-up call, then `--repeats` timed calls; the runtimes take
turns within each repeat (the starting one rotates), so the machine's drift hits them alike.
Every figure is also put against the machine's fp32 GEMM peak (best of 3 `torch.matmul` on
4096² matrices, 2 threads) using the FLOPs torch's `FlopCounterMode` counts for the call,
and each output is compared with ONNX Runtime's.

Usage (from the repository root; a few minutes on 2 cores):

    .venv/bin/python benchmarks/runtime_compare.py
    .venv/bin/python benchmarks/runtime_compare.py --components unet,vae_decoder --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from common import (
    COMPONENTS,
    FOREIGN_LOAD_WARNING,
    GEMM_SIZE,
    PIPELINE_FOLDER,
    REPOSITORY,
    ROOT,
    SETTLE_S,
    Snapshot,
    gemm_gflops,
    machine_load,
    process_cpu_seconds,
    system_cpu_seconds,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdserve_export.built_repository import read_repository
from sdserve_pipeline.components import (
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
    example_inputs,
    image_dims,
)
from sdserve_pipeline.onnx_runtime import create_session

THREADS = 2
IMAGE_SIZE = 256  # pixels, square
VAE_SCALE = 8  # pixels per latent of the SD 1.5 VAE
BATCH = 2  # UNet and text encoder: the CFG pair
TORCH, ORT, OPENVINO = "PyTorch", "ONNX Runtime", "OpenVINO"
RUNTIMES = (TORCH, ORT, OPENVINO)
OPENVINO_PIN = "openvino==2026.4.1"
# ISA extensions worth naming in the results (AMX / BF16 are why OpenVINO must be told f32).
CPU_FEATURES = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
OPENVINO_CONFIG = {
    "INFERENCE_PRECISION_HINT": "f32",
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_NUM_THREADS": THREADS,
}

# One call of a runtime on its fixed inputs → its outputs, in the ONNX model's order.
Runner = Callable[[], list[np.ndarray]]


@dataclass(frozen=True)
class Component:
    """One exported component: how to load its PyTorch module and what inputs it gets.

    Args:
        spec (`ComponentSpec`): its declaration; its inputs are `example_inputs` of it, with
            the checkpoint's fixed dims read from the repository's config.
        load_torch (`Callable[[Path], nn.Module]`): the exported module, from the diffusers
            pipeline folder.
        batch (`int`): rows per call (2 for the UNet and text encoder: the CFG pair).
    """

    spec: ComponentSpec
    load_torch: Callable[[Path], nn.Module]
    batch: int = 1

    @property
    def name(self) -> str:
        """Folder name in the repository."""
        return self.spec.name

    def feeds(self, repository: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Its named inputs at `IMAGE_SIZE`, in the module's argument order."""
        (model,) = (c for c in read_repository(repository).components if c.name == self.name)
        dims = {**model.sizes, **image_dims(self.batch, IMAGE_SIZE, IMAGE_SIZE, VAE_SCALE)}
        return example_inputs(self.spec, dims, rng)


def _text_encoder(folder: Path) -> nn.Module:
    from transformers import CLIPTextModel

    from sdserve_export.onnx_export import TextEncoderExport

    model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32)
    return TextEncoderExport(model)


def _unet(folder: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from sdserve_export.onnx_export import UNetExport

    model = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float32)
    return UNetExport(model)


def _vae(folder: Path, wrapper: str) -> nn.Module:
    from diffusers import AutoencoderKL

    from sdserve_export import onnx_export

    model = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
    return getattr(onnx_export, wrapper)(model)


COMPONENT_SPECS = {
    component.name: component
    for component in (
        Component(TEXT_ENCODER, _text_encoder, batch=BATCH),
        Component(VAE_ENCODER, lambda folder: _vae(folder, "VaeEncoderExport")),
        Component(UNET, _unet, batch=BATCH),
        Component(VAE_DECODER, lambda folder: _vae(folder, "VaeDecoderExport")),
    )
}


# --- arguments -------------------------------------------------------------------------------


def parse_components(text: str) -> list[str]:
    """Parses `unet,vae_decoder` into known component names, in the given order."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in COMPONENT_SPECS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(COMPONENTS)}, got {text!r}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see `--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--repeats", type=int, default=3, help="timed calls per runtime and component (3)")
    add(
        "--components",
        type=parse_components,
        default=list(COMPONENTS),
        help=f"comma-separated components ({','.join(COMPONENTS)})",
    )
    add(
        "--repository",
        type=Path,
        default=REPOSITORY,
        help="exported repository (build/bench/full_repository)",
    )
    add(
        "--pipeline",
        type=Path,
        default=PIPELINE_FOLDER,
        help="diffusers folder it was exported from (build/bench/full-sd15-inpaint)",
    )
    add(
        "--out-dir",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where runtime_compare.{json,md} go (benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("need --repeats >= 1")
    return args


# --- runtimes --------------------------------------------------------------------------------


def openvino_module() -> Any | None:
    """The `openvino` module, or None when it is not installed (it is optional)."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def torch_runner(module: nn.Module, feeds: dict[str, np.ndarray]) -> Runner:
    """Calls `module` on `feeds` (positional, in order) under `torch.no_grad`."""
    tensors = [torch.from_numpy(value) for value in feeds.values()]

    def run() -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*tensors)
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    return run


def ort_runner(onnx_file: Path, feeds: dict[str, np.ndarray]) -> Runner:
    """An ONNX Runtime session made as the project serves it (2 threads, no spinning)."""
    session = create_session(onnx_file, intra_op_threads=THREADS, allow_spinning=False)
    return lambda: session.run(None, feeds)


def openvino_runner(
    ov: Any, onnx_file: Path, feeds: dict[str, np.ndarray]
) -> tuple[Runner, dict[str, str]]:
    """The ONNX model compiled by OpenVINO for CPU in f32; also the properties it got."""
    compiled = ov.Core().compile_model(str(onnx_file), "CPU", OPENVINO_CONFIG)
    request = compiled.create_infer_request()
    properties = {key: _property_text(compiled.get_property(key)) for key in OPENVINO_CONFIG}

    def run() -> list[np.ndarray]:
        return list(request.infer(feeds).to_tuple())

    return run, properties


def _property_text(value: Any) -> str:
    """An OpenVINO property as text: element types by their short name (`f32`)."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def count_flops(run: Runner) -> int:
    """FLOPs of one call, by torch's `FlopCounterMode` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def _timed(run: Runner) -> tuple[float, list[np.ndarray]]:
    time.sleep(SETTLE_S)  # untimed: the previous runtime's idle threads go to sleep
    start = time.perf_counter()
    outputs = run()
    return time.perf_counter() - start, outputs


def max_abs_difference(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest |a - b| over every output tensor."""
    pairs = zip(outputs, reference, strict=True)
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs)


def snapshot() -> Snapshot:
    """Machine-wide and this process's CPU seconds now (see `common.machine_load`)."""
    busy, steal = system_cpu_seconds()
    return Snapshot(time.perf_counter(), busy, steal, process_cpu_seconds(os.getpid()))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- measurement -----------------------------------------------------------------------------


def load_runners(
    component: Component, args: argparse.Namespace, ov: Any | None, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, Runner], dict[str, Any]]:
    """Every available runtime's runner for `component`, plus load times and OV properties."""
    onnx_file = args.repository / component.name / "1" / "model.onnx"
    runners: dict[str, Runner] = {}
    info: dict[str, Any] = {"load_s": {}}
    started = time.perf_counter()
    module = component.load_torch(args.pipeline).eval()
    runners[TORCH] = torch_runner(module, feeds)
    info["load_s"][TORCH] = time.perf_counter() - started
    started = time.perf_counter()
    runners[ORT] = ort_runner(onnx_file, feeds)
    info["load_s"][ORT] = time.perf_counter() - started
    if ov is not None:
        started = time.perf_counter()
        runners[OPENVINO], info["openvino_properties"] = openvino_runner(ov, onnx_file, feeds)
        info["load_s"][OPENVINO] = time.perf_counter() - started
    return runners, info


def measure(component: Component, args: argparse.Namespace, ov: Any | None) -> dict[str, Any]:
    """FLOPs, one warm-up and `args.repeats` interleaved timed calls per runtime."""
    feeds = component.feeds(args.repository, np.random.default_rng(0))
    progress(f"[{component.name}] loading ...")
    runners, info = load_runners(component, args, ov, feeds)
    names = list(runners)
    progress(f"[{component.name}] loaded ({_load_summary(info['load_s'])}); counting FLOPs ...")
    flops = count_flops(runners[TORCH])
    outputs = {}
    for name in names:
        seconds, outputs[name] = _timed(runners[name])
        progress(f"[{component.name}] warm-up {name}: {seconds * 1e3:,.0f} ms")
    samples: dict[str, list[float]] = {name: [] for name in names}
    before = snapshot()
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, _ = _timed(runners[name])
            samples[name].append(seconds)
            progress(
                f"[{component.name}] repeat {repeat + 1}/{args.repeats} {name}: "
                f"{seconds * 1e3:,.0f} ms"
            )
    load = machine_load(before, snapshot())
    del runners
    gc.collect()
    return {
        "component": component.name,
        "inputs": {key: list(value.shape) for key, value in feeds.items()},
        "flops": flops,
        "samples_s": samples,
        "median_s": {name: statistics.median(s) for name, s in samples.items()},
        "min_s": {name: min(s) for name, s in samples.items()},
        "rounds_faster_than_ort": {
            name: sum(a < b for a, b in zip(s, samples[ORT], strict=True))
            for name, s in samples.items()
            if name != ORT
        },
        "max_abs_difference_vs_ort": {
            name: max_abs_difference(outputs[name], outputs[ORT]) for name in names if name != ORT
        },
        "machine_load": load,
        **info,
    }


def add_peak_fraction(result: dict[str, Any], peak_gflops: float) -> None:
    """Adds each runtime's achieved GFLOP/s and fraction of the GEMM peak (median call)."""
    gflop = result["flops"] / 1e9
    achieved = {name: gflop / s for name, s in result["median_s"].items()}
    result["gflops_per_s"] = achieved
    result["fraction_of_peak"] = {name: g / peak_gflops for name, g in achieved.items()}


def _load_summary(load_s: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in load_s.items())


# --- output ----------------------------------------------------------------------------------


def cpuinfo_field(key: str) -> str:
    """The first processor's `key` in /proc/cpuinfo, or "" when absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def machine(ov: Any | None) -> dict[str, Any]:
    """Facts about the machine and software the numbers came from."""
    flags = set(cpuinfo_field("flags").split())
    return {
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "cpu_features": sorted(flags & CPU_FEATURES),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "openvino": ov.__version__ if ov is not None else None,
        "torch": torch.__version__,
        "threads": THREADS,
    }


def _ms(result: dict[str, Any], name: str) -> str:
    if name not in result["median_s"]:
        return "not installed"
    return f"{result['median_s'][name] * 1e3:,.0f} ({result['min_s'][name] * 1e3:,.0f})"


def _per_runtime(result: dict[str, Any], key: str, names: Sequence[str], fmt: str) -> str:
    values = result[key]
    return " / ".join(format(values[n], fmt) if n in values else "n/a" for n in names)


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per component."""
    lines = [
        (
            "| component | GFLOP/call | PyTorch ms | ONNX Runtime ms | OpenVINO ms "
            "| % of GEMM peak: PyTorch / ORT / OpenVINO "
            "| speed vs ORT: PyTorch / OpenVINO | rounds faster than ORT: PyTorch / OpenVINO "
            "| max abs diff vs ORT: PyTorch / OpenVINO |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    others = (TORCH, OPENVINO)
    for r in results:
        ort = r["median_s"][ORT]
        speed = " / ".join(
            f"{ort / r['median_s'][n]:.2f}×" if n in r["median_s"] else "n/a" for n in others
        )
        rounds = " / ".join(
            f"{r['rounds_faster_than_ort'][n]}/{len(r['samples_s'][n])}"
            if n in r["rounds_faster_than_ort"]
            else "n/a"
            for n in others
        )
        peak = " / ".join(
            f"{r['fraction_of_peak'][n] * 100:.0f}%" if n in r["fraction_of_peak"] else "n/a"
            for n in RUNTIMES
        )
        lines.append(
            f"| {r['component']} | {r['flops'] / 1e9:,.1f} | {_ms(r, TORCH)} | {_ms(r, ORT)} "
            f"| {_ms(r, OPENVINO)} | {peak} | {speed} | {rounds} "
            f"| {_per_runtime(r, 'max_abs_difference_vs_ort', others, '.1e')} |"
        )
    return lines


def render_markdown(payload: dict[str, Any]) -> str:
    """The results as markdown: context line, table, notes."""
    env, results = payload["machine"], payload["components"]
    openvino = (
        f"OpenVINO {env['openvino']}"
        if env["openvino"]
        else f"OpenVINO not installed (`pip install {OPENVINO_PIN}`)"
    )
    features = ", ".join(env["cpu_features"]) or "none listed"
    worst = max((r["machine_load"]["foreign_cores"] for r in results), default=0.0)
    lines = [
        "## fp32 CPU runtimes on the exported components",
        "",
        (
            f"Command: `{payload['command']}`. {env['cpu_count']} CPUs ({env['cpu_model']}; "
            f"{features}), onnxruntime {env['onnxruntime']}, {openvino}, torch {env['torch']}; "
            f"{THREADS} threads per runtime; fp32 GEMM peak {payload['gemm_gflops']:.0f} "
            f"GFLOP/s ({GEMM_SIZE}² matmul, best of 3, {THREADS} threads); "
            f"{env['timestamp_utc']}."
        ),
        "",
        (
            f"Full-size SD 1.5-inpainting architecture (random weights) at {IMAGE_SIZE}² "
            f"({IMAGE_SIZE // VAE_SCALE}² latents); UNet and text encoder batch {BATCH} (CFG), "
            "VAE batch 1. "
            f"Times: median (min) of {payload['repeats']} calls per runtime after one warm-up, "
            "runtimes interleaved. % of peak and speed use the medians."
        ),
        "",
        *results_table(results),
        "",
        "Notes:",
        "",
        (
            "- GFLOP/call is what torch's `FlopCounterMode` counts on the PyTorch module: "
            "matmuls, convolutions and attention only (norms, activations and softmax are "
            "left out), so % of peak slightly understates the work done. PyTorch runs one "
            "extra untimed call under the counter, before its warm-up."
        ),
        "- speed vs ORT = ORT median ÷ runtime median (above 1 is faster than ORT).",
        (
            "- rounds faster than ORT: in how many repeats the runtime beat ORT's call in the "
            "same round."
        ),
    ]
    props = [r["openvino_properties"] for r in results if "openvino_properties" in r]
    if props:
        precisions = sorted({p["INFERENCE_PRECISION_HINT"] for p in props})
        threads = sorted({p["INFERENCE_NUM_THREADS"] for p in props})
        lines.append(
            f"- OpenVINO compiled models report INFERENCE_PRECISION_HINT {', '.join(precisions)}"
            f" and INFERENCE_NUM_THREADS {', '.join(threads)}."
        )
    else:
        lines.append(f"- OpenVINO: not installed; `pip install {OPENVINO_PIN}` to add it.")
    lines.append(
        f"- Other processes kept up to {worst:.2f} cores busy during a component's timed calls"
        + (" (wall times unreliable)." if worst > FOREIGN_LOAD_WARNING else ".")
    )
    return "\n".join([*lines, ""])


def write_results(out_dir: Path, payload: dict[str, Any], markdown: str) -> list[Path]:
    """Writes runtime_compare.json and runtime_compare.md into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"runtime_compare.{ext}" for ext in ("json", "md")]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths[1].write_text(markdown)
    return paths


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: GEMM peak, then every component; print and write the results."""
    args = parse_args(argv)
    onnx_files = [args.repository / name / "1" / "model.onnx" for name in args.components]
    missing = [str(path) for path in onnx_files if not path.is_file()]
    if missing or not (args.pipeline / "model_index.json").is_file():
        sys.exit(
            f"missing {missing or args.pipeline}: run `.venv/bin/python benchmarks/full_size.py`"
        )
    torch.set_num_threads(THREADS)
    ov = openvino_module()
    if ov is None:
        progress(f"[openvino] not installed: its column is skipped (pip install {OPENVINO_PIN})")
    progress("[reference] fp32 GEMM ...")
    peak = gemm_gflops()
    progress(f"[reference] {peak:.0f} GFLOP/s")
    results: list[dict[str, Any]] = []
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "repeats": args.repeats,
        "machine": machine(ov),
        "openvino_config": OPENVINO_CONFIG if ov is not None else None,
        "gemm_gflops": peak,
        "components": results,
    }
    for name in args.components:
        result = measure(COMPONENT_SPECS[name], args, ov)
        add_peak_fraction(result, peak)
        results.append(result)
        # Written after every component, so a late failure cannot lose the earlier figures.
        markdown = render_markdown(payload)
        written = write_results(args.out_dir, payload, markdown)
    print(markdown)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
