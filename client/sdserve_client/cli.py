"""`sdserve-client`: the command line front end of the SDK."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from sdserve_protocol.canvas import Extension, build_canvas
from sdserve_protocol.events import Preview, Progress, Queued
from sdserve_protocol.rules import DEFAULT_ADAPTER_SCALE

from .errors import SdserveError
from .images import to_mask_array, to_rgb_array
from .sdk import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    EventCallback,
    GenerationResult,
    InpaintClient,
)
from .tls import TlsSettings

PROG = "sdserve-client"
ClientFactory = Callable[..., InpaintClient]


def build_parser() -> argparse.ArgumentParser:
    """Builds the parser of the `inpaint`, `outpaint`, `img2img`, `txt2img` and `models`
    commands."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url", "--server", dest="url", default="127.0.0.1:8001",
        help="Triton gRPC host:port; several comma-separated (replicas: fail over between them)",
    )  # fmt: skip
    connection.add_argument("--timeout", type=float, help="limit in seconds per call")
    add_tls_arguments(connection)
    connection.add_argument(
        "--admin-key-file", type=Path,
        help=f"file holding the operator's key for Triton's control APIs (`models` needs it "
        f"on a locked server); or set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}",
    )  # fmt: skip

    generation = argparse.ArgumentParser(add_help=False, parents=[connection])
    generation.add_argument("--model", default="inpaint", help="pipeline model name")
    generation.add_argument("--prompt", required=True)
    generation.add_argument("--negative-prompt")
    generation.add_argument("--steps", type=int)
    generation.add_argument("--guidance-scale", type=float)
    generation.add_argument("--strength", type=float)
    generation.add_argument("--seed", type=int)
    generation.add_argument("--scheduler", help="e.g. pndm, ddim, euler_a, dpmpp_2m")
    generation.add_argument("--num-images", type=int)
    generation.add_argument(
        "--clip-skip", type=int, metavar="LAYERS",
        help="text-encoder layers to skip for the prompt (diffusers' clip_skip; default 0)",
    )  # fmt: skip
    generation.add_argument(
        "--no-preserve-unmasked",
        dest="preserve_unmasked",
        action="store_const",
        const=False,
        help="do not paste the input's pixels back outside the mask",
    )
    generation.add_argument(
        "--prompt-weighting", action="store_const", const=True,
        help="read the prompts in compel's weighting syntax, e.g. 'a (red)1.3 bicycle++'",
    )  # fmt: skip
    generation.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG path")
    generation.add_argument(
        "--no-progress", dest="progress", action="store_false",
        help="no progress bar: a plain (unary) call, as to a server without stream models",
    )  # fmt: skip
    generation.add_argument(
        "--previews", type=Path, metavar="DIR",
        help="save live previews into DIR (step-<n>.png; every --preview-every steps)",
    )  # fmt: skip
    generation.add_argument(
        "--preview-every", type=int, default=None,
        help="steps between previews with --previews (default 5)",
    )  # fmt: skip
    generation.add_argument(
        "--lora", type=lora_argument, action="append", metavar="NAME[:SCALE]",
        help="a LoRA adapter of the server's and its scale (default 1.0); repeatable",
    )  # fmt: skip
    generation.add_argument(
        "--retry-started", action="store_true",
        help="with --seed, resend the request to another server even when the connection "
        "broke after it was sent (it may have started; the seed makes the images the same)",
    )  # fmt: skip

    parser = argparse.ArgumentParser(prog=PROG, description="Client of the sdserve pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "models", parents=[connection],
        help="list the checkpoints: loaded or on disk, memory of each and of its LoRA variants",
    )  # fmt: skip
    adapters = commands.add_parser(
        "adapters", parents=[connection], help="list a pipeline's LoRA adapters"
    )
    adapters.add_argument("--model", default="inpaint", help="pipeline model name")

    inpaint = commands.add_parser("inpaint", parents=[generation], help="inpaint an image")
    inpaint.add_argument("--image", required=True, type=Path, help="input image file")
    inpaint.add_argument("--mask", required=True, type=Path, help="mask file (white=regenerate)")
    inpaint.add_argument(
        "--mask-blur", type=int, metavar="PIXELS",
        help="Gaussian blur radius applied to the mask first (diffusers' mask_processor.blur)",
    )  # fmt: skip
    inpaint.add_argument(
        "--padding-mask-crop", type=int, metavar="PIXELS",
        help="inpaint only the masked area: the box around the mask plus PIXELS, generated "
        "at --height x --width (model default) and pasted back (diffusers' padding_mask_crop)",
    )  # fmt: skip
    inpaint.add_argument("--height", type=int, help="with --padding-mask-crop: crop height")
    inpaint.add_argument("--width", type=int, help="with --padding-mask-crop: crop width")

    outpaint = commands.add_parser("outpaint", parents=[generation], help="extend an image")
    outpaint.add_argument("--image", required=True, type=Path, help="input image file")
    outpaint.add_argument("--mask", type=Path, help="optional mask on the original")
    for side in ("left", "top", "right", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add {side}")
    outpaint.add_argument(
        "--save-canvas", type=Path,
        help="also write the canvas and mask the server builds (PATH and PATH-mask.png)",
    )  # fmt: skip

    img2img = commands.add_parser("img2img", parents=[generation], help="redraw an image")
    img2img.add_argument("--image", required=True, type=Path, help="input image file")

    txt2img = commands.add_parser("txt2img", parents=[generation], help="text to image")
    txt2img.add_argument("--height", type=int)
    txt2img.add_argument("--width", type=int)
    return parser


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--ssl`, `--root-certs`, `--client-key`, `--client-cert`, `--ssl-target-name`
    (the CLI's and the web UI's; read back with `tls_from_args`)."""
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--ssl", action="store_true",
        help="connect over TLS (implied by the options below; without --root-certs, "
        "gRPC's public root certificates are trusted)",
    )  # fmt: skip
    group.add_argument("--root-certs", type=Path, help="PEM file of the CA(s) to trust")
    group.add_argument("--client-key", type=Path, help="PEM client key (mutual TLS)")
    group.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    group.add_argument(
        "--ssl-target-name", help="name the server's certificate holds, if not the host's"
    )


def tls_from_args(args: argparse.Namespace) -> bool | TlsSettings:
    """The `ssl` argument of `InpaintClient` from the options of `add_tls_arguments`."""
    files = (args.root_certs, args.client_key, args.client_cert, args.ssl_target_name)
    if not any(item is not None for item in files):
        return bool(args.ssl)
    return TlsSettings(
        root_certificates=args.root_certs,
        private_key=args.client_key,
        certificate_chain=args.client_cert,
        target_name=args.ssl_target_name,
    )


def admin_key_from(path: Path | None) -> str | None:
    """The operator's key, as the server reads it: the file `path`, else `SDSERVE_ADMIN_KEY`,
    else the file `SDSERVE_ADMIN_KEY_FILE`, else `None`."""
    if path is None and not os.environ.get(ADMIN_KEY_ENV):
        path = Path(os.environ[ADMIN_KEY_FILE_ENV]) if os.environ.get(ADMIN_KEY_FILE_ENV) else None
    if path is None:
        return os.environ.get(ADMIN_KEY_ENV) or None
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise SdserveError(f"the admin key file {str(path)!r} is empty")
    return key


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory = InpaintClient) -> int:
    """Runs the CLI and returns its exit code (errors: message on stderr, exit code 1).

    Args:
        argv (`Sequence[str]`, *optional*): arguments without the program name (`sys.argv[1:]`).
        client_factory (`Callable[..., InpaintClient]`, *optional*):
            Called with `InpaintClient`'s keywords (`url`, `timeout`, `ssl`, `admin_key`; and
            `model`, `retry_started` to generate) to build the client.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            return _models(args, client_factory)
        if args.command == "adapters":
            return _adapters(args, client_factory)
        return _generate(args, client_factory)
    except (SdserveError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def lora_argument(text: str) -> tuple[str, float]:
    """`--lora NAME[:SCALE]` → (name, scale); the scale defaults to `DEFAULT_ADAPTER_SCALE`."""
    name, sep, scale = text.rpartition(":")
    if not sep:
        return text, DEFAULT_ADAPTER_SCALE
    try:
        return name, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME or NAME:SCALE with a number as SCALE"
        ) from None


def output_paths(out: Path, count: int) -> list[Path]:
    """`out.png` for the first image, then `out-1.png`, `out-2.png`, ..."""
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "url": args.url,
        "timeout": args.timeout,
        "ssl": tls_from_args(args),
        "admin_key": admin_key_from(args.admin_key_file),
    }


def _models(args: argparse.Namespace, client_factory: ClientFactory) -> int:
    """One line per checkpoint and per component model (memory on disk and resident, LoRA
    variants); a server without the checkpoint listing: its ready models (admin key)."""
    with client_factory(**_connection(args)) as client:
        try:
            listing = client.list_checkpoints()
        except SdserveError:
            for name in client.list_models():
                print(name)
            return 0
    budget = listing["budget_mb"]
    print(f"checkpoint budget: {f'{budget:g} MB' if budget else 'none'}")
    for entry in listing["checkpoints"]:
        mode = "on demand" if entry["on_demand"] else "always loaded"
        print(
            f"{entry['name']}\t{entry['architecture']}\t{entry['state']}\t{mode}\t"
            f"{entry['size_mb']:g} MB\trequests={entry['requests']}"
        )
        for part in entry["components"]:
            rss = "" if part["rss_mb"] is None else f"\tresident {part['rss_mb']:g} MB"
            ready = "ready" if part["ready"] else "not loaded"
            print(f"  {part['name']}\t{ready}\t{part['size_mb']:g} MB{rss}")
            for variant in part["variants"]:
                names = ",".join(f"{name}:{scale:g}" for name, scale in variant["adapters"])
                what = f"weights of {variant['checkpoint']}" if "checkpoint" in variant else ""
                what = " ".join(w for w in (what, f"lora {names}" if names else "") if w)
                print(f"    {what}\t{variant['size_mb']:g} MB")
    return 0


def _adapters(args: argparse.Namespace, client_factory: ClientFactory) -> int:
    """One line per adapter: name, architecture, rank, targets (or why it is refused)."""
    with client_factory(**_connection(args), model=args.model) as client:
        for entry in client.list_adapters():
            if "error" in entry:
                print(f"{entry['name']}\trefused: {entry['error']}")
                continue
            targets = ",".join(f"{c}:{n}" for c, n in entry["targets"].items())
            print(f"{entry['name']}\t{entry['architecture']}\trank={entry['rank']}\t{targets}")
    return 0


def _generate(args: argparse.Namespace, client_factory: ClientFactory) -> int:
    options = {
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "strength": args.strength,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
        "preserve_unmasked": args.preserve_unmasked,
        "mask_blur": getattr(args, "mask_blur", None),  # inpaint only
        "prompt_weighting": args.prompt_weighting,
        "clip_skip": args.clip_skip,
    }
    if args.lora:
        options["adapters"] = [name for name, _ in args.lora]
        options["adapter_scales"] = [scale for _, scale in args.lora]
    if args.previews is not None or args.preview_every is not None:
        options["preview_every"] = args.preview_every or DEFAULT_PREVIEW_EVERY
    if args.command == "inpaint":  # the crop and the size it is generated at
        options |= {name: getattr(args, name) for name in ("padding_mask_crop", "height", "width")}
    connection = {**_connection(args), "model": args.model, "retry_started": args.retry_started}
    with client_factory(**connection) as client, _progress(args) as on_event:
        options["on_event"] = on_event
        if args.command == "inpaint":
            result = client.inpaint(_load(args.image), _load(args.mask), args.prompt, **options)
        elif args.command == "outpaint":
            result = _outpaint(client, args, options)
        elif args.command == "img2img":
            result = client.img2img(_load(args.image), args.prompt, **options)
        else:
            result = client.text_to_image(args.prompt, args.height, args.width, **options)
    for path, picture, seed in zip(
        output_paths(args.out, len(result.images)), result.images, result.seeds, strict=True
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
        print(f"{path}\tseed={seed}")
    return 0


def _outpaint(
    client: InpaintClient, args: argparse.Namespace, options: dict[str, Any]
) -> GenerationResult:
    image = _load(args.image)
    sides = {side: getattr(args, side) for side in ("left", "top", "right", "bottom")}
    mask = _load(args.mask) if args.mask else None
    if args.save_canvas:
        canvas = build_canvas(
            to_rgb_array(image),
            Extension(**sides),
            user_mask=None if mask is None else to_mask_array(mask),
        )
        Image.fromarray(canvas.image).save(args.save_canvas, format="PNG")
        mask_path = args.save_canvas.with_name(f"{args.save_canvas.stem}-mask.png")
        Image.fromarray(canvas.mask).save(mask_path, format="PNG")
        print(f"canvas: {args.save_canvas}, mask: {mask_path}")
    if mask is not None:
        options = {**options, "mask": mask}
    return client.outpaint(image, args.prompt, **sides, **options)


DEFAULT_PREVIEW_EVERY = 5


@contextmanager
def _progress(args: argparse.Namespace) -> Iterator[EventCallback | None]:
    """A progress bar on stderr (tqdm) fed by the request's stream, and the previews saved
    into `--previews`; None with `--no-progress` (a unary call)."""
    if not args.progress:
        yield None
        return
    from tqdm import tqdm  # type: ignore[import-untyped]

    bars: list[Any] = []  # made at the first event: nothing is drawn for a refused request

    def on_event(event: Queued | Progress | Preview) -> None:
        if not bars:
            bars.append(tqdm(total=None, unit="step", leave=False, dynamic_ncols=True))
        bar = bars[0]
        if isinstance(event, Queued):
            bar.set_description(f"queued: {event.position}")
        elif isinstance(event, Progress):
            band = f"band {event.band}/{event.bands}" if event.bands > 1 else ""
            bar.set_description(f"outpainting {band}" if band else "generating")
            bar.total = event.total_steps
            bar.n = event.step
            bar.refresh()
        elif args.previews is not None:
            args.previews.mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(event.images):
                suffix = f"-{i}" if i else ""
                Image.fromarray(array).save(args.previews / f"step-{event.step}{suffix}.png")

    try:
        yield on_event
    finally:
        for bar in bars:
            bar.close()


def _load(path: Path) -> Image.Image:
    image = Image.open(path)
    with image:
        image.load()
        return image.copy()


if __name__ == "__main__":
    sys.exit(main())
