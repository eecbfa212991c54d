"""The generation loop, on the exported components given as callables.

It follows `StableDiffusionInpaintPipeline.__call__` (SD 1.5) and
`StableDiffusionXLInpaintPipeline.__call__` (SDXL: two text encoders, pooled embeddings and
size/crop time ids as extra UNet inputs) step by step (same random draws in the same
order, same scheduler calls, same arithmetic), so that with the same weights, seed,
scheduler and steps the images match diffusers'. The architectures differ only in the
prompt conditioning; latents, timesteps, the denoising loop and decoding are shared.
The same code runs inside Triton (BLS callables) and in-process (ONNX Runtime sessions).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from sdserve_pipeline.assets import PipelineAssets
from sdserve_pipeline.images import (
    Bucket,
    Processors,
    SizeBucketError,
    check_size_buckets,
    composite,
    feather_alpha,
    pad_to,
    postprocess,
    preprocess_image,
    preprocess_mask,
    snap_to_bucket,
)
from sdserve_pipeline.request import GenerationParams, RequestError
from sdserve_pipeline.schedulers import make_scheduler

# A component: positional tensors in its ComponentSpec's input order → outputs in its order.
Runner = Callable[..., tuple[torch.Tensor, ...]]


class Cancelled(Exception):
    """The request was cancelled between two steps."""


@dataclass(frozen=True)
class Components:
    text_encoder: Runner
    unet: Runner
    vae_encoder: Runner
    vae_decoder: Runner
    text_encoder_2: Runner | None = None  # SDXL


@dataclass(frozen=True)
class Call:
    """A component call a plan asks for: `outputs = yield Call("vae_encoder", (image,))`.

    Plans (`InpaintLoop.start_plan`, `finish_plan`) are the generation code written for one
    request; `InpaintLoop.run_plans` drives several at once and merges the calls they ask
    for at the same time into one batched call per component and shape.
    """

    component: str  # a `Components` field
    inputs: tuple[torch.Tensor, ...]  # in the component's spec order, batch first

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    def batch_key(self) -> tuple[Any, ...]:
        """Calls with equal keys can be concatenated along the batch axis."""
        return (self.component, *(tuple(x.shape[1:]) for x in self.inputs))


T = TypeVar("T")
# One request's work up to a result: yields `Call`s, receives their outputs, returns T.
Plan = Generator[Call, tuple[torch.Tensor, ...], T]


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, [uncond x N, cond x N] (or cond x N without CFG).

    Args:
        prompt_embeds: (2N, L, D) `encoder_hidden_states`.
        added: extra UNet inputs in spec order after `encoder_hidden_states`; SDXL:
            `text_embeds` (2N, P) pooled embeddings and `time_ids` (2N, 6).
    """

    prompt_embeds: torch.Tensor
    added: tuple[torch.Tensor, ...] = ()


@dataclass
class LatentState:
    """Latents entering the loop, plus what the UNet input or the blend step needs.

    Args:
        latents: (N, 4, h, w) initial latents.
        unet_extra: (N, 5, h, w) mask and masked-image latents (9-channel UNet).
        blend_latents: (N, 4, h, w) clean image latents re-noised and blended in outside
            the mask after each step (4-channel UNet inpainting, as diffusers does).
        noise: (N, 4, h, w) the initial noise, reused to re-noise `blend_latents`.
        mask: (N, 1, h, w) latent-resolution mask, 1 = regenerate.
    """

    latents: torch.Tensor
    unet_extra: torch.Tensor | None = None
    blend_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def blend(
        self, scheduler: Any, latents: torch.Tensor, next_t: torch.Tensor | None
    ) -> torch.Tensor:
        """`(1 - mask) * noised_init + mask * latents`, the init noised to the next timestep."""
        init, mask = self.blend_latents, self.mask
        if init is None or mask is None:
            raise RuntimeError("blend() needs blend_latents and mask")
        if next_t is not None:
            init = scheduler.add_noise(init, self.noise, torch.tensor([next_t]))
        return (1 - mask) * init + mask * latents


