"""The events of a streamed request (README.md, "Streaming"), declared once.

A streamed request (the pipeline's `<name>_stream` model, over Triton's gRPC bidirectional
stream) gets small typed responses while it runs, then its result:

- `Queued`: its place in the queue (1: next to start), when it changes;
- `Progress`: after each denoising step, the step, the total, seconds since it started and
  an estimate of the seconds left (outpainting: which band of how many);
- `Preview`: every `preview_every` steps, an approximate image of the request's size (a
  linear projection of the latents, the generated region over the input elsewhere);
- the result: the unary call's outputs (`images`, `seeds`) with `event` = "result".

Each event is one response whose `event` output names its kind; `EVENT_OUTPUTS` declares the
tensors (the stream model's config, the server's encoder and the SDK's decoder read them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .contract import OUTPUTS, WireInput, WireTensor

Array = npt.NDArray[Any]

EVENT_OUTPUTS: tuple[WireTensor, ...] = (
    WireTensor("event", "BYTES", (1,)),  # "queued", "progress", "preview" or "result"
    WireTensor("queue_position", "INT32", (1,)),
    WireTensor("step", "INT32", (1,)),
    WireTensor("total_steps", "INT32", (1,)),
    WireTensor("band", "INT32", (2,)),  # (band from 1, bands); (1, 1) but for outpainting
    WireTensor("elapsed_s", "FP32", (1,)),
    WireTensor("eta_s", "FP32", (1,)),
    WireTensor("time_s", "FP64", (1,)),  # Unix time the step ended (server clock)
    WireTensor("preview", "UINT8", (-1, -1, -1, 3)),
)
STREAM_OUTPUTS: tuple[WireTensor, ...] = (*OUTPUTS, *EVENT_OUTPUTS)
"""Outputs of the stream model: the result's and the events'."""

STREAM_ID = WireInput("stream_id", "BYTES", (1,))
"""Set by the stream model when it hands a request to the pipeline model (and on the events
the pipeline sends back): the stream's random id. Not a client input."""
CANCELLED = WireTensor("cancelled", "BOOL", (-1,))
"""The stream model's answer to a batch of events: per event, its client has gone or
cancelled."""

STREAM_SUFFIX = "_stream"
RESULT = "result"


ERROR_STATUS: dict[str, str] = {
    "INVALID_ARG": "StatusCode.INVALID_ARGUMENT",
    "UNAVAILABLE": "StatusCode.UNAVAILABLE",
    "CANCELLED": "StatusCode.CANCELLED",
    "INTERNAL": "StatusCode.INTERNAL",
    "NOT_FOUND": "StatusCode.NOT_FOUND",
    "UNSUPPORTED": "StatusCode.UNIMPLEMENTED",
    "ALREADY_EXISTS": "StatusCode.ALREADY_EXISTS",
    "UNKNOWN": "StatusCode.UNKNOWN",
}
"""A stream's error keeps its code: Triton's gRPC stream carries an error as its message only,
so the stream model writes `stream_error_text` (the gRPC status of the python backend's
`TritonError` code first) and the SDK reads it back (`parse_stream_error`), giving streamed
requests the status a unary call gets."""


def stream_error_text(code: str, message: str) -> str:
    """A stream's error message for `TritonError` code name `code` (`ERROR_STATUS`)."""
    return f"{ERROR_STATUS.get(code, ERROR_STATUS['UNKNOWN'])}: {message}"


def parse_stream_error(text: str) -> tuple[str | None, str]:
    """(gRPC status, message) of a stream's error (`stream_error_text`); (None, text) when it
    carries no status."""
    status, _, message = text.partition(": ")
    if status in ERROR_STATUS.values():
        return status, message
    return None, text


def stream_model_name(pipeline: str) -> str:
    """The decoupled model that streams `pipeline`'s requests."""
    return pipeline + STREAM_SUFFIX


