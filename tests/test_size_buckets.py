"""Size buckets: requests snapped to the static sizes TensorRT engines serve.

Pure snapping logic (`sdserve_pipeline.sizing`), the loop with buckets on the tiny demo
pipeline in-process (outputs keep the request's exact size; a request that already is a
bucket gives what it gives without buckets), oversized requests rejected, and outpainting
bands planned to fit the buckets.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cases import make_case
from hypothesis import given, settings
from hypothesis import strategies as st

from sdserve_pipeline.generation import GenerationLoop
from sdserve_pipeline.images import pad_to
from sdserve_pipeline.outpaint import band_side, outpaint
from sdserve_pipeline.service import PipelineService
from sdserve_pipeline.sizing import (
    SizeBucketError,
    check_size_buckets,
    largest_square_side,
    padded_size,
    snap_to_bucket,
)
from sdserve_protocol.canvas import Extension, build_canvas, plan_bands
from sdserve_protocol.contract import GenerationParams
from sdserve_protocol.rules import Limits, RequestError
from sdserve_protocol.settings import OutpaintSettings
from sdserve_protocol.sizes import SizeBucket, format_buckets, parse_buckets

# (height, width) buckets for the tiny demo (native 128²), as a TensorRT variant would have.
BUCKETS = check_size_buckets(((64, 64), (96, 128), (128, 128)), 8)
STEPS = 3

grid_side = st.integers(1, 40).map(lambda n: 8 * n)
bucket_lists = st.lists(st.tuples(grid_side, grid_side), min_size=1, max_size=8)


# ------------------------------------------------------------------------------ pure logic


def test_parse_and_format_round_trip_in_width_x_height() -> None:
    assert parse_buckets("1152x896, 512x512,512x512,") == ((512, 512), (896, 1152))
    assert parse_buckets("") == parse_buckets(" , ") == ()
    assert format_buckets([SizeBucket(896, 1152), SizeBucket(512, 512)]) == "512x512,1152x896"
    text = "1024x1024,1152x896,896x1152,1536x640"
    assert parse_buckets(format_buckets(parse_buckets(text))) == parse_buckets(text)
    for bad in ("512", "512x", "x512", "0x512", "512x-8", "512*512"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_buckets(bad)


def test_buckets_must_lie_on_the_latent_grid() -> None:
    assert check_size_buckets([(128, 128), (64, 64), (64, 64)], 8) == ((64, 64), (128, 128))
    with pytest.raises(ValueError, match="100x64 .* multiple of the VAE scale factor 8"):
        check_size_buckets([(64, 100)], 8)


@given(st.integers(1, 400), st.integers(1, 400), st.sampled_from([1, 8, 16]))
def test_without_buckets_requests_are_padded_to_the_grid(
    height: int, width: int, multiple: int
) -> None:
    assert snap_to_bucket(height, width, (), multiple) == padded_size(height, width, multiple)


@settings(max_examples=300)
@given(st.integers(1, 330), st.integers(1, 330), bucket_lists)
def test_snap_picks_the_smallest_bucket_containing_the_request(
    height: int, width: int, buckets: list[tuple[int, int]]
) -> None:
    checked = check_size_buckets(buckets, 8)
    fitting = [(h, w) for h, w in checked if h >= height and w >= width]
    if not fitting:
        with pytest.raises(SizeBucketError, match="fits no size bucket") as info:
            snap_to_bucket(height, width, checked, 8)
        largest_h, largest_w = max(checked, key=lambda b: (b[0] * b[1], b))
        assert f"the largest is {largest_w}x{largest_h}" in str(info.value)
        return
    snapped = snap_to_bucket(height, width, checked, 8)
    assert snapped in checked  # a bucket
    assert snapped[0] >= height and snapped[1] >= width  # that contains the request
    assert snapped[0] * snapped[1] == min(h * w for h, w in fitting)  # the smallest such
    assert snap_to_bucket(height, width, checked[::-1], 8) == snapped  # order-free


def test_snap_examples_and_ties() -> None:
    sdxl = parse_buckets("1024x1024,1152x896,896x1152,1216x832,832x1216")
    assert snap_to_bucket(1024, 1024, sdxl, 8) == (1024, 1024)  # a bucket snaps to itself
    assert snap_to_bucket(850, 1100, sdxl, 8) == (896, 1152)  # landscape 1152x896
    assert snap_to_bucket(1100, 850, sdxl, 8) == (1152, 896)  # portrait 896x1152
    assert snap_to_bucket(700, 1100, sdxl, 8) == (832, 1216)  # 1216x832: less area
    # 800x800 fits every bucket; 1216x832 and 832x1216 have the least area: the tie goes to
    # the one nearer the request's aspect ratio, then the lower (height, width)
    assert snap_to_bucket(800, 800, sdxl, 8) == (832, 1216)
    assert snap_to_bucket(800, 790, sdxl, 8) == (1216, 832)
    with pytest.raises(SizeBucketError, match=r"the largest is 1024x1024 .*832x1216"):
        snap_to_bucket(1300, 900, sdxl, 8)


def test_largest_square_side() -> None:
    assert largest_square_side([(96, 128), (64, 64)]) == 96
    assert largest_square_side([]) == 0


# ---------------------------------------------------------------- the loop, in-process


@pytest.fixture(scope="module")
def bucketed(service) -> GenerationLoop:
    loop = service.loop
    return GenerationLoop(
        loop.components, loop.assets, feather_radius=loop.feather_radius, size_buckets=BUCKETS
    )


def _inpaint(height: int, width: int, **kwargs) -> GenerationParams:
    image, mask = make_case(height, width, seed=height * width)
    fields = dict(image=image, mask=mask, steps=STEPS, seed=7) | kwargs
    return GenerationParams(prompt="a red bicycle", height=height, width=width, **fields)


def _txt2img(height: int, width: int) -> GenerationParams:
    return GenerationParams(prompt="a lighthouse", height=height, width=width, seed=3, steps=STEPS)


def _spy_sizes(loop: GenerationLoop, monkeypatch) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    original = loop.sizing.generation_size

    def spy(params: GenerationParams) -> tuple[int, int]:
        sizes.append(original(params))
        return sizes[-1]

    monkeypatch.setattr(loop.sizing, "generation_size", spy)
    return sizes


@pytest.mark.parametrize("make", [_inpaint, _txt2img], ids=["inpaint", "txt2img"])
@pytest.mark.parametrize("size", [(128, 128), (96, 128)])
def test_a_bucket_sized_request_equals_the_unbucketed_run(
    service, bucketed: GenerationLoop, make, size: tuple[int, int]
) -> None:
    params = make(*size)
    assert np.array_equal(bucketed(params), service.loop(params))


@pytest.mark.parametrize("make", [_inpaint, _txt2img], ids=["inpaint", "txt2img"])
def test_other_sizes_run_at_the_bucket_and_come_back_at_their_own_size(
    service, bucketed: GenerationLoop, make, monkeypatch
) -> None:
    params = make(50, 70)  # (height, width): fits 96x128 (not 64x64), smaller than 128²
    if params.image is not None:
        params = replace(params, preserve_unmasked=False)  # compare raw generations
    sizes = _spy_sizes(bucketed, monkeypatch)
    images = bucketed(params)

    assert sizes == [(96, 128)]
    assert images.shape == (1, 50, 70, 3)
    # the same as generating at 96x128 on the edge-padded input, then cropping
    if params.image is not None:
        padded = replace(
            params, image=pad_to(params.image, 96, 128), mask=pad_to(params.mask, 96, 128),
            height=96, width=128,
        )  # fmt: skip
    else:
        padded = replace(params, height=96, width=128)
    assert np.array_equal(images, service.loop(padded)[:, :50, :70])


def test_kept_pixels_stay_identical_with_buckets(bucketed: GenerationLoop) -> None:
    params = _inpaint(50, 70, num_images=2)
    images = bucketed(params)
    assert images.shape == (2, 50, 70, 3)
    keep = params.mask < 128
    assert (images[:, keep] == params.image[keep]).all()


def test_sdxl_loop_with_buckets_keeps_the_request_size(xl_service, monkeypatch) -> None:
    loop = xl_service.loop
    bucketed = GenerationLoop(loop.components, loop.assets, size_buckets=BUCKETS)
    params = replace(_inpaint(128, 128), strength=loop.facts.default_strength)
    assert np.array_equal(bucketed(params), loop(params))  # time ids: the bucket = the request
    sizes = _spy_sizes(bucketed, monkeypatch)
    assert bucketed(_txt2img(40, 100)).shape == (1, 40, 100, 3)
    assert sizes == [(96, 128)]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        (_inpaint(136, 64), "image"),
        (_txt2img(136, 64), "height"),
        (_txt2img(64, 136), "width"),
    ],
)
def test_requests_larger_than_every_bucket_are_rejected(
    bucketed: GenerationLoop, params: GenerationParams, name: str
) -> None:
    with pytest.raises(RequestError, match=r"fits no size bucket.*largest is 128x128") as info:
        bucketed.sizing.check(params)
    assert info.value.name == name
    with pytest.raises(RequestError):
        bucketed(params)  # and never reach a model call
    service = PipelineService(bucketed, Limits())
    with pytest.raises(RequestError) as info:
        service.generate(_wire(params))
    assert info.value.name == name


def _wire(params: GenerationParams) -> dict[str, np.ndarray]:
    inputs = {
        "prompt": np.array([params.prompt.encode()], dtype=np.object_),
        "steps": np.array([params.steps], dtype=np.int32),
        "seed": np.array([params.seed], dtype=np.int64),
    }
    if params.image is not None:
        return inputs | {"image": params.image, "mask": params.mask}
    return inputs | {
        "height": np.array([params.height], dtype=np.int32),
        "width": np.array([params.width], dtype=np.int32),
    }


def test_without_buckets_any_size_is_served(service) -> None:
    assert service.loop.sizing.buckets == ()
    service.loop.sizing.check(_txt2img(136, 200))  # no bucket, no limit but the pixel limit


# ------------------------------------------------------------------------- outpainting


@given(st.sampled_from([64, 128, 512, 1024]), bucket_lists)
def test_band_side_fits_a_bucket(native: int, buckets: list[tuple[int, int]]) -> None:
    checked = check_size_buckets(buckets, 8)
    side = band_side(native, checked)
    assert side % 8 == 0 and 8 <= side <= native
    assert any(h >= side and w >= side for h, w in checked)  # every band fits a bucket
    assert band_side(native, ()) == native


def test_band_side_is_native_when_the_native_square_is_a_bucket() -> None:
    # the GPU repository always adds the checkpoint's own square: nothing changes there
    assert band_side(1024, parse_buckets("1024x1024,1536x640,640x1536")) == 1024
    assert band_side(512, parse_buckets("512x512,768x768,768x512")) == 512
    assert band_side(1024, parse_buckets("1216x832,832x1216")) == 832


@pytest.mark.parametrize("native", [128, 96])
def test_every_planned_band_snaps_to_a_bucket(native: int) -> None:
    image = np.zeros((80, 100, 3), dtype=np.uint8)
    canvas = build_canvas(image, Extension(60, 40, 60, 50), overlap=8, fill="edge")
    side = band_side(native, BUCKETS)
    windows = plan_bands(*canvas.mask.shape, canvas.known, side, side // 4)
    assert len(windows) > 1
    for window in windows:
        assert snap_to_bucket(window.height, window.width, BUCKETS, 8) in BUCKETS


def test_outpainting_with_buckets_runs_every_band_at_a_bucket(
    bucketed: GenerationLoop, monkeypatch
) -> None:
    image, _ = make_case(64, 80, seed=5)
    params = GenerationParams(
        prompt="a wide landscape", height=64 + 24 + 40, width=80 + 48 + 40, seed=11,
        steps=STEPS, image=image, outpaint=(48, 24, 40, 40),
    )  # fmt: skip
    bucketed.sizing.check(params)  # the canvas (128x168) fits no bucket; its bands do
    sizes = _spy_sizes(bucketed, monkeypatch)
    # native 160 > every bucket's square: bands are capped to 128, the largest square
    out = outpaint(bucketed, params, OutpaintSettings(native=160, overlap=8, context=32))

    assert out.shape == (1, 128, 168, 3)
    assert len(sizes) > 1 and set(sizes) <= set(BUCKETS)
    assert (out[0, 24 + 8 : 24 + 64 - 8, 48 + 8 : 48 + 80 - 8] == image[8:-8, 8:-8]).all()
