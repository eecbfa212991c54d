"""TensorRT plan file names: everything a plan depends on is in its name.

`EngineKey` is the name: component, TensorRT version, GPU compute capability, precision,
batch range, size buckets and a digest of the ONNX source, e.g.
`unet.trt10.5.0.sm90.fp16.b2-8.512x512_768x768.onnx-1a2b3c4d5e6f.plan`, plus its parser.
`find_engine` accepts exact matches only, so a stale plan is never loaded. Pure: no
TensorRT, no GPU.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from sdserve_export.engine_profiles import BatchRange

PLAN_SUFFIX = ".plan"
PRECISIONS = ("fp16", "fp32")
DIGEST_CHARS = 12

_PLAN_NAME = re.compile(
    r"(?P<component>[A-Za-z0-9_\-]+)"
    r"\.trt(?P<trt>\d+\.\d+\.\d+)"
    r"\.sm(?P<sm>\d{2,3})"
    r"\.(?P<precision>fp16|fp32)"
    r"\.(?P<batch>b\d+-\d+(?:-\d+)?)"
    r"\.(?P<profiles>static|\d+x\d+(?:_\d+x\d+)*)"
    r"\.onnx-(?P<digest>[0-9a-f]{12})"
    r"\.plan"
)


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; its file name is the key, so a mismatch is a miss.

    Args:
        component: Triton model name of the component (`unet`, `base_unet`, ...).
        trt_version: TensorRT `major.minor.patch` the plan was built with.
        compute_capability: (major, minor) of the GPU it was built for, e.g. (9, 0).
        precision: `fp16` or `fp32`.
        batch: (min, opt, max) batch.
        profiles: profile names in profile-index order (bucket names, or `static`).
        onnx_digest: first 12 hex digits of the ONNX source's sha256 (`onnx_digest`).
    """

    component: str
    trt_version: str
    compute_capability: tuple[int, int]
    precision: str
    batch: tuple[int, int, int]
    profiles: tuple[str, ...]
    onnx_digest: str

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not in {PRECISIONS}")
        if not re.fullmatch(r"\d+\.\d+\.\d+", self.trt_version):
            raise ValueError(f"TensorRT version {self.trt_version!r} is not major.minor.patch")

    @property
    def filename(self) -> str:
        """E.g. `unet.trt10.5.0.sm90.fp16.b2-8.512x512_768x768.onnx-1a2b3c4d5e6f.plan`."""
        major, minor = self.compute_capability
        batch = BatchRange(*self.batch).tag
        return (
            f"{self.component}.trt{self.trt_version}.sm{major}{minor}.{self.precision}."
            f"{batch}.{'_'.join(self.profiles)}.onnx-{self.onnx_digest}{PLAN_SUFFIX}"
        )

    @classmethod
    def parse(cls, filename: str) -> EngineKey:
        """Inverse of `filename`; raises ValueError on any other name."""
        match = _PLAN_NAME.fullmatch(filename)
        if not match:
            raise ValueError(f"{filename!r} is not an sdserve plan name")
        sm = match["sm"]
        return cls(
            component=match["component"],
            trt_version=match["trt"],
            compute_capability=(int(sm[:-1]), int(sm[-1])),
            precision=match["precision"],
            batch=BatchRange.parse_tag(match["batch"]),
            profiles=tuple(match["profiles"].split("_")),
            onnx_digest=match["digest"],
        )


def find_engine(directory: Path, key: EngineKey) -> Path | None:
    """The plan in `directory` whose name parses to exactly `key`, or None.

    Plans for other TensorRT versions, GPUs, precisions, batch ranges, buckets or ONNX
    sources are never returned (see `stale_engines`).
    """
    for path in sorted(Path(directory).glob(f"*{PLAN_SUFFIX}")):
        if _parse_or_none(path.name) == key and path.stat().st_size > 0:
            return path
    return None


def stale_engines(directory: Path, key: EngineKey) -> list[Path]:
    """Plans of the same component that do not match `key` (for logging or cleanup)."""
    stale = []
    for path in sorted(Path(directory).glob(f"*{PLAN_SUFFIX}")):
        parsed = _parse_or_none(path.name)
        if parsed is not None and parsed.component == key.component and parsed != key:
            stale.append(path)
    return stale


def _parse_or_none(filename: str) -> EngineKey | None:
    try:
        return EngineKey.parse(filename)
    except ValueError:
        return None


def normalize_trt_version(version: str) -> str:
    """`10.5.0.18` or `10.5.0.post1` → `10.5.0`."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return ".".join(match.groups())


def onnx_digest(onnx_file: Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 (first 12 hex digits) of an ONNX file and the external-data files beside it."""
    digest = hashlib.sha256()
    for path in _onnx_source_files(Path(onnx_file)):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            while chunk := stream.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()[:DIGEST_CHARS]


def _onnx_source_files(onnx_file: Path) -> list[Path]:
    """The ONNX file, then every external-data file it references (sorted)."""
    import onnx  # heavy import, only where digests are taken

    model = onnx.load(str(onnx_file), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [onnx_file, *(onnx_file.parent / name for name in sorted(locations))]


def timing_cache_path(
    directory: Path, trt_version: str, compute_capability: tuple[int, int]
) -> Path:
    """One timing cache per TensorRT version and GPU architecture."""
    major, minor = compute_capability
    return Path(directory) / f"timing.trt{trt_version}.sm{major}{minor}.cache"
