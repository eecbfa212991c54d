"""`make demo`: serve the exported demo repository and inpaint one picture through the SDK.

Starts tritonserver on 127.0.0.1 (free ports), sends one inpainting request with the
gRPC SDK, writes input, mask and result PNGs, stops the server. The demo pipeline has
RANDOM weights: the result shows the plumbing, not a picture of the prompt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdserve_client import InpaintClient
from sdserve_pipeline.triton_server import TritonServer

PROMPT = "a red hot-air balloon in a clear sky"


def demo_inputs(size: int = 256) -> tuple[Image.Image, Image.Image]:
    """A small synthetic landscape and a mask over its sky (white = regenerate)."""
    y = np.linspace(0.0, 1.0, size)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 230]) + y * np.array([200, 225, 250])
    image = Image.fromarray(np.broadcast_to(sky, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.polygon(
        [
            (0, size),
            (size // 3, size // 2),
            (2 * size // 3, size),
        ],
        fill=(70, 110, 60),
    )
    draw.polygon(
        [(size // 3, size), (3 * size // 4, size // 2 + 20), (size, size)], fill=(50, 90, 50)
    )
    draw.ellipse([size - 70, 20, size - 30, 60], fill=(250, 220, 90))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 5, size // 8, size // 2, size // 2], fill=255)
    return image, mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository"))
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    image, mask = demo_inputs()
    image.save(args.out / "input.png")
    mask.save(args.out / "mask.png")
    print(f"[1/3] starting tritonserver on 127.0.0.1 with {args.repository} ...")
    with TritonServer(args.repository, http_port=0, grpc_port=0, metrics_port=0) as server:
        server.wait_ready(timeout_s=600)
        print(f"[2/3] server ready at {server.grpc_url}; inpainting ({args.steps} steps) ...")
        started = time.perf_counter()
        with InpaintClient(server.grpc_url) as client:
            result = client.inpaint(image, mask, PROMPT, steps=args.steps, seed=args.seed)
        elapsed = time.perf_counter() - started
        print("[3/3] stopping the server ...")
    out_file = args.out / "inpainted.png"
    result.images[0].save(out_file)
    print(f"\nwrote {out_file} (seed {result.seeds[0]}, {elapsed:.1f} s through gRPC)")
    print(f"inputs: {args.out / 'input.png'}, {args.out / 'mask.png'}")
    print(
        "NOTE: the demo pipeline has tiny RANDOM weights, so the masked area is noise-like; "
        "pixels outside the mask are the input's. Serve a real checkpoint as the README shows."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
