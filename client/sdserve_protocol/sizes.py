"""Size buckets: the static image sizes a model serves (TensorRT engines are built for them).

One type for the pipeline (which snaps requests to a bucket) and the export (which builds
engines and writes the `size_buckets` parameter). A bucket is (height, width) in pixels, as
numpy arrays are; as text (the config parameter, plan names, the command line) it is written
`WIDTHxHEIGHT`, e.g. `1152x896`, as the Stable Diffusion world writes sizes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

_BUCKET = re.compile(r"(\d+)x(\d+)")


class SizeBucket(NamedTuple):
    """A static image size: (height, width) in pixels.

    Args:
        height (`int`): rows.
        width (`int`): columns.
    """

    height: int
    width: int

    @property
    def name(self) -> str:
        """`WIDTHxHEIGHT`, as in the `size_buckets` parameter, plan names and on the command
        line."""
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, text: str) -> SizeBucket:
        """`"1152x896"` → `SizeBucket(height=896, width=1152)`.

        Raises:
            ValueError: not `WIDTHxHEIGHT` with positive sides.
        """
        match = _BUCKET.fullmatch(text.strip().lower())
        if not match or not int(match.group(1)) or not int(match.group(2)):
            raise ValueError(f"size bucket {text.strip()!r} is not WIDTHxHEIGHT, e.g. '1152x896'")
        return cls(height=int(match.group(2)), width=int(match.group(1)))

    def latent(self, vae_scale_factor: int) -> tuple[int, int]:
        """(latent_height, latent_width) for a VAE that downsamples by `vae_scale_factor`.

        Raises:
            ValueError: a side is not a multiple of `vae_scale_factor`.
        """
        if self.width % vae_scale_factor or self.height % vae_scale_factor:
            raise ValueError(
                f"size bucket {self.name} (WIDTHxHEIGHT) is not a multiple of the VAE scale "
                f"factor {vae_scale_factor}"
            )
        return self.height // vae_scale_factor, self.width // vae_scale_factor


def parse_buckets(text: str) -> tuple[SizeBucket, ...]:
    """Comma-separated `WIDTHxHEIGHT` sizes → sorted unique buckets; blank text → none.

    Raises:
        ValueError: an entry is not `WIDTHxHEIGHT` with positive sides.
    """
    return tuple(sorted({SizeBucket.parse(part) for part in text.split(",") if part.strip()}))


def format_buckets(buckets: Iterable[SizeBucket]) -> str:
    """Buckets → the `size_buckets` parameter text (`WIDTHxHEIGHT,...`, sorted, unique)."""
    return ",".join(bucket.name for bucket in sorted(set(buckets)))
