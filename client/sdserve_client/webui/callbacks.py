"""The web UI's logic as plain functions: no Gradio here, so every piece is testable alone.

`app.py` wires these to Gradio components and turns `UIError` / `SdserveError` into
`gr.Error` toasts. Images arrive as Gradio hands them over (numpy arrays, an `ImageEditor`
dict) and leave as numpy arrays.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from sdserve_protocol.canvas import Extension, build_canvas
from sdserve_protocol.contract import RANGES
from sdserve_protocol.rules import DEFAULT_ADAPTER_SCALE, Limits, RequestError, check_adapters

from .. import replicas
from ..errors import InvalidRequestError, SdserveError
from .server_info import AdapterListing, QueueState

DEFAULT_SCHEDULER = "model default"
"""Scheduler dropdown entry that sends no `scheduler` (the checkpoint's own)."""

RANDOM_SEED = "-1"
"""Seed field text that asks the server for a random seed."""

MASK_ALPHA_THRESHOLD = 0
"""A painted pixel (layer alpha above this) belongs to the mask."""

PREVIEW_TINT = np.array([230, 40, 40], dtype=np.float32)
"""Colour laid over the regenerated area in the outpaint preview."""

REFRESH_ADAPTERS = "Refresh adapters"
"""The button that re-reads the server's adapter folder (files can be added while it runs)."""

UInt8Array = npt.NDArray[np.uint8]


class UIError(Exception):
    """A problem with what the user entered, shown in the page as is."""


class GenerationClient(Protocol):
    """The part of `InpaintClient` the UI calls (inject a fake in tests)."""

    def inpaint(self, image: Any, mask: Any, prompt: str, **options: Any) -> Any: ...
    def outpaint(
        self, image: Any, prompt: str, left: int, top: int, right: int, bottom: int, **options: Any
    ) -> Any: ...
    def text_to_image(self, prompt: str, height: int, width: int, **options: Any) -> Any: ...
    def img2img(self, image: Any, prompt: str, **options: Any) -> Any: ...


@dataclass(frozen=True)
class Settings:
    """The controls shared by every mode, already converted to request values.

    Args:
        prompt (`str`): text to guide generation.
        negative_prompt (`str`): text to steer away from (`""` sends nothing).
        scheduler (`str`, *optional*): scheduler name; `None` for the model's default.
        steps (`int`): denoising steps.
        guidance_scale (`float`): classifier-free guidance scale.
        strength (`float`): in (0, 1]; sent only with an input image.
        seed (`int`, *optional*): `None` lets the server draw one.
        num_images (`int`): images per request.
        preserve_unmasked (`bool`): paste the input back outside the mask.
        prompt_weighting (`bool`): read the prompts in compel's weighting syntax (sent only
            when on).
        clip_skip (`int`): text-encoder layers to skip for the prompt (0: none, not sent).
        adapters (`tuple[tuple[str, float], ...]`): LoRA adapters and their scales, in order
            (empty: the base weights, nothing sent).
    """

    prompt: str
    negative_prompt: str = ""
    scheduler: str | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    strength: float = 1.0
    seed: int | None = None
    num_images: int = 1
    preserve_unmasked: bool = True
    prompt_weighting: bool = False
    clip_skip: int = 0
    adapters: tuple[tuple[str, float], ...] = ()

    def options(self, *, with_image: bool) -> dict[str, Any]:
        """Keyword arguments for the SDK call (`strength` and `preserve_unmasked` need an image)."""
        options: dict[str, Any] = {
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "num_images": self.num_images,
        }
        if self.negative_prompt:
            options["negative_prompt"] = self.negative_prompt
        if self.scheduler is not None:
            options["scheduler"] = self.scheduler
        if self.seed is not None:
            options["seed"] = self.seed
        if self.prompt_weighting:
            options["prompt_weighting"] = True
        if self.clip_skip:
            options["clip_skip"] = self.clip_skip
        if self.adapters:
            options["adapters"] = [name for name, _ in self.adapters]
            options["adapter_scales"] = [scale for _, scale in self.adapters]
        if with_image:
            options["strength"] = self.strength
            options["preserve_unmasked"] = self.preserve_unmasked
        return options


@dataclass(frozen=True, eq=False)
class Generation:
    """Images of one run with their seeds, ready for the gallery.

    Args:
        mode (`str`): `"inpaint"`, `"outpaint"` or `"text-to-image"`.
        images (`list[np.ndarray]`): (H, W, 3) uint8 each.
        seeds (`list[int]`): the seed behind each image.
    """

    mode: str
    images: list[UInt8Array] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def gallery(self) -> list[tuple[UInt8Array, str]]:
        """(image, caption) pairs for `gr.Gallery`; the caption names the seed and size."""
        return [
            (image, f"seed {seed} · {image.shape[1]}×{image.shape[0]}")
            for image, seed in zip(self.images, self.seeds)
        ]

    @property
    def summary(self) -> str:
        """One Markdown line: mode, count, size and seeds."""
        if not self.images:
            return "No images."
        height, width = self.images[0].shape[:2]
        count = len(self.images)
        noun = "image" if count == 1 else "images"
        seeds = ", ".join(f"`{seed}`" for seed in self.seeds)
        label = "seed" if count == 1 else "seeds"
        return f"**{self.mode}**: {count} {noun} of {width}×{height} · {label} {seeds}"


def make_settings(
    prompt: str | None,
    negative_prompt: str | None,
    scheduler: str | None,
    steps: float,
    guidance_scale: float,
    strength: float,
    seed: float | str | None,
    num_images: float,
    preserve_unmasked: bool = True,
    prompt_weighting: bool = False,
    clip_skip: float = 0,
    adapters: Sequence[str] | None = None,
    adapter_scales: Sequence[Sequence[Any]] | None = None,
    limits: Limits | None = None,
) -> Settings:
    """Converts raw control values (sliders give floats) into `Settings`; raises `UIError`.

    `adapters`, `adapter_scales` and `limits` are as `parse_adapters` takes them.
    """
    return Settings(
        prompt=(prompt or "").strip(),
        negative_prompt=(negative_prompt or "").strip(),
        scheduler=parse_scheduler(scheduler),
        steps=_whole("steps", steps),
        guidance_scale=_finite("guidance scale", guidance_scale),
        strength=_finite("strength", strength),
        seed=parse_seed(seed),
        num_images=_whole("number of images", num_images),
        preserve_unmasked=bool(preserve_unmasked),
        prompt_weighting=bool(prompt_weighting),
        clip_skip=_whole("clip skip", clip_skip, low=0),
        adapters=parse_adapters(adapters, adapter_scales, limits),
    )


def parse_adapters(
    names: Sequence[str] | None,
    table: Sequence[Sequence[Any]] | None,
    limits: Limits | None = None,
) -> tuple[tuple[str, float], ...]:
    """The chosen adapters with their scales, checked by the protocol's rules (each scale in
    `adapter_scales`' range, at most `max_adapters`, none twice); raises `UIError`.

    Args:
        names (`Sequence[str]`, *optional*): the adapters chosen, in order.
        table (`Sequence[Sequence]`, *optional*): (name, scale) rows (`adapter_rows`); a chosen
            adapter without a row gets `DEFAULT_ADAPTER_SCALE`.
        limits (`Limits`, *optional*): the model's limits; `None` leaves the count to the SDK,
            which checks it against the model's own before sending.
    """
    chosen = [str(name).strip() for name in names or ()]
    scales = _scale_table(table)
    rule = RANGES["adapter_scales"]
    values = []
    for name in chosen:
        scale = _float_or_nan(scales.get(name, DEFAULT_ADAPTER_SCALE))
        if not rule.allows(scale, limits):
            raise UIError(
                f"LoRA scale of {name!r} must be a number in {rule.describe(limits)}, "
                f"got {scales.get(name)!r}"
            )
        values.append(scale)
    try:
        return check_adapters(chosen, values, limits)
    except RequestError as err:
        raise UIError(f"LoRA adapters: {err.message}") from None


def adapter_rows(
    names: Sequence[str] | None, table: Sequence[Sequence[Any]] | None
) -> list[list[Any]]:
    """The scale table's (name, scale) rows for the chosen adapters: one per adapter, in order,
    each keeping the scale it had (`DEFAULT_ADAPTER_SCALE` when just chosen)."""
    scales = _scale_table(table)
    return [[name, scales.get(name, DEFAULT_ADAPTER_SCALE)] for name in names or ()]


def _scale_table(table: Sequence[Sequence[Any]] | None) -> dict[str, Any]:
    """The scale table's rows as name → scale (as entered); rows without both are skipped."""
    return {str(row[0]).strip(): row[1] for row in table or () if len(row) >= 2}


def adapter_note(model: str, listing: AdapterListing, limits: Limits | None = None) -> str:
    """The adapter section's line: what can be chosen and how, what the server refuses and
    why, or why there is nothing to choose."""
    if listing.unavailable:
        return f"No LoRA adapters from `{model}`: {listing.unavailable}"
    refused = "; ".join(f"`{name}`: {why}" for name, why in listing.refused)
    refused = f" {len(listing.refused)} refused by the server: {refused}." if refused else ""
    if not listing.usable:
        where = f"`<repository>/{model}/adapters/`"
        return (f"No usable LoRA adapters: add `.safetensors` files to {where}, then press "
                f"{REFRESH_ADAPTERS}.{refused}")  # fmt: skip
    count = len(listing.usable)
    most = f", at most {limits.max_adapters} per request" if limits is not None else ""
    scales = RANGES["adapter_scales"].describe(limits)
    return (f"{count} adapter{'s' if count != 1 else ''} available{most}; scales in {scales} "
            f"(0 turns one off).{refused}")  # fmt: skip


def parse_scheduler(value: str | None) -> str | None:
    """Dropdown value → scheduler name; blank or `DEFAULT_SCHEDULER` → `None` (model default).

    Custom names pass through unchanged: the server is the judge of what it accepts.
    """
    text = (value or "").strip()
    return None if not text or text == DEFAULT_SCHEDULER else text


def parse_seed(value: float | str | None) -> int | None:
    """Seed field → seed; empty or negative (`RANDOM_SEED`) means random (`None`).

    Text is parsed as an exact integer first: seeds go up to 2**63 - 1, beyond a float's
    precision, so the seed field is a text box.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number: float | int
    if isinstance(value, bool):
        number = math.nan
    elif isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value.strip())
    else:
        number = _float_or_nan(value)
    if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
        raise UIError(f"seed must be a whole number (or -1 for random), got {value!r}")
    return None if number < 0 else int(number)


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def mask_from_editor(editor: dict[str, Any] | None) -> UInt8Array | None:
    """The mask painted in a `gr.ImageEditor`: 255 where any layer has paint, else 0.

    Args:
        editor (`dict`, *optional*):
            The editor's value (`background`, `layers`, `composite`) with numpy RGBA arrays.

    Returns:
        `np.ndarray`: (H, W) uint8 in the background's size, or `None` when nothing is painted.
    """
    background = _editor_background(editor)
    if background is None or editor is None:
        return None
    height, width = background.shape[:2]
    painted = np.zeros((height, width), dtype=bool)
    for layer in editor.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue  # a layer without alpha cannot tell paint from blank
        alpha = layer[..., 3]
        if alpha.shape != (height, width):
            alpha = np.asarray(
                Image.fromarray(alpha).resize((width, height), Image.Resampling.NEAREST)
            )
        painted |= alpha > MASK_ALPHA_THRESHOLD
    if not painted.any():
        return None
    return np.where(painted, np.uint8(255), np.uint8(0)).astype(np.uint8)


def image_from_editor(editor: dict[str, Any] | None) -> UInt8Array | None:
    """The uploaded image of a `gr.ImageEditor` (its background) as RGB; `None` if none."""
    background = _editor_background(editor)
    return None if background is None else to_rgb(background)


def inpaint_inputs(
    editor: dict[str, Any] | None, mask_upload: npt.NDArray[Any] | None = None
) -> tuple[UInt8Array, UInt8Array]:
    """Image and mask for an inpaint request: the editor's background and painted layers,
    united with an uploaded mask (white = regenerate) if one is given. Raises `UIError`."""
    image = image_from_editor(editor)
    if image is None:
        raise UIError("Upload an image to inpaint first.")
    height, width = image.shape[:2]
    mask = mask_from_editor(editor)
    if mask_upload is not None:
        uploaded = to_mask(mask_upload)
        if uploaded.shape != (height, width):
            raise UIError(
                f"The uploaded mask is {uploaded.shape[1]}×{uploaded.shape[0]} "
                f"but the image is {width}×{height}."
            )
        mask = uploaded if mask is None else np.maximum(mask, uploaded)
    if mask is None or not (mask >= 128).any():
        raise UIError("Paint over the area to regenerate (or upload a mask) first.")
    return image, mask


def editor_value(image: npt.NDArray[Any] | None) -> dict[str, Any] | None:
    """An `ImageEditor` value holding `image` as background, with nothing painted."""
    if image is None:
        return None
    return {"background": image, "layers": [], "composite": image}


def outpaint_sides(left: float, top: float, right: float, bottom: float) -> tuple[int, ...]:
    """The four extension sliders as (left, top, right, bottom) pixel counts."""
    return tuple(
        _whole(name, value, low=0)
        for name, value in zip(("left", "top", "right", "bottom"), (left, top, right, bottom))
    )


def outpaint_canvas(image: npt.NDArray[Any], sides: Sequence[int]) -> tuple[UInt8Array, UInt8Array]:
    """The enlarged canvas and its mask (255 = generated), as the server builds them: with
    `sdserve_protocol.canvas`, the server's own geometry (the overlap band included)."""
    canvas = build_canvas(to_rgb(image), Extension(*(int(side) for side in sides)))
    return canvas.image, canvas.mask


def outpaint_preview(
    image: npt.NDArray[Any] | None, left: float, top: float, right: float, bottom: float
) -> tuple[UInt8Array | None, str]:
    """Live preview of an outpaint: the canvas with the generated area tinted, and a caption."""
    if image is None:
        return None, "Upload an image to extend."
    try:
        sides = outpaint_sides(left, top, right, bottom)
    except UIError as err:
        return None, str(err)
    canvas, mask = outpaint_canvas(image, sides)
    weight = (mask.astype(np.float32) / 255.0)[..., None] * 0.45  # (H', W', 1)
    tinted = canvas.astype(np.float32) * (1.0 - weight) + PREVIEW_TINT * weight
    preview = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
    height, width = np.asarray(image).shape[:2]
    new_height, new_width = mask.shape
    if not any(sides):
        return preview, f"{width}×{height}: set at least one side to extend."
    return preview, (
        f"{width}×{height} → **{new_width}×{new_height}**; red = generated "
        f"(new area and a seam band inside the original)."
    )


def run_inpaint(
    client: GenerationClient,
    settings: Settings,
    editor: dict[str, Any] | None,
    mask_upload: npt.NDArray[Any] | None = None,
    mask_blur: float = 0,
    crop: bool = False,
    crop_padding: float = 32,
) -> Generation:
    """Inpaints the painted (or uploaded) mask of the editor's image, its mask blurred by
    `mask_blur` pixels first (0: not at all); with `crop`, only the box around the mask plus
    `crop_padding` pixels is generated (`padding_mask_crop`) and the image keeps its size."""
    image, mask = inpaint_inputs(editor, mask_upload)
    options = settings.options(with_image=True)
    if blur := _whole("mask blur", mask_blur, low=0):
        options["mask_blur"] = blur
    if crop:
        options["padding_mask_crop"] = _whole("crop padding", crop_padding, low=0)
    result = client.inpaint(image, mask, settings.prompt, **options)
    return _generation("inpaint", result)


def run_outpaint(
    client: GenerationClient,
    settings: Settings,
    image: npt.NDArray[Any] | None,
    left: float,
    top: float,
    right: float,
    bottom: float,
) -> Generation:
    """Extends the image by the given pixels per side."""
    if image is None:
        raise UIError("Upload an image to extend first.")
    sides = outpaint_sides(left, top, right, bottom)
    if not any(sides):
        raise UIError("Set at least one side (left, top, right, bottom) to extend.")
    options = settings.options(with_image=True)
    result = client.outpaint(to_rgb(image), settings.prompt, *sides, **options)
    return _generation("outpaint", result)


def run_img2img(
    client: GenerationClient, settings: Settings, image: npt.NDArray[Any] | None
) -> Generation:
    """Redraws the whole image (`settings.strength`: how much of it to destroy first)."""
    if image is None:
        raise UIError("Upload an image to redraw first.")
    options = settings.options(with_image=True)
    result = client.img2img(to_rgb(image), settings.prompt, **options)
    return _generation("img2img", result)


def run_text_to_image(
    client: GenerationClient, settings: Settings, height: float, width: float
) -> Generation:
    """Generates images of the given size from the prompt alone."""
    size = _whole("height", height), _whole("width", width)
    result = client.text_to_image(settings.prompt, *size, **settings.options(with_image=False))
    return _generation("text-to-image", result)


def pick_result(images: Sequence[UInt8Array] | None, selected: int | None) -> UInt8Array:
    """The selected result image (the first when none is selected); raises `UIError`."""
    if not images:
        raise UIError("Generate an image first, then use it as input.")
    index = selected if selected is not None and 0 <= selected < len(images) else 0
    return images[index]


def reuse_seed(seeds: Sequence[int] | None, selected: int | None) -> str:
    """The seed of the selected result (the first when none is selected); raises `UIError`."""
    if not seeds:
        raise UIError("No seed to reuse yet: generate an image first.")
    index = selected if selected is not None and 0 <= selected < len(seeds) else 0
    return str(int(seeds[index]))  # text: exact beyond 2**53


def error_message(exc: Exception, server_url: str = "") -> str:
    """A readable message for the page, keeping the server's own text.

    Args:
        exc (`Exception`): what a generation raised.
        server_url (`str`, *optional*): the server's address, named when it cannot be reached.
    """
    if isinstance(exc, UIError):
        return str(exc)
    if isinstance(exc, InvalidRequestError):
        return f"Invalid setting: {exc.message}"
    if isinstance(exc, SdserveError):
        status = (exc.status or "").rsplit(".", 1)[-1]
        where = f" at {server_url}" if server_url else ""
        if status == "INVALID_ARGUMENT":
            return f"The server rejected the request: {exc.message}"
        if status == "UNAVAILABLE" and any(text in exc.message for text in BUSY_MESSAGES):
            return f"The server is busy{where}: {exc.message}"
        if status == "UNAVAILABLE":
            return f"Cannot reach the Triton server{where}: {exc.message}"
        if status == "DEADLINE_EXCEEDED":
            return f"The server did not answer in time{where}: {exc.message}"
        if status:
            return f"Server error ({status}): {exc.message}"
        return f"Server error: {exc.message}"
    return f"Unexpected error: {type(exc).__name__}: {exc}"


OUTCOME_WORDS = {
    "success": "served",
    "invalid": "invalid",
    "cancelled": "cancelled",
    "timeout": "timed out in the queue",
    "overloaded": "refused (busy)",
    "failed": "failed",
}
"""How the status line names each `outcome` of the pipeline's request counter."""

PROBLEMS = ("timeout", "overloaded", "failed")
"""Outcomes the server is to blame for: shown in bold when recent."""

BUSY_MESSAGES = (*replicas.BUSY_MESSAGES, "Request timeout expired")
"""Words of the pipeline's UNAVAILABLE refusals of a busy server: queue full, memory budget
(the SDK's failover keeps such a server in rotation), waited past its queue timeout."""


def status_markdown(
    url: str,
    queue: QueueState,
    in_flight: int = 0,
    recent: dict[str, int] | None = None,
    replicas: tuple[int, int] | None = None,
) -> str:
    """The status line: readiness, then what the server's metrics say about its load.

    Args:
        url (`str`): the server's gRPC address.
        queue (`QueueState`): readiness and load of the selected model.
        in_flight (`int`, *optional*): requests this page has sent and not yet got back.
        recent (`dict[str, int]`, *optional*):
            Requests answered lately by outcome (`server_info.RecentOutcomes`); the problems
            among them are shown in bold.
        replicas (`tuple[int, int]`, *optional*): (ready, total) servers, when several.
    """
    if not queue.ready:
        return f"**Server not ready** at `{url}` (model `{queue.model}`): start it or wait."
    parts = [f"**Ready**: `{queue.model}` at `{url}`"]
    if replicas is not None:
        parts.append(f"{replicas[0]} of {replicas[1]} servers ready")
    if queue.pending is not None:
        plural = "s" if queue.pending != 1 else ""
        busy = f"**Busy: {queue.pending} request{plural} waiting in the server queue**"
        parts.append(busy if queue.pending else "idle")
    if in_flight:
        parts.append(f"{in_flight} from this page running")
    if queue.outstanding_steps is not None:
        parts.append(f"{queue.outstanding_steps} denoising steps to go")
    if queue.memory_budget and queue.memory_reserved is not None:
        gb = 1 << 30
        used, budget = queue.memory_reserved / gb, queue.memory_budget / gb
        parts.append(f"memory {used:.1f} of {budget:.1f} GB reserved")
    if queue.outcomes is not None:
        parts.append(_outcome_list(queue.outcomes))
    problems = {k: n for k, n in (recent or {}).items() if k in PROBLEMS and n > 0}
    if problems:
        parts.append(f"**lately: {_outcome_list(problems)}**")
    if queue.avg_queue_ms is not None:
        parts.append(f"mean queue wait {queue.avg_queue_ms:.0f} ms")
    return " · ".join(parts)


def _outcome_list(counts: dict[str, int]) -> str:
    """`12 served, 3 refused (busy), 1 failed`: the successes, then every other non-zero count."""
    words = [f"{counts.get('success', 0)} served"] if "success" in counts else []
    words += [
        f"{counts[k]} {OUTCOME_WORDS[k]}" for k in OUTCOME_WORDS if k != "success" and counts.get(k)
    ]
    return ", ".join(words)


def to_rgb(image: npt.NDArray[Any] | Image.Image) -> UInt8Array:
    """Any Gradio image (numpy L, RGB, RGBA, or PIL) as (H, W, 3) uint8 RGB; alpha dropped."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        return np.ascontiguousarray(np.repeat(array[..., None], 3, axis=2))
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[..., :3])
    if array.ndim == 3 and array.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    raise UIError(f"Unsupported image of shape {tuple(array.shape)}.")


def to_mask(image: npt.NDArray[Any] | Image.Image) -> UInt8Array:
    """An uploaded mask (any mode) as (H, W) uint8; a transparent mask uses its alpha."""
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4 and (array[..., 3] < 255).any():
        return np.ascontiguousarray(array[..., 3])  # paint on a transparent sheet
    if array.ndim == 3:
        array = np.asarray(Image.fromarray(to_rgb(array)).convert("L"))
    if array.ndim != 2:
        raise UIError(f"Unsupported mask of shape {tuple(array.shape)}.")
    return np.ascontiguousarray(array, dtype=np.uint8)


def _editor_background(editor: dict[str, Any] | None) -> npt.NDArray[Any] | None:
    if not editor:
        return None
    background = editor.get("background")
    if background is None:
        return None
    background = np.asarray(background)
    return background if background.ndim >= 2 and background.size else None


def _generation(mode: str, result: Any) -> Generation:
    images = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in result.images]
    return Generation(mode, images, [int(seed) for seed in result.seeds])


def _whole(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise UIError(f"{name} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UIError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < low:
        raise UIError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(number)


def _finite(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UIError(f"{name} must be a finite number, got {value!r}")
    return number
