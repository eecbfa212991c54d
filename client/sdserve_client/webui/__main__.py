"""Start the web UI: `python -m sdserve_client.webui --server 127.0.0.1:8001 --port 7860`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ..cli import add_tls_arguments, admin_key_from, tls_from_args
from ..errors import SdserveError
from ..sdk import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV
from .backend import Backend


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m sdserve_client.webui",
        description="Gradio web UI for inpainting, outpainting and text-to-image on sdserve.",
    )
    parser.add_argument(
        "--server",
        default="127.0.0.1:8001",
        help="Triton gRPC host:port; several comma-separated (replicas: fail over between them)",
    )
    parser.add_argument("--model", default="inpaint", help="pipeline model selected at first")
    parser.add_argument("--host", default="127.0.0.1", help="address the page binds to")
    parser.add_argument("--port", type=int, default=7860, help="port of the page")
    parser.add_argument(
        "--metrics-url",
        default=None,
        help="Triton metrics endpoint (e.g. http://127.0.0.1:8002/metrics) for the queue state",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per generation")
    parser.add_argument(
        "--concurrency", type=int, default=2, help="generations sent to the server at once"
    )
    parser.add_argument(
        "--wait-ready",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the server and model to be ready before starting",
    )
    parser.add_argument(
        "--retry-started",
        action="store_true",
        help="resend a seeded request to another server even when the connection broke after "
        "it was sent (it may have started; the seed makes the images the same)",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help="file holding the operator's key for Triton's control APIs (the full model list;"
        f" without it the page offers --model); or set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}",
    )
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    try:
        args.ssl_option = tls_from_args(args)
        args.admin_key = admin_key_from(args.admin_key_file)
    except (SdserveError, OSError) as exc:
        parser.error(str(exc))
    return args


def wait_ready(backend: Backend, model: str, seconds: float) -> bool:
    """Polls the server until `model` is ready or `seconds` pass; returns readiness."""
    deadline = time.monotonic() + seconds
    while True:
        if backend.status(model).queue.ready:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM handler: unwinds the main thread, which closes the page server."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the page until Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, _interrupt)
    from .app import AppConfig, build_app, launch  # gradio is imported only here

    config = AppConfig(
        server_url=args.server,
        model=args.model,
        timeout=args.timeout,
        metrics_url=args.metrics_url,
        concurrency=args.concurrency,
    )
    backend = Backend(
        config.server_url,
        config.timeout,
        config.metrics_url,
        ssl=args.ssl_option,
        retry_started=args.retry_started,
        admin_key=args.admin_key,
        model=args.model,
    )
    if args.wait_ready > 0 and not wait_ready(backend, args.model, args.wait_ready):
        print(
            f"[sdserve-ui] {args.model!r} at {args.server} not ready after {args.wait_ready:.0f} s;"
            " starting anyway (the page shows the server state)",
            file=sys.stderr,
            flush=True,
        )
    demo = build_app(config, backend)
    print(f"[sdserve-ui] server {args.server}, page http://{args.host}:{args.port}", flush=True)
    try:
        launch(demo, args.host, args.port)
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
