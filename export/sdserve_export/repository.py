"""Build a ready Triton model repository from a diffusers inpainting pipeline.

    build/model_repository/
      text_encoder/  config.pbtxt  1/model.py  1/model.onnx   (ONNX Runtime runner)
      unet/          ...                                       (same runner, own ONNX)
      vae_encoder/   ...
      vae_decoder/   ...
      inpaint/       config.pbtxt  1/model.py  1/assets/       (pipeline, BLS)
      inpaint_stream/ config.pbtxt  1/model.py                 (its streamed requests)
      preview_decoder/ ...          (with --preview-decoder: a tiny VAE for the previews)

An SDXL checkpoint (a `text_encoder_2` folder) adds `text_encoder_2/`; built with a
component prefix (`xl_`) and its own pipeline name (`inpaint_xl`) into the same folder, it
is served beside SD 1.5.

A checkpoint of the same graph as one already there can share that one's component models
(`share_graph_with`): its components are exported and checked as usual but written as its
pipeline's weights (`<name>/1/weights/<shared model>/model.onnx`), and the shared models run
them (`sdserve_pipeline.shared_graph`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import onnx
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdserve_export.built_repository import CONFIG_FILE
from sdserve_export.embeddings import (
    add_embeddings,
    check_architecture,
    copy_embeddings,
    read_embeddings,
)
from sdserve_export.onnx_export import (
    ExportTarget,
    checkpoint_sizes,
    export_onnx,
    max_clip_skip,
    preview_decoder_target,
    sd15_targets,
    sdxl_targets,
)
from sdserve_export.parity import ParityReport, check_parity, require_parity
from sdserve_export.preview_decoder import load_preview_decoder
from sdserve_export.triton_configs import (
    adapters_config,
    checkpoints_config,
    component_config,
    pipeline_config,
    stream_config,
    to_pbtxt,
)
from sdserve_export.weight_slots import build_weight_map
from sdserve_pipeline.adapters import ADAPTERS_DIR, LORA_COMPONENTS
from sdserve_pipeline.assets import ASSETS_DIR, VERSION, CheckpointFacts, PipelineAssets
from sdserve_pipeline.inprocess import read_parameters
from sdserve_pipeline.onnx_runtime import ONNX_FILE, RunnerSettings
from sdserve_pipeline.shared_graph import WEIGHTS_DIR, graph_signature
from sdserve_pipeline.weight_map import save_weight_map
from sdserve_protocol.adapters import adapters_model_name
from sdserve_protocol.checkpoints import CHECKPOINTS_MODEL
from sdserve_protocol.events import stream_model_name
from sdserve_protocol.rules import Limits
from sdserve_protocol.settings import OutpaintSettings, PipelineSettings

DEFAULT_REPOSITORY = Path("build/model_repository")


class SharedGraphError(ValueError):
    """`share_graph_with` names no pipeline of this graph (nothing is written)."""


@dataclass(frozen=True)
class LoadedPipeline:
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    assets: PipelineAssets
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL

    def sizes(self) -> dict[str, int]:
        """Values of the fixed symbolic dims of the component specs."""
        return checkpoint_sizes(self.text_encoder, self.unet, self.vae, self.text_encoder_2)

    def targets(self) -> list[ExportTarget]:
        """What to export for this checkpoint's architecture."""
        if self.text_encoder_2 is not None:
            return sdxl_targets(self.text_encoder, self.text_encoder_2, self.unet, self.vae)
        return sd15_targets(self.text_encoder, self.unet, self.vae)


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
    scheduler_config = dict(
        DDIMScheduler.load_config(source, subfolder="scheduler")
    )  # any class reads it
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    pipeline_config = _pipeline_config(source)
    sdxl = "text_encoder_2" in pipeline_config
    text_encoder_2, tokenizer_2 = None, None
    if sdxl:
        if pipeline_config.get("requires_aesthetics_score"):
            raise ValueError(
                "requires_aesthetics_score=True (refiner-style time ids) is not supported; "
                "sdserve serves SDXL base/inpainting checkpoints"
            )
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **kwargs
        ).eval()
        tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
    facts = CheckpointFacts(
        vae_scaling_factor=float(vae.config.scaling_factor),
        vae_scale_factor=vae_scale,
        latent_channels=vae.config.latent_channels,
        unet_in_channels=unet.config.in_channels,
        default_size=unet.config.sample_size * vae_scale,
        text_max_length=tokenizer.model_max_length,
        architecture="sdxl" if sdxl else "sd15",
        # diffusers' defaults: StableDiffusionXLInpaintPipeline strength 0.9999
        default_strength=0.9999 if sdxl else 1.0,
        force_zeros_for_empty_prompt=sdxl
        and bool(pipeline_config.get("force_zeros_for_empty_prompt", True)),
        max_clip_skip=min(
            max_clip_skip(encoder, from_last=2 if sdxl else 1)
            for encoder in (text_encoder, text_encoder_2)
            if encoder is not None
        ),
    )
    if facts.unet_in_channels not in (4, 9):
        raise ValueError(
            f"unet has {facts.unet_in_channels} input channels; sdserve serves 9-channel "
            "inpainting and 4-channel text-to-image checkpoints"
        )
    assets = PipelineAssets(facts, tokenizer, scheduler_config, tokenizer_2)
    return LoadedPipeline(text_encoder.eval(), unet.eval(), vae.eval(), assets, text_encoder_2)


