"""What streaming costs: images/s with half the clients streaming previews vs all unary, and
how late a progress event reaches its client (issue 18).

One tritonserver serves the demo repository. `concurrency` closed-loop clients (one SDK client
each) send inpainting requests back to back, in two modes, alternating ABAB over `repeats`:

* **unary**: every client calls `InpaintClient.generate`;
* **half streaming**: half the clients call `InpaintClient.stream` with `preview_every`, the
  others `generate`.

Images/s is images over the wall time of the round; the summary gives the ratio of the modes'
median images/s and, robust to a shared machine's drift, the median of each pair's ratio. A
progress event's latency is the client's clock when the event arrives minus `Progress.time_s`,
the server's clock when its step ended (same machine: same clock).

Usage (from the repository root):

    .venv/bin/python benchmarks/streaming.py
    .venv/bin/python benchmarks/streaming.py --requests 48 --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, environment, make_inputs, start_server, wait_ready

from sdserve_client import GenerationRequest, InpaintClient
from sdserve_protocol.events import Progress

UNARY, HALF = "unary", "half streaming"


def run_round(
    url: str, mode: str, requests: int, concurrency: int, steps: int, preview_every: int,
    size: int,
) -> dict[str, Any]:  # fmt: skip
    """`requests` requests from `concurrency` closed-loop clients; images/s and latencies."""
    image, mask = make_inputs(size, size)
    todo = list(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    images = [0]
    errors: list[Exception] = []

    def client_loop(index: int) -> None:
        streaming = mode == HALF and index % 2 == 0
        with InpaintClient(url) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    seed = todo.pop()
                request = GenerationRequest(
                    "a red bicycle", image=image, mask=mask, steps=steps, seed=seed,
                    scheduler="euler", preview_every=preview_every if streaming else None,
                )  # fmt: skip
                try:
                    if streaming:
                        late = []
                        for event in client.stream(request):
                            if isinstance(event, Progress):
                                late.append(time.time() - event.time_s)
                        count = len(event.seeds)
                    else:
                        late, count = [], len(client.generate(request).seeds)
                except Exception as exc:  # noqa: BLE001 (reported)
                    with lock:
                        errors.append(exc)
                    continue
                with lock:
                    latencies.extend(late)
                    images[0] += count

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]}")
    return {"mode": mode, "seconds": elapsed, "images": images[0],
            "images_per_s": images[0] / elapsed, "event_latencies_s": latencies}  # fmt: skip


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode = {m: [r for r in rounds if r["mode"] == m] for m in (UNARY, HALF)}
    rates = {m: statistics.median(r["images_per_s"] for r in rs) for m, rs in by_mode.items()}
    late = sorted(x for r in by_mode[HALF] for x in r["event_latencies_s"])
    paired = zip(by_mode[UNARY], by_mode[HALF], strict=True)
    pairs = [half["images_per_s"] / unary["images_per_s"] for unary, half in paired]
    return {
        "images_per_s": rates,
        "ratio_half_streaming_to_unary": rates[HALF] / rates[UNARY],
        # each ABAB pair's own ratio: robust to the machine's drift over the run
        "pair_ratios": [round(r, 3) for r in pairs],
        "median_pair_ratio": statistics.median(pairs),
        "progress_events": len(late),
        "event_latency_ms": {
            "median": 1e3 * float(np.percentile(late, 50)),
            "p99": 1e3 * float(np.percentile(late, 99)),
            "max": 1e3 * late[-1],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "build/model_repository")
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preview-every", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="square image side")
    parser.add_argument("--repeats", type=int, default=2, help="ABAB pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/streaming.json")
    args = parser.parse_args()
    started = time.perf_counter()
    with start_server(args.repository) as server:
        wait_ready(server, started)
        options = dict(requests=args.requests, concurrency=args.concurrency, steps=args.steps,
                       preview_every=args.preview_every, size=args.size)  # fmt: skip
        run_round(server.grpc_url, UNARY, **{**options, "requests": args.concurrency})  # warm
        rounds = []
        for _ in range(args.repeats):
            for mode in (UNARY, HALF):
                rounds.append(run_round(server.grpc_url, mode, **options))
                print(f"{mode}: {rounds[-1]['images_per_s']:.2f} images/s")
    summary = summarize(rounds)
    report = {
        "benchmark": "streaming",
        "settings": vars(args) | {"repository": str(args.repository), "out": str(args.out)},
        "environment": environment(),
        "summary": summary,
        "rounds": [{k: v for k, v in r.items() if k != "event_latencies_s"} for r in rounds],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