@dataclass(frozen=True)
class Queued:
    """Waiting to start; `position` 1 is next."""

    position: int


@dataclass(frozen=True)
class Progress:
    """A denoising step done: `step` of `total_steps` (over every band and image of an
    outpainting request), `band` of `bands`; `time_s`: the Unix time it ended, on the
    server's clock (0: not told)."""

    step: int
    total_steps: int
    elapsed_s: float
    eta_s: float
    band: int = 1
    bands: int = 1
    time_s: float = 0.0


@dataclass(frozen=True)
class Preview:
    """An approximate image after `step` of `total_steps`: (N, H, W, 3) uint8."""

    step: int
    total_steps: int
    images: Array = field(repr=False)


@dataclass(frozen=True)
class Result:
    """The request's outputs, as a unary call returns them."""

    outputs: Mapping[str, Array] = field(repr=False)


Event = Queued | Progress | Preview | Result


def encode_event(event: Queued | Progress | Preview) -> dict[str, Array]:
    """An event → its response tensors (no leading batch dim)."""

    def one(value: float, dtype: type) -> Array:
        return np.asarray([value], dtype=dtype)

    if isinstance(event, Queued):
        kind, fields = "queued", {"queue_position": one(event.position, np.int32)}
    elif isinstance(event, Progress):
        kind, fields = "progress", {
            "step": one(event.step, np.int32), "total_steps": one(event.total_steps, np.int32),
            "band": np.asarray([event.band, event.bands], dtype=np.int32),
            "elapsed_s": one(event.elapsed_s, np.float32), "eta_s": one(event.eta_s, np.float32),
            "time_s": one(event.time_s, np.float64),
        }  # fmt: skip
    else:
        kind, fields = "preview", {
            "step": one(event.step, np.int32), "total_steps": one(event.total_steps, np.int32),
            "preview": np.ascontiguousarray(event.images, dtype=np.uint8),
        }  # fmt: skip
    return {"event": np.asarray([kind.encode()], dtype=np.object_), **fields}


def encode_events(events: Sequence[Queued | Progress | Preview]) -> dict[str, Array]:
    """Events of one kind (previews: of one shape) → their tensors stacked, (k, ...) each:
    the pipeline sends the events of several streams to the stream model in one call.

    Raises:
        ValueError: no events, or events of several kinds or preview shapes.
    """
    encoded = [encode_event(event) for event in events]
    if not encoded or any(
        e.keys() != encoded[0].keys() or any(e[k].shape != encoded[0][k].shape for k in e)
        for e in encoded
    ):
        raise ValueError("encode_events needs events of one kind and shape")
    return {name: np.stack([e[name] for e in encoded]) for name in encoded[0]}


def decode_event(outputs: Mapping[str, Array]) -> Event:
    """A stream response's tensors (no leading batch dim) → its event.

    Raises:
        ValueError: the response names no known event.
    """
    raw = outputs.get("event")
    kind = text_of(raw[0]) if raw is not None and len(raw) else RESULT
    if kind == RESULT:
        return Result({k: v for k, v in outputs.items() if k in {t.name for t in OUTPUTS}})
    if kind == "queued":
        return Queued(int(outputs["queue_position"][0]))
    if kind == "progress":
        band, bands = (int(v) for v in outputs["band"])
        return Progress(
            int(outputs["step"][0]), int(outputs["total_steps"][0]),
            float(outputs["elapsed_s"][0]), float(outputs["eta_s"][0]), band, bands,
            float(outputs["time_s"][0]) if "time_s" in outputs else 0.0,
        )  # fmt: skip
    if kind == "preview":
        return Preview(int(outputs["step"][0]), int(outputs["total_steps"][0]), outputs["preview"])
    raise ValueError(f"unknown stream event {kind!r}")


def text_of(value: Any) -> str:
    """A BYTES tensor item as text (bytes over the wire, str in-process)."""
    return value.decode() if isinstance(value, bytes) else str(value)
