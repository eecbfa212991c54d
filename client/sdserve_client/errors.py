"""The one exception type of the SDK."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from sdserve_protocol.events import parse_stream_error


class SdserveError(Exception):
    """An error reported by the server, the transport, or the client's own input checks.

    Args:
        message (`str`):
            Human-readable description; for server errors, the server's own message.
        status (`str`, *optional*):
            The gRPC status string when known (e.g. `"StatusCode.INVALID_ARGUMENT"`).
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"[{self.status}] {self.message}" if self.status else self.message

    @classmethod
    def from_triton(cls, exc: InferenceServerException) -> SdserveError:
        """Builds an `SdserveError` from a tritonclient `InferenceServerException`."""
        message = str(exc.message() or exc)
        status = exc.status()
        if status is None:  # a stream's error: its status leads its message
            status, message = parse_stream_error(message)
        return cls(message, str(status) if status is not None else None)


class InvalidRequestError(SdserveError, ValueError):
    """A request rejected by the client-side checks before anything is sent."""


__all__ = ["InvalidRequestError", "SdserveError"]
