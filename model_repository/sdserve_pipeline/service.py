"""Request → images: parsing, limits and the loop, wired from a model's config parameters.

`PipelineService` is what the Triton pipeline model wraps (with BLS runners) and what tests
and benchmarks run in-process (with ONNX Runtime runners), from the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sdserve_pipeline.assets import PipelineAssets
from sdserve_pipeline.components import ComponentSpec, served_components
from sdserve_pipeline.crop import crop_request
from sdserve_pipeline.executor import Runner
from sdserve_pipeline.generation import Components, GenerationLoop
from sdserve_pipeline.outpaint import BandStep, outpaint
from sdserve_pipeline.streaming import PreviewDecoder, linear_decoder
from sdserve_protocol.contract import GenerationParams, decode_request
from sdserve_protocol.rules import Limits, RequestError
from sdserve_protocol.settings import SCHEDULER_NAMES, OutpaintSettings, PipelineSettings

# Makes a runner for a component: (its spec, the Triton model name serving it) → callable.
RunnerFactory = Callable[[ComponentSpec, str], Runner]


class PipelineService:
    """Validated generation for one pipeline model.

    Args:
        loop: the generation loop on its components.
        limits: request limits.
        outpaint: outpainting settings (bands of the model's default size).
        schedulers: the scheduler names requests may ask for (all of `SCHEDULER_NAMES`).
        adapters: the LoRA adapter folder (`adapters.AdapterCatalog`); None: none served.
    """

    def __init__(
        self, loop: GenerationLoop, limits: Limits, outpaint: OutpaintSettings | None = None,
        schedulers: Sequence[str] = SCHEDULER_NAMES, adapters: Any = None,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.adapters = adapters  # an `adapters.AdapterCatalog`, or None: no LoRA served
        if adapters is not None:
            loop.adapter_targets = self.adapter_targets
        self.limits = limits
        self.outpaint = outpaint or OutpaintSettings(native=loop.facts.default_size)
        self.schedulers = tuple(schedulers)

    @classmethod
    def from_settings(
        cls, settings: PipelineSettings, assets_dir: str | Path, make_runner: RunnerFactory
    ) -> PipelineService:
        """Build from a pipeline model's settings (its config's parameters, read with
        `PipelineSettings.from_parameters`) and its assets folder.

        Raises:
            ValueError: the settings name another architecture than the checkpoint's, or
                allow a `clip_skip` beyond its text encoders' layers.
        """
        assets = PipelineAssets.load(assets_dir)
        facts = assets.facts
        if settings.architecture and settings.architecture != facts.architecture:
            raise ValueError(
                f"parameter architecture: {settings.architecture!r}, but the checkpoint in "
                f"{assets_dir} is {facts.architecture!r}"
            )
        if settings.limits.max_clip_skip > facts.max_clip_skip:
            raise ValueError(
                f"parameter limit_max_clip_skip: {settings.limits.max_clip_skip}, but the text "
                f"encoders in {assets_dir} have layers to skip up to {facts.max_clip_skip}"
            )
        specs = served_components(facts.architecture, settings.components)
        runners = {
            spec.name: make_runner(spec, settings.component_model(spec.name)) for spec in specs
        }
        loop = GenerationLoop(
            Components(**runners),
            assets,
            feather_radius=settings.feather_radius,
            max_rows={spec.name: settings.max_batch.get(spec.name, 0) for spec in specs},
            size_buckets=settings.size_buckets,
        )
        outpaint_settings = settings.outpaint
        if not outpaint_settings.native:
            outpaint_settings = replace(outpaint_settings, native=facts.default_size)
        models = {spec.name: settings.component_model(spec.name) for spec in specs}
        catalog = None  # a shared-graph checkpoint serves no adapters (`shared_graph`)
        if not settings.shared_graph:
            catalog = adapter_catalog(Path(assets_dir).parent.parent, models, facts.architecture)
        return cls(loop, settings.limits, outpaint_settings, settings.schedulers, catalog)

    @property
    def preview(self) -> PreviewDecoder:
        """How streamed previews are decoded: by the pipeline's preview decoder (a tiny VAE)
        when the repository was exported with one, else by the model family's linear
        projection of the latents."""
        if self.loop.components.preview_decoder is not None:
            return self.loop.decode_previews
        return linear_decoder(self.loop.facts.architecture)

    def parse(self, inputs: Mapping[str, npt.NDArray[Any]]) -> GenerationParams:
        """Wire inputs → validated parameters; a `padding_mask_crop` request comes back as
        the inpainting of its crop (`crop.crop_request`), so that what follows sees the size
        generated.

        Raises:
            RequestError: a bad input, before any model call.
        """
        facts = self.loop.facts
        params = decode_request(
            inputs, self.limits, default_size=facts.default_size,
            default_strength=facts.default_strength, schedulers=self.schedulers,
        )  # fmt: skip
        if params.padding_mask_crop is not None:
            params = crop_request(self.loop.processors, params)
        self.loop.sizing.check(params)  # larger than every size bucket: RequestError here
        prompts = self.loop.prompts
        prompts.check(params.prompt, params.negative_prompt, params.prompt_weighting,
                      self.limits.max_prompt_chunks)  # fmt: skip
        if params.adapters:
            self.check_adapters([name for name, _ in params.adapters])
        texts = [params.negative_prompt, params.prompt]
        if params.clip_skip and prompts.applies(texts, params.prompt_weighting):
            raise RequestError(
                "clip_skip", "applies to plain prompts (one text-encoder window, no weighting)"
            )
        return params

    def adapter_targets(self, name: str) -> tuple[str, ...]:
        """The components adapter `name` changes (all LoRA can change when it is not usable
        now: the runner then refuses it)."""
        from sdserve_pipeline.adapters import LORA_COMPONENTS, AdapterError

        try:
            return tuple(self.adapters.get([name])[0].targets)
        except AdapterError:
            return LORA_COMPONENTS[self.loop.facts.architecture]

    def check_adapters(self, names: Sequence[str]) -> None:
        """Every adapter named is in the folder and usable; raises `RequestError` if not."""
        from sdserve_pipeline.adapters import AdapterError

        if self.adapters is None:
            raise RequestError("adapters", "this model serves no LoRA adapters")
        try:
            self.adapters.get(names)
        except AdapterError as err:
            raise RequestError("adapters", str(err)) from None

    def generate(
        self, inputs: Mapping[str, npt.NDArray[Any]], is_cancelled: Callable[[], bool] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Wire inputs → wire outputs (`images` (N, H, W, 3) uint8, `seeds` (N,) int64).

        Raises:
            RequestError: a bad input, before any model call.
            Cancelled: the request was cancelled mid-loop.
        """
        params = self.parse(inputs)
        if params.outpaint is not None:
            return self.outpaint_request(params, is_cancelled)
        return wire_outputs(self.loop(params, is_cancelled), params)

    def outpaint_request(
        self,
        params: GenerationParams,
        is_cancelled: Callable[[], bool] | None = None,
        on_step: BandStep | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """An outpainting request, band after band: its wire outputs (`outpaint.outpaint`)."""
        images = outpaint(self.loop, params, self.outpaint, is_cancelled, on_step)
        return wire_outputs(images, params)


def adapter_catalog(
    pipeline_dir: Path, component_models: Mapping[str, str], architecture: str
) -> Any:
    """The pipeline's adapter folder (`<pipeline model>/adapters`), checked against the weight
    maps of its components; None when no component has one (an export before adapters, or
    the GPU variant's native components, which cannot switch weights).

    Args:
        pipeline_dir: `<repository>/<pipeline>`.
        component_models: component role → the Triton model serving it.
        architecture: the checkpoint's.
    """
    from sdserve_pipeline.adapters import ADAPTERS_DIR, LORA_COMPONENTS, AdapterCatalog
    from sdserve_pipeline.assets import VERSION
    from sdserve_pipeline.weight_map import load_weight_map

    maps = {}
    for component in LORA_COMPONENTS.get(architecture, ()):
        model = component_models.get(component, component)
        found = load_weight_map(pipeline_dir.parent / model / VERSION)
        if found is not None:
            maps[component] = list(found)
    if not maps:
        return None
    return AdapterCatalog(pipeline_dir / ADAPTERS_DIR, architecture, maps)


def wire_outputs(
    images: npt.NDArray[np.uint8], params: GenerationParams
) -> dict[str, npt.NDArray[Any]]:
    """Generated images → the wire outputs `images` (N, H, W, 3) uint8 and `seeds` (N,)."""
    return {"images": images, "seeds": np.asarray(params.seeds, dtype=np.int64)}


def unbatch(inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """Tensors of a batching pipeline model (a leading dim of 1 per request) → wire items.

    Raises:
        RequestError: a request carries more than one item (one prompt per request; several
            images come from `num_images`).
    """
    items = {}
    for name, array in inputs.items():
        if array.ndim == 0 or array.shape[0] != 1:
            raise RequestError(
                name,
                f"batch dimension {list(array.shape[:1])} given, [1] expected: one prompt per "
                "request (use num_images for several images)",
            )
        items[name] = array[0]
    return items


def batch(outputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """Wire outputs → tensors of a batching pipeline model (leading dim of 1)."""
    return {name: array[np.newaxis] for name, array in outputs.items()}
