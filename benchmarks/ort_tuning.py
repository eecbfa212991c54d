"""ONNX Runtime session settings of the component models, each measured served, in one run.

Every variant is a copy of the demo repository whose component configs differ only in the
runner parameters (`allow_spinning`, `intra_op_threads`). For each, a tritonserver serves it
and the same closed-loop sweep as `throughput.py` runs (same mix, same requests, same
seeds); the variants take turns, so the machine's drift hits them alike. A setting is kept
(made the exported default) only if it helps here.

Usage (from the repository root; needs `make repository`):

    .venv/bin/python benchmarks/ort_tuning.py
    .venv/bin/python benchmarks/ort_tuning.py --concurrency 1,8 --requests 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import (
    COMPONENTS,
    ROOT,
    CpuMeter,
    MixEntry,
    Snapshot,
    environment,
    machine_load,
    mix_requests,
    parse_concurrency,
    parse_mix,
    start_server,
    sweep_level,
)
from google.protobuf import text_format
from tqdm import tqdm
from tritonclient.grpc import model_config_pb2 as mc

# name → runner parameters set on every component model.
VARIANTS: dict[str, dict[str, str]] = {
    "ORT defaults (spinning on, 1 thread per core)": {
        "allow_spinning": "1",
        "intra_op_threads": "0",
    },
    "spinning off": {"allow_spinning": "0", "intra_op_threads": "0"},
}


def variant_repository(source: Path, out: Path, params: Mapping[str, str]) -> Path:
    """A copy of `source` (weights hard-linked where possible) with `params` on its components."""
    shutil.copytree(source, out, copy_function=_link_or_copy)
    for name in COMPONENTS:
        config_file = out / name / "config.pbtxt"
        config_file.unlink()  # a hard link: never write through it into the source
        config = text_format.Parse((source / name / "config.pbtxt").read_text(), mc.ModelConfig())
        for key, value in params.items():
            config.parameters[key].string_value = value
        config_file.write_text(text_format.MessageToString(config))
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def measure(repository: Path, args: argparse.Namespace, mix: list[MixEntry]) -> dict[str, Any]:
    """The sweep on one variant: images/s and latency per concurrency level."""
    requests = mix_requests(mix, args.requests, args.steps, args.seed)
    levels = []
    with start_server(repository) as server:
        server.wait_ready(timeout_s=600)
        assert server.pid is not None
        before = Snapshot.take(CpuMeter(server.pid))
        total = sum(args.requests + c for c in args.concurrency)
        with tqdm(total=total, desc=repository.name, unit="req", file=sys.stderr) as bar:
            for c in args.concurrency:
                level = sweep_level(server.grpc_url, requests, c, bar, args.steps)
                levels.append(level)
        load = machine_load(before, Snapshot.take(CpuMeter(server.pid)))
    return {"levels": levels, "machine_load": load}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[int, dict[str, float]]]:
    """Per variant and concurrency: best images/s over the rounds and that round's p50."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for name, rounds in runs.items():
        table[name] = {}
        for run in rounds:
            for level in run["levels"]:
                row = table[name].get(level["concurrency"])
                if row is None or level["images_per_s"] > row["images_per_s"]:
                    table[name][level["concurrency"]] = {
                        "images_per_s": level["images_per_s"],
                        "p50_ms": level["latency_ms"]["p50"],
                        "unet_ms_per_request": level["stages"]["component_ms_per_request"]["unet"],
                        "own_ms_per_request": level["stages"]["pipeline_own_ms_per_request"],
                    }
    return table


def render_markdown(payload: dict[str, Any]) -> str:
    """The comparison as a markdown table, baseline first."""
    table, env = payload["summary"], payload["environment"]
    names = list(table)
    lines = [
        "## ONNX Runtime session settings, served",
        "",
        (
            f"Command: `{payload['command']}`. {env['cpu_count']} CPUs, onnxruntime "
            f"{env['onnxruntime']}, commit `{env['git_commit']}`, {env['timestamp_utc']}. "
            f"Demo pipeline, mix `{payload['mix']}`, {payload['args']['steps']} steps, "
            f"{payload['args']['requests']} requests per level, best of "
            f"{payload['args']['rounds']} rounds (variants interleaved)."
        ),
        "",
        "| variant | concurrency | images/s | vs baseline | p50 (ms) | UNet ms/request "
        "| pipeline's own + idle ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        for c, row in table[name].items():
            base = table[names[0]][c]["images_per_s"]
            lines.append(
                f"| {name} | {c} | {row['images_per_s']:.2f} | {row['images_per_s'] / base:.2f} "
                f"| {row['p50_ms']:.0f} | {row['unet_ms_per_request']:.1f} "
                f"| {row['own_ms_per_request']:.1f} |"
            )
    loads = [r["machine_load"]["foreign_cores"] for rs in payload["runs"].values() for r in rs]
    lines += ["", f"Other processes kept up to {max(loads):.2f} cores busy during a run.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--repository", type=Path, default=ROOT / "build" / "model_repository")
    add("--size", default="128x128", help="demo WIDTHxHEIGHT (128x128)")
    add("--steps", type=int, default=10)
    add("--concurrency", type=parse_concurrency, default=[1, 8])
    add("--mix", type=parse_mix, default=parse_mix("inpaint:3,txt2img:1"))
    add("--requests", type=int, default=16)
    add("--rounds", type=int, default=2, help="runs of every variant, interleaved (2)")
    add("--seed", type=int, default=7)
    add("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    mix = [MixEntry(k, w, *(size or (height, width))) for k, w, size in args.mix]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        repos = {
            name: variant_repository(args.repository, Path(tmp) / f"variant{i}", params)
            for i, (name, params) in enumerate(VARIANTS.items())
        }
        for _ in range(args.rounds):
            for name, repo in repos.items():
                runs[name].append(measure(repo, args, mix))
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "mix": ",".join(f"{e.kind}@{e.width}x{e.height}:{e.weight}" for e in mix),
        "environment": environment(),
        "variants": VARIANTS,
        "runs": runs,
        "summary": summarize(runs),
    }
    markdown = render_markdown(payload)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ort_tuning.json").write_text(json.dumps(payload, indent=1, default=str))
    (args.out_dir / "ort_tuning.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
