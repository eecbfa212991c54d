"""Serve a model repository with the wheel's `tritonserver` until Ctrl-C or SIGTERM.

Usage:
    python -m sdserve_pipeline.serve --repository build/model_repository
        [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
        [--tls-cert server.pem --tls-key server.key [--tls-client-ca ca.pem]]

Triton's control APIs (model repository, shared memory, statistics, trace, logging) are
closed behind the key from $SDSERVE_ADMIN_KEY or the file $SDSERVE_ADMIN_KEY_FILE; without
either, a key is generated for this start into the build folder (its path is printed).
A model whose backend stub dies is reloaded (the server reports not-ready meanwhile).

Prints loading progress, then the endpoint URLs once every model is ready. On Ctrl-C or
SIGTERM the server gets SIGTERM, in-flight requests get `--exit-timeout-secs`, and the
launcher exits 0. It exits 1 if the server fails to become ready or dies on its own.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from sdserve_pipeline.server_security import SecurityConfigError, TlsConfig
from sdserve_pipeline.triton_server import DEFAULT_HOST, TritonServer, TritonServerError


class ShutdownRequested(Exception):
    """Raised in the main thread by the SIGINT/SIGTERM handler."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m sdserve_pipeline.serve", description=__doc__)
    parser.add_argument("--repository", required=True, help="Triton model repository folder")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (all endpoints)")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument(
        "--exit-timeout-secs", type=int, default=30, help="grace period for in-flight requests"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for every model"
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose")
    parser.add_argument("--build-dir", default="build", help="holds the backend dir and logs")
    parser.add_argument("--log-file", default=None, help="server log (default: under build)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: gRPC over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", default=None, help="PEM CA: clients must show a cert it signed"
    )
    parser.add_argument(
        "--checkpoint-budget-mb", default=None,
        help="MB the components of checkpoints loaded on demand may hold together ('auto': "
        "half the memory, the default; 0: no limit); default: $SDSERVE_CHECKPOINT_BUDGET_MB",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    return args


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS files named on the command line, if any."""
    if args.tls_cert is None:
        return None
    client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
    return TlsConfig(Path(args.tls_cert), Path(args.tls_key), client_ca)


def _request_shutdown(signum: int, frame: FrameType | None) -> None:
    """Signal handler: unwinds the main thread into the shutdown path."""
    raise ShutdownRequested(signal.Signals(signum).name)


def _print(message: str) -> None:
    """Prints a launcher line, flushed so that it shows up in logs and pipes at once."""
    print(f"[sdserve] {message}", flush=True)


def run(server: TritonServer, ready_timeout_s: float) -> int:
    """Starts `server`, waits for its models, then blocks until it exits or a signal arrives.

    Args:
        server (`TritonServer`): The server to run; stopped by the caller.
        ready_timeout_s (`float`): Seconds to wait for every model to be ready.

    Returns:
        The exit status for the launcher: 0 after a requested shutdown, 1 on failure.
    """
    try:
        _print(f"control APIs closed; admin key: {server.admin_key.source}")
        server.start()
        _print(f"tritonserver started (pid {server.pid}), log: {server.log_path}")
        models = server.wait_ready(ready_timeout_s, on_progress=_print)
        _print(f"models ready: {', '.join(models) or '(none)'}")
        _print(f"gRPC    {server.grpc_url}{' (TLS)' if server.tls else ''}")
        _print(f"HTTP    http://{server.http_url}")
        _print(f"metrics {server.metrics_url}")
        _print("serving; Ctrl-C or SIGTERM to stop")
        returncode = server.wait()
    except ShutdownRequested as exc:
        _print(f"{exc} received; stopping (in-flight requests get {server.exit_timeout_s}s)")
        return 0
    except TritonServerError as exc:
        print(f"[sdserve] error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(
        f"[sdserve] error: tritonserver exited on its own with code {returncode}", file=sys.stderr
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m sdserve_pipeline.serve`; returns the exit status."""
    args = parse_args(argv)
    try:
        server = TritonServer(
            args.repository,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            exit_timeout_s=args.exit_timeout_secs,
            log_verbose=args.log_verbose,
            build_dir=args.build_dir,
            log_path=args.log_file,
            tls=tls_config(args),
            on_event=_print,
            checkpoint_budget_mb=args.checkpoint_budget_mb,
        )
    except SecurityConfigError as exc:
        print(f"[sdserve] error: {exc}", file=sys.stderr, flush=True)
        return 1
    previous = {
        sig: signal.signal(sig, _request_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        status = run(server, args.ready_timeout)
    finally:
        # A second Ctrl-C must not interrupt the shutdown; stop() is bounded by itself.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        returncode = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if returncode is not None:
        _print(f"tritonserver stopped (exit code {returncode})")
    return status


if __name__ == "__main__":
    sys.exit(main())
