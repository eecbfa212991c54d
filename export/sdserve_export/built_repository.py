"""Reading a model repository written by `build_repository`: its pipelines and components.

A pipeline model is recognised by its parameters (`sdserve_protocol.settings.is_pipeline`:
they name a model for every role all architectures share); its architecture (`pipeline.json`
in its assets) gives the specs of its components, whose checkpoint-fixed dims are read back
from their configs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from sdserve_export.engine_profiles import sizes_from_config
from sdserve_export.triton_configs import parse_pbtxt
from sdserve_pipeline.assets import ASSETS_DIR, PIPELINE_JSON, VERSION
from sdserve_pipeline.components import (
    COMPONENTS_BY_ARCHITECTURE,
    OPTIONAL_COMPONENTS,
    ComponentSpec,
    components_for,
    served_components,
)
from sdserve_pipeline.onnx_runtime import ONNX_FILE
from sdserve_protocol.settings import PipelineSettings, config_parameters, is_pipeline

CONFIG_FILE = "config.pbtxt"
# Component roles of every architecture (`text_encoder_2` is SDXL's; `preview_decoder` optional).
ROLES = frozenset(
    s.name for specs in (*COMPONENTS_BY_ARCHITECTURE.values(), OPTIONAL_COMPONENTS) for s in specs
)


class RepositoryError(RuntimeError):
    """The input repository is not one `build_repository` wrote, or a variant cannot be made."""


@dataclass(frozen=True)
class ComponentModel:
    """A component model of a built repository.

    Args:
        name: Triton model name (`unet`, or `base_unet` with a component prefix).
        spec: the component declaration (by its role in the pipeline config).
        sizes: values of the checkpoint-fixed dims, read from its config.
        directory: the model's folder in the input repository.
    """

    name: str
    spec: ComponentSpec
    sizes: Mapping[str, int]
    directory: Path

    @property
    def onnx_file(self) -> Path:
        return self.directory / VERSION / ONNX_FILE


@dataclass(frozen=True)
class PipelineModel:
    """A pipeline model of a built repository.

    Args:
        name: Triton model name (`inpaint`).
        components: role (`unet`, ...) → component model name, from its `<role>_model` parameters.
        settings: its config parameters (`PipelineSettings`).
        vae_scale_factor: pixels per latent, from its assets.
        vae_scaling_factor: the VAE's latent scaling factor, from its assets.
        default_size: the checkpoint's native image size, from its assets.
        max_batch_size: requests per `execute` call, from its config (the continuous batcher
            denoises up to its `max_active_requests` together, whatever this is).
        architecture: `sd15` or `sdxl`, from its assets; decides the component specs.
    """

    name: str
    components: Mapping[str, str]
    settings: PipelineSettings
    vae_scale_factor: int
    vae_scaling_factor: float
    default_size: int
    max_batch_size: int = 0
    architecture: str = "sd15"

    def spec(self, role: str) -> ComponentSpec:
        """The declaration of one of its components, for its architecture."""
        specs = served_components(self.architecture, self.components)
        return next(s for s in specs if s.name == role)


@dataclass(frozen=True)
class Repository:
    """What a built repository holds: pipelines, their components, and any other models."""

    root: Path
    pipelines: tuple[PipelineModel, ...]
    components: tuple[ComponentModel, ...]
    others: tuple[str, ...]

    def pipeline_of(self, component: str) -> PipelineModel:
        return next(p for p in self.pipelines if component in p.components.values())


def read_configs(root: Path) -> dict[str, mc.ModelConfig]:
    """Model name (folder) → parsed config.pbtxt, for every model of a repository."""
    configs = {}
    for path in sorted(Path(root).glob(f"*/{CONFIG_FILE}")):
        configs[path.parent.name] = parse_pbtxt(path.read_text())
    if not configs:
        raise RepositoryError(f"{root} holds no model (no */{CONFIG_FILE})")
    return configs


def read_repository(root: Path) -> Repository:
    """Find the pipelines (by their `<role>_model` parameters) and their components."""
    root = Path(root)
    configs = read_configs(root)
    pipelines = tuple(
        _pipeline_model(root, name, config)
        for name, config in configs.items()
        if is_pipeline(config_parameters(config))
    )
    if not pipelines:
        raise RepositoryError(f"{root} has no pipeline model (no config with *_model parameters)")
    components: dict[str, ComponentModel] = {}
    for pipeline in pipelines:
        for role, model in pipeline.components.items():
            if model not in configs:
                raise RepositoryError(f"{pipeline.name} calls {model!r}, which {root} lacks")
            spec = pipeline.spec(role)
            components.setdefault(model, _component_model(root, model, spec, configs[model]))
    used = {p.name for p in pipelines} | set(components)
    others = tuple(name for name in configs if name not in used)
    return Repository(root, pipelines, tuple(components.values()), others)


def _pipeline_model(root: Path, name: str, config: mc.ModelConfig) -> PipelineModel:
    params = config_parameters(config)
    try:
        settings = PipelineSettings.from_parameters(params)
    except ValueError as err:
        raise RepositoryError(f"pipeline {name!r}: {err}") from None
    facts_file = root / name / VERSION / ASSETS_DIR / PIPELINE_JSON
    try:
        facts = json.loads(facts_file.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"pipeline {name!r} has no {facts_file}") from None
    architecture = str(facts.get("architecture", "sd15"))
    try:
        roles = [spec.name for spec in components_for(architecture)]
    except ValueError as err:
        raise RepositoryError(f"pipeline {name!r}: {err}") from None
    missing = [f"{role}_model" for role in roles if role not in settings.components]
    if missing:
        raise RepositoryError(f"{architecture} pipeline {name!r} lacks parameters {missing}")
    served = served_components(architecture, settings.components)  # + its preview decoder
    return PipelineModel(
        name=name,
        components={spec.name: settings.components[spec.name] for spec in served},
        settings=settings,
        vae_scale_factor=int(facts["vae_scale_factor"]),
        vae_scaling_factor=float(facts["vae_scaling_factor"]),
        default_size=int(facts["default_size"]),
        max_batch_size=config.max_batch_size,
        architecture=architecture,
    )


def _component_model(
    root: Path, name: str, spec: ComponentSpec, config: mc.ModelConfig
) -> ComponentModel:
    dims = {t.name: list(t.dims) for t in (*config.input, *config.output)}
    extra = set(dims) - {t.name for t in (*spec.inputs, *spec.outputs)}
    if extra:
        raise RepositoryError(f"{name}: tensors {sorted(extra)} are not in the {spec.name} spec")
    try:
        sizes = sizes_from_config(spec, dims)
    except ValueError as err:
        raise RepositoryError(str(err)) from None
    return ComponentModel(name, spec, sizes, root / name)
