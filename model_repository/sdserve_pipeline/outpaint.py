"""Outpainting: the canvas, one inpainting run per band, the seamless composite.

The canvas geometry (placement, pre-fill, overlap band, band plan, seam weights) lives in
`sdserve_protocol.canvas`, shared with the SDK so clients can inspect exactly what the server
builds. Here each band is an ordinary inpainting request on a window of the canvas, so a
canvas that fits the model's native size is one run that equals diffusers' inpainting of
that canvas and mask.

With size buckets (static TensorRT shapes), every band must fit a bucket: a band is at most
`native` on each side, so `band_side` caps `native` at the largest square inside a bucket.
The GPU repository always adds the checkpoint's own square size (the default `native`) to
the buckets, so there the cap changes nothing; it matters only when `outpaint_native` is
set above every bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import numpy.typing as npt

from sdserve_pipeline.generation import GenerationLoop, Job
from sdserve_pipeline.images import composite
from sdserve_pipeline.sizing import largest_square_side
from sdserve_protocol.canvas import (
    Canvas,
    Extension,
    Window,
    band_mask,
    build_canvas,
    plan_bands,
    seam_alpha,
)
from sdserve_protocol.contract import GenerationParams
from sdserve_protocol.settings import OutpaintSettings
from sdserve_protocol.sizes import SizeBucket

LATENT_GRID = 8  # `plan_bands` needs a band side that is a multiple of 8


def band_side(native: int, buckets: Sequence[SizeBucket]) -> int:
    """The largest band side: `native`, capped so that a square band fits a size bucket.

    Every band is at most `band_side` pixels on each side, so each fits the bucket holding
    the largest square; the loop then generates it at the smallest bucket containing it.

    Args:
        native: the configured band size (`OutpaintSettings.native`), a multiple of 8.
        buckets: the loop's size buckets; empty means no cap.

    Raises:
        ValueError: no bucket holds even an 8x8 square.
    """
    if not buckets:
        return native
    side = min(native, largest_square_side(buckets))
    side -= side % LATENT_GRID
    if side < LATENT_GRID:
        raise ValueError(f"no size bucket in {list(buckets)} holds an outpainting band")
    return side


def band_windows(
    known: npt.NDArray[np.bool_], settings: OutpaintSettings, buckets: Sequence[SizeBucket]
) -> list[Window]:
    """The bands that generate a canvas whose `known` pixels (H', W') are kept: each at most
    `band_side` on a side (so it fits a size bucket), reaching `context` pixels (at most a
    quarter of a band: a band is mostly new pixels) into what is known by its turn."""
    native = band_side(settings.native, buckets)
    context = min(settings.context, native // 4)
    windows: list[Window] = plan_bands(known.shape[0], known.shape[1], known, native, context)
    return windows


# Told after each denoising step of a band: the band's job, the band as an inpainting
# request, the canvas so far (H', W', 3) and the band's window on it.
BandStep = Callable[[Job, GenerationParams, npt.NDArray[np.uint8], Window], None]


def outpaint(
    loop: GenerationLoop,
    params: GenerationParams,
    settings: OutpaintSettings,
    is_cancelled: Callable[[], bool] | None = None,
    on_step: BandStep | None = None,
) -> npt.NDArray[np.uint8]:
    """Extend `params.image` by `params.outpaint`: (N, H', W', 3) uint8.

    `is_cancelled` is asked before each denoising step, `on_step` told after it."""
    if params.image is None or params.outpaint is None:
        raise ValueError("outpaint needs an image and an extension")
    canvas = build_canvas(
        params.image,
        Extension(*params.outpaint),
        overlap=settings.overlap,
        fill=settings.fill,
        user_mask=params.mask,
    )
    windows = band_windows(canvas.known, settings, loop.sizing.buckets)
    hold = loop.holds.hold(loop.adapter_calls(params))  # its LoRA variants, across bands
    try:
        images = _bands(loop, params, canvas, windows, is_cancelled, on_step)
    finally:
        loop.holds.release(hold)
    out: npt.NDArray[np.uint8] = np.stack(images)  # (N, H', W', 3)
    if params.preserve_unmasked:
        out = composite(canvas.image, out, seam_alpha(canvas))
    return out


def _bands(
    loop: GenerationLoop,
    params: GenerationParams,
    canvas: Canvas,
    windows: list[Window],
    is_cancelled: Callable[[], bool] | None,
    on_step: BandStep | None,
) -> list[npt.NDArray[np.uint8]]:
    """Each image's canvas, generated band after band."""
    images = []
    for seed in params.seeds:
        one = replace(params, seed=seed, num_images=1, preserve_unmasked=False, outpaint=None)
        state, known = canvas.image.copy(), canvas.known.copy()
        for window in windows:
            mask = band_mask(known, window)
            band = replace(
                one, image=state[window.slices], mask=mask, height=window.height,
                width=window.width,
            )  # fmt: skip
            told = None if on_step is None else partial(_tell, on_step, band, state, window)
            generated = loop(band, is_cancelled, told)[0]  # (h, w, 3)
            if len(windows) == 1:  # the whole canvas in one run: diffusers' own output
                state[window.slices] = generated
            else:  # keep what earlier bands made; take this band's new pixels only
                regenerated = mask >= 128
                state[window.slices][regenerated] = generated[regenerated]
            known[window.slices] = True
        images.append(state)
    return images


def _tell(
    on_step: BandStep,
    band: GenerationParams,
    state: npt.NDArray[np.uint8],
    window: Window,
    job: Job,
) -> None:
    on_step(job, band, state, window)
