"""The launcher's own client for Triton's health and control APIs, over HTTP (stdlib only).

The launcher talks HTTP on the loopback address even when gRPC is served over TLS (Triton's
HTTP endpoint has no TLS, and mutual TLS would refuse a launcher without a client
certificate). Control calls (repository index, load, unload) carry the operator's key
header; health, readiness and model config are open.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ControlError(RuntimeError):
    """A control call failed: the server is not answering, or answered with an error."""


@dataclass(frozen=True)
class ModelState:
    """One entry of Triton's repository index."""

    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING, or "" when never loaded
    reason: str = ""


@dataclass(frozen=True)
class ControlClient:
    """Triton's HTTP API at `http_url` (`host:port`), with `headers` on every call.

    Args:
        http_url (`str`): `host:port` of Triton's HTTP endpoint.
        headers (`Mapping[str, str]`, *optional*): Sent with every call (the admin key).
        timeout_s (`float`, *optional*, defaults to 10.0):
            Socket timeout of one call (load and unload: `load_timeout_s`).
        load_timeout_s (`float`, *optional*, defaults to 600.0): Socket timeout of a load.
    """

    http_url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    load_timeout_s: float = 600.0

    def _call(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{self.http_url}{path}", data=data, method=method, headers=dict(self.headers)
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        except (OSError, urllib.error.URLError) as err:
            raise ControlError(f"{method} {path}: server not answering ({err})") from None
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def _checked(self, method: str, path: str, **kwargs: Any) -> Any:
        status, body = self._call(method, path, **kwargs)
        if status != 200:
            message = body.get("error", body) if isinstance(body, dict) else body
            raise ControlError(f"{method} {path}: HTTP {status}: {message}")
        return body

    def is_live(self) -> bool:
        """Whether the server answers `/v2/health/live` with 200."""
        return self._call("GET", "/v2/health/live")[0] == 200

    def is_ready(self) -> bool:
        """Whether the server answers `/v2/health/ready` with 200."""
        return self._call("GET", "/v2/health/ready")[0] == 200

    def is_model_ready(self, name: str) -> bool:
        """Whether model `name` answers `/v2/models/<name>/ready` with 200."""
        return self._call("GET", f"/v2/models/{_quote(name)}/ready")[0] == 200

    def model_config(self, name: str) -> dict[str, Any]:
        """Model `name`'s configuration, as JSON."""
        config: dict[str, Any] = self._checked("GET", f"/v2/models/{_quote(name)}/config")
        return config

    def index(self) -> list[ModelState]:
        """The repository index (needs the admin key)."""
        entries = self._checked("POST", "/v2/repository/index", body={}) or []
        return [
            ModelState(e["name"], e.get("version", ""), e.get("state", ""), e.get("reason", ""))
            for e in entries
        ]

    def load(self, name: str) -> None:
        """Loads (or reloads) model `name` from the repository; returns once it is loaded."""
        path = f"/v2/repository/models/{_quote(name)}/load"
        self._checked("POST", path, body={}, timeout_s=self.load_timeout_s)

    def unload(self, name: str) -> None:
        """Starts unloading model `name`; in-flight requests finish first (poll `index`)."""
        self._checked("POST", f"/v2/repository/models/{_quote(name)}/unload", body={})


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


__all__ = ["ControlClient", "ControlError", "ModelState"]
