"""What engine each component of a built repository needs: profiles, batch range, precision.

Pure: no TensorRT, no GPU. `engine_targets` derives each component's `EngineTarget` from its
spec, its pipeline's size buckets and precision rules; `batch_coverage_problems` names the
requests the pipeline accepts but those batch ranges would reject (from the specs'
`CallRows`, the rows one request's call has).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sdserve_export.built_repository import ComponentModel, PipelineModel, Repository
from sdserve_export.engine_profiles import (
    BatchRange,
    Profile,
    batch_range,
    default_buckets,
    default_fp32_components,
    derive_profiles,
)
from sdserve_export.plan_names import EngineKey
from sdserve_protocol.sizes import SizeBucket


@dataclass(frozen=True)
class EngineTarget:
    """What one component's engine must be: profiles, batch range, precision.

    Args:
        component: the component model.
        profiles: one per size bucket (one `static` profile without spatial dims).
        batch: batch range.
        precision: `fp16` or `fp32`.
    """

    component: ComponentModel
    profiles: tuple[Profile, ...]
    batch: BatchRange
    precision: str

    def key(self, trt_version: str, compute_capability: tuple[int, int], digest: str) -> EngineKey:
        return EngineKey(
            component=self.component.name,
            trt_version=trt_version,
            compute_capability=compute_capability,
            precision=self.precision,
            batch=self.batch.as_tuple(),
            profiles=tuple(p.name for p in self.profiles),
            onnx_digest=digest,
        )


def serving_buckets(
    pipeline: PipelineModel,
    requested: Iterable[SizeBucket] | None = None,
    xl_requested: Iterable[SizeBucket] | None = None,
) -> tuple[SizeBucket, ...]:
    """The buckets a pipeline's engines serve, plus the checkpoint's own square size (e.g.
    128² for the demo; the default outpainting band).

    Args:
        pipeline: the pipeline model.
        requested: buckets for every pipeline; None: its architecture's `default_buckets`.
        xl_requested: buckets for SDXL pipelines, overriding `requested` for them.
    """
    chosen = xl_requested if pipeline.architecture == "sdxl" else None
    if chosen is None:
        chosen = requested
    if chosen is None:
        chosen = default_buckets(pipeline.architecture)
    own = SizeBucket(height=pipeline.default_size, width=pipeline.default_size)
    return tuple(sorted({*chosen, own}))


def engine_targets(
    repository: Repository,
    buckets: Iterable[SizeBucket] | None = None,
    fp32_components: Iterable[str] | None = None,
    batch_overrides: Mapping[str, Sequence[int]] | None = None,
    xl_buckets: Iterable[SizeBucket] | None = None,
) -> list[EngineTarget]:
    """The engine each component needs (pure: no TensorRT, no GPU).

    Args:
        repository: the built repository.
        buckets: image sizes to serve, for every pipeline; None: each pipeline's
            architecture's `default_buckets`. The checkpoint's own square size is always
            added.
        fp32_components: spec names (`vae_decoder`, ...) built without fp16; None picks the
            default per pipeline (the SDXL VAE stays fp32, see `default_fp32_components`).
        batch_overrides: spec name → (min, opt, max) replacing `spec.trt_batch`.
        xl_buckets: image sizes for SDXL pipelines, overriding `buckets` for them.
    """
    requested = None if buckets is None else tuple(buckets)
    xl_requested = None if xl_buckets is None else tuple(xl_buckets)
    overrides = batch_overrides or {}
    targets = []
    for component in repository.components:
        pipeline = repository.pipeline_of(component.name)
        spec = component.spec
        fp32 = (
            set(fp32_components)
            if fp32_components is not None
            else default_fp32_components(pipeline.vae_scaling_factor, pipeline.architecture)
        )
        batch = batch_range(spec, overrides.get(spec.name))
        profiles = derive_profiles(
            spec,
            component.sizes,
            serving_buckets(pipeline, requested, xl_requested),
            pipeline.vae_scale_factor,
            batch,
            pipeline.settings.limits.max_prompt_chunks,  # the UNet's text length
        )
        precision = "fp32" if spec.name in fp32 else "fp16"
        targets.append(EngineTarget(component, profiles, batch, precision))
    return targets


def batch_coverage_problems(repository: Repository, targets: Sequence[EngineTarget]) -> list[str]:
    """Requests the pipeline accepts but the engines' batch ranges would reject.

    One request's call of a component has `spec.rows.count(num_images, guidance)` rows (e.g.
    the UNet N rows, 2N under guidance; `num_images` up to `limit_max_images`). Calls of
    several requests are batched together but split at the pipeline's `max_<role>_batch`
    (the TensorRT variant sets each to its engine's max), never within one request's rows,
    so an engine must take one request's rows alone.
    """
    by_model = {t.component.name: t for t in targets}
    problems = []
    for pipeline in repository.pipelines:
        max_images = pipeline.settings.limits.max_images
        for role, model in pipeline.components.items():
            target = by_model.get(model)
            if target is None:
                continue
            low, high = pipeline.spec(role).rows.bounds(max_images)
            batch = target.batch
            if low < batch.min or high > batch.max:
                problems.append(
                    f"{pipeline.name}: {target.component.name} is called with batch {low}..{high} "
                    f"(limit_max_images={max_images}) but its engine accepts "
                    f"{batch.min}..{batch.max}"
                )
    return problems
