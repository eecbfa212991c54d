"""Outpainting geometry (sdserve_protocol.canvas): canvas, mask, seam weight and band plan."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sdserve_protocol.canvas import (
    Canvas,
    Extension,
    Window,
    band_mask,
    build_canvas,
    plan_bands,
    seam_alpha,
)

sizes = st.integers(1, 64)
extensions = st.builds(Extension, *(st.integers(0, 80) for _ in range(4)))
overlaps = st.integers(0, 24)
fills = st.sampled_from(["edge", "blur"])


@st.composite
def canvases(draw: st.DrawFn, with_user_mask: bool | None = None) -> tuple[np.ndarray, Canvas]:
    """(original image, canvas) over random sizes, extensions, overlaps, fills, user masks."""
    h, w = draw(sizes), draw(sizes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    use_mask = draw(st.booleans()) if with_user_mask is None else with_user_mask
    user = rng.integers(0, 256, (h, w), dtype=np.uint8) if use_mask else None
    canvas = build_canvas(image, draw(extensions), draw(overlaps), draw(fills), user)
    return image, canvas


def expected_band_distance(canvas: Canvas) -> np.ndarray:
    """(H, W) distance of each original pixel from the nearest extended side (inf if none)."""
    h, w = canvas.original_size
    ext = canvas.ext
    i, j = np.mgrid[0:h, 0:w].astype(np.float64)
    sides = [
        (ext.top, i),
        (ext.bottom, h - 1 - i),
        (ext.left, j),
        (ext.right, w - 1 - j),
    ]
    distance = np.full((h, w), np.inf)
    for extended, d in sides:
        if extended:
            distance = np.minimum(distance, d)
    return distance


def user_region(canvas: Canvas) -> np.ndarray:
    """(H, W) bool user mask, all False if none was given."""
    if canvas.user_mask is None:
        return np.zeros(canvas.original_size, dtype=bool)
    return canvas.user_mask


# --- canvas ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(canvases())
def test_canvas_size_offset_and_original_placement(case):
    image, canvas = case
    (h, w), ext = image.shape[:2], canvas.ext
    assert canvas.image.shape == (h + ext.top + ext.bottom, w + ext.left + ext.right, 3)
    assert canvas.mask.shape == canvas.image.shape[:2] == canvas.size
    assert canvas.image.dtype == canvas.mask.dtype == np.uint8
    assert canvas.offset == (ext.top, ext.left) and canvas.original_size == (h, w)
    np.testing.assert_array_equal(
        canvas.image[ext.top : ext.top + h, ext.left : ext.left + w], image
    )
    np.testing.assert_array_equal(canvas.image[canvas.original_slices], image)
    assert canvas.new_area.sum() == canvas.mask.size - h * w


@settings(max_examples=150, deadline=None)
@given(canvases())
def test_mask_is_new_area_plus_overlap_band_plus_user_mask(case):
    _, canvas = case
    expected = np.ones(canvas.size, dtype=bool)  # the new area...
    band = expected_band_distance(canvas) < canvas.overlap
    expected[canvas.original_slices] = band | user_region(canvas)  # ...and inside the original
    assert set(np.unique(canvas.mask)) <= {0, 255}
    np.testing.assert_array_equal(canvas.mask == 255, expected)
    np.testing.assert_array_equal(canvas.known, ~expected)


@settings(max_examples=100, deadline=None)
@given(canvases(with_user_mask=False))
def test_band_is_clipped_and_only_along_extended_sides(case):
    _, canvas = case
    (h, w), ext, overlap = canvas.original_size, canvas.ext, canvas.overlap
    inside = canvas.mask[canvas.original_slices] == 255  # (H, W)
    rows_hit, cols_hit = inside.any(axis=1), inside.any(axis=0)
    band_rows = min(overlap, h) * ((ext.top > 0) + (ext.bottom > 0))
    band_cols = min(overlap, w) * ((ext.left > 0) + (ext.right > 0))
    if ext.left == ext.right == 0:  # only horizontal bands: whole rows at top/bottom
        assert rows_hit.sum() == min(band_rows, h)
    if ext.top == ext.bottom == 0:
        assert cols_hit.sum() == min(band_cols, w)


@settings(max_examples=100, deadline=None)
@given(sizes, sizes, extensions, st.integers(0, 2**32 - 1))
def test_edge_fill_equals_np_pad_edge(h, w, ext, seed):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    canvas = build_canvas(image, ext, fill="edge")
    pad = ((ext.top, ext.bottom), (ext.left, ext.right), (0, 0))
    np.testing.assert_array_equal(canvas.image, np.pad(image, pad, mode="edge"))


@settings(max_examples=60, deadline=None)
@given(sizes, sizes, extensions, st.integers(0, 2**32 - 1))
def test_blur_fill_keeps_original_and_stays_within_the_border_colours(h, w, ext, seed):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    canvas = build_canvas(image, ext, fill="blur")
    np.testing.assert_array_equal(canvas.image[canvas.original_slices], image)
    new = canvas.image[canvas.new_area]  # (N, 3): a blur of border pixels
    if new.size:
        assert np.all(new >= image.min(axis=(0, 1))) and np.all(new <= image.max(axis=(0, 1)))


def test_blur_fill_of_a_constant_image_is_constant():
    image = np.full((10, 12, 3), (10, 200, 77), dtype=np.uint8)
    canvas = build_canvas(image, Extension(30, 5, 0, 40), fill="blur")
    assert np.all(canvas.image == image[0, 0])


def test_blur_fill_smooths_the_streaks_of_edge_fill():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, ::2] = 255  # vertical stripes: edge fill repeats them upward
    ext = Extension(0, 64, 0, 0)
    edge = build_canvas(image, ext, fill="edge").image[:64].astype(float)
    blur = build_canvas(image, ext, fill="blur").image[:64].astype(float)
    assert np.abs(np.diff(blur, axis=1)).mean() < 0.1 * np.abs(np.diff(edge, axis=1)).mean()
    np.testing.assert_array_equal(build_canvas(image, ext, fill="blur").image[64:], image)


def test_canvas_example():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    canvas = build_canvas(image, Extension(left=2, top=1, right=0, bottom=0), overlap=1)
    assert canvas.size == (5, 8) and canvas.offset == (1, 2)
    expected = np.array(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],  # top band row of the original
            [1, 1, 1, 0, 0, 0, 0, 0],  # left band column; right side not extended
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(canvas.mask, expected * 255)


def test_zero_extension_gives_the_image_and_the_user_mask():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    user = np.array([[0, 200, 127], [128, 0, 255]], dtype=np.uint8)
    canvas = build_canvas(image, Extension(0, 0, 0, 0), overlap=16, user_mask=user)
    np.testing.assert_array_equal(canvas.image, image)
    np.testing.assert_array_equal(canvas.mask, np.where(user >= 128, 255, 0))


# --- seam_alpha ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(canvases(), st.data())
def test_seam_alpha_is_one_outside_zero_beyond_band_and_ramps_inside(case, data):
    _, canvas = case
    width = data.draw(st.integers(0, canvas.overlap))
    alpha = seam_alpha(canvas, width)
    assert alpha.shape == canvas.size and alpha.dtype == np.float32
    assert np.all(alpha[canvas.new_area] == 1.0)  # whole new area, canvas border included
    assert np.all(alpha[canvas.mask == 0] == 0.0)  # every kept pixel kept exactly
    assert np.all((alpha >= 0.0) & (alpha <= 1.0))

    inner = alpha[canvas.original_slices]  # (H, W)
    user = user_region(canvas)
    assert np.all(inner[user] == 1.0)
    distance = expected_band_distance(canvas)
    band = (distance < width) & ~user
    assert np.all(inner[(distance >= width) & ~user] == 0.0)
    assert np.all((inner[band] > 0.0) & (inner[band] < 1.0))
    # Monotone ramp: alpha is a strictly decreasing function of the distance into the original.
    d, a = distance[band], inner[band]
    order = np.argsort(d, kind="stable")
    d, a = d[order], a[order]
    same = d[1:] == d[:-1]
    assert np.all(a[1:][same] == a[:-1][same])
    assert np.all(a[1:][~same] < a[:-1][~same])


def test_seam_alpha_defaults_to_the_canvas_overlap_and_ramps_across_it():
    image = np.zeros((8, 10, 3), dtype=np.uint8)
    canvas = build_canvas(image, Extension(left=3, top=0, right=0, bottom=0), overlap=4)
    alpha = seam_alpha(canvas)
    np.testing.assert_array_equal(alpha, seam_alpha(canvas, 4))
    row = alpha[0]
    assert np.all(row[:3] == 1.0) and np.all(row[7:] == 0.0)
    assert np.all(np.diff(row[2:8]) < 0)  # strictly down across the band
    assert np.all(alpha == row)  # same in every row
    np.testing.assert_array_equal(seam_alpha(canvas, 0), canvas.new_area.astype(np.float32))


def test_seam_alpha_wider_than_the_mask_band_raises():
    canvas = build_canvas(np.zeros((8, 8, 3), np.uint8), Extension(1, 0, 0, 0), overlap=4)
    with pytest.raises(ValueError, match="overlap=5"):
        seam_alpha(canvas, 5)
    with pytest.raises(ValueError, match="-1"):
        seam_alpha(canvas, -1)


# --- plan_bands / band_mask ------------------------------------------------------------------


def run_plan(known: np.ndarray, windows: list[Window]) -> list[tuple[int, int]]:
    """Walks the band loop; returns (known before, unknown before) pixel counts per window."""
    done = known.copy()
    counts = []
    for window in windows:
        mask = band_mask(done, window)
        np.testing.assert_array_equal(mask == 255, ~done[window.slices])
        counts.append((int(done[window.slices].sum()), int((mask == 255).sum())))
        done[window.slices] = True
    assert done.all(), "every unknown pixel is covered"
    return counts


def check_plan(known: np.ndarray, native: int, context: int) -> list[Window]:
    canvas_h, canvas_w = known.shape
    windows = plan_bands(canvas_h, canvas_w, known, native, context)
    size = (min(native, canvas_h), min(native, canvas_w))
    for window in windows:
        assert (
            window.height,
            window.width,
        ) == size  # native, or the whole side if smaller
        assert window.height % 8 == 0 or window.height == canvas_h
        assert window.width % 8 == 0 or window.width == canvas_w
        assert window.top >= 0 and window.bottom <= canvas_h
        assert window.left >= 0 and window.right <= canvas_w
    counts = run_plan(known, windows)
    assert all(unknown > 0 for _, unknown in counts), "no window without work"
    assert all(known_before > 0 for known_before, _ in counts[1:]), "conditioned on known"
    if known.all():
        assert windows == []
    elif size == known.shape:
        assert windows == [Window(0, 0, canvas_h, canvas_w)]
    return windows


natives = st.sampled_from([8, 16, 24, 32, 64])


@settings(max_examples=150, deadline=None)
@given(canvases(), natives, st.data())
def test_plan_bands_covers_the_canvas_in_conditioned_windows(case, native, data):
    _, canvas = case
    context = data.draw(st.integers(1, native - 1))
    check_plan(canvas.known, native, context)


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.bool_, st.tuples(st.integers(1, 90), st.integers(1, 90))),
    natives,
    st.data(),
)
def test_plan_bands_covers_any_known_mask(known, native, data):
    context = data.draw(st.integers(1, native - 1))
    check_plan(known, native, context)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(0, 64))
def test_plan_bands_with_nothing_known_still_covers(canvas_h, canvas_w, context):
    native = 64 if context < 64 else 72
    windows = plan_bands(canvas_h, canvas_w, np.zeros((canvas_h, canvas_w), bool), native, context)
    assert windows == [Window(0, 0, canvas_h, canvas_w)]


@settings(max_examples=100, deadline=None)
@given(canvases(with_user_mask=False), st.integers(1, 47))
def test_plan_bands_windows_reach_context_deep_into_known_pixels(case, context):
    """Plain outpaint: the pixels each window sees known span at least `context` rows or
    columns (or the whole known extent, where that is smaller)."""
    _, canvas = case
    known = canvas.known
    if not known.any():  # the overlap band swallowed the original
        return
    depth = min(context, known.any(axis=1).sum(), known.any(axis=0).sum())
    done = known.copy()
    for window in check_plan(known, 48, context):
        seen = done[window.slices]
        assert max(seen.any(axis=1).sum(), seen.any(axis=0).sum()) >= depth
        done[window.slices] = True


def test_plan_bands_large_extension_example():
    """512x512 extended by 512 on every side at native 512: a 1536x1536 canvas in 512 bands."""
    image = np.zeros((512, 512, 3), dtype=np.uint8)
    canvas = build_canvas(image, Extension(512, 512, 512, 512), overlap=16)
    windows = check_plan(canvas.known, 512, 64)
    assert canvas.size == (1536, 1536)
    assert len(windows) == 20
    assert all((w.height, w.width) == (512, 512) for w in windows)
    # Left and right first (the rows of the original), then full-width rows up, then down.
    assert [w.top for w in windows[:4]] == [512] * 4
    assert [w.left for w in windows[:4]] == [264, 0, 760, 1024]
    assert [w.top for w in windows[4:12]] == [264] * 4 + [0] * 4
    assert [w.top for w in windows[12:]] == [760] * 4 + [1024] * 4
    counts = run_plan(canvas.known, windows)
    assert all(known_before >= 64 * 512 for known_before, _ in counts)


def test_plan_bands_one_window_when_the_canvas_fits():
    canvas = build_canvas(np.zeros((100, 80, 3), np.uint8), Extension(10, 20, 30, 40))
    assert plan_bands(*canvas.size, canvas.known, 512, 64) == [Window(0, 0, 160, 120)]
    assert plan_bands(5, 7, np.ones((5, 7), bool), 512, 64) == []


def test_band_mask_marks_the_unknown_pixels_of_the_window():
    known = np.zeros((4, 6), dtype=bool)
    known[1:3, 2:5] = True
    mask = band_mask(known, Window(1, 1, 2, 3))
    np.testing.assert_array_equal(mask, [[255, 0, 0], [255, 0, 0]])
    assert mask.dtype == np.uint8


# --- bad inputs ------------------------------------------------------------------------------


def test_extension_rejects_negative_and_non_int_sides():
    with pytest.raises(ValueError, match="top=-1"):
        Extension(0, -1, 0, 0)
    with pytest.raises(ValueError, match="'2'"):
        Extension(0, 0, "2", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((4, 4, 3), np.float32)}, "float32"),
        ({"image": np.zeros((4, 4), np.uint8)}, r"\(4, 4\)"),
        ({"image": np.zeros((0, 4, 3), np.uint8)}, r"\(0, 4, 3\)"),
        ({"overlap": -2}, "-2"),
        ({"overlap": 1.5}, "1.5"),
        ({"fill": "mirror"}, "'mirror'"),
        ({"user_mask": np.zeros((3, 4), np.uint8)}, r"\(3, 4\)"),
        ({"user_mask": np.zeros((4, 4), np.float32)}, "float32"),
        ({"blur_radius": -1.0}, "-1.0"),
    ],
)
def test_build_canvas_rejects_bad_inputs(kwargs, match):
    args = {
        "image": np.zeros((4, 4, 3), np.uint8),
        "ext": Extension(1, 0, 0, 0),
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        build_canvas(**args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 4, np.zeros((0, 4), bool), 8, 1), "canvas_h"),
        ((4, 4, np.zeros((4, 5), bool), 8, 1), r"\(4, 5\)"),
        ((4, 4, np.zeros((4, 4), np.uint8), 8, 1), "uint8"),
        ((4, 4, np.zeros((4, 4), bool), 12, 1), "native.*12"),
        ((4, 4, np.zeros((4, 4), bool), 0, 0), "native.*0"),
        ((4, 4, np.zeros((4, 4), bool), 8, 8), "context.*8"),
        ((4, 4, np.zeros((4, 4), bool), 8, -1), "context.*-1"),
    ],
)
def test_plan_bands_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        plan_bands(*args)


def test_band_mask_rejects_a_window_outside_the_canvas():
    with pytest.raises(ValueError, match="Window"):
        band_mask(np.zeros((4, 4), bool), Window(2, 0, 4, 4))
    with pytest.raises(ValueError, match="-1"):
        Window(-1, 0, 4, 4)
