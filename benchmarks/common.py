"""What the benchmark scripts share, so that no script imports another.

* paths and constants (`ROOT`, the model names, the settle pause);
* command-line parsers (`parse_size`, `parse_concurrency`, `parse_mix`);
* the environment a result came from (`environment`, `git_commit`);
* CPU clocks and the machine's other load (`CpuMeter`, `Snapshot`, `machine_load`) and the
  fp32 GEMM reference (`gemm_gflops`);
* requests and request paths (`make_inputs`, `make_request`, `mix_requests`,
  `inprocess_path`, `served_path`);
* the served side: `start_server`, `wait_ready`, Triton's statistics (`fetch_statistics`,
  `stage_breakdown`) and the closed-loop concurrency sweep (`ClosedLoop`, `sweep_level`);
* the full-size SD 1.5-inpainting architecture with random weights (`ensure_full_size`).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tritonclient.grpc as grpcclient
from tqdm import tqdm

from sdserve_client import GenerationRequest, InpaintClient, encode_request, infer_inputs
from sdserve_client.webui.server_info import fetch_metrics, metric_value
from sdserve_pipeline.service import PipelineService
from sdserve_pipeline.triton_server import TritonServer, process_group_members
from sdserve_protocol.metrics import QUEUE_DURATION_METRIC

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red bicycle"
PIPELINE_MODEL = "inpaint"
COMPONENTS = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
# Untimed pause before each request, so ONNX Runtime's spinning worker threads of the
# previous request (in either process) have gone idle when the clock starts.
SETTLE_S = 0.2
# Above this many cores kept busy by other processes, wall times are flagged as unreliable.
FOREIGN_LOAD_WARNING = 0.25
GEMM_SIZE = 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The full-size architecture: its diffusers folder and its built Triton repository.
PIPELINE_FOLDER = ROOT / "build" / "bench" / "full-sd15-inpaint"
REPOSITORY = ROOT / "build" / "bench" / "full_repository"

# One request path: GenerationRequest → (N, H, W, 3) uint8 images.
Generate = Callable[[GenerationRequest], np.ndarray]


# --- arguments -------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """Parses `WIDTHxHEIGHT` (or a single number for a square) into (height, width).

    Args:
        text (`str`): e.g. `"256x256"`, `"512x384"` or `"256"`.

    Returns:
        `(height, width)` in pixels.
    """
    try:
        numbers = [int(p) for p in text.lower().split("x")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) <= 0:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 256x256, got {text!r}")
    width, height = numbers if len(numbers) == 2 else numbers * 2
    return height, width


def parse_concurrency(text: str) -> list[int]:
    """Parses `1,2,4,8` into a sorted list of positive ints."""
    try:
        levels = sorted({int(part) for part in text.split(",")})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,2,4,8, got {text!r}")
    return levels


def parse_mix(text: str) -> list[tuple[str, int, tuple[int, int] | None]]:
    """Parses `inpaint:3,txt2img@64x64:1` into (kind, weight, size or None) triples.

    Args:
        text (`str`): comma-separated `KIND[@WxH]:WEIGHT`; KIND is `inpaint` or `txt2img`;
            without `@WxH` the entry uses `--size`.
    """
    entries = []
    for part in text.split(","):
        head, _, weight = part.partition(":")
        kind, _, size = head.partition("@")
        if kind not in ("inpaint", "txt2img") or not weight.isdigit() or int(weight) < 1:
            raise argparse.ArgumentTypeError(f"bad mix entry {part!r}: want KIND[@WxH]:WEIGHT")
        entries.append((kind, int(weight), parse_size(size) if size else None))
    return entries


# --- environment -----------------------------------------------------------------------------


def git_commit() -> str | None:
    """The checked-out commit of the project (with `-dirty` if modified), if known."""
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Facts about the machine and software the numbers came from."""
    import onnxruntime

    return {
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
    }


# --- CPU clocks and the machine reference ----------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads); 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from `/proc/stat`."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


class CpuMeter:
    """CPU seconds of the system under test: this process plus every server process.

    Args:
        server_pid (`int`): the server's pid, which leads the group of its backend stubs.
    """

    def __init__(self, server_pid: int) -> None:
        self.pids = [os.getpid(), *process_group_members(server_pid)]

    def __call__(self) -> float:
        """Total CPU seconds used so far by the measured processes."""
        return sum(process_cpu_seconds(pid) for pid in self.pids)


