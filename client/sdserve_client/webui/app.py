"""The Gradio page: inpaint, outpaint and text-to-image tabs over the sdserve gRPC SDK.

Only layout and wiring live here; the logic is in `callbacks.py` (pure functions) and
`backend.py` (clients of one server). Element ids (`elem_id`) are stable: the browser test
drives the page through them.
"""

from __future__ import annotations

import html
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the page server

import gradio as gr

from sdserve_protocol.events import Preview, Progress, Queued
from sdserve_protocol.rules import DEFAULT_IMG2IMG_STRENGTH, Limits

from ..errors import SdserveError
from . import callbacks as cb
from .backend import Backend
from .server_info import ModelInfo, RecentOutcomes

TITLE = "sdserve — Stable Diffusion on Triton"
SIDE_MAX = 512
SIZE_MIN, SIZE_MAX = 64, 1024
CSS = """
.sd-busy { display: flex; flex-direction: column; gap: 6px; font-size: 0.9rem; }
.sd-bar { position: relative; height: 6px; overflow: hidden; border-radius: 3px;
          background: var(--neutral-200); }
.sd-bar::before { content: ""; position: absolute; inset: 0 auto 0 -40%; width: 40%;
                  background: var(--color-accent); animation: sd-slide 1.2s ease-in-out infinite; }
@keyframes sd-slide { from { left: -40%; } to { left: 100%; } }
.sd-bar.sd-steps::before { animation: none; left: 0; width: var(--done); transition: width 0.2s; }
#server-status { min-height: 1.5em; }
footer { display: none !important; }
"""


@dataclass(frozen=True)
class AppConfig:
    """How the page reaches its server.

    Args:
        server_url (`str`, *optional*, defaults to `"127.0.0.1:8001"`): Triton's gRPC address.
        model (`str`, *optional*, defaults to `"inpaint"`): the model selected at first.
        timeout (`float`, *optional*): per-generation limit in seconds; `None` waits.
        metrics_url (`str`, *optional*):
            Triton's metrics endpoint, for the pipeline's pending count and mean queue wait.
        concurrency (`int`, *optional*, defaults to 2): generations this page server sends at
            once; more wait in the page's own queue, which shows each user its position.
        status_interval (`float`, *optional*, defaults to 5.0): seconds between status updates.
    """

    server_url: str = "127.0.0.1:8001"
    model: str = "inpaint"
    timeout: float | None = None
    metrics_url: str | None = None
    concurrency: int = 2
    status_interval: float = 5.0


def build_app(config: AppConfig, backend: Backend | None = None) -> gr.Blocks:
    """Builds the page (not launched).

    Args:
        config (`AppConfig`): server address and options.
        backend (`Backend`, *optional*): the server connection; made from `config` if absent.
    """
    backend = backend or Backend(config.server_url, config.timeout, config.metrics_url)
    handlers = _Handlers(backend, config)
    with gr.Blocks(title="sdserve", analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}")
        status = gr.Markdown(elem_id="server-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                prompts = _prompts()
                with gr.Tabs(elem_id="modes"):
                    inpaint = _inpaint_tab()
                    outpaint = _outpaint_tab()
                    img2img = _img2img_tab()
                    t2i = _text_to_image_tab()
                settings = _settings_panel(config)
            with gr.Column(scale=2):
                results = _results_panel()
        common = [settings["model"], *prompts, *(settings[name] for name in _SETTING_NAMES)]
        session = gr.State("")  # this page's id: its Cancel button stops its own run
        demo.load(lambda: secrets.token_hex(8), None, session, queue=False)
        _wire_generation(
            handlers, config, common, session, inpaint, outpaint, img2img, t2i, results, status
        )
        _wire_outpaint_preview(outpaint)
        _wire_results(handlers, results, settings, inpaint, outpaint)
        _wire_server(demo, handlers, config, settings, status)
    return demo  # type: ignore[no-any-return]  # gradio context managers are untyped


def launch(demo: gr.Blocks, host: str, port: int, **kwargs: Any) -> Any:
    """Queues and launches the page on `host:port` (never shared publicly)."""
    demo.queue(default_concurrency_limit=4)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=False,
        css=CSS,
        theme=gr.themes.Default(primary_hue="orange"),
        **kwargs,
    )


