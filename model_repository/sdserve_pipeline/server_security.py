"""Who may use Triton's control APIs, and TLS for gRPC.

Triton's model-repository API loads models from files a client sends, and the Python
backend runs them: whoever reaches it runs code in the server. So the launcher closes the
control APIs (model repository, shared memory, statistics, trace, logging) on both gRPC and
HTTP with Triton's own restricted-protocol settings, behind a key header; inference,
health, metadata and model config stay open (the SDK and the web UI read the served limits
from the config, which holds nothing secret).

The operator's key comes from `SDSERVE_ADMIN_KEY` (the value) or `SDSERVE_ADMIN_KEY_FILE`
(a file holding it); without either, a key is generated for this start and written to a
file readable by its owner only. HTTP clients send it as the `sdserve-admin-key` header;
Triton's gRPC frontend expects it as `triton-grpc-protocol-sdserve-admin-key`, e.g.
`grpc_client.unload_model("inpaint", headers={"triton-grpc-protocol-sdserve-admin-key": key})`.
Without it Triton answers HTTP 403, or gRPC UNAVAILABLE "This protocol is restricted".

Triton takes the key on its command line, so local users who can read the server's
`/proc/<pid>/cmdline` (same user, or root) can read it: run the server as its own user.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sdserve_protocol.auth import ADMIN_KEY_HEADER, GRPC_ADMIN_KEY_HEADER

ADMIN_KEY_ENV = "SDSERVE_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "SDSERVE_ADMIN_KEY_FILE"
# Triton's names (tritonserver --help, "Allowed protocols"); the same on gRPC and HTTP.
RESTRICTED_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
OPEN_APIS = ("health", "metadata", "inference", "model-config")


class SecurityConfigError(ValueError):
    """The admin key or the TLS files are unusable."""


@dataclass(frozen=True)
class AdminKey:
    """The operator's key for Triton's control APIs.

    Args:
        value (`str`): The key; sent in the `sdserve-admin-key` header.
        source (`str`): Where it came from, for the launcher's log (never the key itself).
    """

    value: str
    source: str

    @property
    def headers(self) -> dict[str, str]:
        """The HTTP header that opens the control APIs (tritonclient.http's `headers=`)."""
        return {ADMIN_KEY_HEADER: self.value}

    @property
    def grpc_headers(self) -> dict[str, str]:
        """The gRPC metadata that opens the control APIs (tritonclient.grpc's `headers=`)."""
        return {GRPC_ADMIN_KEY_HEADER: self.value}

    def server_args(self) -> list[str]:
        """tritonserver flags closing `RESTRICTED_APIS` on gRPC and HTTP behind this key."""
        setting = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.value}"
        return [f"--grpc-restricted-protocol={setting}", f"--http-restricted-api={setting}"]


def _checked(value: str, source: str) -> AdminKey:
    key = value.strip()
    if not key:
        raise SecurityConfigError(f"the admin key from {source} is empty")
    # printable ASCII (a header value), and no ':' or '=': tritonserver reads the flag as
    # "<apis>:<header>=<key>" (docker/entrypoint.sh checks the same)
    if not (key.isascii() and key.isprintable()) or any(c in ":=" for c in key):
        raise SecurityConfigError(
            f"the admin key from {source} must be printable ASCII without ':' or '='"
        )
    return AdminKey(key, source)


def resolve_admin_key(env: Mapping[str, str], generated_path: Path) -> AdminKey:
    """The admin key: `SDSERVE_ADMIN_KEY` or the file `SDSERVE_ADMIN_KEY_FILE` (not both, as
    in docker/entrypoint.sh), else a new random key written to `generated_path` (mode 0600,
    replaced on every start).

    Args:
        env (`Mapping[str, str]`): Environment to read (usually `os.environ`).
        generated_path (`Path`): Where a generated key is written.

    Returns:
        The key and where it came from.

    Raises:
        SecurityConfigError: Both are set, the key is empty or malformed, or its file
            unreadable.
    """
    if env.get(ADMIN_KEY_ENV) and env.get(ADMIN_KEY_FILE_ENV):
        raise SecurityConfigError(f"set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}, not both")
    if env.get(ADMIN_KEY_ENV):
        return _checked(env[ADMIN_KEY_ENV], f"${ADMIN_KEY_ENV}")
    if env.get(ADMIN_KEY_FILE_ENV):
        path = Path(env[ADMIN_KEY_FILE_ENV])
        try:
            return _checked(path.read_text(), str(path))
        except OSError as exc:
            raise SecurityConfigError(f"cannot read the admin key file {path}: {exc}") from None
    generated_path.parent.mkdir(parents=True, exist_ok=True)
    generated_path.unlink(missing_ok=True)
    key = secrets.token_hex(32)
    fd = os.open(generated_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return AdminKey(key, f"generated for this start, in {generated_path}")


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the gRPC endpoint (Triton's HTTP endpoint has no TLS; keep it on loopback or
    behind a proxy that terminates TLS).

    Args:
        cert (`Path`): PEM server certificate (chain).
        key (`Path`): PEM private key of `cert`.
        client_ca (`Path`, *optional*):
            PEM CA bundle; when given, clients must present a certificate it signed
            (mutual TLS).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Raises `SecurityConfigError` naming the first file that cannot be read."""
        for role, path in (("cert", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path is not None and not os.access(path, os.R_OK):
                raise SecurityConfigError(f"TLS {role} file {path} is missing or unreadable")

    def server_args(self) -> list[str]:
        """tritonserver flags serving gRPC over TLS (mutual when `client_ca` is set)."""
        args = [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={Path(self.cert).resolve()}",
            f"--grpc-server-key={Path(self.key).resolve()}",
        ]
        if self.client_ca is not None:
            ca = Path(self.client_ca).resolve()
            args += [f"--grpc-root-cert={ca}", "--grpc-use-ssl-mutual=true"]
        return args


__all__ = [
    "ADMIN_KEY_ENV",
    "ADMIN_KEY_FILE_ENV",
    "ADMIN_KEY_HEADER",
    "GRPC_ADMIN_KEY_HEADER",
    "OPEN_APIS",
    "RESTRICTED_APIS",
    "AdminKey",
    "SecurityConfigError",
    "TlsConfig",
    "resolve_admin_key",
]
