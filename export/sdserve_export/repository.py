"""Build a ready Triton model repository from a diffusers inpainting pipeline.

    build/model_repository/
      text_encoder/  config.pbtxt  1/model.py  1/model.onnx   (ONNX Runtime runner)
      unet/          ...                                       (same runner, own ONNX)
      vae_encoder/   ...
      vae_decoder/   ...
      inpaint/       config.pbtxt  1/model.py  1/assets/       (pipeline, BLS)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers import DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from sdserve_export.onnx_export import export_onnx, sd15_targets
from sdserve_export.parity import ParityReport, check_parity, require_parity
from sdserve_export.triton_configs import ONNX_FILE, component_config, pipeline_config, to_pbtxt
from sdserve_pipeline.assets import ASSETS_DIR, CheckpointFacts, PipelineAssets
from sdserve_pipeline.components import SD15_COMPONENTS
from sdserve_pipeline.request import Limits

DEFAULT_REPOSITORY = Path("build/model_repository")
VERSION = "1"


@dataclass(frozen=True)
class LoadedPipeline:
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    assets: PipelineAssets

    def sizes(self) -> dict[str, int]:
        """Values of the fixed symbolic dims of the component specs."""
        te, vae = self.text_encoder.config, self.vae.config
        return {
            "sequence_length": te.max_position_embeddings,
            "hidden_size": te.hidden_size,
            "unet_in_channels": self.unet.config.in_channels,
            "latent_channels": vae.latent_channels,
            "image_channels": vae.in_channels,
        }


def load_pipeline(source: str | Path, allow_pickle: bool = False) -> LoadedPipeline:
    """Load the components of a diffusers pipeline folder (or hub id, where reachable).

    Args:
        source: diffusers-format folder (model_index.json, unet/, vae/, ...) or hub id.
        allow_pickle: also accept `.bin` / `.ckpt` weights (pickle can run code on load);
            by default only safetensors load.
    """
    kwargs = {"use_safetensors": None if allow_pickle else True}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))  # any class reads it
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    facts = CheckpointFacts(
        vae_scaling_factor=float(vae.config.scaling_factor),
        vae_scale_factor=vae_scale,
        latent_channels=vae.config.latent_channels,
        unet_in_channels=unet.config.in_channels,
        default_size=unet.config.sample_size * vae_scale,
        text_max_length=tokenizer.model_max_length,
    )
    if facts.unet_in_channels != 9:
        raise ValueError(
            f"unet has {facts.unet_in_channels} input channels; this export serves "
            "9-channel inpainting checkpoints"
        )
    assets = PipelineAssets(facts=facts, tokenizer=tokenizer, scheduler_config=scheduler_config)
    return LoadedPipeline(text_encoder.eval(), unet.eval(), vae.eval(), assets)


def build_repository(
    source: str | Path,
    out: Path = DEFAULT_REPOSITORY,
    pipeline_name: str = "inpaint",
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    limits: Limits = Limits(),
    allow_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> list[ParityReport]:
    """Export every component with a parity check, then write configs and the pipeline model.

    Raises:
        ParityError: an exported component drifted past its tolerance (nothing is left
            half-written: the repository is assembled in a temporary folder first).
    """
    log(f"[load] {source}")
    pipe = load_pipeline(source, allow_pickle)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    targets = sd15_targets(pipe.text_encoder, pipe.unet, pipe.vae)
    reports = []
    for i, target in enumerate(targets, 1):
        name = target.spec.name
        started = time.perf_counter()
        log(f"[{i}/{len(targets)}] export {name} ...")
        onnx_file = export_onnx(target, staging / name / VERSION / ONNX_FILE)
        report = require_parity(check_parity(target, onnx_file))
        log(f"[{i}/{len(targets)}] {report} ({time.perf_counter() - started:.1f} s)")
        reports.append(report)
        _write_config(staging / name, to_pbtxt(component_config(target.spec, pipe.sizes(), providers)))
        _copy_model_py("onnx_runner", staging / name / VERSION)
    roles = {spec.name: spec.name for spec in SD15_COMPONENTS}
    _write_config(staging / pipeline_name, to_pbtxt(pipeline_config(pipeline_name, roles, limits)))
    _copy_model_py("pipeline", staging / pipeline_name / VERSION)
    pipe.assets.save(staging / pipeline_name / VERSION / ASSETS_DIR)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log(f"[done] Triton model repository written to {out}")
    return reports


def _write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)


def _copy_model_py(kind: str, version_dir: Path) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    source = resources.files("sdserve_pipeline") / "triton_models" / kind / "model.py"
    (version_dir / "model.py").write_text(source.read_text())