# --- layout -----------------------------------------------------------------------------------

Components = dict[str, Any]
_SETTING_NAMES = (
    "scheduler", "steps", "guidance", "strength", "seed", "num_images", "preserve", "weighting",
    "clip_skip", "adapters", "adapter_scales",
)  # fmt: skip


def _prompts() -> tuple[gr.Textbox, gr.Textbox]:
    prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red bicycle", elem_id="prompt")
    negative = gr.Textbox(label="Negative prompt", placeholder="blurry", elem_id="negative-prompt")
    return prompt, negative


def _inpaint_tab() -> Components:
    with gr.Tab("Inpaint", id="inpaint", elem_id="tab-inpaint"):
        editor = gr.ImageEditor(
            label="Image: paint over what to regenerate",
            type="numpy",
            image_mode="RGBA",
            sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["rgba(255, 255, 255, 0.85)"], color_mode="fixed"),
            eraser=gr.Eraser(),
            layers=False,
            transforms=(),
            format="png",
            canvas_size=(512, 512),
            elem_id="inpaint-editor",
        )
        with gr.Accordion("Mask file (optional)", open=False, elem_id="inpaint-mask-accordion"):
            mask = gr.Image(
                label="Mask: white = regenerate (added to the painted mask)",
                type="numpy",
                image_mode="RGBA",
                sources=["upload", "clipboard"],
                format="png",
                elem_id="inpaint-mask",
            )
        mask_blur = gr.Slider(
            0, 64, value=0, step=1, label="Mask blur (pixels)",
            info="Gaussian blur of the mask before inpainting (diffusers' mask_processor.blur)",
            elem_id="inpaint-mask-blur",
        )  # fmt: skip
        with gr.Row():
            crop = gr.Checkbox(
                False, label="Only the masked area", elem_id="inpaint-crop",
                info="generate the box around the mask at the model's size, paste it back "
                "(diffusers' padding_mask_crop): for large photos",
            )  # fmt: skip
            crop_padding = gr.Slider(
                0, 256, value=32, step=1, label="Padding around the mask (pixels)",
                elem_id="inpaint-crop-padding",
            )  # fmt: skip
        button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-generate")
    return {"editor": editor, "mask": mask, "mask_blur": mask_blur, "crop": crop,
            "crop_padding": crop_padding, "button": button}  # fmt: skip


def _outpaint_tab() -> Components:
    with gr.Tab("Outpaint", id="outpaint", elem_id="tab-outpaint"):
        with gr.Row():
            image = gr.Image(
                label="Image to extend",
                type="numpy",
                image_mode="RGB",
                sources=["upload", "clipboard"],
                format="png",
                height=280,
                elem_id="outpaint-image",
            )
            preview = gr.Image(
                label="Canvas preview (red = generated)",
                type="numpy",
                interactive=False,
                format="png",
                height=280,
                elem_id="outpaint-preview",
            )
        caption = gr.Markdown(elem_id="outpaint-caption")
        with gr.Row():
            sides = [
                gr.Slider(0, SIDE_MAX, value=value, step=8, label=name, elem_id=f"outpaint-{name}")
                for name, value in (("left", 0), ("top", 0), ("right", 64), ("bottom", 0))
            ]
        button = gr.Button("Outpaint", variant="primary", elem_id="outpaint-generate")
    return {
        "image": image,
        "preview": preview,
        "caption": caption,
        "sides": sides,
        "button": button,
    }


def _img2img_tab() -> Components:
    with gr.Tab("Image to image", id="img2img", elem_id="tab-img2img"):
        image = gr.Image(
            label="Image to redraw",
            type="numpy",
            image_mode="RGB",
            sources=["upload", "clipboard"],
            format="png",
            height=280,
            elem_id="img2img-image",
        )
        strength = gr.Slider(
            0.01, 1.0, value=DEFAULT_IMG2IMG_STRENGTH, step=0.01, label="Redraw strength",
            info="how much of the image to destroy first (1 = ignore it)",
            elem_id="img2img-strength",
        )  # fmt: skip
        button = gr.Button("Redraw", variant="primary", elem_id="img2img-generate")
    return {"image": image, "strength": strength, "button": button}


