"""`sdserve-client`: the command line front end of the SDK."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from .errors import SdserveError
from .sdk import InpaintClient

PROG = "sdserve-client"
ClientFactory = Callable[..., InpaintClient]


def build_parser() -> argparse.ArgumentParser:
    """Builds the parser of the `inpaint` and `models` commands."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC host:port")
    connection.add_argument("--timeout", type=float, help="limit in seconds per call")

    parser = argparse.ArgumentParser(prog=PROG, description="Client of the sdserve pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", parents=[connection], help="list the ready models")

    inpaint = commands.add_parser("inpaint", parents=[connection], help="inpaint an image")
    inpaint.add_argument("--model", default="inpaint", help="pipeline model name")
    inpaint.add_argument("--image", required=True, type=Path, help="input image file")
    inpaint.add_argument("--mask", required=True, type=Path, help="mask file (white=regenerate)")
    inpaint.add_argument("--prompt", required=True)
    inpaint.add_argument("--negative-prompt")
    inpaint.add_argument("--steps", type=int)
    inpaint.add_argument("--guidance-scale", type=float)
    inpaint.add_argument("--strength", type=float)
    inpaint.add_argument("--seed", type=int)
    inpaint.add_argument("--scheduler", help="e.g. pndm, ddim, euler_a, dpmpp_2m")
    inpaint.add_argument("--num-images", type=int)
    inpaint.add_argument(
        "--no-preserve-unmasked",
        dest="preserve_unmasked",
        action="store_const",
        const=False,
        help="do not paste the input's pixels back outside the mask",
    )
    inpaint.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG path")
    return parser


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory = InpaintClient) -> int:
    """Runs the CLI and returns its exit code (errors: message on stderr, exit code 1).

    Args:
        argv (`Sequence[str]`, *optional*): arguments without the program name (`sys.argv[1:]`).
        client_factory (`Callable[..., InpaintClient]`, *optional*):
            Called with `url`, `model` and `timeout` keywords to build the client.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            return _models(args, client_factory)
        return _inpaint(args, client_factory)
    except (SdserveError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def output_paths(out: Path, count: int) -> list[Path]:
    """`out.png` for the first image, then `out-1.png`, `out-2.png`, ..."""
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def _models(args: argparse.Namespace, client_factory: ClientFactory) -> int:
    with client_factory(url=args.url, timeout=args.timeout) as client:
        for name in client.list_models():
            print(name)
    return 0


def _inpaint(args: argparse.Namespace, client_factory: ClientFactory) -> int:
    image, mask = _load(args.image), _load(args.mask)
    options = {
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "strength": args.strength,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
        "preserve_unmasked": args.preserve_unmasked,
    }
    with client_factory(url=args.url, model=args.model, timeout=args.timeout) as client:
        result = client.inpaint(image, mask, args.prompt, **options)
    for path, picture, seed in zip(
        output_paths(args.out, len(result.images)), result.images, result.seeds, strict=True
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
        print(f"{path}\tseed={seed}")
    return 0


def _load(path: Path) -> Image.Image:
    image = Image.open(path)
    with image:
        image.load()
        return image.copy()


if __name__ == "__main__":
    sys.exit(main())
