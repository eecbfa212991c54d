"""The diffusion plans: prompt encoding, latents, denoising steps and decoding, on the
exported components.

They follow `StableDiffusionInpaintPipeline.__call__` (SD 1.5) and
`StableDiffusionXLInpaintPipeline.__call__` (SDXL: two text encoders, pooled embeddings and
size/crop time ids as extra UNet inputs) step by step (same random draws in the same
order, same scheduler calls, same arithmetic), so that with the same weights, seed,
scheduler and steps the images match diffusers'. The architectures differ only in the
prompt conditioning; latents, timesteps, the denoising loop and decoding are shared.

Each stage is a plan (`executor.Plan`) for one request; the loop's `Executor` runs one
request alone (`GenerationLoop.__call__`), the `ContinuousBatcher` runs the plans of many
together. The same code runs inside Triton (BLS callables) and in-process (ONNX Runtime
sessions).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from sdserve_pipeline.adapter_holds import AdapterHolds, Hold
from sdserve_pipeline.assets import TOKENIZER_LOCK, PipelineAssets
from sdserve_pipeline.components import components_for
from sdserve_pipeline.crop import paste_back
from sdserve_pipeline.executor import Call, Cancelled, Executor, Plan, Runner, with_adapters
from sdserve_pipeline.images import (
    Processors,
    blur_mask,
    composite,
    feather_alpha,
    pad_to,
    postprocess,
    preprocess_image,
    preprocess_mask,
)
from sdserve_pipeline.prompts import PromptEncoder
from sdserve_pipeline.schedulers import make_scheduler
from sdserve_pipeline.sizing import Sizing
from sdserve_protocol.contract import GenerationParams

LORA_CALLS = frozenset({"unet", "text_encoder", "text_encoder_2"})  # what LoRA can change
AdapterSet = tuple[tuple[str, float], ...]  # (adapter, scale) pairs


@dataclass(frozen=True)
class Components:
    text_encoder: Runner
    unet: Runner
    vae_encoder: Runner
    vae_decoder: Runner
    text_encoder_2: Runner | None = None  # SDXL
    preview_decoder: Runner | None = None  # a tiny VAE for streamed previews, when exported


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
    """One request between `GenerationLoop.start_plan` and `finish_plan`: its own scheduler
    and state."""

    params: GenerationParams
    cfg: bool
    scheduler: Any
    timesteps: torch.Tensor
    state: LatentState
    conditioning: Conditioning
    step_kwargs: dict[str, Any]
    index: int = 0
    adapter_calls: dict[str, AdapterSet] = field(default_factory=dict)
    hold: Hold | None = None  # its adapter sets, held for the runners until it is decoded

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


class GenerationLoop:
    """Inpainting, text-to-image and SDXL generation on exported components.

    Args:
        components: the networks as callables.
        assets: tokenizer, scheduler config and checkpoint facts.
        feather_radius: width in pixels of the blend ramp inside the mask when the input's
            pixels are pasted back (`preserve_unmasked`).
        max_rows: handed to the `Executor` (component → most rows of one call).
        size_buckets: (height, width) sizes to generate at (see `sizing.Sizing`); empty
            (default): any size, padded to the latent grid.
    """

    def __init__(
        self,
        components: Components,
        assets: PipelineAssets,
        feather_radius: int = 4,
        max_rows: Mapping[str, int] | None = None,
        size_buckets: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.holds = AdapterHolds()  # the adapter sets of the running requests
        self.executor = Executor(components, max_rows, held=self.holds.held)
        self.assets = assets
        self.facts = assets.facts
        self.processors = Processors.for_vae_scale(assets.facts.vae_scale_factor)
        self.feather_radius = feather_radius
        self.sizing = Sizing(size_buckets, assets.facts.vae_scale_factor)
        encoders = [
            s for s in components_for(assets.facts.architecture) if "input_ids" in s.input_names
        ]
        self.prompts = PromptEncoder(assets, {s.name: s.output_names for s in encoders})
        # adapter name → the components it changes; set by the service that serves adapters
        self.adapter_targets: Callable[[str], Collection[str]] | None = None

    @property
    def components(self) -> Components:
        return cast(Components, self.executor.components)

    def __call__(
        self,
        params: GenerationParams,
        is_cancelled: Callable[[], bool] | None = None,
        on_step: Callable[[Job], None] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """Generate `params.num_images` images: (N, H, W, 3) uint8 at the request's size.

        Args:
            params: the request.
            is_cancelled: asked before each denoising step.
            on_step: told the job after each denoising step (progress, previews).

        Raises:
            RequestError: the request fits no size bucket.
            Cancelled: `is_cancelled` said so before a denoising step.
        """
        return self.executor.run(self.plan(params, is_cancelled or (lambda: False), on_step))

    def plan(
        self,
        params: GenerationParams,
        is_cancelled: Callable[[], bool],
        on_step: Callable[[Job], None] | None = None,
    ) -> Plan[npt.NDArray[np.uint8]]:
        """One request from start to images, checking `is_cancelled` before each step and
        telling `on_step` after it."""
        job = yield from self.start_plan(params)
        try:
            while not job.finished:
                if is_cancelled():
                    raise Cancelled()
                yield from self.step_plan(job)
                if on_step is not None:
                    on_step(job)
        finally:
            self.holds.release(job.hold)  # decoding runs on base weights
        return (yield from self.finish_plan(job))

    def start_plan(self, params: GenerationParams) -> Plan[Job]:
        """Everything before the denoising loop: prompt, timesteps, latents, conditioning;
        its text-encoder calls on the request's adapters, which it holds from now on
        (`adapter_holds`: until `finish_plan`, a failed step, or the job is dropped)."""
        calls = self.adapter_calls(params)
        hold = self.holds.hold(calls)
        try:
            job = yield from with_adapters(self._start_plan(params), calls)
        except BaseException:  # failed, or closed (GeneratorExit): it holds nothing more
            self.holds.release(hold)
            raise
        job.adapter_calls = calls
        job.hold = hold
        return job

    def adapter_calls(self, params: GenerationParams) -> dict[str, AdapterSet]:
        """Component → the request's adapters that change it (`adapter_targets`; all of them
        when unknown): calls of a component no adapter changes run on the base weights, and
        share their batch with base requests."""
        if not params.adapters:
            return {}
        targets = self.adapter_targets
        return {
            component: tuple(
                a for a in params.adapters if targets is None or component in targets(a[0])
            )
            for component in LORA_CALLS
        }

    def _start_plan(self, params: GenerationParams) -> Plan[Job]:
        n, cfg = params.num_images, params.guidance_scale > 1.0
        generators = [torch.Generator().manual_seed(s) for s in params.seeds]
        height, width = self.sizing.generation_size(params)  # on the grid, or a size bucket

        # 1. Encode input prompt: [uncond x N, cond x N] (one call per text encoder)
        conditioning = yield from self.condition(params, n, cfg, height, width)

        # 2. Set timesteps, truncated by strength
        scheduler: Any = make_scheduler(params.scheduler, self.assets.scheduler_config)
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
        )  # fmt: skip

    def step_plan(self, job: Job) -> Plan[None]:
        """One denoising step of one job: its UNet rows, then its own guidance, scheduler step
        and blend. Jobs at different steps of different schedules share the UNet call; jobs
        on different adapter sets make separate calls. A failed step releases the job's
        adapter sets (the request ends)."""
        try:
            return (yield from with_adapters(self._step_plan(job), job.adapter_calls))
        except BaseException:
            self.holds.release(job.hold)
            raise

    def _step_plan(self, job: Job) -> Plan[None]:
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

    def finish_plan(self, job: Job) -> Plan[npt.NDArray[np.uint8]]:
        """Decode, crop to the request's size, paste the kept pixels back (a cropped request:
        the crop back into its image)."""
        self.holds.release(job.hold)  # the VAE decoder has no adapters
        # 5. Decode and postprocess
        params = job.params
        (decoded,) = yield Call("vae_decoder", (job.latents / self.facts.vae_scaling_factor,))
        images = postprocess(self.processors, decoded)[:, : params.height, : params.width]
        if params.crop is not None:  # padding_mask_crop: back into the image as sent
            return paste_back(
                self.processors, params.crop, images, params.preserve_unmasked,
                self.feather_radius,
            )  # fmt: skip
        if params.image is not None and params.mask is not None and params.preserve_unmasked:
            alpha = feather_alpha(params.mask, self.feather_radius)
            images = composite(params.image, images, alpha)
        return images

    def decode_previews(self, latents: torch.Tensor) -> npt.NDArray[np.uint8]:
        """Denoising latents → preview images with the preview decoder (a tiny VAE): one row
        per image, merged into calls of at most its `max_rows`, quantised as diffusers
        quantises the VAE's output.

        Args:
            latents: (N, 4, h, w) denoising latents, as the UNet sees them.

        Returns:
            (N, 8h, 8w, 3) uint8.

        Raises:
            RuntimeError: the pipeline has no preview decoder.
        """
        if self.components.preview_decoder is None:
            raise RuntimeError("this pipeline was exported without a preview decoder")
        rows = self.executor.run_plans([self._preview_plan(row) for row in torch.split(latents, 1)])
        failed = next((row for row in rows if isinstance(row, Exception)), None)
        if failed is not None:
            raise failed
        return np.concatenate(cast(list[npt.NDArray[np.uint8]], rows))

    def _preview_plan(self, latents: torch.Tensor) -> Plan[npt.NDArray[np.uint8]]:
        (decoded,) = yield Call("preview_decoder", (latents.float(),))  # (1, 3, 8h, 8w)
        return postprocess(self.processors, decoded)

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
        `StableDiffusionPipeline`: the noise only; a 4-channel image-to-image request (an
        image, no mask) `StableDiffusionImg2ImgPipeline`: the image latents, then the noise,
        noised to the first timestep whatever the strength. On a 9-channel UNet, an image
        without a mask is inpainted under a full mask (what such a checkpoint can do).
        """
        facts, n = self.facts, params.num_images
        latent_shape = (1, facts.latent_channels, height // facts.vae_scale_factor,
                        width // facts.vae_scale_factor)  # fmt: skip
        nine_channels = facts.unet_in_channels == 9
        if not nine_channels and params.image is None:
            noise = torch.cat([randn_tensor(latent_shape, generator=g) for g in generators])
            return LatentState(latents=noise * scheduler.init_noise_sigma)
        if not nine_channels and params.mask is None:  # StableDiffusionImg2ImgPipeline
            init_image, _ = self.prepare_image_and_mask(params, height, width)
            init_latents = yield from self.encode_image(init_image, generators)
            noise = torch.cat([randn_tensor(latent_shape, generator=g) for g in generators])
            noised = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(n))
            return LatentState(latents=noised)

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
        prompt, negative, skip = params.prompt, params.negative_prompt, params.clip_skip
        if self.facts.architecture == "sdxl":
            return (yield from self.encode_prompt_xl(prompt, negative, n, cfg, height, width,
                                                     skip, params.prompt_weighting))  # fmt: skip
        embeds = yield from self.encode_prompt(prompt, negative, n, cfg, skip,
                                               params.prompt_weighting)  # fmt: skip
        return Conditioning(embeds)

    def encode_prompt(
        self, prompt: str, negative: str, n: int, cfg: bool, clip_skip: int = 0,
        weighting: bool = False,
    ) -> Plan[torch.Tensor]:  # fmt: skip
        """(2N, L, D) embeddings [uncond x N, cond x N], or (N, L, D) without CFG; the prompt
        read `clip_skip` layers before the last (diffusers' semantics). L is one window, or
        several for long or weighted prompts (compel: `prompts.PromptEncoder`, at clip skip 0:
        the request check refuses both together)."""
        texts = [negative, prompt] if cfg else [prompt]
        if self.prompts.applies(texts, weighting):
            embeds, _ = yield from self.prompts.encode(texts, weighting)
        else:
            inputs = (tokenize(self.assets.tokenizer, texts), clip_skips(len(texts), clip_skip))
            (embeds,) = yield Call("text_encoder", inputs)
        return embeds.repeat_interleave(n, dim=0)

    def encode_prompt_xl(
        self, prompt: str, negative: str, n: int, cfg: bool, height: int, width: int,
        clip_skip: int = 0,
        weighting: bool = False,
    ) -> Plan[Conditioning]:  # fmt: skip
        """SDXL conditioning as `StableDiffusionXLInpaintPipeline.encode_prompt` and its
        step 10 compute it.

        Prompt embeds: both encoders' penultimate hidden states (the prompt's `clip_skip`
        layers earlier), concatenated on the feature axis; pooled embeds: text_encoder_2's
        projected output. Without a negative prompt and with `force_zeros_for_empty_prompt`,
        the negative embeds are zeros (diffusers' default call); otherwise the negative prompt
        is encoded like the prompt (at clip_skip 0, as diffusers). Time ids:
        original size, crop top-left (0, 0), target size; both sizes are the padded
        generation size, for the negative branch too. Long or weighted prompts: compel
        (`prompts.PromptEncoder`), as `CompelForSDXL`.
        """
        tokenizer_2 = self.assets.tokenizer_2
        if tokenizer_2 is None or self.components.text_encoder_2 is None:
            raise RuntimeError("an sdxl pipeline needs tokenizer_2 and text_encoder_2")
        zero_negative = cfg and not negative and self.facts.force_zeros_for_empty_prompt
        texts = [negative, prompt] if cfg and not zero_negative else [prompt]
        if self.prompts.applies(texts, weighting):
            embeds, xl_pooled = yield from self.prompts.encode(texts, weighting)
            pooled = cast(torch.Tensor, xl_pooled)  # an SDXL encoding has pooled embeddings
        else:
            skips = clip_skips(len(texts), clip_skip)
            ids_1, ids_2 = tokenize(self.assets.tokenizer, texts), tokenize(tokenizer_2, texts)
            (hidden_1,) = yield Call("text_encoder", (ids_1, skips))
            hidden_2, pooled = yield Call("text_encoder_2", (ids_2, skips))
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
        """(1, 3, H, W) image in [-1, 1] and (1, 1, H, W) binary mask at the padded size; a
        full mask without one (text-to-image: a zero image; image-to-image: the image)."""
        if params.image is None:
            return torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width)
        image = preprocess_image(self.processors, pad_to(params.image, height, width))
        if params.mask is None:
            return image, torch.ones(1, 1, height, width)
        mask = params.mask
        if params.mask_blur:  # at the request's size, as a diffusers user blurs their mask
            mask = blur_mask(self.processors, mask, params.mask_blur)
        mask_tensor = preprocess_mask(self.processors, pad_to(mask, height, width))
        return image, mask_tensor

    def encode_image(
        self, image: torch.Tensor, generators: list[torch.Generator]
    ) -> Plan[torch.Tensor]:
        """Sample scaled latents of one image once per generator, as diffusers' VAE encode."""
        mean, logvar = yield Call("vae_encoder", (image,))
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
        latents = torch.cat([posterior.sample(generator=g) for g in generators])
        return self.facts.vae_scaling_factor * latents


class _TextualInversion(TextualInversionLoaderMixin):
    """diffusers' `maybe_convert_prompt`, on its own."""


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """(B, L) int64 token ids padded to the tokenizer's max length, as diffusers tokenizes
    (a multi-vector textual inversion token first expanded to its tokens, `tok tok_1 ...`)."""
    with TOKENIZER_LOCK:
        tokens = tokenizer(
            _TextualInversion().maybe_convert_prompt(texts, tokenizer),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
    ids: torch.Tensor = tokens.input_ids
    return ids.to(torch.int64)


def clip_skips(rows: int, clip_skip: int) -> torch.Tensor:
    """(rows,) int64 `clip_skip` input of the text encoders: the prompt's (last row) skips
    `clip_skip` layers; a negative prompt keeps 0, as diffusers encodes it."""
    skips = torch.zeros(rows, dtype=torch.int64)
    skips[-1] = clip_skip
    return skips


def truncated_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The timesteps left after skipping the first (1 - strength) of them, as diffusers."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps: torch.Tensor = scheduler.timesteps[t_start * scheduler.order :]
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