def _text_to_image_tab() -> Components:
    with gr.Tab("Text to image", id="text-to-image", elem_id="tab-t2i"):
        with gr.Row():
            height, width = (
                gr.Slider(SIZE_MIN, SIZE_MAX, value=512, step=8, label=name, elem_id=f"t2i-{name}")
                for name in ("height", "width")
            )
        button = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
    return {"height": height, "width": width, "button": button}


def _settings_panel(config: AppConfig) -> Components:
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            model = gr.Dropdown(
                choices=[config.model], value=config.model, label="Model", elem_id="model"
            )
            scheduler = gr.Dropdown(
                choices=[cb.DEFAULT_SCHEDULER],
                value=cb.DEFAULT_SCHEDULER,
                allow_custom_value=True,
                label="Scheduler",
                elem_id="scheduler",
            )
            refresh = gr.Button("Refresh from server", size="sm", scale=0, elem_id="refresh")
        with gr.Row():
            steps = gr.Slider(1, 150, value=25, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(
                0.0, 50.0, value=7.5, step=0.5, label="Guidance scale", elem_id="guidance"
            )
            strength = gr.Slider(
                0.01,
                1.0,
                value=1.0,
                step=0.01,
                label="Strength",
                info="image modes; 1 = ignore the masked pixels",
                elem_id="strength",
            )
        with gr.Row():
            seed = gr.Textbox(
                value=cb.RANDOM_SEED, label="Seed (-1 = random)", max_lines=1, elem_id="seed"
            )
            random_seed = gr.Button("Random", size="sm", elem_id="seed-random")
            reuse_seed = gr.Button("Reuse last", size="sm", elem_id="seed-reuse")
            num_images = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="num-images")
            preserve = gr.Checkbox(value=True, label="Keep unmasked pixels", elem_id="preserve")
            weighting = gr.Checkbox(
                value=False, label="Prompt weighting", elem_id="prompt-weighting",
                info="compel syntax: (word)1.3, word++, word-",
            )  # fmt: skip
        clip_skip = gr.Slider(
            0, 12, value=0, step=1, label="Clip skip",
            info="text-encoder layers to skip for the prompt (diffusers' clip_skip)",
            elem_id="clip-skip",
        )  # fmt: skip
    adapters = _adapters_panel()
    return {
        "model": model,
        "scheduler": scheduler,
        "refresh": refresh,
        "steps": steps,
        "guidance": guidance,
        "strength": strength,
        "seed": seed,
        "random_seed": random_seed,
        "reuse_seed": reuse_seed,
        "num_images": num_images,
        "preserve": preserve,
        "weighting": weighting,
        "clip_skip": clip_skip,
        **adapters,
    }


def _adapters_panel() -> Components:
    """The LoRA adapters to generate with and their scales; the choices come from the server
    (`_Handlers.adapters`), the controls hidden while it serves none."""
    with gr.Accordion("Adapters (LoRA)", open=True, elem_id="adapters-section"):
        note = gr.Markdown("Adapters are read from the server…", elem_id="adapters-note")
        with gr.Column(visible=False, elem_id="adapters-controls") as controls:
            adapters = gr.Dropdown(
                choices=[], value=[], multiselect=True, label="Adapters",
                info="LoRA files in the server's adapter folder", elem_id="adapters",
            )  # fmt: skip
            scales = gr.Dataframe(
                value=[], headers=["adapter", "scale"], datatype=["str", "number"],
                type="array", static_columns=[0], label="Scales (diffusers' adapter_weights)",
                elem_id="adapter-scales",
            )  # fmt: skip
        refresh = gr.Button(cb.REFRESH_ADAPTERS, size="sm", elem_id="adapters-refresh")
    return {"adapters": adapters, "adapter_scales": scales, "adapter_note": note,
            "adapter_controls": controls, "adapters_refresh": refresh}  # fmt: skip


