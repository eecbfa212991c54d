"""`sdserve-export`: build the demo pipeline, and export a pipeline to a Triton repository.

python -m sdserve_export demo-pipeline [--out build/demo-pipeline] [--sdxl]
python -m sdserve_export repository --source build/demo-pipeline [--out build/model_repository]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdserve_export.demo_pipeline import (
    DEFAULT_FOLDER,
    DEFAULT_XL_FOLDER,
    save_demo_pipeline,
    save_demo_xl_pipeline,
)
from sdserve_export.parity import ParityError
from sdserve_export.repository import DEFAULT_REPOSITORY, build_repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdserve-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-pipeline", help="write the tiny random-weight demo pipeline")
    demo.add_argument(
        "--out", type=Path, default=None,
        help=f"default: {DEFAULT_FOLDER} ({DEFAULT_XL_FOLDER} with --sdxl)",
    )  # fmt: skip
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    demo.add_argument(
        "--unet-in-channels", type=int, choices=(4, 9), default=9,
        help="9: inpainting checkpoint (default); 4: standard text-to-image checkpoint",
    )  # fmt: skip
    demo.add_argument(
        "--sdxl", action="store_true",
        help="the SDXL inpainting architecture (two text encoders); serve it with "
        "`repository --name inpaint_xl --component-prefix xl_`",
    )  # fmt: skip

    repo = sub.add_parser("repository", help="export a pipeline to a Triton model repository")
    repo.add_argument(
        "--source", default=str(DEFAULT_FOLDER),
        help="diffusers inpainting pipeline folder (or hub id where a network exists); "
        "SD 1.5 or SDXL, told apart by its text_encoder_2",
    )  # fmt: skip
    repo.add_argument("--out", type=Path, default=DEFAULT_REPOSITORY)
    repo.add_argument("--name", default="inpaint", help="pipeline model name")
    repo.add_argument(
        "--component-prefix", default="",
        help="prefix of the component model names, to serve several checkpoints side by side",
    )  # fmt: skip
    repo.add_argument(
        "--providers", default="CPUExecutionProvider",
        help="comma-separated ONNX Runtime execution providers, in order of preference",
    )  # fmt: skip
    repo.add_argument(
        "--allow-pickle", action="store_true",
        help="also load .bin/.ckpt (pickle) weights; default: safetensors only",
    )  # fmt: skip

    args = parser.parse_args(argv)
    if args.command == "demo-pipeline":
        if args.sdxl:
            folder = save_demo_xl_pipeline(args.out or DEFAULT_XL_FOLDER, args.seed)
        else:
            folder = save_demo_pipeline(
                args.out or DEFAULT_FOLDER, args.seed, args.unet_in_channels
            )
        print(f"demo pipeline (tiny, RANDOM weights) written to {folder}")
        return 0
    try:
        build_repository(
            args.source,
            args.out,
            pipeline_name=args.name,
            component_prefix=args.component_prefix,
            providers=tuple(args.providers.split(",")),
            allow_pickle=args.allow_pickle,
        )
    except ParityError as err:
        print(f"export failed parity check: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