def _pipeline_config(source: str | Path) -> dict:
    """`model_index.json` of the pipeline (component classes, pipeline flags)."""
    local = Path(source) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download  # a hub id, where a network exists

    return json.loads(Path(hf_hub_download(str(source), "model_index.json")).read_text())


def build_repository(
    source: str | Path,
    out: Path = DEFAULT_REPOSITORY,
    pipeline_name: str = "inpaint",
    component_prefix: str = "",
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    limits: Limits = Limits(),
    allow_pickle: bool = False,
    log: Callable[[str], None] = print,
    embeddings: Path | None = None,
    preview_decoder: Path | None = None,
    load_on_demand: bool = False,
    share_graph_with: str = "",
) -> list[ParityReport]:
    """Export every component with a parity check, then write configs and the pipeline model.

    Args:
        source: diffusers pipeline folder or hub id.
        out: repository folder; models of other pipelines already there are kept, so
            several pipelines can be served side by side.
        pipeline_name: Triton name of the pipeline model.
        component_prefix: prefix of the component model names (`<prefix>unet`, ...), to
            keep a second checkpoint's components apart from the first's.
        providers: ONNX Runtime execution providers in order of preference.
        limits: request limits written into the pipeline config; `max_clip_skip` is the
            checkpoint's (`CheckpointFacts.max_clip_skip`), whatever `limits` says.
        allow_pickle: also load pickle weights (see `load_pipeline`).
        log: progress sink.
        embeddings: a folder of textual inversion `.safetensors` files whose tokens the
            exported text encoder(s) and tokenizer(s) gain (`sdserve_export.embeddings`).
        preview_decoder: a diffusers `AutoencoderTiny` folder (TAESD / TAESDXL) exported as
            the `preview_decoder` component, which then decodes streamed previews.
        load_on_demand: the server loads the components on the pipeline's first request
            and may unload them for another checkpoint (`sdserve_pipeline.checkpoints`).
        share_graph_with: a pipeline already in `out` whose component models this
            checkpoint's graph is; they serve it on its weights, written into its pipeline
            folder (`sdserve_pipeline.shared_graph`); `component_prefix` is then unused.

    Raises:
        EmbeddingError: an embedding file is refused (before anything is exported).
        PreviewDecoderError: the preview decoder is refused (before anything is exported).
        ParityError: an exported component drifted past its tolerance (nothing is left
            half-written: the models are assembled in a temporary folder first).
        SharedGraphError: `share_graph_with` is not a pipeline in `out`, or a component's
            graph differs from its model's there (nothing is written).
    """
    log(f"[load] {source}")
    pipe = load_pipeline(source, allow_pickle)
    facts = pipe.assets.facts
    tiny_vae = None
    if preview_decoder is not None:
        tiny_vae = load_preview_decoder(preview_decoder, pipe.sizes(), allow_pickle)
        log(f"[preview decoder] {preview_decoder}")
    added = read_embeddings(embeddings) if embeddings is not None else []
    if added:
        check_architecture(added, sdxl=pipe.text_encoder_2 is not None)
        tokens = add_embeddings(added, pipe.text_encoder, pipe.assets.tokenizer)
        if pipe.text_encoder_2 is not None:
            add_embeddings(added, pipe.text_encoder_2, pipe.assets.tokenizer_2, second=True)
        log(f"[embeddings] {', '.join(tokens)}")
    staging = out.with_name(out.name + ".partial")
    targets = pipe.targets()
    if tiny_vae is not None:
        targets.append(preview_decoder_target(tiny_vae, pipe.sizes(), facts.vae_scale_factor))
    names = {target.spec.name: component_prefix + target.spec.name for target in targets}
    shared_files = {}  # component model → its ONNX file, when sharing its graph
    if share_graph_with:
        shared_files = _shared_models(out, share_graph_with, facts.architecture, list(names))
        names = {role: model for role, (model, _) in shared_files.items()}
    shutil.rmtree(staging, ignore_errors=True)
    reports = []
    for i, target in enumerate(targets, 1):
        name = names[target.spec.name]
        started = time.perf_counter()
        log(f"[{i}/{len(targets)}] export {name} ...")
        if share_graph_with:
            weights = staging / pipeline_name / VERSION / WEIGHTS_DIR / name / ONNX_FILE
            onnx_file = export_onnx(target, weights)
        else:
            onnx_file = export_onnx(target, staging / name / VERSION / ONNX_FILE)
        report = require_parity(check_parity(target, onnx_file))
        log(f"[{i}/{len(targets)}] {report} ({time.perf_counter() - started:.1f} s)")
        reports.append(report)
        if share_graph_with:
            _check_same_graph(onnx_file, shared_files[target.spec.name][1], share_graph_with)
            continue
        runner = RunnerSettings(providers=tuple(providers))
        inner = lora_module(target.module)
        architecture = pipe.assets.facts.architecture
        if target.spec.name in LORA_COMPONENTS[architecture] and inner is not None:
            model = onnx.load(str(onnx_file), load_external_data=True)
            save_weight_map(build_weight_map(inner, model), onnx_file.parent)
            del model
            runner = replace(
                runner, adapters_dir=f"../{pipeline_name}/{ADAPTERS_DIR}",
                lora_component=target.spec.name, architecture=architecture,
            )  # fmt: skip
        config = component_config(
            target.spec, pipe.sizes(), providers, model_name=name, runner=runner
        )
        _write_config(staging / name, to_pbtxt(config))
        _copy_model_py("onnx_runner", staging / name / VERSION)
    settings = PipelineSettings(
        architecture=facts.architecture, components=names,
        limits=replace(limits, max_clip_skip=facts.max_clip_skip),
        outpaint=OutpaintSettings(native=facts.default_size), load_on_demand=load_on_demand,
        shared_graph=bool(share_graph_with),
    )  # fmt: skip
    config = pipeline_config(pipeline_name, settings)
    _write_config(staging / pipeline_name, to_pbtxt(config))
    _copy_model_py("pipeline", staging / pipeline_name / VERSION)
    pipe.assets.save(staging / pipeline_name / VERSION / ASSETS_DIR)
    stream_name = stream_model_name(pipeline_name)
    _write_config(staging / stream_name, to_pbtxt(stream_config(stream_name, pipeline_name)))
    _copy_model_py("stream", staging / stream_name / VERSION)
    listing = adapters_model_name(pipeline_name)
    config = adapters_config(listing, pipeline_name, facts.architecture, names)
    _write_config(staging / listing, to_pbtxt(config))
    _copy_model_py("adapters", staging / listing / VERSION)
    _write_config(staging / CHECKPOINTS_MODEL, to_pbtxt(checkpoints_config()))
    _copy_model_py("checkpoints", staging / CHECKPOINTS_MODEL / VERSION)
    copy_embeddings(added, staging / pipeline_name / VERSION / ASSETS_DIR)
    adapters = out / pipeline_name / ADAPTERS_DIR
    if adapters.is_dir():  # the operator's adapters stay across a rebuild
        shutil.copytree(adapters, staging / pipeline_name / ADAPTERS_DIR)
    (staging / pipeline_name / ADAPTERS_DIR).mkdir(exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for model_dir in sorted(staging.iterdir()):
        shutil.rmtree(out / model_dir.name, ignore_errors=True)
        model_dir.rename(out / model_dir.name)
    staging.rmdir()
    log(f"[done] Triton model repository written to {out}")
    return reports


def _shared_models(
    out: Path, pipeline: str, architecture: str, roles: list[str]
) -> dict[str, tuple[str, Path]]:
    """Role → (component model of `pipeline` in `out`, its ONNX file), for `roles`.

    Raises:
        SharedGraphError: `pipeline` is not a pipeline of `architecture` in `out`, or lacks
            one of the roles.
    """
    flag = f"--share-graph-with {pipeline}"
    try:
        settings = PipelineSettings.from_parameters(read_parameters(out / pipeline))
    except (OSError, ValueError) as err:
        raise SharedGraphError(f"{flag}: no pipeline model {pipeline!r} in {out}: {err}") from None
    if settings.architecture and settings.architecture != architecture:
        raise SharedGraphError(
            f"{flag}: {pipeline!r} is {settings.architecture!r}, this checkpoint "
            f"{architecture!r}: the graphs differ"
        )
    shared = {}
    for role in roles:
        model = settings.component_model(role)
        try:
            runner = RunnerSettings.from_parameters(read_parameters(out / model))
        except (OSError, ValueError) as err:
            raise SharedGraphError(
                f"{flag}: {pipeline!r} has no {role} model to share ({model!r}: {err})"
            ) from None
        shared[role] = (model, out / model / VERSION / runner.onnx_file)
    return shared


def _check_same_graph(onnx_file: Path, shared_file: Path, pipeline: str) -> None:
    """Raises `SharedGraphError` unless `onnx_file` is `shared_file`'s graph (other weights)."""
    if graph_signature(onnx_file) != graph_signature(shared_file):
        raise SharedGraphError(
            f"--share-graph-with {pipeline}: this checkpoint's {shared_file.parent.parent.name} "
            "graph differs from the shared model's (its layers, shapes or dtypes); export it "
            "with its own component models (--component-prefix) instead"
        )


def lora_module(wrapper: Any) -> Any:
    """The diffusers / transformers model inside an export wrapper whose weights LoRA files
    name (`unet`, `text_encoder`), or None (the VAE's)."""
    for attribute in ("unet", "text_encoder"):
        inner = getattr(wrapper, attribute, None)
        if inner is not None:
            return inner
    return None


def _write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_FILE).write_text(text)


def _copy_model_py(kind: str, version_dir: Path) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    source = resources.files("sdserve_pipeline") / "triton_models" / kind / "model.py"
    (version_dir / "model.py").write_text(source.read_text())