@dataclass
class Job:
    """One request between `InpaintLoop.start` and `finish`: its own scheduler and state."""

    params: GenerationParams
    cfg: bool
    scheduler: Any
    timesteps: torch.Tensor
    state: LatentState
    conditioning: Conditioning
    step_kwargs: dict[str, Any]
    is_cancelled: Callable[[], bool]
    index: int = 0

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.conditioning.prompt_embeds

    @property
    def latents(self) -> torch.Tensor:
        return self.state.latents

    @property
    def finished(self) -> bool:
        return self.index >= len(self.timesteps)

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guidance, scheduler step and (4-channel UNet) blend for this job's noise prediction."""
        t, params = self.timesteps[self.index], self.params
        if self.cfg:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + params.guidance_scale * (noise_text - noise_uncond)
        latents = self.scheduler.step(
            noise_pred, t, self.latents, **self.step_kwargs, return_dict=False
        )[0]
        if self.state.blend_latents is not None:  # 4-channel UNet inpainting
            last = self.index == len(self.timesteps) - 1
            next_t = None if last else self.timesteps[self.index + 1]
            latents = self.state.blend(self.scheduler, latents, next_t)
        self.state.latents = latents
        self.index += 1


def _chunks(items: list[T], rows_of: Callable[[T], int], max_rows: int) -> list[list[T]]:
    """Consecutive runs of items whose rows add up to at most `max_rows` (0: one run).

    An item larger than `max_rows` on its own still runs, alone.
    """
    if max_rows <= 0:
        return [items]
    chunks: list[list[T]] = []
    rows = 0
    for item in items:
        item_rows = rows_of(item)
        if chunks and rows + item_rows <= max_rows:
            chunks[-1].append(item)
            rows += item_rows
        else:
            chunks.append([item])
            rows = item_rows
    return chunks