def _results_panel() -> Components:
    gallery = gr.Gallery(
        label="Results",
        columns=2,
        height="auto",
        object_fit="contain",
        format="png",
        interactive=False,
        elem_id="results",
    )
    busy = gr.HTML("", elem_id="busy")
    cancel = gr.Button("Cancel", size="sm", variant="stop", elem_id="cancel")
    summary = gr.Markdown("Results and their seeds appear here.", elem_id="seeds")
    use_as_input = gr.Button("Use as input (inpaint / outpaint)", elem_id="use-as-input")
    return {
        "gallery": gallery,
        "busy": busy,
        "cancel": cancel,
        "summary": summary,
        "use_as_input": use_as_input,
        "images": gr.State([]),
        "seeds": gr.State([]),
        "selected": gr.State(None),
    }


# --- events -----------------------------------------------------------------------------------


def _wire_generation(
    handlers: _Handlers,
    config: AppConfig,
    common: list[Any],
    session: gr.State,
    inpaint: Components,
    outpaint: Components,
    img2img: Components,
    t2i: Components,
    results: Components,
    status: gr.Markdown,
) -> None:
    """Generate buttons: show the busy bar at once, run (queued, streaming its progress and
    previews into the bar and the gallery), then hide it either way. Cancel stops the run on
    the server at its next step."""
    names = ("gallery", "summary", "images", "seeds", "selected", "busy")
    outputs = [results[name] for name in names]
    model, busy = common[0], results["busy"]
    for button, handler, inputs in (
        (
            inpaint["button"],
            handlers.inpaint,
            [
                *common,
                *(inpaint[n] for n in ("editor", "mask", "mask_blur", "crop", "crop_padding")),
            ],
        ),
        (outpaint["button"], handlers.outpaint, [*common, outpaint["image"], *outpaint["sides"]]),
        (img2img["button"], handlers.img2img, [*common, img2img["image"], img2img["strength"]]),
        (t2i["button"], handlers.text_to_image, [*common, t2i["height"], t2i["width"]]),
    ):
        run = button.click(handlers.busy, model, busy, queue=False, show_progress="hidden").then(
            handler,
            [*inputs, session],
            outputs,
            concurrency_limit=config.concurrency,
            concurrency_id="generate",
            show_progress="hidden",
        )
        # Not `.then`: Gradio 6.31's page skips `.then` listeners after an error.
        run.success(handlers.finish, model, [busy, status], show_progress="hidden")
        run.failure(handlers.finish, model, [busy, status], show_progress="hidden")
    # Not Gradio's `cancels`: that marks the run's outputs as failed. The run sees the Cancel
    # at its next event, ends the stream (the server drops the request) and says so.
    results["cancel"].click(handlers.cancel, session, [busy, results["summary"]], queue=False)


def _wire_outpaint_preview(outpaint: Components) -> None:
    inputs = [outpaint["image"], *outpaint["sides"]]
    for trigger in inputs:
        trigger.change(
            cb.outpaint_preview,
            inputs,
            [outpaint["preview"], outpaint["caption"]],
            show_progress="hidden",
            trigger_mode="always_last",
        )


def _wire_results(
    handlers: _Handlers,
    results: Components,
    settings: Components,
    inpaint: Components,
    outpaint: Components,
) -> None:
    picked = [results["images"], results["selected"]]
    results["gallery"].select(_selected_index, None, results["selected"], show_progress="hidden")
    results["use_as_input"].click(
        handlers.use_as_input, picked, [inpaint["editor"], outpaint["image"]]
    )
    settings["random_seed"].click(
        lambda: cb.RANDOM_SEED, None, settings["seed"], show_progress="hidden"
    )
    settings["reuse_seed"].click(
        handlers.reuse_seed, [results["seeds"], results["selected"]], settings["seed"]
    )


