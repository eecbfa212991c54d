"""TLS for the SDK's gRPC channels, and plain words for connection failures.

Triton serves gRPC over TLS with `--grpc-use-ssl=true` (server certificate and key) and
asks clients for their own certificate with `--grpc-use-ssl-mutual=true`; `serve --tls-cert
--tls-key [--tls-client-ca]` sets both. A client then trusts the CA that signed the server's
certificate (`TlsSettings.root_certificates`) and, for mutual TLS, presents a key and a
certificate chain of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import tritonclient.grpc as grpcclient  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from .errors import SdserveError

# tritonclient's own channel defaults (no message size limit, keepalive as gRPC's), plus a
# short reconnect backoff: gRPC's default grows to 120 s, which would keep a replica that
# came back unreachable long after the pool's own re-probe.
_MAX_MESSAGE = 2**31 - 1
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.keepalive_time_ms", _MAX_MESSAGE),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


@dataclass(frozen=True)
class TlsSettings:
    """How the SDK connects over TLS (`InpaintClient(..., ssl=TlsSettings(...))`).

    Args:
        root_certificates (`str` or `Path`, *optional*):
            PEM file of the CA certificates that may sign the server's certificate; `None`
            trusts gRPC's bundled public roots.
        private_key (`str` or `Path`, *optional*): PEM client key, for mutual TLS.
        certificate_chain (`str` or `Path`, *optional*):
            PEM client certificate (chain), for mutual TLS; given with `private_key`.
        target_name (`str`, *optional*):
            The name the server's certificate must hold, when it differs from the host in the
            address (e.g. connecting by IP to a certificate issued for a DNS name).
    """

    root_certificates: str | Path | None = None
    private_key: str | Path | None = None
    certificate_chain: str | Path | None = None
    target_name: str | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise SdserveError(
                "mutual TLS needs both a client key and a client certificate, got only the "
                + ("key" if self.private_key is not None else "certificate")
            )

    @property
    def mutual(self) -> bool:
        """Whether a client certificate is presented."""
        return self.certificate_chain is not None

    def credentials(self) -> Any:
        """gRPC channel credentials from the PEM files (read now, so a bad path fails here)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read("root certificates", self.root_certificates),
            private_key=_read("client key", self.private_key),
            certificate_chain=_read("client certificate", self.certificate_chain),
        )


SslOption = bool | TlsSettings
"""`InpaintClient`'s `ssl`: `False` plaintext, `True` TLS with gRPC's public roots, or
`TlsSettings`."""


def tls_settings(ssl: SslOption | None) -> TlsSettings | None:
    """The `TlsSettings` an `ssl` argument stands for; `None` for plaintext."""
    if ssl is None or ssl is False:
        return None
    if ssl is True:
        return TlsSettings()
    if isinstance(ssl, TlsSettings):
        return ssl
    raise SdserveError(f"ssl must be a bool or TlsSettings, got {type(ssl).__name__}")


def connect(url: str, tls: TlsSettings | None) -> Any:
    """A `tritonclient.grpc.InferenceServerClient` of `url`, over TLS when `tls` is given.

    gRPC connects lazily: nothing is sent until the first call.
    """
    options = list(_CHANNEL_OPTIONS)
    creds = None
    if tls is not None:
        creds = tls.credentials()
        if tls.target_name:
            options.append(("grpc.ssl_target_name_override", tls.target_name))
    try:
        return grpcclient.InferenceServerClient(url, creds=creds, channel_args=options)
    except InferenceServerException as exc:
        raise SdserveError.from_triton(exc) from None


# Failures while gRPC sets up a connection, as its messages word them (grpcio 1.6x-1.8x).
_CONNECT_PREFIX = "failed to connect to all addresses"
_HANDSHAKE = re.compile(r"handshake failed|SSL_ERROR|TSI_", re.IGNORECASE)


def explain(url: str, message: str, tls: TlsSettings | None) -> str:
    """`message` of a failed call to `url` with a plain explanation in front when it is a TLS
    or connection-setup failure (wrong CA, TLS against a plaintext port or the reverse, a
    missing client certificate); any other message is returned as it is."""
    if _CONNECT_PREFIX not in message:
        return message
    reason = _reason(message, url, tls)
    return message if reason is None else f"{reason} ({message})"


def _reason(message: str, url: str, tls: TlsSettings | None) -> str | None:
    if _HANDSHAKE.search(message):
        if "WRONG_VERSION_NUMBER" in message:
            return (
                f"TLS handshake with {url} failed: the server does not use TLS; connect without ssl"
            )
        if "CERTIFICATE_VERIFY_FAILED" in message:
            roots = (
                f"the root certificates in {tls.root_certificates}"
                if tls is not None and tls.root_certificates is not None
                else "gRPC's public root certificates (give the CA's file as root certificates)"
            )
            return (
                f"TLS handshake with {url} failed: the server's certificate is not signed by a "
                f"CA in {roots}"
            )
        if "Peer name" in message or "hostname" in message.lower():
            return (
                f"TLS handshake with {url} failed: the server's certificate does not name this "
                "host; connect by a name it holds or set TlsSettings.target_name"
            )
        return f"TLS handshake with {url} failed"
    if "Socket closed" in message or "Connection reset" in message:
        if tls is None:
            return (
                f"{url} closed the connection while it was being set up: the server may "
                "require TLS (connect with ssl and the root certificates of its CA)"
            )
        if not tls.mutual:
            return (
                f"{url} closed the TLS connection while it was being set up: the server may "
                "require a client certificate (mutual TLS: give a client key and certificate)"
            )
        return (
            f"{url} closed the TLS connection while it was being set up: it may not trust "
            "the client certificate's CA"
        )
    return None


def _read(what: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SdserveError(f"cannot read the TLS {what} {str(path)!r}: {exc.strerror}") from None


__all__ = ["SslOption", "TlsSettings", "connect", "explain", "tls_settings"]
