"""Request → images: parsing, limits and the loop, wired from a model's config parameters.

`PipelineService` is what the Triton pipeline model wraps (with BLS runners) and what tests
and benchmarks run in-process (with ONNX Runtime runners), from the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path

import numpy as np

from sdserve_pipeline.assets import PipelineAssets
from sdserve_pipeline.components import SD15_COMPONENTS, ComponentSpec
from sdserve_pipeline.loop import Components, InpaintLoop, Runner
from sdserve_pipeline.request import Limits, parse_request

# Makes a runner for a component: (its spec, the Triton model name serving it) → callable.
RunnerFactory = Callable[[ComponentSpec, str], Runner]


class PipelineService:
    """Validated generation for one pipeline model.

    Args:
        loop: the generation loop on its components.
        limits: request limits.
    """

    def __init__(self, loop: InpaintLoop, limits: Limits) -> None:
        self.loop = loop
        self.limits = limits

    @classmethod
    def from_parameters(
        cls, params: Mapping[str, str], assets_dir: str | Path, make_runner: RunnerFactory
    ) -> PipelineService:
        """Build from a pipeline config's parameters (see `triton_configs.pipeline_config`)."""
        runners = {
            spec.name: make_runner(spec, params.get(f"{spec.name}_model", spec.name))
            for spec in SD15_COMPONENTS
        }
        loop = InpaintLoop(
            Components(**runners),
            PipelineAssets.load(assets_dir),
            feather_radius=int(params.get("feather_radius", 4)),
        )
        return cls(loop, limits_from_parameters(params))

    def generate(
        self, inputs: Mapping[str, np.ndarray], is_cancelled: Callable[[], bool] | None = None
    ) -> dict[str, np.ndarray]:
        """Wire inputs → wire outputs (`images` (N, H, W, 3) uint8, `seeds` (N,) int64).

        Raises:
            RequestError: a bad input, before any model call.
            Cancelled: the request was cancelled mid-loop.
        """
        params = parse_request(dict(inputs), self.limits, self.loop.facts.default_size)
        images = self.loop(params, is_cancelled)
        return {"images": images, "seeds": np.asarray(params.seeds, dtype=np.int64)}


def limits_from_parameters(params: Mapping[str, str]) -> Limits:
    values = {}
    for f in fields(Limits):
        key = f"limit_{f.name}"
        if key in params:
            values[f.name] = float(params[key]) if f.type == "float" else int(params[key])
    return Limits(**values)


def config_parameters(model_config: Mapping) -> dict[str, str]:
    """`parameters` of a Triton model config (as JSON) → plain {key: string value}."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