def _wire_server(
    demo: gr.Blocks,
    handlers: _Handlers,
    config: AppConfig,
    settings: Components,
    status: gr.Markdown,
) -> None:
    """Dropdowns and limits from the server at page load, on refresh and on a model change;
    the status line every `config.status_interval` seconds."""
    inputs = [settings[name] for name in ("model", "scheduler", "steps", "num_images", "clip_skip")]
    names = ("model", "scheduler", "steps", "guidance", "num_images", "clip_skip")
    outputs = [*(settings[name] for name in names), status]
    # the adapters after the limits: `refresh` reads the model's `max_adapters`
    adapter_inputs = [settings[name] for name in ("model", "adapters", "adapter_scales")]
    adapter_names = ("adapter_controls", "adapters", "adapter_scales", "adapter_note")
    adapter_outputs = [settings[name] for name in adapter_names]
    for refreshed in (
        demo.load(handlers.refresh, inputs, outputs),
        settings["refresh"].click(handlers.refresh, inputs, outputs),
        settings["model"].input(handlers.refresh, inputs, outputs),
    ):
        refreshed.then(handlers.adapters, adapter_inputs, adapter_outputs)
    settings["adapters_refresh"].click(handlers.adapters, adapter_inputs, adapter_outputs)
    settings["adapters"].change(
        cb.adapter_rows, adapter_inputs[1:], settings["adapter_scales"], show_progress="hidden"
    )
    timer = gr.Timer(config.status_interval)
    timer.tick(handlers.status, settings["model"], status, show_progress="hidden")


# --- handlers ---------------------------------------------------------------------------------


