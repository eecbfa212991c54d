"""Soak: many mixed requests through a real tritonserver, with a component crash mid-run.

Serves the demo SD 1.5 pipeline (`inpaint`) and the demo SDXL one (`inpaint_xl`) from one
repository and sends `--requests` requests from `--concurrency` closed-loop clients: inpaint,
text-to-image, outpaint, SDXL inpaint, requests the client cancels, and invalid ones (sent
raw, so that the server, not the SDK, refuses them). When `--crash-at` requests have been
answered, the UNet's backend stub is SIGKILLed (as the OOM killer would); the launcher's
watchdog reloads it.

Checked and written to `--out` (JSON):
- every request answered (a result or an error) before its deadline: no hang;
- the server's `sdserve_requests_total` counters, by outcome, add up to the requests sent;
- the server's RSS (tritonserver and its stubs) at request 200 (a fifth of a shorter run) and
  at the end: growth <= 10 %;
- seeded requests give the same images after the crash as before it.

Usage (from the repository root; about ten minutes on 2 cores):

    .venv/bin/python benchmarks/soak.py [--requests 1000] [--concurrency 8] [--crash-at 500]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from common import PROMPT, ROOT, environment, make_inputs
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from sdserve_client import GenerationRequest, InpaintClient, SdserveError, infer_inputs
from sdserve_client.webui.server_info import fetch_metrics, outcome_counts
from sdserve_pipeline.healing import python_stubs
from sdserve_pipeline.triton_server import TritonServer, process_group_members
from sdserve_protocol.metrics import OUTCOMES

MODELS = ("inpaint", "inpaint_xl")
# Request kinds and their share of the mix (one in ten of each rare kind).
KINDS = ("inpaint",) * 4 + ("txt2img",) * 2 + ("outpaint", "sdxl", "cancel", "invalid")
DEADLINE_S = 300.0


def build_repository(out: Path) -> Path:
    """The demo SD 1.5 and SDXL pipelines exported into one repository (once)."""
    from sdserve_export.demo_pipeline import save_demo_pipeline, save_demo_xl_pipeline
    from sdserve_export.repository import build_repository as export

    repository = out / "model_repository"
    if (repository / "inpaint_xl" / "config.pbtxt").is_file():
        return repository
    quiet: Callable[[str], None] = lambda message: None  # noqa: E731
    export(save_demo_pipeline(out / "demo"), repository, log=quiet)
    export(save_demo_xl_pipeline(out / "demo-xl"), repository, "inpaint_xl", "xl_", log=quiet)
    return repository


def server_rss_kib(server: TritonServer) -> int:
    """Resident memory of tritonserver and its backend stubs, KiB."""
    total = 0
    for pid in process_group_members(server.pid or 0):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total


def outcomes_by_model(metrics_url: str) -> dict[str, dict[str, int]]:
    """`sdserve_requests_total` by model and outcome, from the metrics endpoint (all 0 for a
    model that publishes none)."""
    text = fetch_metrics(metrics_url, timeout=10) or ""
    return {m: outcome_counts(text, m) or dict.fromkeys(OUTCOMES, 0) for m in MODELS}


def invalid_request(url: str) -> str:
    """A request the server must refuse (steps far beyond the limit), sent raw."""
    tensors = {
        "prompt": np.array([[PROMPT.encode()]], np.object_),
        "steps": np.array([[100_000]], np.int32),
        "height": np.array([[64]], np.int32),
        "width": np.array([[64]], np.int32),
    }
    with grpcclient.InferenceServerClient(url) as client:
        try:
            client.infer("inpaint", infer_inputs(tensors), client_timeout=DEADLINE_S)
        except InferenceServerException as exc:
            return str(exc.status())
    return "accepted"


class Soak:
    """The closed loop: `concurrency` clients take request numbers until none are left."""

    def __init__(self, server: TritonServer, args: argparse.Namespace) -> None:
        self.server, self.args = server, args
        self.image, self.mask = make_inputs(64, 64, seed=2)
        self.results: Counter[tuple[str, str]] = Counter()  # (kind, status) → count
        self.sent: Counter[str] = Counter()  # model → requests sent to it
        self.answered = 0
        self.rss: dict[str, int] = {}
        self.rss_at = min(200, args.requests // 5)  # the first RSS reading, after warm-up
        self.crash: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.numbers = iter(range(args.requests))
        self.bar = tqdm(total=args.requests, desc="soak", unit="req", file=sys.stderr)

    def request(self, clients: dict[str, InpaintClient], i: int) -> tuple[str, str]:
        kind = KINDS[i % len(KINDS)]
        seed = 1000 + i
        common = {"steps": 3, "seed": seed, "timeout": DEADLINE_S}
        if kind == "invalid":
            return kind, invalid_request(self.server.grpc_url)
        client = clients["inpaint"]
        try:
            if kind == "inpaint":
                client.inpaint(self.image, self.mask, PROMPT, **common)
            elif kind == "txt2img":
                client.text_to_image(PROMPT, 64, 64, **common)
            elif kind == "outpaint":
                client.outpaint(self.image, PROMPT, right=32, **common)
            elif kind == "sdxl":
                clients["inpaint_xl"].inpaint(self.image, self.mask, PROMPT, **common)
            else:  # cancel: sent, then cancelled while it runs
                request = GenerationRequest(PROMPT, image=self.image, mask=self.mask, steps=40,
                                            seed=seed)  # fmt: skip
                pending = client.submit(request, timeout=DEADLINE_S)
                time.sleep(0.3)
                pending.cancel()
                pending.result(timeout=DEADLINE_S)
        except SdserveError as exc:
            return kind, exc.status or "client"
        return kind, "ok"

    def worker(self) -> None:
        clients = {m: InpaintClient(self.server.grpc_url, model=m) for m in MODELS}
        try:
            for i in self.numbers:
                kind, status = self.request(clients, i)
                with self.lock:
                    self.sent["inpaint_xl" if kind == "sdxl" else "inpaint"] += 1
                    self.results[kind, status] += 1
                    self.answered += 1
                    answered = self.answered
                self.bar.update()
                if answered == self.rss_at:
                    self.rss["first_kib"] = server_rss_kib(self.server)
                if answered == self.args.crash_at:
                    self.kill_unet()
        finally:
            for client in clients.values():
                client.close()

    def kill_unet(self) -> None:
        (pid,) = python_stubs(self.server.pid or 0)["unet"]
        os.kill(pid, signal.SIGKILL)
        self.crash = {"at_request": self.answered, "stub_pid": pid, "time": time.monotonic()}
        tqdm.write(f"soak: SIGKILLed the UNet stub (pid {pid})")

    def run(self) -> float:
        threads = [threading.Thread(target=self.worker) for _ in range(self.args.concurrency)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.bar.close()
        return time.perf_counter() - start


def reference_images(url: str, seeds: list[int]) -> list[np.ndarray]:
    image, mask = make_inputs(64, 64, seed=2)
    with InpaintClient(url, timeout=DEADLINE_S) as client:
        return [client.inpaint(image, mask, PROMPT, steps=3, seed=s).arrays[0] for s in seeds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--crash-at", type=int, default=500, help="answered requests; 0: none")
    parser.add_argument("--build", type=Path, default=ROOT / "build" / "soak")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak.json")
    args = parser.parse_args(argv)

    repository = build_repository(args.build)
    events: list[str] = []
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0,
                      build_dir=args.build, on_event=events.append) as server:  # fmt: skip
        server.wait_ready(600)
        seeds = [7, 8, 9]
        before = reference_images(server.grpc_url, seeds)
        counts_before = outcomes_by_model(server.metrics_url)
        soak = Soak(server, args)
        elapsed = soak.run()
        time.sleep(1.0)  # the last answers' metrics
        counts = outcomes_by_model(server.metrics_url)
        rss_end = server_rss_kib(server)
        ready_by = time.monotonic() + 300  # a crash late in a short run: the reload may go on
        while not server.control.is_ready() and time.monotonic() < ready_by:
            time.sleep(0.5)
        after = reference_images(server.grpc_url, seeds)
        reloads = list(server.watchdog.reloads) if server.watchdog else []
    counted = {m: {o: counts[m][o] - counts_before[m][o] for o in OUTCOMES} for m in MODELS}
    hung = sum(n for (_, status), n in soak.results.items() if "DEADLINE" in status)
    checks = {
        "every_request_answered": hung == 0 and soak.answered == args.requests,
        "counters_add_up": all(sum(counted[m].values()) == soak.sent[m] for m in MODELS),
        "rss_growth_at_most_10pct": rss_end / soak.rss["first_kib"] - 1 <= 0.10,
        "same_images_after_crash": all(
            np.array_equal(a, b) for a, b in zip(before, after, strict=True)
        ),
        "unet_reloaded": (not args.crash_at) or any(m == "unet" for m, _ in reloads),
    }
    result = {
        "config": vars(args) | {"build": str(args.build), "out": str(args.out)},
        "environment": environment(),
        "elapsed_s": elapsed,
        "client_results": {f"{k}: {s}": n for (k, s), n in sorted(soak.results.items())},
        "sent_by_model": dict(soak.sent),
        "server_outcomes": counted,
        "rss_kib": {
            f"at_{soak.rss_at}": soak.rss["first_kib"],
            "at_end": rss_end,
            "growth": rss_end / soak.rss["first_kib"] - 1,
        },  # fmt: skip
        "crash": {k: v for k, v in soak.crash.items() if k != "time"},
        "watchdog": {"reloads": reloads, "events": events},
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = ("client_results", "server_outcomes", "rss_kib", "watchdog", "checks")
    print(json.dumps({k: result[k] for k in summary}, indent=2, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
