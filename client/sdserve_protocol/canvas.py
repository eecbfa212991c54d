"""Outpainting geometry: the enlarged canvas, its mask, the seam blend weight and the bands.

Pure numpy + Pillow (no torch), shared by the SDK (to build and inspect a canvas locally) and
the server's pipeline.

Conventions: arrays are (H, W[, 3]); sizes are (height, width); extensions are given in the
wire order (left, top, right, bottom); masks are uint8 with 255 = regenerate, 0 = keep, and
are read as "regenerate" where >= 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from .rules import SIDES

MASK_THRESHOLD = 128
"""uint8 mask values >= this are regenerated."""

DEFAULT_OVERLAP = 16
"""Default width in pixels of the band regenerated inside the original along extended sides."""

DEFAULT_BLUR_RADIUS = 32.0
"""Default Gaussian radius of the `"blur"` fill."""

FILL_MODES: tuple[str, ...] = ("edge", "blur")

FillMode = Literal["edge", "blur"]
BoolArray = npt.NDArray[np.bool_]
UInt8Array = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Extension:
    """Pixels added to each side of an image: the `outpaint` input (left, top, right, bottom).

    Construction checks that every side is a non-negative int; the rules of a request (at least
    one side extended, each within the model's `max_outpaint`) are `rules.check_outpaint`'s.

    Args:
        left (`int`): columns added on the left.
        top (`int`): rows added on top.
        right (`int`): columns added on the right.
        bottom (`int`): rows added at the bottom.
    """

    left: int
    top: int
    right: int
    bottom: int

    def __post_init__(self) -> None:
        for side, value in zip(SIDES, self.as_tuple()):
            if not _is_int(value):
                raise ValueError(f"outpaint {side} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"outpaint {side} must be >= 0, got {side}={value}")

    def as_tuple(self) -> tuple[int, int, int, int]:
        """The extension in wire order (left, top, right, bottom)."""
        return self.left, self.top, self.right, self.bottom


@dataclass(frozen=True, eq=False)
class Canvas:
    """An image placed on an enlarged canvas, with the mask of what to generate.

    Args:
        image (`np.ndarray`):
            (H', W', 3) uint8: the original at `offset`, the new area pre-filled from its border.
        mask (`np.ndarray`):
            (H', W') uint8: 255 on the new area, on the overlap band inside the original along
            every extended side, and on the user mask; 0 elsewhere.
        offset (`tuple[int, int]`): (top, left) of the original on the canvas.
        original_size (`tuple[int, int]`): (H, W) of the original.
        ext (`Extension`): the extension that made the canvas.
        overlap (`int`): the width of the overlap band the mask was built with.
        user_mask (`np.ndarray`, *optional*):
            (H, W) bool: the user mask on the original (True = regenerate), if one was given.
    """

    image: UInt8Array
    mask: UInt8Array
    offset: tuple[int, int]
    original_size: tuple[int, int]
    ext: Extension
    overlap: int
    user_mask: BoolArray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H', W') of the canvas."""
        return self.mask.shape[0], self.mask.shape[1]

    @property
    def original_slices(self) -> tuple[slice, slice]:
        """(rows, columns) of the original on the canvas: `canvas.image[canvas.original_slices]`."""
        (top, left), (height, width) = self.offset, self.original_size
        return slice(top, top + height), slice(left, left + width)

    @property
    def new_area(self) -> BoolArray:
        """(H', W') bool: True on the pixels added around the original."""
        new = np.ones(self.size, dtype=bool)
        new[self.original_slices] = False
        return new

    @property
    def known(self) -> BoolArray:
        """(H', W') bool: True where the mask keeps the pixel (the input of `plan_bands`)."""
        return self.mask < MASK_THRESHOLD


def build_canvas(
    image: UInt8Array,
    ext: Extension,
    overlap: int = DEFAULT_OVERLAP,
    fill: FillMode = "edge",
    user_mask: npt.NDArray[Any] | None = None,
    *,
    blur_radius: float = DEFAULT_BLUR_RADIUS,
) -> Canvas:
    """Places an image on a canvas enlarged by `ext` and builds the mask of what to generate.

    An all-zero extension is accepted here (the canvas is the image, the mask the user mask);
    requests are checked by `rules.check_outpaint` first.

    Args:
        image (`np.ndarray`): (H, W, 3) uint8 RGB.
        ext (`Extension`): pixels to add on each side.
        overlap (`int`, *optional*, defaults to 16):
            Width of the band inside the original, along each extended side only, that is
            regenerated so the seam blends; clipped to the original's size.
        fill (`str`, *optional*, defaults to `"edge"`):
            How the new area is pre-filled: `"edge"` repeats the border pixels outward (as
            `np.pad(mode="edge")`); `"blur"` does the same, then replaces the new area with a
            Gaussian blur of the padded image, so `strength` < 1 starts from soft colours rather
            than streaks. The original's pixels are untouched in both.
        user_mask (`np.ndarray`, *optional*):
            (H, W) uint8 (>= 128 regenerates) or bool mask on the original, added to the mask.
        blur_radius (`float`, *optional*, defaults to 32.0): Gaussian radius of `"blur"`.

    Returns:
        `Canvas`: the canvas image, mask and geometry.
    """
    _check_image(image)
    _check_overlap(overlap)
    _check_fill(fill, blur_radius)
    original_size = (image.shape[0], image.shape[1])
    user = None if user_mask is None else _user_mask(user_mask, original_size)
    padded = _pad_edge(image, ext)  # (H', W', 3)
    canvas = Canvas(
        image=padded,
        mask=np.zeros(padded.shape[:2], dtype=np.uint8),  # (H', W'), filled below
        offset=(ext.top, ext.left),
        original_size=original_size,
        ext=ext,
        overlap=overlap,
        user_mask=user,
    )
    if fill == "blur":
        canvas.image[...] = _blur_new_area(padded, canvas.new_area, blur_radius)
    regenerate = _band_distance(canvas) < overlap  # new area (distance -1) and overlap band
    if user is not None:
        regenerate[canvas.original_slices] |= user
    canvas.mask[regenerate] = 255
    return canvas


def seam_alpha(canvas: Canvas, overlap: int | None = None) -> FloatArray:
    """Blend weight of the generated pixels for the final composite of an outpainted canvas.

    1 on the whole new area (up to the canvas border); inside the original, a smoothstep ramp
    across the overlap band of each extended side, from just below 1 next to the new area down
    to just above 0 at the band's inner edge (strictly decreasing with the distance into the
    original; where two bands meet, the larger weight); 0 beyond the band. Pixels of the user
    mask get 1 (a hard edge: combine with a feathered user-mask weight if wanted). The weight
    is > 0 only where `canvas.mask` is 255, so every kept pixel keeps weight 0 exactly.

    Args:
        canvas (`Canvas`): the canvas from `build_canvas`.
        overlap (`int`, *optional*, defaults to `canvas.overlap`):
            Width of the ramp; at most `canvas.overlap` (a wider ramp would blend pixels the
            mask told the model to keep).

    Returns:
        `np.ndarray`: (H', W') float32 in [0, 1].
    """
    width = canvas.overlap if overlap is None else overlap
    _check_overlap(width)
    if width > canvas.overlap:
        raise ValueError(
            f"overlap={width} is wider than the canvas' overlap band ({canvas.overlap})"
        )
    distance = _band_distance(canvas)  # -1 on the new area, inf off the bands
    t = np.clip((width - distance) / (width + 1), 0.0, 1.0)  # in (0, 1) on the band
    alpha = np.where(distance < 0, 1.0, t * t * (3.0 - 2.0 * t))  # smoothstep
    if canvas.user_mask is not None:
        alpha[canvas.original_slices] = np.where(
            canvas.user_mask, 1.0, alpha[canvas.original_slices]
        )
    return alpha.astype(np.float32)


@dataclass(frozen=True)
class Window:
    """A rectangle of the canvas processed as one band.

    Args:
        top (`int`): first row.
        left (`int`): first column.
        height (`int`): rows.
        width (`int`): columns.
    """

    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("top", "left"):
            if getattr(self, name) < 0:
                raise ValueError(f"window {name} must be >= 0, got {getattr(self, name)}")
        for name in ("height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"window {name} must be >= 1, got {getattr(self, name)}")

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.top + self.height

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.left + self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns): `canvas_array[window.slices]` is the window's crop."""
        return slice(self.top, self.bottom), slice(self.left, self.right)


def plan_bands(
    canvas_h: int, canvas_w: int, known: BoolArray, native: int, context: int
) -> list[Window]:
    """Plans the windows that generate a canvas band by band, each conditioned on what is known.

    Window size: every window is (min(native, canvas_h), min(native, canvas_w)): `native` (a
    multiple of 8) along a side where the canvas is larger, the whole side where it is not. A
    canvas that fits (both sides <= native) gives one window, the whole canvas.

    Order: a rectangle of known pixels grows until it is the whole canvas.

    1. Holes: if the bounding box of the known pixels (the box) holds unknown pixels (a user
       mask), windows tiling the holes' bounding box (raster order, spread evenly, neighbours
       overlapping by at least `context`) generate them first. For a plain outpaint the box
       is all known and this step emits nothing. With no known pixel at all, the box is the
       top-left window's rectangle.
    2. Left, then right: strips of one column of windows spanning the box's rows, each strip
       reaching at least `context` columns into the box (the columns to add are split evenly
       over the fewest strips, so each strip sees as much context as possible); the box grows
       to the canvas' left, then right edge.
    3. Top, then bottom: the same with rows of windows spanning the canvas' full width, so the
       corners see the left and right content generated in step 2.

    Windows with no unknown pixel left at their turn are dropped, so an all-known canvas gives
    an empty plan. Every window after the first overlaps pixels known by its turn (for
    `context` >= 1), and together the windows cover every unknown pixel. Example: 512x512
    extended by 512 on every side, native 512, context 64, overlap band 16: 20 windows of
    512x512 (2 left, 2 right, then 2 rows of 4 on top and 2 rows of 4 at the bottom).

    Band loop: for each window, generate on the crop `canvas[window.slices]` with
    `band_mask(known, window)`, paste the generated pixels where that mask is 255, then mark the
    window known (`known[window.slices] = True`).

    Args:
        canvas_h (`int`): canvas height H'.
        canvas_w (`int`): canvas width W'.
        known (`np.ndarray`): (H', W') bool, True = already known (e.g. `canvas.known`).
        native (`int`): the model's native working size (512 for SD 1.5), a multiple of 8.
        context (`int`): pixels of known content each window reaches into, in [0, native).

    Returns:
        `list[Window]`: the windows in generation order.
    """
    _check_plan(canvas_h, canvas_w, known, native, context)
    sizes = (min(native, canvas_h), min(native, canvas_w))
    planner = _Planner(known.copy(), sizes, context)
    box = _bounding_box(known) or ((0, sizes[0]), (0, sizes[1]))  # none: the top-left window
    planner.cover_holes(box)  # 1. holes inside the known box (a user mask)
    for axis, forward in ((1, False), (1, True), (0, False), (0, True)):
        box = planner.grow(box, axis, forward)  # 2. left, right; 3. top, bottom
    return planner.windows


def band_mask(known: BoolArray, window: Window) -> UInt8Array:
    """The mask of one band: 255 where the window's pixels are still unknown, 0 elsewhere.

    Args:
        known (`np.ndarray`): (H', W') bool, True = known or already generated.
        window (`Window`): the band's window, inside the canvas.

    Returns:
        `np.ndarray`: (window.height, window.width) uint8.
    """
    _check_known(known)
    if window.bottom > known.shape[0] or window.right > known.shape[1]:
        raise ValueError(f"window {window} does not fit the canvas of size {known.shape}")
    return np.where(known[window.slices], np.uint8(0), np.uint8(255)).astype(np.uint8)


# --- canvas helpers ---------------------------------------------------------------------------


def _pad_edge(image: UInt8Array, ext: Extension) -> UInt8Array:
    pad = ((ext.top, ext.bottom), (ext.left, ext.right), (0, 0))
    return np.ascontiguousarray(np.pad(image, pad, mode="edge"), dtype=np.uint8)


def _blur_new_area(padded: UInt8Array, new_area: BoolArray, radius: float) -> UInt8Array:
    blurred = np.asarray(Image.fromarray(padded).filter(ImageFilter.GaussianBlur(radius)))
    return np.where(new_area[..., None], blurred, padded).astype(np.uint8)


def _band_distance(canvas: Canvas) -> npt.NDArray[np.float64]:
    """(H', W'): -1 on the new area; inside the original, the distance in pixels from the
    nearest extended side (0 on the original's outermost row/column); inf if no side is."""
    height, width = canvas.original_size
    ext = canvas.ext
    rows = np.arange(height, dtype=np.float64)
    cols = np.arange(width, dtype=np.float64)
    from_rows = np.minimum(_side(rows, ext.top), _side(height - 1 - rows, ext.bottom))
    from_cols = np.minimum(_side(cols, ext.left), _side(width - 1 - cols, ext.right))
    distance = np.full(canvas.size, -1.0)
    distance[canvas.original_slices] = np.minimum(from_rows[:, None], from_cols[None, :])
    return distance


def _side(distance: npt.NDArray[np.float64], extended: int) -> npt.NDArray[np.float64]:
    return distance if extended > 0 else np.full_like(distance, math.inf)


def _user_mask(mask: npt.NDArray[Any], size: tuple[int, int]) -> BoolArray:
    if not isinstance(mask, np.ndarray) or mask.dtype not in (np.uint8, np.bool_):
        raise ValueError(
            f"user_mask must be a uint8 or bool array, got {_short(mask)} "
            f"of dtype {getattr(mask, 'dtype', None)}"
        )
    if mask.shape != size:
        raise ValueError(f"user_mask shape {mask.shape} does not match the image's {size}")
    binary: BoolArray = mask.copy() if mask.dtype == np.bool_ else mask >= MASK_THRESHOLD
    return binary


# --- band helpers -----------------------------------------------------------------------------


Span = tuple[int, int]  # [start, stop) along one axis
Box = tuple[Span, Span]  # (rows, columns)


class _Planner:
    """The state of `plan_bands`: pixels known so far and the windows emitted."""

    def __init__(self, done: BoolArray, sizes: tuple[int, int], context: int) -> None:
        self.done = done  # (H', W') bool, updated as windows are emitted
        self.sizes = sizes  # (height, width) of every window
        self.context = context
        self.windows: list[Window] = []

    def cover_holes(self, box: Box) -> None:
        """Emits windows tiling the bounding box of the unknown pixels inside `box`, if any."""
        (top, bottom), (left, right) = box
        holes = _bounding_box(~self.done[top:bottom, left:right])
        if holes is None:
            return
        (r0, r1), (c0, c1) = holes
        spans = ((top + r0, top + r1), (left + c0, left + c1))
        for row in self._spans(spans[0], 0):
            for col in self._spans(spans[1], 1):
                self._emit(row, col)

    def grow(self, box: Box, axis: int, forward: bool) -> Box:
        """Emits strips extending the (fully known) `box` along `axis` to the canvas edge."""
        length, size = self.done.shape[axis], self.sizes[axis]
        start, stop = box[axis]
        across = self._spans(box[1 - axis], 1 - axis)
        reach = size - self.context if size < length else size  # one window spans the axis
        while stop < length if forward else start > 0:
            step = _step(length - stop if forward else start, reach)
            if forward:
                stop = max(stop + step, size)
                position = stop - size
            else:
                start = position = min(start - step, length - size)
            for other in across:
                self._emit(*((position, other) if axis == 0 else (other, position)))
        return ((start, stop), box[1]) if axis == 0 else (box[0], (start, stop))

    def _spans(self, span: Span, axis: int) -> list[int]:
        """Window starts along `axis` covering `span`: one window centred on it if it fits,
        else the fewest windows spread evenly over it, neighbours overlapping by `context`."""
        length, size = self.done.shape[axis], self.sizes[axis]
        start, stop = span
        if stop - start <= size:
            return [min(max((start + stop - size) // 2, 0), length - size)]
        return [start + p for p in _axis_positions(stop - start, size, self.context)]

    def _emit(self, top: int, left: int) -> None:
        window = Window(top, left, *self.sizes)
        if not self.done[window.slices].all():
            self.windows.append(window)
            self.done[window.slices] = True


def _bounding_box(mask: BoolArray) -> Box | None:
    """The bounding box of the True pixels of `mask`; None if there is none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def _step(remaining: int, reach: int) -> int:
    """How far one strip advances: `remaining` split evenly over the fewest strips that each
    advance at most `reach`."""
    strips = -(-remaining // reach)
    return -(-remaining // strips)


def _axis_positions(length: int, size: int, context: int) -> list[int]:
    """The fewest window starts in [0, length - size], evenly spread, first at 0, last at
    length - size, consecutive ones at most `size - context` apart."""
    if length <= size:
        return [0]
    count = -(-(length - context) // (size - context))  # >= 2 since length > size
    span, gaps = length - size, count - 1
    return [(i * span + gaps // 2) // gaps for i in range(count)]


# --- checks -----------------------------------------------------------------------------------


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a uint8 array, got {_short(image)} "
            f"of dtype {getattr(image, 'dtype', None)}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3) with H, W >= 1, got {image.shape}")


def _check_overlap(overlap: Any) -> None:
    if not _is_int(overlap) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")


def _check_fill(fill: Any, blur_radius: Any) -> None:
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
    if not isinstance(blur_radius, (int, float)) or not 0 <= blur_radius < math.inf:
        raise ValueError(f"blur_radius must be a finite number >= 0, got {blur_radius!r}")


def _check_known(known: Any) -> None:
    if not isinstance(known, np.ndarray) or known.dtype != np.bool_ or known.ndim != 2:
        raise ValueError(
            f"known must be a 2-D bool array, got {_short(known)} "
            f"of dtype {getattr(known, 'dtype', None)}"
        )


def _check_plan(canvas_h: int, canvas_w: int, known: Any, native: int, context: int) -> None:
    for name, value in (("canvas_h", canvas_h), ("canvas_w", canvas_w)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    _check_known(known)
    if known.shape != (canvas_h, canvas_w):
        raise ValueError(
            f"known has shape {known.shape}, expected the canvas' {(canvas_h, canvas_w)}"
        )
    if not _is_int(native) or native < 8 or native % 8:
        raise ValueError(f"native must be a positive multiple of 8, got {native!r}")
    if not _is_int(context) or not 0 <= context < native:
        raise ValueError(f"context must be an int in [0, native={native}), got {context!r}")


def _is_int(value: Any) -> bool:
    """Whether `value` is a Python int, bools excluded."""
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = [
    "DEFAULT_OVERLAP",
    "Canvas",
    "Extension",
    "Window",
    "band_mask",
    "build_canvas",
    "plan_bands",
    "seam_alpha",
]
