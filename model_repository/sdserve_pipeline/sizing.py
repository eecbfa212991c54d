"""The size a request is generated at: its own size padded to the latent grid, or the
smallest size bucket containing it (the static shapes of TensorRT engines).

Buckets are `sdserve_protocol.sizes.SizeBucket`s, (height, width), written `WIDTHxHEIGHT`;
a request is padded to its bucket (`images.pad_to`) and its output cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from sdserve_protocol.contract import GenerationParams
from sdserve_protocol.rules import RequestError
from sdserve_protocol.sizes import SizeBucket, format_buckets


class SizeBucketError(ValueError):
    """A request larger than every size bucket the model serves."""


def padded_size(height: int, width: int, multiple: int) -> SizeBucket:
    """The smallest (height, width) >= the given one whose sides are multiples of `multiple`."""
    return SizeBucket(-(-height // multiple) * multiple, -(-width // multiple) * multiple)


def check_size_buckets(buckets: Iterable[tuple[int, int]], multiple: int) -> tuple[SizeBucket, ...]:
    """Sorted unique (height, width) buckets, each side a positive multiple of `multiple` (the
    VAE scale).

    Raises:
        ValueError: a bucket off the latent grid (a load-time problem of the model config).
    """
    checked = tuple(sorted({SizeBucket(int(h), int(w)) for h, w in buckets}))
    for bucket in checked:
        if bucket.height < 1 or bucket.width < 1:
            raise ValueError(f"size bucket {bucket.name} (WIDTHxHEIGHT) is not positive")
        bucket.latent(multiple)  # ValueError off the latent grid
    return checked


def snap_to_bucket(
    height: int, width: int, buckets: Sequence[SizeBucket], multiple: int
) -> SizeBucket:
    """The (height, width) a request is generated at.

    Without buckets: the request padded to a multiple of `multiple` (`padded_size`). With
    buckets: the smallest bucket containing the request (both sides >=); among those of
    equal area, the one closest to the request's aspect ratio, then the lower one.

    Args:
        height: request height in pixels.
        width: request width in pixels.
        buckets: the sizes the model serves (see `check_size_buckets`); empty for any size.
        multiple: the latent grid (VAE scale factor), used without buckets.

    Raises:
        SizeBucketError: the request is larger than every bucket.
    """
    if not buckets:
        return padded_size(height, width, multiple)
    fitting = [b for b in buckets if b.height >= height and b.width >= width]
    if not fitting:
        largest = max(buckets, key=lambda b: (b.height * b.width, b))
        listed = format_buckets(buckets).replace(",", ", ")
        raise SizeBucketError(
            f"height {height}, width {width} fits no size bucket of this model; the largest "
            f"is {largest.name} (WIDTHxHEIGHT; buckets: {listed})"
        )
    aspect = math.log(height / width)
    return min(
        fitting,
        key=lambda b: (b.height * b.width, abs(math.log(b.height / b.width) - aspect), b),
    )


def largest_square_side(buckets: Iterable[tuple[int, int]]) -> int:
    """Side of the largest square that fits in some bucket (0 without buckets)."""
    return max((min(height, width) for height, width in buckets), default=0)


class Sizing:
    """The sizes one pipeline generates at.

    Args:
        buckets: the sizes to generate at, each a multiple of `multiple`; empty: any size,
            padded to the latent grid.
        multiple: the latent grid (the VAE scale factor).

    Raises:
        ValueError: a bucket off the latent grid.
    """

    def __init__(self, buckets: Iterable[tuple[int, int]], multiple: int) -> None:
        self.buckets = check_size_buckets(buckets, multiple)
        self.multiple = multiple

    def generation_size(self, params: GenerationParams) -> SizeBucket:
        """(height, width) the request is generated at: its size padded to the latent grid,
        or snapped to the smallest size bucket containing it.

        Raises:
            RequestError: the request is larger than every size bucket (naming `image`, or
                `height`/`width` for text-to-image).
        """
        try:
            return snap_to_bucket(params.height, params.width, self.buckets, self.multiple)
        except SizeBucketError as err:
            raise RequestError(self._size_input(params), str(err)) from None

    def check(self, params: GenerationParams) -> None:
        """Reject at validation time a request no size bucket can serve.

        Outpainting requests pass: their bands are planned to fit the buckets (see
        `outpaint.band_side`), whatever the canvas size.

        Raises:
            RequestError: see `generation_size`.
        """
        if params.outpaint is None:
            self.generation_size(params)

    def _size_input(self, params: GenerationParams) -> str:
        """The wire input a size error concerns: `image`; text-to-image and a cropped request
        (generated at height x width): `width` when the width alone exceeds every bucket, else
        `height`."""
        if params.image is not None and params.padding_mask_crop is None:
            return "image"
        if all(bucket.width < params.width for bucket in self.buckets):
            return "width"
        return "height"
