"""Time to first image of a checkpoint loaded on demand (issue 17), through a real tritonserver.

Two checkpoints of the same architecture (the demo pipeline with two weight seeds, or two
given pipeline folders), both exported with `--load-on-demand` into one repository, served
with a checkpoint budget that holds one of them. Each round requests A (cold: loaded from
disk, evicting B), A again (warm), B (cold, evicting A), B again (warm). Beside it, diffusers'
own cold start on the same folder: `from_pretrained` and a first image.

Graph reuse: two more checkpoints, C and D (the demo with seeds 2 and 3, or B's folder
twice), exported with `--share-graph-with ckpt_a`: they run on A's component models with
their own weights swapped in (`sdserve_pipeline.shared_graph`). With A loaded, and A's
runners' variant cache (`adapter_cache_mb`) set to hold one checkpoint's weights, not two,
each round requests C (cold: its weights read and a session built in each loaded runner,
evicting D's), C again (warm), D (cold), D again (warm).

Usage (from the repository root; builds the demo pipelines and the repository in a temporary
folder unless given):

    .venv/bin/python benchmarks/checkpoint_switch.py [--pipelines DIR DIR] [--rounds 3]

Writes `benchmarks/results/checkpoint_switch.json`: cold and warm times both ways, and
`cold_load_over_cold_graph_reuse`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import ROOT, environment, make_inputs

from sdserve_client import GenerationRequest, InpaintClient
from sdserve_export.demo_pipeline import save_demo_pipeline
from sdserve_export.repository import build_repository
from sdserve_export.triton_configs import parse_pbtxt, to_pbtxt
from sdserve_pipeline.checkpoints import model_bytes
from sdserve_pipeline.inprocess import read_parameters
from sdserve_pipeline.triton_server import TritonServer
from sdserve_protocol.settings import PipelineSettings

NAMES = ("ckpt_a", "ckpt_b")
SHARED = ("ckpt_c", "ckpt_d")  # on ckpt_a's component models (--share-graph-with ckpt_a)
STEPS = 4


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _request() -> GenerationRequest:
    image, mask = make_inputs(64, 64)
    return GenerationRequest("a red bicycle", image=image, mask=mask, steps=STEPS, seed=1)


def _checkpoint_mb(repository: Path, name: str) -> float:
    settings = PipelineSettings.from_parameters(read_parameters(repository / name))
    return sum(model_bytes(repository, m) for m in settings.components.values()) / 2**20


def _diffusers_cold(folder: Path) -> float:
    """diffusers' cold start: load the pipeline from disk and make a first image."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    def run() -> None:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
        image, mask = make_inputs(64, 64)
        from PIL import Image

        pipe(
            "a red bicycle", image=Image.fromarray(image), mask_image=Image.fromarray(mask),
            height=64, width=64, num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    return _time(run)


def _one_variant_cache(repository: Path, pipeline: str) -> dict[str, int]:
    """Set `adapter_cache_mb` of `pipeline`'s component models to hold one weight variant
    (1.5x its weights), not two, so that alternating two shared-graph checkpoints makes each
    request cold; returns model → MB set."""
    settings = PipelineSettings.from_parameters(read_parameters(repository / pipeline))
    cache = {}
    for model in settings.components.values():
        config_file = repository / model / "config.pbtxt"
        config = parse_pbtxt(config_file.read_text())
        cache[model] = math.ceil(1.5 * model_bytes(repository, model) / 2**20)
        config.parameters["adapter_cache_mb"].string_value = str(cache[model])
        config_file.write_text(to_pbtxt(config))
    return cache


def _rounds(clients: dict[str, InpaintClient], names: tuple[str, ...], rounds: int) -> dict:
    """Each round: per checkpoint, a cold request then a warm one; their times."""
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    for _ in range(rounds):
        for name in names:
            times["cold"].append(_time(lambda n=name: clients[n].generate(_request())))
            times["warm"].append(_time(lambda n=name: clients[n].generate(_request())))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", nargs=2, type=Path, help="two diffusers folders")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/checkpoint_switch.json"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = args.pipelines or [
            save_demo_pipeline(work / f"pipe{seed}", seed=seed) for seed in (0, 1)
        ]
        shared_folders = [folders[1]] * 2 if args.pipelines else [
            save_demo_pipeline(work / f"pipe{seed}", seed=seed) for seed in (2, 3)
        ]  # fmt: skip
        repository = work / "repo"
        for name, folder in zip(NAMES, folders, strict=True):
            build_repository(
                folder, repository, pipeline_name=name, component_prefix=f"{name}_",
                load_on_demand=True, log=lambda _msg: None,
            )  # fmt: skip
        for name, folder in zip(SHARED, shared_folders, strict=True):
            build_repository(
                folder, repository, pipeline_name=name, share_graph_with=NAMES[0],
                load_on_demand=True, log=lambda _msg: None,
            )  # fmt: skip
        variant_cache_mb = _one_variant_cache(repository, NAMES[0])
        sizes = {name: _checkpoint_mb(repository, name) for name in NAMES}
        budget_mb = 1.5 * max(sizes.values())  # one fits, not two
        with TritonServer(
            repository, http_port=0, grpc_port=0, metrics_port=0, build_dir=work / "build",
            checkpoint_budget_mb=f"{budget_mb:.3f}",
        ) as server:  # fmt: skip
            server.wait_ready(timeout_s=300)
            clients = {n: InpaintClient(server.grpc_url, model=n) for n in (*NAMES, *SHARED)}
            times = _rounds(clients, NAMES, args.rounds)  # cold: a Triton load
            clients[NAMES[0]].generate(_request())  # A's graph loaded for C and D
            reuse = _rounds(clients, SHARED, args.rounds)  # cold: weights into A's graph
            for client in clients.values():
                client.close()
        diffusers = [_diffusers_cold(Path(folders[0])) for _ in range(args.rounds)]
    cold, warm = statistics.median(times["cold"]), statistics.median(times["warm"])
    reuse_cold, reuse_warm = statistics.median(reuse["cold"]), statistics.median(reuse["warm"])
    result = {
        "what": "time to first image of a checkpoint loaded on demand through tritonserver, "
        f"64x64 inpainting, {STEPS} steps; budget holds one of two checkpoints, so each cold "
        "request also unloads the other",
        "pipelines": [str(f) for f in args.pipelines] if args.pipelines else "demo seeds 0, 1",
        "checkpoint_mb": sizes,
        "budget_mb": round(budget_mb, 1),
        "rounds": args.rounds,
        "cold_s": times["cold"],
        "warm_s": times["warm"],
        "cold_median_s": round(cold, 3),
        "warm_median_s": round(warm, 3),
        "cold_over_warm": round(cold / warm, 1),
        "diffusers_from_pretrained_and_first_image_s": diffusers,
        "diffusers_median_s": round(statistics.median(diffusers), 3),
        "graph_reuse": "checkpoints C, D exported with --share-graph-with ckpt_a: a cold one "
        "swaps its weights into A's loaded graph (A's runners' variant cache holds one "
        "checkpoint's weights, so alternating C and D makes each first request cold)",
        "graph_reuse_variant_cache_mb": variant_cache_mb,
        "graph_reuse_cold_s": reuse["cold"],
        "graph_reuse_warm_s": reuse["warm"],
        "graph_reuse_cold_median_s": round(reuse_cold, 3),
        "graph_reuse_warm_median_s": round(reuse_warm, 3),
        "cold_load_over_cold_graph_reuse": round(cold / reuse_cold, 1),
        "environment": environment(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
