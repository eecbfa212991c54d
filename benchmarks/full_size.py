"""The full-size SD 1.5-inpainting architecture with random weights, for performance work.

Random weights cost exactly the compute of the real checkpoint (same shapes, same kernels),
and need no download. The builder (`common.ensure_full_size`, shared with `throughput.py`)
saves a diffusers folder and exports it into a Triton model repository with
`sdserve_export.repository.build_repository`; both are cached, so a second call returns at
once.

Usage (from the repository root; a few minutes and about 4 GB of disk the first time):

    .venv/bin/python benchmarks/full_size.py
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common import PIPELINE_FOLDER, REPOSITORY, ensure_full_size


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: build what is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=PIPELINE_FOLDER)
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    args = parser.parse_args(argv)
    ensure_full_size(args.folder, args.repository)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
