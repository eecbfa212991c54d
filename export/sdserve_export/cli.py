"""`sdserve-export`: build the demo pipeline, export a pipeline to a Triton repository, and
write the GPU variant of a built repository.

python -m sdserve_export demo-pipeline [--out build/demo-pipeline] [--sdxl]
python -m sdserve_export demo-preview-decoder [--out build/demo-preview-decoder]
python -m sdserve_export repository --source build/demo-pipeline [--out build/model_repository] \\
    [--preview-decoder DIR]
python -m sdserve_export gpu-repository --repository build/model_repository \\
    --platform onnxruntime_onnx|tensorrt_plan --out build/model_repository_gpu

With `tensorrt_plan`, `gpu-repository` looks each engine up in `--engines` by exact name
(TensorRT version, GPU, precision, batch range, size buckets, ONNX digest) and builds the
missing ones, which needs the `tensorrt` package and a GPU (see `engine_store`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sdserve_export.built_repository import ROLES, RepositoryError, read_repository
from sdserve_export.demo_pipeline import (
    DEFAULT_FOLDER,
    DEFAULT_PREVIEW_FOLDER,
    DEFAULT_XL_FOLDER,
    save_demo_pipeline,
    save_demo_preview_decoder,
    save_demo_xl_pipeline,
)
from sdserve_export.embeddings import EmbeddingError
from sdserve_export.engine_store import EngineSettings, ensure_engines
from sdserve_export.gpu_variant import PLATFORMS, TENSORRT, write_gpu_repository
from sdserve_export.parity import ParityError
from sdserve_export.plan_names import normalize_trt_version
from sdserve_export.preview_decoder import PreviewDecoderError
from sdserve_export.repository import DEFAULT_REPOSITORY, SharedGraphError, build_repository
from sdserve_export.tensorrt_build import (
    EngineBuildError,
    TensorRTUnavailable,
    check_tensorrt_match,
    tensorrt_version,
    triton_tensorrt_version,
)
from sdserve_protocol.sizes import parse_buckets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdserve-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_pipeline(sub)
    _add_demo_preview_decoder(sub)
    _add_repository(sub)
    _add_gpu_repository(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "demo-pipeline":
        return demo_pipeline(args)
    if args.command == "demo-preview-decoder":
        return demo_preview_decoder(args)
    if args.command == "repository":
        return repository(args)
    return gpu_repository(args)


# ----------------------------------------------------------------------------- demo-pipeline


def _add_demo_pipeline(sub: argparse._SubParsersAction) -> None:
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


def demo_pipeline(args: argparse.Namespace) -> int:
    if args.sdxl:
        folder = save_demo_xl_pipeline(args.out or DEFAULT_XL_FOLDER, args.seed)
    else:
        folder = save_demo_pipeline(args.out or DEFAULT_FOLDER, args.seed, args.unet_in_channels)
    print(f"demo pipeline (tiny, RANDOM weights) written to {folder}")
    return 0


# ---------------------------------------------------------------------- demo-preview-decoder


def _add_demo_preview_decoder(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo-preview-decoder",
        help="write a tiny random-weight AutoencoderTiny (TAESD's architecture), for "
        "`repository --preview-decoder`",
    )
    demo.add_argument("--out", type=Path, default=DEFAULT_PREVIEW_FOLDER)
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def demo_preview_decoder(args: argparse.Namespace) -> int:
    folder = save_demo_preview_decoder(args.out, args.seed)
    print(f"demo preview decoder (tiny AutoencoderTiny, RANDOM weights) written to {folder}")
    return 0


# -------------------------------------------------------------------------------- repository


def _add_repository(sub: argparse._SubParsersAction) -> None:
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
        "--load-on-demand", action="store_true",
        help="load this pipeline's component models on its first request, not when the server "
        "starts, and unload them when another checkpoint needs the room (server budget: "
        "SDSERVE_CHECKPOINT_BUDGET_MB, or serve --checkpoint-budget-mb)",
    )  # fmt: skip
    repo.add_argument(
        "--share-graph-with", default="", metavar="PIPELINE",
        help="a pipeline already in --out of the same graph (architecture and sizes): this "
        "checkpoint uses its component models, on its own weights (written into its pipeline "
        "folder); refused when the graphs differ",
    )  # fmt: skip
    repo.add_argument(
        "--providers", default="CPUExecutionProvider",
        help="comma-separated ONNX Runtime execution providers, in order of preference",
    )  # fmt: skip
    repo.add_argument(
        "--allow-pickle", action="store_true",
        help="also load .bin/.ckpt (pickle) weights; default: safetensors only",
    )  # fmt: skip
    repo.add_argument(
        "--embeddings", type=Path, metavar="DIR",
        help="folder of textual inversion .safetensors files whose tokens prompts may use",
    )  # fmt: skip
    repo.add_argument(
        "--preview-decoder", type=Path, metavar="DIR",
        help="a diffusers AutoencoderTiny folder (TAESD: madebyollin/taesd for SD 1.5, "
        "madebyollin/taesdxl for SDXL, saved with save_pretrained) that decodes streamed "
        "previews; default: a linear projection of the latents",
    )  # fmt: skip


def repository(args: argparse.Namespace) -> int:
    try:
        build_repository(
            args.source,
            args.out,
            pipeline_name=args.name,
            component_prefix=args.component_prefix,
            load_on_demand=args.load_on_demand,
            share_graph_with=args.share_graph_with,
            providers=tuple(args.providers.split(",")),
            allow_pickle=args.allow_pickle,
            embeddings=args.embeddings,
            preview_decoder=args.preview_decoder,
        )
    except ParityError as err:
        print(f"export failed parity check: {err}", file=sys.stderr)
        return 1
    except EmbeddingError as err:
        print(f"export refused an embedding: {err}", file=sys.stderr)
        return 1
    except PreviewDecoderError as err:
        print(f"export refused the preview decoder: {err}", file=sys.stderr)
        return 1
    except SharedGraphError as err:
        print(f"export refused to share a graph: {err}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- gpu-repository


def _add_gpu_repository(sub: argparse._SubParsersAction) -> None:
    gpu = sub.add_parser(
        "gpu-repository",
        help="write the GPU variant of a built repository (components on Triton's native "
        "onnxruntime_onnx or tensorrt_plan backends)",
    )
    gpu.add_argument("--repository", type=Path, required=True, help="built CPU repository")
    gpu.add_argument("--platform", choices=PLATFORMS, required=True)
    gpu.add_argument("--out", type=Path, required=True, help="GPU repository to write")
    gpu.add_argument(
        "--engines", type=Path, default=None,
        help="TensorRT plan folder (default: <repository>/../engines)",
    )  # fmt: skip
    gpu.add_argument(
        "--buckets", type=parse_buckets, default=None,
        help="comma-separated WIDTHxHEIGHT image sizes the engines of every pipeline serve "
        "(default per architecture: SD 1.5 512x512,768x768,768x512,512x768; SDXL 1024x1024 "
        "and its aspect ratios; the checkpoint's own square size is always added). The "
        "pipeline generates each request at the smallest size containing it",
    )  # fmt: skip
    gpu.add_argument(
        "--xl-buckets", type=parse_buckets, default=None,
        help="WIDTHxHEIGHT sizes for SDXL pipelines, overriding --buckets for them",
    )  # fmt: skip
    gpu.add_argument(
        "--fp32-components", default=None,
        help="comma-separated components built without fp16, e.g. vae_encoder,vae_decoder "
        "(default: the SDXL VAE only)",
    )  # fmt: skip
    gpu.add_argument("--no-build", action="store_true", help="fail when a plan is missing")
    gpu.add_argument("--no-parity", action="store_true", help="skip parity of new plans")
    gpu.add_argument("--instances", type=int, default=1, help="instances per GPU")
    gpu.add_argument("--copy", action="store_true", help="copy model files, not symlinks")
    gpu.add_argument(
        "--triton-trt-version", default="auto",
        help="TensorRT version of Triton's backend: auto (read libnvinfer), none, or X.Y.Z",
    )  # fmt: skip


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The `gpu-repository` options → how `ensure_engines` finds or builds plans."""
    fp32 = None
    if args.fp32_components is not None:
        fp32 = frozenset(n.strip() for n in args.fp32_components.split(",") if n.strip())
        unknown = fp32 - ROLES
        if unknown:
            raise RepositoryError(f"--fp32-components: {sorted(unknown)} not in {sorted(ROLES)}")
    return EngineSettings(
        engine_dir=args.engines or args.repository.resolve().parent / "engines",
        buckets=args.buckets,
        xl_buckets=args.xl_buckets,
        fp32_components=fp32,
        build_missing=not args.no_build,
        parity=not args.no_parity,
    )


def _server_trt_version(option: str) -> str | None:
    if option == "none":
        return None
    if option == "auto":
        return triton_tensorrt_version()
    return normalize_trt_version(option)


def gpu_repository(args: argparse.Namespace) -> int:
    try:
        plans = None
        if args.platform == TENSORRT:
            mismatch = check_tensorrt_match(
                tensorrt_version(), _server_trt_version(args.triton_trt_version)
            )
            if mismatch:
                raise RepositoryError(mismatch)
            plans = ensure_engines(read_repository(args.repository), engine_settings(args))
        write_gpu_repository(
            args.repository, args.out, args.platform, plans, args.instances, link=not args.copy
        )
    except (RepositoryError, TensorRTUnavailable, EngineBuildError) as err:
        print(f"gpu-repository: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