@dataclass(frozen=True)
class Snapshot:
    """Machine-wide and measured CPU seconds at one moment (see `machine_load`)."""

    wall: float
    busy: float
    steal: float
    measured: float

    @classmethod
    def take(cls, cpu: CpuMeter) -> Snapshot:
        """Reads the clocks now."""
        busy, steal = system_cpu_seconds()
        return cls(wall=time.perf_counter(), busy=busy, steal=steal, measured=cpu())


def machine_load(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """How busy the rest of the machine was between two snapshots.

    Returns:
        `foreign_cores`: cores kept busy on average by processes outside the measurement;
        `steal_cores`: cores taken on average by the hypervisor.
    """
    elapsed = after.wall - before.wall
    foreign = (after.busy - before.busy) - (after.measured - before.measured)
    return {
        "foreign_cores": max(0.0, foreign) / elapsed,
        "steal_cores": (after.steal - before.steal) / elapsed,
    }


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemm_gflops(size: int = GEMM_SIZE, reps: int = 3, dtype: str = "float32") -> float:
    """Best-of-`reps` `torch.matmul` throughput on `size`² matrices of `dtype`, in GFLOP/s."""
    import torch

    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    best = min(timed(lambda: torch.matmul(a, b)) for _ in range(reps))
    return 2 * size**3 / best / 1e9


# --- requests and request paths --------------------------------------------------------------


def make_inputs(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random RGB image and a rectangular mask (255 = regenerate) over its middle.

    Args:
        height (`int`): image height.
        width (`int`): image width.
        seed (`int`, *optional*, defaults to 0): seed of the image's pixels.

    Returns:
        `(image, mask)`: uint8 (H, W, 3) and uint8 (H, W).
    """
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return image, mask


@dataclass(frozen=True)
class MixEntry:
    """One kind of request in the sweep's mix.

    Args:
        kind (`str`): `inpaint` (image + mask) or `txt2img`.
        weight (`int`): relative frequency.
        height (`int`): image height.
        width (`int`): image width.
    """

    kind: str
    weight: int
    height: int
    width: int


def make_request(kind: str, height: int, width: int, steps: int, seed: int) -> GenerationRequest:
    """An inpainting (random image, centre mask) or text-to-image request.

    `preserve_unmasked` is off so the output is exactly what diffusers computes.
    """
    if kind == "txt2img":
        return GenerationRequest(
            PROMPT, height=height, width=width, steps=steps, seed=seed, preserve_unmasked=False
        )
    image, mask = make_inputs(height, width)
    return GenerationRequest(
        PROMPT, image=image, mask=mask, steps=steps, seed=seed, preserve_unmasked=False
    )


def mix_requests(mix: list[MixEntry], count: int, steps: int, seed: int) -> list[GenerationRequest]:
    """`count` requests drawn from the mix (a fixed shuffle, so every level gets the same)."""
    kinds = [entry for entry in mix for _ in range(entry.weight)]
    rng = random.Random(seed)
    chosen = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(chosen)
    return [make_request(e.kind, e.height, e.width, steps, seed + i) for i, e in enumerate(chosen)]


def inprocess_path(service: PipelineService) -> Generate:
    """The in-process path: the request's wire tensors straight into the service."""

    def generate(request: GenerationRequest) -> np.ndarray:
        return service.generate(encode_request(request))["images"]

    return generate


def served_path(client: InpaintClient) -> Generate:
    """The served path: the request over gRPC to the pipeline model."""

    def generate(request: GenerationRequest) -> np.ndarray:
        return client.generate(request).arrays

    return generate


# --- the server and its statistics -----------------------------------------------------------


def start_server(repository: Path) -> TritonServer:
    """A tritonserver on free ports for `repository` (started by the caller's `with`)."""
    return TritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, exit_timeout_s=5,
        build_dir=ROOT / "build",
    )  # fmt: skip


def wait_ready(server: TritonServer, started: float) -> float:
    """Waits until every model of `server` is ready; returns seconds since `started`."""
    server.wait_ready(timeout_s=600, on_progress=lambda s: tqdm.write(f"tritonserver: {s}"))
    return time.perf_counter() - started


def fetch_statistics(
    url: str, metrics_url: str | None = None, headers: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Cumulative statistics of every model: counts and nanoseconds per stage.

    Triton's statistics API is closed behind the operator's key: `headers` carries it
    (`TritonServer.admin_key.grpc_headers`).

    With `metrics_url`, the pipeline's own queue wait (`sdserve_queue_duration_us`: its
    batcher holds the queue, so Triton's `queue` stays near zero for it) is added to its
    `queue` nanoseconds.
    """
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True, headers=headers)
    finally:
        client.close()
    table = {}
    for model in stats["model_stats"]:
        infer = model.get("inference_stats", {})
        row = {key: float(infer.get(key, {}).get("ns", 0)) for key in _STAGE_KEYS}
        row["requests"] = float(infer.get("success", {}).get("count", 0))
        row["executions"] = float(model.get("execution_count", 0))
        table[model["name"]] = row
    if metrics_url is not None and PIPELINE_MODEL in table:
        metrics = fetch_metrics(metrics_url, timeout=10)
        if metrics is None:
            raise RuntimeError(f"metrics endpoint {metrics_url} did not answer")
        waited_us = metric_value(metrics, QUEUE_DURATION_METRIC, PIPELINE_MODEL) or 0.0
        table[PIPELINE_MODEL]["queue"] += waited_us * 1e3
    return table


_STAGE_KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def stage_breakdown(
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    requests: int,
    elapsed_s: float,
    steps: int,
) -> dict[str, Any]:
    """Where the window's time went, per request, from two statistics snapshots.

    The pipeline model batches step by step (`sdserve_pipeline.batcher`): one UNet call
    serves every request at that point of its run, so component time is amortised: each
    component's busy time in the window (queue + compute) divided by the requests served.
    What is left of `elapsed / requests` is the pipeline's own work (parsing, pre/post-
    processing, scheduler steps, CFG, BLS round trips) plus any idle time.

    Args:
        before (`dict`): `fetch_statistics` at the start of the window.
        after (`dict`): `fetch_statistics` at its end.
        requests (`int`): requests completed in the window.
        elapsed_s (`float`): the window's wall time.
        steps (`int`): denoising steps per request (for UNet calls per request-step).

    Returns:
        amortised ms per request per component and for the pipeline itself, UNet calls per
        request-step (1.0: no batching; 1/c: c requests in every call), ms per component
        call, and the pipeline model's queue wait and in-Triton time per request.
    """
    delta = {name: {k: after[name][k] - before[name].get(k, 0.0) for k in after[name]}
             for name in after}  # fmt: skip
    pipe, served = delta[PIPELINE_MODEL], max(requests, 1)
    busy = {
        name: sum(
            delta[name][k] for k in ("queue", "compute_input", "compute_infer", "compute_output")
        )
        / served
        / 1e6  # fmt: skip
        for name in COMPONENTS
    }
    window_ms = elapsed_s * 1e3 / served
    return {
        "requests": pipe["requests"],
        "requests_sent": requests,
        "window_ms_per_request": window_ms,
        "component_ms_per_request": busy,
        "pipeline_own_ms_per_request": window_ms - sum(busy.values()),
        "unet_calls_per_request_step": delta["unet"]["executions"] / (served * steps),
        "pipeline_queue_ms_per_request": pipe["queue"] / max(pipe["requests"], 1.0) / 1e6,
        "pipeline_request_ms": pipe["success"] / max(pipe["requests"], 1.0) / 1e6,
        "per_call_ms": {
            name: delta[name]["compute_infer"] / max(delta[name]["executions"], 1.0) / 1e6
            for name in COMPONENTS
        },
    }


# --- concurrency sweep -----------------------------------------------------------------------


class ClosedLoop:
    """`concurrency` clients send requests back to back on tritonclient's async gRPC API
    (`async_infer`: each completion callback sends that client's next request).

    One client (gRPC channel) per caller, as independent callers have.
    """

    def __init__(self, url: str, requests: list[GenerationRequest], bar: tqdm) -> None:
        self.queue = list(
            reversed([infer_inputs(encode_request(r, batched=True)) for r in requests])
        )
        self.bar = bar
        self.url = url
        self.latencies: list[float] = []
        self.images = 0
        self.errors: list[Exception] = []
        self._lock = threading.Lock()
        self._idle = threading.Semaphore(0)

    def run(self, concurrency: int) -> float:
        """Send every request; the elapsed seconds."""
        clients = [grpcclient.InferenceServerClient(self.url) for _ in range(concurrency)]
        try:
            for client in clients:  # connect before the clock starts
                client.is_server_ready()
            started = time.perf_counter()
            for client in clients:
                self._send_next(client)
            for _ in clients:
                self._idle.acquire()
            elapsed = time.perf_counter() - started
        finally:
            for client in clients:
                client.close()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} requests failed; first: {self.errors[0]}")
        return elapsed

    def _send_next(self, client: Any) -> None:
        with self._lock:
            if not self.queue:
                self._idle.release()
                return
            inputs = self.queue.pop()
        start = time.perf_counter()

        def done(result: Any, error: Exception | None) -> None:
            with self._lock:
                if error is not None:
                    self.errors.append(error)
                else:
                    self.latencies.append(time.perf_counter() - start)
                    self.images += result.as_numpy("images").shape[1]  # (1, N, H, W, 3)
            self.bar.update()
            self._send_next(client)

        client.async_infer(PIPELINE_MODEL, inputs, done)


def sweep_level(
    url: str,
    requests: list[GenerationRequest],
    concurrency: int,
    bar: tqdm,
    steps: int,
    metrics_url: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One concurrency level: warm-up round, then the timed window with statistics
    (`headers`: the admin key for Triton's statistics API)."""
    ClosedLoop(url, requests[:concurrency], bar).run(concurrency)  # warm-up
    before = fetch_statistics(url, metrics_url, headers)
    loop = ClosedLoop(url, requests, bar)
    elapsed = loop.run(concurrency)
    after = fetch_statistics(url, metrics_url, headers)
    latencies = loop.latencies
    quantiles = np.percentile(latencies, [50, 95, 99]) * 1e3
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "images": loop.images,
        "elapsed_s": elapsed,
        "images_per_s": loop.images / elapsed,
        "latency_ms": dict(zip(("p50", "p95", "p99"), quantiles.tolist(), strict=True)),
        "latency_ms_mean": statistics.mean(latencies) * 1e3,
        "stages": stage_breakdown(before, after, len(latencies), elapsed, steps),
    }


# --- full-size SD 1.5-inpainting, random weights ---------------------------------------------


def sd15_unet() -> UNet2DConditionModel:
    """SD 1.5-inpainting's UNet config: 9 input channels, 860 M parameters."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    )


def sd15_vae() -> AutoencoderKL:
    """SD 1.5's AutoencoderKL config (83 M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_text_encoder() -> CLIPTextModel:
    """CLIP ViT-L/14's text tower, as SD 1.5 uses it (123 M parameters)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdserve_pipeline.components import CLIP_VOCAB_SIZE

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_full_size_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """The full-size inpainting pipeline with weights drawn from `torch.manual_seed(seed)`.

    Args:
        seed (`int`, *optional*, defaults to 0): seed of the random weights.
    """
    import torch

    from sdserve_export.demo_pipeline import assemble_sd15

    torch.manual_seed(seed)
    return assemble_sd15(sd15_unet(), sd15_vae(), sd15_text_encoder())


def ensure_full_size(
    folder: Path = PIPELINE_FOLDER, repository: Path = REPOSITORY, log=print
) -> tuple[Path, Path]:
    """Builds (or reuses) the diffusers folder and the Triton repository.

    Args:
        folder (`Path`): where the diffusers pipeline is saved.
        repository (`Path`): where the Triton model repository is written.
        log (`Callable[[str], None]`): progress sink.

    Returns:
        `(folder, repository)`.
    """
    from sdserve_export.repository import build_repository

    if not (folder / "model_index.json").is_file():
        started = time.perf_counter()
        log(f"[full-size] building random-weight SD 1.5-inpainting into {folder}")
        build_full_size_pipeline().save_pretrained(folder)
        log(f"[full-size] saved ({time.perf_counter() - started:.0f} s)")
    if not (repository / "inpaint" / "config.pbtxt").is_file():
        started = time.perf_counter()
        log(f"[full-size] exporting to {repository} (minutes)")
        build_repository(folder, repository, log=log)
        log(f"[full-size] exported ({time.perf_counter() - started:.0f} s)")
    return folder, repository


def repository_with_adapters(
    pipeline: Path | None, repository: Path | None, names: Sequence[str], prefix: str
) -> tuple[Path, Path, Path]:
    """(pipeline folder, built repository, adapter folder): the given ones, else the tiny
    demo pipeline and its repository built in a temporary folder; with one LoRA adapter per
    name (UNet with convs, and text encoder) in the adapter folder."""
    import tempfile

    from sdserve_export.demo_adapters import TEXT_ATTENTION, UNET_WITH_CONV, make_adapter
    from sdserve_export.demo_pipeline import save_demo_pipeline
    from sdserve_export.repository import build_repository

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    pipeline = pipeline or save_demo_pipeline(tmp / "demo")
    if repository is None:
        repository = tmp / "repository"
        build_repository(pipeline, repository, log=lambda _m: None)
    folder = repository / "inpaint" / "adapters"
    for i, name in enumerate(names):
        make_adapter(pipeline, folder / f"{name}.safetensors", unet=UNET_WITH_CONV,
                     text=TEXT_ATTENTION, seed=i)  # fmt: skip
    return pipeline, repository, folder
