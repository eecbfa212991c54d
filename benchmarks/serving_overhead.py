"""Per-denoising-step cost of the served loop vs the in-process loop, on one repository.

The same requests run through two paths, from one process, in one run:

* **in-process**: `sdserve_pipeline.inprocess.load_service` — the pipeline loop calling
  ONNX Runtime sessions directly;
* **served**: `tritonserver` + the gRPC SDK (`sdserve_client.InpaintClient`) — the same
  loop inside the Python-backend pipeline model, calling the ONNX Runtime runner models
  through BLS.

Each path runs at two step counts. The slope `(t_high - t_low) / (high - low)` of the
median request latencies is the time per denoising step, free of every per-request fixed
cost (text encoding, VAE, transport), which goes into the intercept instead. The same fit
is made to CPU time (this process plus every process of the server), which other load on
the machine disturbs far less than wall time. The two paths alternate in an ABBA order over
repeats, so drifts hit both alike; in-process requests run while the server is idle.

Usage (from the repository root):

    .venv/bin/python benchmarks/serving_overhead.py
    .venv/bin/python benchmarks/serving_overhead.py --size 512x512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    FOREIGN_LOAD_WARNING,
    PROMPT,
    ROOT,
    SETTLE_S,
    CpuMeter,
    Generate,
    Snapshot,
    environment,
    inprocess_path,
    machine_load,
    make_inputs,
    parse_size,
    served_path,
    wait_ready,
)
from tqdm import tqdm

from sdserve_client import GenerationRequest, InpaintClient
from sdserve_pipeline.inprocess import load_service
from sdserve_pipeline.service import PipelineService
from sdserve_pipeline.triton_server import TritonServer

INPROCESS = "in-process"
SERVED = "served"
MODES = (INPROCESS, SERVED)
TABLE_HEADER = (
    "| figure | in-process (ms) | served (ms) | served / in-process | served - in-process (ms) |"
)

# Seconds per request, keyed by step count.
Samples = dict[int, list[float]]


@dataclass(frozen=True)
class Config:
    """What was measured.

    Args:
        repository (`str`): the built Triton model repository.
        height (`int`): image height in pixels.
        width (`int`): image width in pixels.
        steps_low (`int`): the smaller step count.
        steps_high (`int`): the larger step count.
        repeats (`int`): timed requests per (path, step count).
        warmup (`int`): untimed requests per path (at `steps_low`) before the timed ones.
        seed (`int`): generation seed (the input image and mask are fixed as well).
        scheduler (`str`, *optional*): scheduler name; `None` means the checkpoint's own.
    """

    repository: str
    height: int
    width: int
    steps_low: int
    steps_high: int
    repeats: int
    warmup: int
    seed: int
    scheduler: str | None


@dataclass
class Fit:
    """Per-step and fixed cost fitted to one path's request costs, in seconds.

    Args:
        per_step (`float`): slope between the medians at the two step counts.
        fixed (`float`): intercept: the median at `steps_low` minus `steps_low` steps.
        at_low (`float`): median whole-request cost at `steps_low`.
        at_high (`float`): median whole-request cost at `steps_high`.
        per_step_range (`list[float]`): min and max of the per-repeat slopes (a spread).
    """

    per_step: float
    fixed: float
    at_low: float
    at_high: float
    per_step_range: list[float]


@dataclass
class Recorder:
    """Wall and CPU seconds of every timed request, per path and step count."""

    wall: dict[str, Samples]
    cpu: dict[str, Samples]

    @classmethod
    def empty(cls, step_counts: Sequence[int]) -> Recorder:
        """A recorder with an empty list for every (path, step count)."""
        return cls(
            wall={mode: {s: [] for s in step_counts} for mode in MODES},
            cpu={mode: {s: [] for s in step_counts} for mode in MODES},
        )

    def add(self, mode: str, steps: int, wall: float, cpu: float) -> None:
        """Records one request."""
        self.wall[mode][steps].append(wall)
        self.cpu[mode][steps].append(cpu)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see `--help`)."""
    parser = argparse.ArgumentParser(
        description="Per-step time of the Triton-served loop vs the in-process loop."
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=ROOT / "build" / "model_repository",
        help="built model repository (default: build/model_repository; `make repository`)",
    )
    parser.add_argument(
        "--size", type=parse_size, default=(256, 256), help="WIDTHxHEIGHT (default: 256x256)"
    )
    parser.add_argument("--steps-low", type=int, default=5, help="smaller step count (5)")
    parser.add_argument("--steps-high", type=int, default=25, help="larger step count (25)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed requests per path and step count (5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed requests per path before timing (1)"
    )
    parser.add_argument("--seed", type=int, default=7, help="generation seed (7)")
    parser.add_argument(
        "--scheduler", default=None, help="scheduler name (default: the checkpoint's own)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where serving_overhead.{json,md} go (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.steps_low < args.steps_high:
        parser.error("need 0 < --steps-low < --steps-high")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("need --repeats >= 1 and --warmup >= 0")
    return args


def make_requests(config: Config) -> dict[int, GenerationRequest]:
    """The benchmark's request at each of the two step counts, keyed by step count."""
    image, mask = make_inputs(config.height, config.width)
    return {
        steps: GenerationRequest(
            PROMPT,
            image=image,
            mask=mask,
            steps=steps,
            seed=config.seed,
            guidance_scale=7.5,
            preserve_unmasked=True,
            scheduler=config.scheduler,
        )
        for steps in (config.steps_low, config.steps_high)
    }


def run_request(
    generate: Generate, request: GenerationRequest, cpu: CpuMeter
) -> tuple[float, float, np.ndarray]:
    """Runs one request; returns its wall seconds, CPU seconds and images."""
    cpu_start, wall_start = cpu(), time.perf_counter()
    images = generate(request)
    wall = time.perf_counter() - wall_start
    return wall, cpu() - cpu_start, images


def schedule(config: Config) -> list[tuple[int, str, int]]:
    """The ordered (round, path, step count) plan; round -1 is warm-up.

    Warm-up runs `config.warmup` requests per path at `steps_low` (tensor shapes do not
    depend on the step count, so this covers every first-call cost). Each timed round then
    runs both paths at both step counts; every other round runs the reverse order (ABBA),
    so drifts and ordering effects hit both paths alike.
    """
    plan = [(-1, mode, config.steps_low) for _ in range(config.warmup) for mode in MODES]
    pairs = [(mode, steps) for steps in (config.steps_low, config.steps_high) for mode in MODES]
    for index in range(config.repeats):
        order = pairs if index % 2 == 0 else pairs[::-1]
        plan += [(index, mode, steps) for mode, steps in order]
    return plan


def measure(
    config: Config, paths: dict[str, Generate], cpu: CpuMeter
) -> tuple[Recorder, dict[int, dict[str, np.ndarray]]]:
    """Runs the plan of `schedule`, with a progress bar.

    Args:
        config (`Config`): what to measure.
        paths (`dict[str, Generate]`): the request paths, keyed by mode name.
        cpu (`CpuMeter`): CPU clock of the measured processes.

    Returns:
        The timed requests' costs and the last images of each path and step count,
        `{steps: {mode: images}}` (to check that both paths did the same work).
    """
    requests = make_requests(config)
    record = Recorder.empty(list(requests))
    images: dict[int, dict[str, np.ndarray]] = {s: {} for s in requests}
    with tqdm(schedule(config), desc="requests", unit="req", file=sys.stderr) as bar:
        for round_index, mode, steps in bar:
            phase = "warm-up" if round_index < 0 else f"repeat {round_index + 1}"
            bar.set_postfix_str(f"{phase}: {mode}, {steps} steps")
            time.sleep(SETTLE_S)
            wall, cpu_s, images[steps][mode] = run_request(paths[mode], requests[steps], cpu)
            if round_index >= 0:
                record.add(mode, steps, wall, cpu_s)
    return record, images


def fit(samples: Samples, steps_low: int, steps_high: int) -> Fit:
    """Fits per-step and fixed cost to one path's request costs (medians, then a slope).

    Args:
        samples (`Samples`): seconds per request, keyed by step count.
        steps_low (`int`): the smaller step count.
        steps_high (`int`): the larger step count.

    Returns:
        The fit.
    """
    span = steps_high - steps_low
    low, high = statistics.median(samples[steps_low]), statistics.median(samples[steps_high])
    pairs = zip(samples[steps_low], samples[steps_high], strict=True)
    slopes = [(h - lo) / span for lo, h in pairs]
    per_step = (high - low) / span
    return Fit(
        per_step=per_step,
        fixed=low - per_step * steps_low,
        at_low=low,
        at_high=high,
        per_step_range=[min(slopes), max(slopes)],
    )


def summarize(record: Recorder, config: Config) -> dict[str, Any]:
    """Per path: the wall-time fit, the CPU-time fit and the raw samples."""
    low, high = config.steps_low, config.steps_high
    return {
        mode: {
            "wall_s": asdict(fit(record.wall[mode], low, high)),
            "cpu_s": asdict(fit(record.cpu[mode], low, high)),
            "samples": {
                "wall_s": {str(s): v for s, v in record.wall[mode].items()},
                "cpu_s": {str(s): v for s, v in record.cpu[mode].items()},
            },
        }
        for mode in MODES
    }


def max_abs_difference(images: dict[int, dict[str, np.ndarray]]) -> int:
    """Largest pixel difference between the two paths' outputs over both step counts."""
    diffs = [
        np.abs(pair[INPROCESS].astype(np.int16) - pair[SERVED].astype(np.int16)).max()
        for pair in images.values()
    ]
    return int(max(diffs))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _row(name: str, inprocess: float, served: float) -> str:
    ratio = f"{served / inprocess:.3f}" if inprocess > 0 else "n/a"
    cells = [name, _ms(inprocess), _ms(served), ratio, f"{(served - inprocess) * 1e3:+,.1f}"]
    return "| " + " | ".join(cells) + " |"


def _context(config: dict[str, Any], env: dict[str, Any]) -> str:
    """One line saying what was measured, where and when."""
    scheduler = config["scheduler"] or "checkpoint default"
    return (
        f"{config['width']}x{config['height']} inpainting, steps {config['steps_low']} and "
        f"{config['steps_high']}, median of {config['repeats']} per path and step count "
        f"(after {config['warmup']} warm-up per path), scheduler `{scheduler}`; "
        f"{env['cpu_count']} CPUs, onnxruntime {env['onnxruntime']}, "
        f"commit `{env['git_commit']}`, {env['timestamp_utc']}."
    )


def _table(paths: dict[str, Any], low: int, high: int) -> list[str]:
    """The markdown table, header included."""
    wall = {mode: Fit(**paths[mode]["wall_s"]) for mode in MODES}
    cpu = {mode: Fit(**paths[mode]["cpu_s"]) for mode in MODES}

    def row(name: str, fits: dict[str, Fit], attribute: str) -> str:
        return _row(name, *(getattr(fits[mode], attribute) for mode in MODES))

    return [
        TABLE_HEADER,
        "|---|---:|---:|---:|---:|",
        row("**per denoising step**, wall (slope)", wall, "per_step"),
        row("per denoising step, CPU time (slope)", cpu, "per_step"),
        row("fixed per request, wall (intercept)", wall, "fixed"),
        row("fixed per request, CPU time (intercept)", cpu, "fixed"),
        row(f"whole request, {low} steps, wall", wall, "at_low"),
        row(f"whole request, {high} steps, wall", wall, "at_high"),
    ]


def _notes(payload: dict[str, Any]) -> list[str]:
    """Slope spread, output check, machine load and (unmeasured) setup times."""
    paths, load, setup = payload["paths"], payload["machine_load"], payload["setup_s"]
    spread = ", ".join(
        f"{mode} {_ms(paths[mode]['wall_s']['per_step_range'][0])} to "
        f"{_ms(paths[mode]['wall_s']['per_step_range'][1])}"
        for mode in MODES
    )
    summary = (
        f"Per-repeat wall slopes (ms/step): {spread}. Served vs in-process images: "
        f"max |Δ| = {payload['max_abs_pixel_difference']} (same inputs, same seed). "
        f"Other processes kept {load['foreign_cores']:.2f} cores busy on average during the "
        f"measurement (hypervisor steal {load['steal_cores']:.2f}). Setup, in no figure: "
        f"in-process load {setup['inprocess_load']:.1f} s (while the server starts), "
        f"server start to ready {setup['server_ready']:.1f} s."
    )
    if load["foreign_cores"] <= FOREIGN_LOAD_WARNING:
        return [summary]
    warning = (
        f"**Warning:** other processes competed for the CPU ({load['foreign_cores']:.2f} "
        "cores on average), so the wall-time figures are noisy; trust the CPU-time rows "
        "more, or rerun on an idle machine."
    )
    return [summary, "", warning]


def render_markdown(payload: dict[str, Any]) -> str:
    """The results as a markdown section: context line, table, notes."""
    config = payload["config"]
    title = "## Serving overhead: Triton (gRPC + BLS) vs in-process loop"
    context = _context(config, payload["environment"])
    table = _table(payload["paths"], config["steps_low"], config["steps_high"])
    return "\n".join([title, "", context, "", *table, "", *_notes(payload), ""])


def write_results(out_dir: Path, payload: dict[str, Any], markdown: str) -> list[Path]:
    """Writes `serving_overhead.json` and `serving_overhead.md` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "serving_overhead.json", out_dir / "serving_overhead.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


def load_inprocess(repository: Path) -> tuple[PipelineService, float]:
    """Loads the in-process service; returns it and the seconds it took."""
    start = time.perf_counter()
    service = load_service(repository)
    return service, time.perf_counter() - start


def run(config: Config) -> dict[str, Any]:
    """Starts the server, loads the in-process service meanwhile, measures both paths.

    Returns:
        The JSON-ready results: config, environment, setup times, machine load, the fits
        and samples of each path, and the largest pixel difference between their images.
    """
    repository = Path(config.repository)
    started = time.perf_counter()
    # No request is in flight at shutdown, so a short exit timeout is safe.
    server = TritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        exit_timeout_s=5,
        build_dir=ROOT / "build",
    )
    with server:
        service, load_s = load_inprocess(repository)  # overlaps the server's start
        ready_s = wait_ready(server, started)
        assert server.pid is not None  # started by the `with`
        cpu = CpuMeter(server.pid)
        with InpaintClient(server.grpc_url) as client:
            paths = {INPROCESS: inprocess_path(service), SERVED: served_path(client)}
            before = Snapshot.take(cpu)
            record, images = measure(config, paths, cpu)
            load = machine_load(before, Snapshot.take(cpu))
    return {
        "config": asdict(config),
        "environment": environment(),
        "setup_s": {"inprocess_load": load_s, "server_ready": ready_s},
        "machine_load": load,
        "paths": summarize(record, config),
        "max_abs_pixel_difference": max_abs_difference(images),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: measure, print the markdown table, write JSON + markdown."""
    args = parse_args(argv)
    if not (args.repository / "inpaint" / "config.pbtxt").is_file():
        sys.exit(f"{args.repository} is not a built repository; run `make repository` first")
    height, width = args.size
    config = Config(
        repository=str(args.repository.resolve()),
        height=height,
        width=width,
        steps_low=args.steps_low,
        steps_high=args.steps_high,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        scheduler=args.scheduler,
    )
    payload = run(config)
    markdown = render_markdown(payload)
    print(markdown)
    for path in write_results(args.out_dir, payload, markdown):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