class _Handlers:
    """Gradio-facing callbacks: convert arguments, call `callbacks`, map errors to toasts."""

    def __init__(self, backend: Backend, config: AppConfig) -> None:
        self.backend = backend
        self.config = config
        self._recent: dict[str, RecentOutcomes] = {}  # per model, for the status line
        self._limits: dict[str, Limits] = {}  # per model, as `refresh` last read them
        self._stops: dict[str, threading.Event] = {}  # per page session: its Cancel

    # Gradio hands each generate button's inputs positionally: the model, the prompts and the
    # shared settings (`_SETTING_NAMES`), then the tab's own (`_wire_generation`).

    # Each also gets the page's session id last (its Cancel button's); each is a generator of
    # (gallery, summary, images, seeds, selected, busy) updates (`_run`).

    def inpaint(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        model, settings, (editor, mask, mask_blur, *crop, session) = self._common(values)
        yield from self._run(
            model, session, lambda c: cb.run_inpaint(c, settings, editor, mask, mask_blur, *crop)
        )

    def outpaint(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        model, settings, (image, *sides, session) = self._common(values)
        yield from self._run(model, session, lambda c: cb.run_outpaint(c, settings, image, *sides))

    def img2img(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        """The tab's own strength replaces the shared one (whose default, 1, ignores the image)."""
        image, redraw_strength, session = values[-3:]
        model, settings, _ = self._common(values, strength=redraw_strength)
        yield from self._run(model, session, lambda c: cb.run_img2img(c, settings, image))

    def text_to_image(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        model, settings, (height, width, session) = self._common(values)
        yield from self._run(
            model, session, lambda c: cb.run_text_to_image(c, settings, height, width)
        )

    def cancel(self, session: str) -> tuple[str, str]:
        """Stops this page's run: the server drops it at its next step."""
        stop = self._stops.get(session)
        if stop is not None:
            stop.set()
        return "", "Cancelled."

    def busy(self, model: str) -> str:
        """The indeterminate bar shown until the server's first event."""
        where = html.escape(f"{model or self.config.model} on {self.backend.url}")
        return (
            '<div class="sd-busy"><div class="sd-bar"></div>'
            f"<span>Generating with {where}…</span></div>"
        )

    def finish(self, model: str) -> tuple[str, str]:
        """Hides the busy bar and refreshes the status line."""
        return "", self.status(model)

    def use_as_input(self, images: list[Any], selected: int | None) -> tuple[Any, Any]:
        image = _user_errors(cb.pick_result, images, selected)
        return cb.editor_value(image), image

    def reuse_seed(self, seeds: list[int], selected: int | None) -> str:
        return str(_user_errors(cb.reuse_seed, seeds, selected))

    def refresh(
        self, model: str, scheduler: str, steps: float, num_images: float, clip_skip: float = 0
    ) -> tuple[Any, ...]:
        """Fills the model and scheduler dropdowns and the slider limits from the server."""
        model = model or self.config.model
        try:
            models = self.backend.models()
            if models and model not in models:  # the selected model is gone: take the first
                model = models[0]
            info = self.backend.model_info(model)
            self._limits[model] = info.limits
        except SdserveError as exc:
            gr.Warning(html.escape(cb.error_message(exc, self.backend.url), quote=False))
            unchanged = [gr.update() for _ in range(6)]
            return (*unchanged, self.status(model))
        return (
            gr.update(choices=models or [model], value=model),
            _scheduler_update(info, scheduler),
            gr.update(maximum=info.max_steps, value=min(int(steps or 1), info.max_steps)),
            gr.update(maximum=info.max_guidance_scale),
            gr.update(maximum=info.max_images, value=min(int(num_images or 1), info.max_images)),
            _clip_skip_update(info, clip_skip),
            self.status(model),
        )

    def adapters(
        self, model: str, chosen: list[str] | None, table: list[list[Any]] | None
    ) -> tuple[Any, ...]:
        """The adapter section from the server: its usable adapters (re-read from its folder;
        at most the model's `max_adapters` chosen), the chosen ones it still serves with their
        scales, and the note (what it refuses and why, or why there is nothing to choose)."""
        model = model or self.config.model
        listing = self.backend.adapters(model)
        limits = self._limits.get(model)
        kept = [name for name in chosen or () if name in listing.names]
        return (
            gr.update(visible=bool(listing.usable)),
            gr.update(
                choices=[(adapter.label, adapter.name) for adapter in listing.usable],
                value=kept,
                max_choices=limits.max_adapters if limits is not None else None,
            ),
            cb.adapter_rows(kept, table),
            cb.adapter_note(model, listing, limits),
        )

    def status(self, model: str) -> str:
        """The status line of `model`: readiness, load, and the problems of the last minutes
        (counted between this page's polls of the server's metrics)."""
        model = model or self.config.model
        state = self.backend.status(model)
        recent = self._recent.setdefault(model, RecentOutcomes()).update(state.queue.outcomes)
        return state.markdown(recent)

    def _common(
        self, values: tuple[Any, ...], strength: float | None = None
    ) -> tuple[str, cb.Settings, tuple[Any, ...]]:
        """`_common_values` under the limits `refresh` last read for the button's model."""
        limits = self._limits.get(values[0] or self.config.model)
        return _common_values(values, strength, limits)

    def _run(
        self, model: str, session: str, run: Callable[[Any], cb.Generation]
    ) -> Iterator[tuple[Any, ...]]:
        """Runs a generation streamed (on a thread of its own): yields the progress bar and
        previews as they come, then the images. A Cancel of this page (or Gradio closing the
        generator) makes the next event end the stream, which cancels it on the server."""
        stop = self._stops.setdefault(session, threading.Event())
        stop.clear()
        events: queue.Queue[Queued | Progress | Preview | None] = queue.Queue()
        outcome: dict[str, Any] = {}

        def on_event(event: Queued | Progress | Preview) -> None:
            if stop.is_set():
                raise cb.UIError("Cancelled.")
            events.put(event)

        def work() -> None:
            try:
                with self.backend.track():
                    client = _Streamed(self.backend.client(model or self.config.model), on_event)
                    outcome["generation"] = run(client)
            except Exception as exc:  # noqa: BLE001 (shown below, on the page's thread)
                outcome["error"] = exc
            finally:
                events.put(None)

        threading.Thread(target=work, name="sdserve-ui-generate", daemon=True).start()
        cancelled = False
        try:
            while (event := events.get()) is not None:
                yield _progress_update(event)
        finally:
            cancelled = stop.is_set()  # this page's Cancel
            stop.set()  # also when Gradio closes this generator: the stream ends
        if cancelled:  # not an error: say so where the images would be
            skip = gr.skip()
            yield skip, "Cancelled.", skip, skip, skip, ""
            return
        error = outcome.get("error")
        if isinstance(error, cb.UIError | SdserveError):
            raise _toast(error, self.backend.url) from None
        if error is not None:
            raise error
        generation: cb.Generation = outcome["generation"]
        yield (generation.gallery, generation.summary, generation.images, generation.seeds,
               None, gr.skip())  # fmt: skip


class _Streamed:
    """An SDK client whose generation calls stream (`on_event`), with previews about every
    eighth of the steps."""

    def __init__(self, client: Any, on_event: Callable[[Any], None]) -> None:
        self._client = client
        self._on_event = on_event

    def __getattr__(self, name: str) -> Any:
        return partial(self._call, getattr(self._client, name))

    def _call(self, method: Callable[..., Any], *args: Any, **options: Any) -> Any:
        steps = options.get("steps") or 25
        options.setdefault("preview_every", max(1, steps // PREVIEWS_PER_RUN))
        return method(*args, on_event=self._on_event, **options)


PREVIEWS_PER_RUN = 8


def _progress_update(event: Queued | Progress | Preview) -> tuple[Any, ...]:
    """The outputs one event changes: the bar (queue position or steps), or the gallery."""
    skip = gr.skip()
    if isinstance(event, Preview):
        gallery = [(image, f"preview · step {event.step}/{event.total_steps}")
                   for image in event.images]  # fmt: skip
        return gallery, skip, skip, skip, skip, skip
    if isinstance(event, Queued):
        line, done = f"Waiting in the server's queue: position {event.position}…", 0.0
    else:
        band = f" · band {event.band}/{event.bands}" if event.bands > 1 else ""
        line = (f"Step {event.step}/{event.total_steps}{band} · {event.elapsed_s:.1f} s, "
                f"about {event.eta_s:.1f} s left")  # fmt: skip
        done = 100 * event.step / max(event.total_steps, 1)
    bar = (f'<div class="sd-busy"><div class="sd-bar sd-steps" style="--done: {done:.0f}%">'
           f"</div><span>{html.escape(line)}</span></div>")  # fmt: skip
    return skip, skip, skip, skip, skip, bar


def _common_values(
    values: tuple[Any, ...], strength: float | None = None, limits: Limits | None = None
) -> tuple[str, cb.Settings, tuple[Any, ...]]:
    """A generate button's inputs → (model, the shared settings, the tab's own inputs).

    Args:
        values: model, prompt, negative prompt, then `_SETTING_NAMES`' values, then the tab's.
        strength: replaces the shared strength (a tab with its own).
        limits: the model's limits, for the adapter count (`cb.parse_adapters`).
    """
    model, prompt, negative, *rest = values
    shared = dict(zip(_SETTING_NAMES, rest, strict=False))
    if strength is not None:
        shared["strength"] = strength
    settings: cb.Settings = _user_errors(
        cb.make_settings, prompt, negative, *(shared[name] for name in _SETTING_NAMES), limits
    )
    return model, settings, tuple(rest[len(_SETTING_NAMES) :])


def _clip_skip_update(info: ModelInfo, current: float | None) -> Any:
    """The clip-skip slider up to the model's layer count (fixed at 0 where it has none)."""
    most = info.max_clip_skip
    return gr.update(maximum=max(most, 1), value=min(int(current or 0), most), interactive=most > 0)


def _scheduler_update(info: ModelInfo, current: str | None) -> Any:
    choices = [cb.DEFAULT_SCHEDULER, *info.schedulers]
    return gr.update(choices=choices, value=current or cb.DEFAULT_SCHEDULER)


def _selected_index(event: gr.SelectData) -> int | None:
    index = event.index
    return index if isinstance(index, int) else None


def _user_errors(function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except cb.UIError as exc:
        raise _toast(exc) from None


def _toast(exc: Exception, url: str = "") -> gr.Error:
    """A `gr.Error` that stays until closed, with the (HTML-escaped) readable message."""
    message = html.escape(cb.error_message(exc, url), quote=False)
    title = "Cannot generate" if isinstance(exc, cb.UIError) else "Server error"
    return gr.Error(message, duration=None, title=title, print_exception=False)