class InpaintLoop:
    """Inpainting / text-to-image generation on exported components.

    Args:
        components: the four networks as callables.
        assets: tokenizer, scheduler config and checkpoint facts.
        feather_radius: width in pixels of the blend ramp inside the mask when the input's
            pixels are pasted back (`preserve_unmasked`).
        max_rows: component name → most rows of one call batched across requests (absent
            or 0: no limit); set to the TensorRT engines' largest profile batches.
        size_buckets: (height, width) sizes to generate at, each a multiple of the VAE scale
            factor (the static shapes of TensorRT engines); a request is generated at the
            smallest bucket containing it and cropped back. Empty (default): any size,
            padded to the latent grid.
    """

    def __init__(
        self,
        components: Components,
        assets: PipelineAssets,
        feather_radius: int = 4,
        max_rows: Mapping[str, int] | None = None,
        size_buckets: Sequence[Bucket] = (),
    ) -> None:
        self.max_rows = dict(max_rows or {})
        self.components = components
        self.assets = assets
        self.facts = assets.facts
        self.processors = Processors.for_vae_scale(assets.facts.vae_scale_factor)
        self.feather_radius = feather_radius
        self.size_buckets = check_size_buckets(size_buckets, assets.facts.vae_scale_factor)

    def generation_size(self, params: GenerationParams) -> tuple[int, int]:
        """(height, width) the request is generated at: its size padded to the latent grid,
        or snapped to the smallest size bucket containing it.

        Raises:
            RequestError: the request is larger than every size bucket (naming `image`, or
                `height`/`width` for text-to-image).
        """
        try:
            return snap_to_bucket(
                params.height, params.width, self.size_buckets, self.facts.vae_scale_factor
            )
        except SizeBucketError as err:
            raise RequestError(self._size_input(params), str(err)) from None

    def check_size(self, params: GenerationParams) -> None:
        """Reject at validation time a request no size bucket can serve.

        Outpainting requests pass: their bands are planned to fit the buckets (see
        `outpaint.band_side`), whatever the canvas size.

        Raises:
            RequestError: see `generation_size`.
        """
        if params.outpaint is None:
            self.generation_size(params)

    def _size_input(self, params: GenerationParams) -> str:
        """The wire input a size error concerns: `image`; text-to-image: `width` when the
        width alone exceeds every bucket, else `height`."""
        if params.image is not None:
            return "image"
        if all(width < params.width for _, width in self.size_buckets):
            return "width"
        return "height"

    def __call__(
        self, params: GenerationParams, is_cancelled: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """Generate `params.num_images` images: (N, H, W, 3) uint8 at the request's size."""
        job = self.start(params, is_cancelled)
        while not job.finished:
            if job.is_cancelled():
                raise Cancelled()
            _result(self.run_plans([self.step_plan(job)])[0])
        return self.finish(job)

    def start(
        self, params: GenerationParams, is_cancelled: Callable[[], bool] | None = None
    ) -> Job:
        """Everything before the denoising loop: prompt, timesteps, latents, conditioning."""
        return _result(self.run_plans([self.start_plan(params, is_cancelled)])[0])

    def start_many(
        self, requests: Sequence[tuple[GenerationParams, Callable[[], bool] | None]]
    ) -> list[Job | Exception]:
        """`start` of several requests, their text-encoder and VAE-encoder calls batched."""
        return self.run_plans([self.start_plan(p, c) for p, c in requests])

    def start_plan(
        self, params: GenerationParams, is_cancelled: Callable[[], bool] | None = None
    ) -> Plan[Job]:
        """`start` as a plan (see `Call`)."""
        n, cfg = params.num_images, params.guidance_scale > 1.0
        generators = [torch.Generator().manual_seed(s) for s in params.seeds]
        height, width = self.generation_size(params)  # padded to the grid, or a size bucket

        # 1. Encode input prompt: [uncond x N, cond x N] (one call per text encoder)
        conditioning = yield from self.condition(params, n, cfg, height, width)

        # 2. Set timesteps, truncated by strength
        scheduler = make_scheduler(params.scheduler, self.assets.scheduler_config)
        scheduler.set_timesteps(params.steps)
        timesteps = truncated_timesteps(scheduler, params.steps, params.strength)

        # 3. Prepare latents and the inpainting conditioning, drawing as diffusers does
        state = yield from self.prepare_latents(
            params, scheduler, timesteps, generators, height, width
        )
        if cfg and state.unet_extra is not None:
            state.unet_extra = torch.cat([state.unet_extra] * 2)  # (2N, 5, h, w)
        return Job(
            params=params, cfg=cfg, scheduler=scheduler, timesteps=timesteps, state=state,
            conditioning=conditioning, step_kwargs=extra_step_kwargs(scheduler, generators),
            is_cancelled=is_cancelled or (lambda: False),
        )  # fmt: skip

    def step_plan(self, job: Job) -> Plan[None]:
        """One denoising step of one job as a plan (see `Call`): its UNet rows, then its own
        guidance, scheduler step and blend. `step_all` batches the UNet calls of many."""
        # 4. Denoising loop, one step: [latents, mask, masked latents]
        t = job.timesteps[job.index]
        model_input = torch.cat([job.latents] * 2) if job.cfg else job.latents
        model_input = job.scheduler.scale_model_input(model_input, t)
        if job.state.unet_extra is not None:  # 9-channel UNet
            model_input = torch.cat([model_input, job.state.unet_extra], dim=1)
        timestep = t.to(torch.float32).repeat(model_input.shape[0])  # (2N,)
        (noise_pred,) = yield Call(
            "unet", (model_input, timestep, job.prompt_embeds, *job.conditioning.added)
        )
        job.advance(noise_pred)

    def finish(self, job: Job) -> np.ndarray:
        """Decode, crop to the request's size, paste the kept pixels back."""
        return _result(self.run_plans([self.finish_plan(job)])[0])

    def finish_many(self, jobs: Sequence[Job]) -> list[np.ndarray | Exception]:
        """`finish` of several jobs, their VAE-decoder calls batched."""
        return self.run_plans([self.finish_plan(job) for job in jobs])

    def finish_plan(self, job: Job) -> Plan[np.ndarray]:
        """`finish` as a plan (see `Call`)."""
        # 5. Decode and postprocess
        params = job.params
        (decoded,) = yield Call("vae_decoder", (job.latents / self.facts.vae_scaling_factor,))
        images = postprocess(self.processors, decoded)[:, : params.height, : params.width]
        if params.image is not None and params.mask is not None and params.preserve_unmasked:
            alpha = feather_alpha(params.mask, self.feather_radius)
            images = composite(params.image, images, alpha)
        return images

    def run_many(
        self, requests: list[tuple[GenerationParams, Callable[[], bool] | None]]
    ) -> list[np.ndarray | Exception]:
        """Several requests denoised together: one UNet call per step per latent size.

        Returns each request's images, or the exception that ended it (`Cancelled`, or an
        error of its own), in request order; one request's failure does not stop the rest.
        """
        results: list[np.ndarray | Exception | None] = [None] * len(requests)
        jobs: dict[int, Job] = {}
        for i, started in enumerate(self.start_many(requests)):
            if isinstance(started, Exception):
                results[i] = started
            else:
                jobs[i] = started
        while jobs:
            for i in [i for i, job in jobs.items() if job.is_cancelled()]:
                results[i] = Cancelled()
                del jobs[i]
            failed = self.step_all(list(jobs.values()))
            for i in [i for i, job in jobs.items() if id(job) in failed]:
                results[i] = failed[id(jobs.pop(i))]
            done = [i for i, job in jobs.items() if job.finished]
            for i, images in zip(done, self.finish_many([jobs.pop(i) for i in done]), strict=True):
                results[i] = images
        return [r if r is not None else RuntimeError("request produced nothing") for r in results]

    def run_plans(self, plans: Sequence[Plan[T]]) -> list[T | Exception]:
        """Drive plans together: the calls they ask for at the same time that share a
        component and trailing shapes become one call (split at the component's
        `max_rows`), whose outputs are split back by rows.

        Each plan's own code, random draws included, runs in its own order, so its result
        is the one it gets alone. Returns each plan's result or the exception that ended it;
        a failed call fails only the plans in it.
        """
        results: dict[int, T | Exception] = {}
        asked: dict[int, Call] = {}

        def resume(i: int, outputs: tuple[torch.Tensor, ...] | None) -> None:
            try:
                asked[i] = plans[i].send(outputs)  # type: ignore[arg-type]  # None starts it
            except StopIteration as stop:
                results[i] = stop.value
            except Exception as err:  # noqa: BLE001 (this plan fails, not the rest)
                results[i] = err

        for i in range(len(plans)):
            resume(i, None)
        while asked:
            calls, asked = asked, {}
            for chunk in self._batches(calls):
                try:
                    outputs = self._call([calls[i] for i in chunk])
                except Exception as err:  # noqa: BLE001 (the chunk's plans fail, not all)
                    for i in chunk:
                        plans[i].close()
                        results[i] = err
                    continue
                for i, piece in zip(chunk, outputs, strict=True):
                    resume(i, piece)
        return [results[i] for i in range(len(plans))]

    def _batches(self, calls: dict[int, Call]) -> list[list[int]]:
        """Keys of `calls` grouped into batched calls: same `batch_key`, in order, each at
        most the component's `max_rows` rows."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, call in calls.items():
            groups.setdefault(call.batch_key(), []).append(i)
        return [
            chunk
            for group in groups.values()
            for chunk in _chunks(
                group, lambda i: calls[i].rows, self.max_rows.get(calls[group[0]].component, 0)
            )
        ]

    def _call(self, calls: list[Call]) -> list[tuple[torch.Tensor, ...]]:
        """One component call for several `Call`s: inputs concatenated, outputs split."""
        run: Runner = getattr(self.components, calls[0].component)
        if len(calls) == 1:
            return [tuple(run(*calls[0].inputs))]
        inputs = zip(*(c.inputs for c in calls), strict=True)
        outputs = run(*(torch.cat(parts) for parts in inputs))
        pieces = [output.split([c.rows for c in calls]) for output in outputs]
        return [tuple(piece[j] for piece in pieces) for j in range(len(calls))]

    def step_all(self, jobs: list[Job]) -> dict[int, Exception]:
        """One denoising step of every job: one UNet call per latent size, each call at most
        `max_rows["unet"]` rows. Jobs may be at different steps of different schedules.

        Returns:
            `{id(job): error}` for the jobs whose UNet call or own step failed (a failed
            UNet call fails only the jobs in it); the others advanced one step.
        """
        outcomes = self.run_plans([self.step_plan(job) for job in jobs])
        return {id(j): o for j, o in zip(jobs, outcomes, strict=True) if isinstance(o, Exception)}

    def prepare_latents(
        self,
        params: GenerationParams,
        scheduler: Any,
        timesteps: torch.Tensor,
        generators: list[torch.Generator],
        height: int,
        width: int,
    ) -> Plan[LatentState]:
        """Initial latents and conditioning, with every random draw in diffusers' order.

        Inpainting pipeline order: image latents (strength < 1, or a 4-channel UNet), then
        the noise, then the masked-image latents. A 4-channel text-to-image request follows
        `StableDiffusionPipeline`: the noise only.
        """
        facts, n = self.facts, params.num_images
        latent_shape = (1, facts.latent_channels, height // facts.vae_scale_factor,
                        width // facts.vae_scale_factor)  # fmt: skip
        nine_channels = facts.unet_in_channels == 9
        inpainting = params.image is not None
        if not nine_channels and not inpainting:
            noise = torch.cat([randn_tensor(latent_shape, generator=g) for g in generators])
            return LatentState(latents=noise * scheduler.init_noise_sigma)

        # Preprocess image and mask (text-to-image: full mask, nothing kept)
        init_image, mask_condition = self.prepare_image_and_mask(params, height, width)
        masked_image = init_image * (mask_condition < 0.5)  # (1, 3, H, W)
        image_latents = None
        if params.strength < 1.0 or not nine_channels:
            image_latents = yield from self.encode_image(init_image, generators)  # (N, 4, h, w)
        noise = torch.cat([randn_tensor(latent_shape, generator=g) for g in generators])
        if params.strength < 1.0:
            latent_timestep = timesteps[:1].repeat(n)
            latents = scheduler.add_noise(image_latents, noise, latent_timestep)
        else:
            latents = noise * scheduler.init_noise_sigma
        mask = F.interpolate(mask_condition, size=latent_shape[2:]).repeat(n, 1, 1, 1)
        masked_image_latents = yield from self.encode_image(masked_image, generators)
        if nine_channels:
            extra = torch.cat([mask, masked_image_latents], dim=1)  # (N, 5, h, w)
            return LatentState(latents=latents, unet_extra=extra)
        return LatentState(latents=latents, noise=noise, blend_latents=image_latents, mask=mask)

    def condition(
        self, params: GenerationParams, n: int, cfg: bool, height: int, width: int
    ) -> Plan[Conditioning]:
        """The UNet's text (and, SDXL, size) conditioning for the architecture served."""
        if self.facts.architecture == "sdxl":
            return (yield from self.encode_prompt_xl(params.prompt, params.negative_prompt, n,
                                                     cfg, height, width))  # fmt: skip
        embeds = yield from self.encode_prompt(params.prompt, params.negative_prompt, n, cfg)
        return Conditioning(embeds)

    def encode_prompt(self, prompt: str, negative: str, n: int, cfg: bool) -> Plan[torch.Tensor]:
        """(2N, L, D) embeddings [uncond x N, cond x N], or (N, L, D) without CFG."""
        texts = [negative, prompt] if cfg else [prompt]
        (embeds,) = yield Call("text_encoder", (tokenize(self.assets.tokenizer, texts),))
        return embeds.repeat_interleave(n, dim=0)

    def encode_prompt_xl(
        self, prompt: str, negative: str, n: int, cfg: bool, height: int, width: int
    ) -> Plan[Conditioning]:
        """SDXL conditioning as `StableDiffusionXLInpaintPipeline.encode_prompt` and its
        step 10 compute it.

        Prompt embeds: both encoders' penultimate hidden states, concatenated on the feature
        axis; pooled embeds: text_encoder_2's projected output. Without a negative prompt
        and with `force_zeros_for_empty_prompt`, the negative embeds are zeros (diffusers'
        default call); otherwise the negative prompt is encoded like the prompt. Time ids:
        original size, crop top-left (0, 0), target size; both sizes are the padded
        generation size, for the negative branch too.
        """
        tokenizer_2 = self.assets.tokenizer_2
        if tokenizer_2 is None or self.components.text_encoder_2 is None:
            raise RuntimeError("an sdxl pipeline needs tokenizer_2 and text_encoder_2")
        zero_negative = cfg and not negative and self.facts.force_zeros_for_empty_prompt
        texts = [negative, prompt] if cfg and not zero_negative else [prompt]
        (hidden_1,) = yield Call("text_encoder", (tokenize(self.assets.tokenizer, texts),))
        hidden_2, pooled = yield Call("text_encoder_2", (tokenize(tokenizer_2, texts),))
        embeds = torch.cat([hidden_1, hidden_2], dim=-1)  # (B, L, D1 + D2)
        if zero_negative:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
        time_ids = time_ids.repeat(embeds.shape[0], 1)  # (B, 6); negative ids are the same
        return Conditioning(
            embeds.repeat_interleave(n, dim=0),
            (pooled.repeat_interleave(n, dim=0), time_ids.repeat_interleave(n, dim=0)),
        )

    def prepare_image_and_mask(
        self, params: GenerationParams, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) image in [-1, 1] and (1, 1, H, W) binary mask at the padded size."""
        if params.image is None or params.mask is None:
            return torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width)
        image = preprocess_image(self.processors, pad_to(params.image, height, width))
        mask = preprocess_mask(self.processors, pad_to(params.mask, height, width))
        return image, mask

    def encode_image(
        self, image: torch.Tensor, generators: list[torch.Generator]
    ) -> Plan[torch.Tensor]:
        """Sample scaled latents of one image once per generator, as diffusers' VAE encode."""
        mean, logvar = yield Call("vae_encoder", (image,))
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
        latents = torch.cat([posterior.sample(generator=g) for g in generators])
        return self.facts.vae_scaling_factor * latents


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """(B, L) int64 token ids padded to the tokenizer's max length, as diffusers tokenizes."""
    tokens = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids.to(torch.int64)


def truncated_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The timesteps left after skipping the first (1 - strength) of them, as diffusers."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def extra_step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """`eta` and `generator` for schedulers whose `step` takes them, as diffusers passes them."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators[0] if len(generators) == 1 else generators
    return kwargs


def _result(outcome: T | Exception) -> T:
    """A `run_plans` outcome of one plan: its result, or its exception raised."""
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
