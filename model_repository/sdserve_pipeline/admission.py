"""What a request will cost before it runs: its denoising steps and its peak memory.

The batcher reserves each admitted request's estimated memory until it is answered and
refuses at once (`OverMemoryBudget`, UNAVAILABLE) a request that would take the reserved
total past the budget. The estimate, per request of N images generated at H x W (padded to
the latent grid or snapped to a size bucket), T = H·W / 64 latent tokens:

    bytes = request_bytes
          + bytes_per_pixel · H·W · (N + 1)                       convolutions, tensors
          + 6 · 4 B · rows · heads · (T / token_divisor)²          UNet self-attention
          + 2 · 4 B · (N + 1) · T²                                 VAE mid-block attention

`rows` = N with classifier-free guidance off, 2N with it on; (N + 1): the VAE decoder runs
per image, the encoder once per request. Self-attention scores are (rows · heads, T, T) fp32
whatever the model's width, so the quadratic terms are the same for the tiny demo and the
full-size checkpoint of one architecture; the linear term grows with the VAE's width and is a
config parameter. Measured (sum of VmRSS over tritonserver and its stubs, peak above idle,
one request per fresh server; see `UNET_SCORE_BUFFERS` and `MemoryModel`): the UNet's
process held 2 to 5.3 score-sized buffers (ONNX Runtime's arena), the demo's VAE ~530 B per
pixel and the full-size SD VAE ~2 kB (encoder) to 4-6 kB (decoder) per pixel. ONNX Runtime
keeps its arena after a request, so the server's RSS stays near the highest load it has
served; the budget bounds that load.

Outpainting runs its bands one at a time, one image at a time: the estimate of one band
(N = 1, at most the native size) plus `canvas_bytes_per_pixel` per image per canvas pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdserve_pipeline.outcomes import Overloaded
from sdserve_pipeline.outpaint import band_side, band_windows
from sdserve_pipeline.service import PipelineService
from sdserve_protocol.canvas import Extension
from sdserve_protocol.contract import GenerationParams
from sdserve_protocol.settings import MemoryPolicy

MB = 1 << 20
AUTO = "auto"
AUTO_FRACTION = 0.5  # `memory_budget_mb: auto`: half the memory the server may use
# (rows·heads, T, T) fp32 attention-score buffers the UNet's process holds per request. Live at
# once: ~2.25 (measured with ONNX Runtime's CPU arena off). The runners keep the arena on, and
# it holds more: 2 to 4 after one request, 4 after a second call of the same size, 5.3 after
# a batch grew request by request (continuous batching). 6 covers those.
UNET_SCORE_BUFFERS = 6
VAE_SCORE_BUFFERS = 2


@dataclass(frozen=True)
class AttentionLayout:
    """The UNet's largest self-attention: `heads` heads over latent tokens / `token_divisor`.

    SD 1.5 attends at the full latent resolution with 8 heads (the demo's UNet too); SDXL
    starts at half resolution (1/4 of the tokens) with 10 heads (20 at quarter resolution,
    1/16 of the tokens: smaller).
    """

    heads: int
    token_divisor: int


ATTENTION = {"sd15": AttentionLayout(8, 1), "sdxl": AttentionLayout(10, 4)}


class OverMemoryBudget(Overloaded):
    """Admitting the request would take the estimated memory in use past the budget."""

    def __init__(self, needed: int, budget: int, reserved: int) -> None:
        alone = " (more than the whole budget)" if needed > budget else ""
        super().__init__(
            f"Not enough memory: the request needs about {needed / MB:.0f} MB{alone}, "
            f"the memory budget is {budget / MB:.0f} MB and requests in progress hold "
            f"{reserved / MB:.0f} MB; retry later, or ask for fewer or smaller images"
        )


@dataclass(frozen=True)
class MemoryModel:
    """Estimated peak memory of a request across the server's processes (see the module).

    Args:
        architecture: `sd15` or `sdxl` (the UNet's attention layout; unknown: `sd15`).
        vae_scale_factor: pixels per latent along a side (8).
        bytes_per_pixel: per generated pixel, for every image and once more for the VAE
            encoder: convolution activations and the pipeline's tensors. 6000 covers the
            full-size SD 1.5 / SDXL VAE (measured 2 kB encoder, 4-6 kB decoder); the tiny
            demo needs ~700 (measured 530 for its VAE, ~150 for the pipeline and BLS).
        request_bytes: fixed cost per request (prompt encoding, scheduler, buffers).
        canvas_bytes_per_pixel: outpainting: per image per canvas pixel (the canvas, its
            state and masks, the composite).
        crop_bytes_per_pixel: `padding_mask_crop`: per image per pixel of the image the crop
            goes back into (the input, its masks and their copies, the output images).
    """

    architecture: str = "sd15"
    vae_scale_factor: int = 8
    bytes_per_pixel: float = MemoryPolicy.bytes_per_pixel
    request_bytes: int = 16 * MB
    canvas_bytes_per_pixel: int = 64
    crop_bytes_per_pixel: int = 16

    def generation_bytes(self, height: int, width: int, images: int, cfg: bool) -> int:
        """One run of `images` images at `height` x `width` (the generation size)."""
        tokens = (height // self.vae_scale_factor) * (width // self.vae_scale_factor)
        layout = ATTENTION.get(self.architecture, ATTENTION["sd15"])
        rows = images * (2 if cfg else 1)
        unet = UNET_SCORE_BUFFERS * 4 * rows * layout.heads * (tokens / layout.token_divisor) ** 2
        vae = VAE_SCORE_BUFFERS * 4 * (images + 1) * tokens**2
        convs = self.bytes_per_pixel * height * width * (images + 1)
        return self.request_bytes + math.ceil(unet + vae + convs)

    def request_bytes_of(self, service: PipelineService, params: GenerationParams) -> int:
        """A validated request's estimate, on the service's size buckets and band size."""
        cfg = params.guidance_scale > 1.0
        if params.outpaint is None:
            height, width = service.loop.sizing.generation_size(params)
            generation = self.generation_bytes(height, width, params.num_images, cfg)
            if params.crop is None:
                return generation
            full_h, full_w = params.crop.keep_mask.shape
            return generation + self.crop_bytes_per_pixel * full_h * full_w * params.num_images
        canvas_h, canvas_w = canvas_size(params)
        side = band_side(service.outpaint.native, service.loop.sizing.buckets)
        band = self.generation_bytes(min(side, canvas_h), min(side, canvas_w), 1, cfg)
        return band + self.canvas_bytes_per_pixel * canvas_h * canvas_w * params.num_images


def canvas_size(params: GenerationParams) -> tuple[int, int]:
    """(H', W') of an outpainting request's canvas: its output size."""
    return params.height, params.width


def denoising_steps(service: PipelineService, params: GenerationParams) -> int:
    """Denoising steps the request will run, for the outstanding-steps gauge.

    One run takes `steps × strength` steps (diffusers skips the first `1 - strength` of the
    schedule); a request runs once for all its images, an outpainting request once per image
    per band (`outpaint_bands`).
    """
    per_run = max(1, min(int(params.steps * params.strength), params.steps))
    if params.outpaint is None:
        return per_run
    return per_run * params.num_images * outpaint_bands(service, params)


def outpaint_bands(service: PipelineService, params: GenerationParams) -> int:
    """Bands an outpainting request will generate: `outpaint.band_windows` (the plan
    `outpaint.outpaint` runs) with the original, less its overlap band, known. An estimate:
    a user mask adds bands for its holes."""
    canvas_h, canvas_w = canvas_size(params)
    ext = Extension(*(params.outpaint or (0, 0, 0, 0)))
    settings = service.outpaint
    known = np.zeros((canvas_h, canvas_w), dtype=bool)
    top = ext.top + (settings.overlap if ext.top else 0)
    left = ext.left + (settings.overlap if ext.left else 0)
    bottom = canvas_h - ext.bottom - (settings.overlap if ext.bottom else 0)
    right = canvas_w - ext.right - (settings.overlap if ext.right else 0)
    known[top : max(top, bottom), left : max(left, right)] = True
    return max(1, len(band_windows(known, settings, service.loop.sizing.buckets)))


def budget_bytes(budget_mb: float | str, limit_bytes: int | None = None) -> int:
    """The memory budget in bytes (`MemoryPolicy.budget_mb`); 0: no budget.

    Args:
        budget_mb: MB (`0`: off), or `auto`: half of `limit_bytes`.
        limit_bytes: memory the server may use; by default `memory_limit_bytes()`.
    """
    if budget_mb == AUTO:
        return int(AUTO_FRACTION * (limit_bytes or memory_limit_bytes()))
    return int(float(budget_mb) * MB)


def memory_limit_bytes(root: Path = Path("/")) -> int:
    """The memory this process may use: its cgroup's limit (v2 `memory.max`, v1
    `memory.limit_in_bytes`) where one is set, else the machine's `MemTotal`."""
    total = _mem_total(root / "proc/meminfo")
    for name in ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = (root / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total


def _mem_total(meminfo: Path) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no MemTotal in {meminfo}")


def memory_model_for(service: PipelineService, memory: MemoryPolicy) -> MemoryModel:
    """The `MemoryModel` of the service's checkpoint (architecture, latent scale), with the
    policy's `bytes_per_pixel`."""
    facts = service.loop.facts
    return MemoryModel(
        architecture=facts.architecture,
        vae_scale_factor=facts.vae_scale_factor,
        bytes_per_pixel=memory.bytes_per_pixel,
    )


class MemoryBudget:
    """Estimated bytes reserved by admitted requests, against a budget (0: no limit).

    Not thread-safe: the batcher calls it under its own lock.
    """

    def __init__(self, budget: int = 0) -> None:
        if budget < 0:
            raise ValueError(f"memory budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.reserved = 0

    def reserve(self, needed: int) -> None:
        """Reserves `needed` bytes.

        Raises:
            OverMemoryBudget: the reservation would pass the budget (nothing is reserved).
        """
        if self.budget and self.reserved + needed > self.budget:
            raise OverMemoryBudget(needed, self.budget, self.reserved)
        self.reserved += needed

    def release(self, amount: int) -> None:
        self.reserved -= amount
