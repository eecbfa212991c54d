"""The pipeline model's `config.pbtxt` parameters as one typed object, `PipelineSettings`.

The export writes them (`PipelineSettings.to_parameters`, also the GPU variant); the pipeline
model, the in-process runner, the web UI and the SDK read them
(`PipelineSettings.from_parameters`). Each parameter is named, typed and defaulted here and
nowhere else; a parameter that is absent reads as its default.

Server side, a value that is not valid is a load-time error (`strict=True`); a client
reading any server's config keeps the default instead (`strict=False`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, TypeVar, cast

from .canvas import FILL_MODES, FillMode
from .rules import Limits
from .sizes import SizeBucket, format_buckets, parse_buckets

T = TypeVar("T")

SCHEDULER_NAMES: tuple[str, ...] = (
    "pndm",
    "ddim",
    "ddpm",
    "euler",
    "euler_a",
    "heun",
    "lms",
    "lms_karras",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
)
"""Every scheduler a request may name (the server builds each from diffusers,
`sdserve_pipeline.schedulers`); a model may serve fewer (`PipelineSettings.schedulers`)."""

ARCHITECTURES: tuple[str, ...] = ("sd15", "sdxl")
"""`sd15`: one text encoder (SD 1.5, 9- or 4-channel UNet); `sdxl`: two, pooled embeddings."""

COMPONENT_ROLES: tuple[str, ...] = (
    "text_encoder",
    "text_encoder_2",
    "unet",
    "vae_encoder",
    "vae_decoder",
    "preview_decoder",
)
"""The component models a pipeline calls (`text_encoder_2`: SDXL only; `preview_decoder`, a
tiny VAE for streamed previews: only when exported with one)."""

PIPELINE_ROLES: tuple[str, ...] = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
"""The roles every architecture has: a model config naming all of them is a pipeline."""

LIMIT_PREFIX = "limit_"
"""Parameter `limit_<field>` sets the `Limits` field `<field>`."""


@dataclass(frozen=True)
class QueuePolicy:
    """How much work the pipeline model takes before refusing, and for how long it waits.

    The pipeline's batcher holds this queue, not Triton's dynamic batcher (which, in Triton
    2.51, sometimes left a request queued ~500 ms beside a free instance; see
    `sdserve_pipeline.batcher`).

    Args:
        max_active (`int`, parameter `max_active_requests`): requests denoised together
            (continuous batching: a request joins the running batch at the next step).
        max_queue_size (`int`, parameter `max_queue_size`): requests waiting beyond those;
            more are refused at once with UNAVAILABLE "Exceeds maximum queue size".
        timeout_s (`float`, parameter `queue_timeout_s`): a request still waiting to start
            after this long is answered with UNAVAILABLE "Request timeout expired" (0: no
            limit). A client may set its own (`timeout` on the request).
        join_wait_ms (`float`, parameter `join_wait_ms`): after a step that answered k
            requests, how long the batcher waits for up to k newcomers before the next step,
            so clients that send their next request on each answer join the next step rather
            than the one after (0: no wait). It ends as soon as k have arrived; its cost is at
            most this much idle time per step that answered someone and got fewer newcomers
            (benchmarks/README.md).
    """

    max_active: int = 8
    max_queue_size: int = 16
    timeout_s: float = 120
    join_wait_ms: float = 5


@dataclass(frozen=True)
class MemoryPolicy:
    """Admission by memory: the pipeline estimates each request's peak memory (from its size,
    images and the architecture: `sdserve_pipeline.admission.MemoryModel`) and refuses at
    once, with UNAVAILABLE and the numbers, a request that would take the estimated total of
    the requests it holds (queued and running) past the budget.

    Args:
        budget_mb (`float` or `"auto"`, parameter `memory_budget_mb`): MB the requests taken may
            hold, per pipeline model instance; `"auto"`: half the memory the server may use
            (its cgroup's limit, else the machine's), read when the model loads; 0: no
            admission by memory. Serving several pipeline models from one server, give each
            its share.
        bytes_per_pixel (`int`, parameter `memory_bytes_per_pixel`): the estimate's linear
            term (VAE and pipeline tensors per generated pixel); the default covers the
            full-size SD 1.5 / SDXL VAE, measured at 4-6 kB per pixel for its decoder on ONNX
            Runtime (the tiny demo needs ~700).
    """

    budget_mb: float | str = "auto"
    bytes_per_pixel: int = 6000


@dataclass(frozen=True)
class OutpaintSettings:
    """How outpainting bands are cut (parameters `outpaint_<field>`).

    Args:
        native (`int`): largest band side in pixels, a multiple of 8; 0: the checkpoint's
            default size (512 for SD 1.5, 1024 for SDXL).
        overlap (`int`): depth in pixels of the band regenerated inside the original, for a
            seamless edge.
        context (`int`): known pixels each band includes to condition on what is already there.
        fill (`str`): how the new area is pre-filled from the border (`edge` or `blur`).
    """

    native: int = 0
    overlap: int = 16
    context: int = 128
    fill: FillMode = "edge"


@dataclass(frozen=True)
class PipelineSettings:
    """Every parameter of a pipeline model's config.

    Args:
        architecture (`str`, parameter `architecture`): one of `ARCHITECTURES`; "" when not
            recorded (repositories exported before it was: the checkpoint's assets say).
        components (`dict[str, str]`, parameters `<role>_model`): role (`COMPONENT_ROLES`) →
            the Triton model serving it.
        limits (`Limits`, parameters `limit_<field>`): request limits.
        feather_radius (`int`, parameter `feather_radius`): blend ramp width in pixels of
            `preserve_unmasked`.
        queue (`QueuePolicy`): the batcher's queue.
        memory (`MemoryPolicy`): admission by memory.
        outpaint (`OutpaintSettings`): outpainting bands.
        schedulers (`tuple[str, ...]`, parameter `schedulers`, comma-separated): the scheduler
            names requests may ask for, in lower case; the server refuses any other, the SDK
            too, and the web UI lists them. A server serves a subset of `SCHEDULER_NAMES`.
        size_buckets (`tuple[SizeBucket, ...]`, parameter `size_buckets`, `WIDTHxHEIGHT`
            comma-separated): static sizes requests are padded to (TensorRT engines); empty:
            any size on the latent grid.
        max_batch (`dict[str, int]`, parameters `max_<role>_batch`): most rows one call of a
            component may carry (its engine's limit); absent: no limit.
        load_on_demand (`bool`, parameter `load_on_demand`): the component models are not
            loaded when the server starts but by the pipeline's first request, and unloaded
            when another checkpoint needs the room and no request uses them
            (`sdserve_pipeline.checkpoints`; the server's budget: its environment's
            `SDSERVE_CHECKPOINT_BUDGET_MB`).
        shared_graph (`bool`, parameter `shared_graph`): this checkpoint has no component
            models of its own: `components` are another checkpoint's of the same graph, and
            each call names this pipeline so that they run on this checkpoint's weights (its
            version folder's `weights/`; `sdserve_pipeline.shared_graph`). LoRA adapters are
            not served on it.
    """

    architecture: str = ""
    components: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    feather_radius: int = 4
    queue: QueuePolicy = field(default_factory=QueuePolicy)
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    outpaint: OutpaintSettings = field(default_factory=OutpaintSettings)
    schedulers: tuple[str, ...] = SCHEDULER_NAMES
    size_buckets: tuple[SizeBucket, ...] = ()
    max_batch: dict[str, int] = field(default_factory=dict)
    load_on_demand: bool = False
    shared_graph: bool = False

    def __post_init__(self) -> None:
        _check_choice("architecture", self.architecture, ("", *ARCHITECTURES))
        for role in (*self.components, *self.max_batch):
            _check_choice("component role", role, COMPONENT_ROLES)
        _check_choice("parameter outpaint_fill", self.outpaint.fill, FILL_MODES)

    def component_model(self, role: str) -> str:
        """The Triton model serving `role` (the role's own name when not set)."""
        return self.components.get(role, role)

    def to_parameters(self) -> dict[str, str]:
        """The config parameters, {key: value as text}."""
        params = {"architecture": self.architecture} if self.architecture else {}
        params |= {_model_key(role): model for role, model in self.components.items()}
        params["feather_radius"] = str(self.feather_radius)
        for group, key_of in _GROUPS.items():
            params |= {key_of(k): str(v) for k, v in asdict(getattr(self, group)).items()}
        params["schedulers"] = ",".join(self.schedulers)
        if self.size_buckets:
            params["size_buckets"] = format_buckets(self.size_buckets)
        params |= {_batch_key(role): str(rows) for role, rows in self.max_batch.items()}
        params["load_on_demand"] = str(self.load_on_demand).lower()
        if self.shared_graph:
            params["shared_graph"] = "true"
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], *, strict: bool = True) -> PipelineSettings:
        """Settings from a pipeline config's parameters; an absent one keeps its default.

        Args:
            params (`Mapping[str, str]`): the config's parameters (`config_parameters`).
            strict (`bool`, *optional*, defaults to `True`):
                Raise `ValueError` naming the parameter and its value when one is not valid
                (the server, at load time); `False` keeps the default instead (a client).
        """
        read = _Reader(params, strict)
        default = cls()
        schedulers = read("schedulers", _scheduler_names, default.schedulers)
        if strict:
            _check_schedulers(schedulers, params.get("schedulers", ""))
        return cls(
            architecture=read("architecture", _architecture, default.architecture),
            components={
                r: params[_model_key(r)] for r in COMPONENT_ROLES if _model_key(r) in params
            },
            feather_radius=read("feather_radius", int, default.feather_radius),
            **{
                group: read.fields(getattr(default, group), key_of)
                for group, key_of in _GROUPS.items()
            },
            schedulers=schedulers or default.schedulers,
            size_buckets=read("size_buckets", parse_buckets, default.size_buckets),
            max_batch={
                role: read(_batch_key(role), int, 0)
                for role in COMPONENT_ROLES
                if _batch_key(role) in params
            },
            load_on_demand=read("load_on_demand", parse_flag, default.load_on_demand),
            shared_graph=read("shared_graph", parse_flag, default.shared_graph),
        )


def is_pipeline(params: Mapping[str, str]) -> bool:
    """Whether a model config's parameters are a pipeline's (they name every shared role)."""
    return all(_model_key(role) in params for role in PIPELINE_ROLES)


def config_parameters(model_config: Any) -> dict[str, str]:
    """`parameters` of a Triton model config → {key: string value}.

    Args:
        model_config: the config in its JSON form (a mapping: `get_model_config(as_json=True)`,
            the `model_config` a Python backend receives; JSON leaves out an empty
            `string_value`, which reads as ""), or a `ModelConfig` protobuf message (a parsed
            `config.pbtxt`, tritonclient's gRPC `get_model_config().config`).
    """
    if isinstance(model_config, Mapping):
        params = model_config.get("parameters", {})
        return {key: value.get("string_value", "") for key, value in params.items()}
    return {key: value.string_value for key, value in model_config.parameters.items()}


def parse_flag(text: str) -> bool:
    """A boolean parameter: `true`/`1`/`yes` or `false`/`0`/`no`, any case.

    Raises:
        ValueError: any other value.
    """
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError("not a boolean (true/false)")


# Parameter names of the fields of `QueuePolicy`.
_QUEUE = {
    "max_active": "max_active_requests",
    "max_queue_size": "max_queue_size",
    "timeout_s": "queue_timeout_s",
    "join_wait_ms": "join_wait_ms",
}
_GROUPS: dict[str, Callable[[str], str]] = {
    "limits": lambda name: f"{LIMIT_PREFIX}{name}",
    "queue": _QUEUE.__getitem__,
    "memory": lambda name: f"memory_{name}",
    "outpaint": lambda name: f"outpaint_{name}",
}
"""The `PipelineSettings` fields that are dataclasses, and the parameter name of each of
their fields (written by `to_parameters`, read by `from_parameters`)."""


def _model_key(role: str) -> str:
    return f"{role}_model"


def _batch_key(role: str) -> str:
    return f"max_{role}_batch"


def _number(text: str) -> float:
    """A number of seconds or milliseconds: whole ones as ints, so they are written back as
    they were (`120`, not `120.0`)."""
    number = float(text)
    return int(number) if number.is_integer() else number


def _scheduler_names(text: str) -> tuple[str, ...]:
    """The names in a `schedulers` value: comma-separated, blanks dropped, lower case."""
    names = (name.strip().lower() for name in text.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


def _check_schedulers(names: tuple[str, ...], text: str) -> None:
    """The server serves only schedulers it can build, and at least one."""
    unknown = [name for name in names if name not in SCHEDULER_NAMES]
    if unknown or not names:
        problem = f"unknown {', '.join(unknown)}" if unknown else "no name"
        raise ValueError(
            f"parameter schedulers: {text!r} lists {problem}; "
            f"known: {', '.join(SCHEDULER_NAMES)} (absent: all of them)"
        )


def _budget(text: str) -> float | str:
    value = text.strip().lower()
    if value in ("", "auto"):
        return "auto"
    number = _number(value)
    if not 0 <= number < math.inf:
        raise ValueError("a number of MB >= 0 or 'auto'")
    return number


def _architecture(text: str) -> str:
    _check_choice("architecture", text, ARCHITECTURES)
    return text


def _fill(text: str) -> FillMode:
    _check_choice("fill", text, FILL_MODES)
    return cast(FillMode, text)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is unknown; known: {', '.join(allowed)}")


class _Reader:
    """Reads typed parameters; a bad value raises (strict) or keeps the default."""

    def __init__(self, params: Mapping[str, str], strict: bool) -> None:
        self.params = params
        self.strict = strict

    def __call__(self, key: str, parse: Callable[[str], T], default: T) -> T:
        if key not in self.params:
            return default
        try:
            return parse(self.params[key])
        except ValueError as err:
            if self.strict:
                raise ValueError(f"parameter {key}: {self.params[key]!r} is not valid ({err})")
            return default

    def fields(self, defaults: T, key_of: Callable[[str], str]) -> T:
        """A settings dataclass whose fields are each read from parameter `key_of(field)`."""
        values: dict[str, Any] = {}
        for f in fields(defaults):  # type: ignore[arg-type]
            default = getattr(defaults, f.name)
            parse = _PARSERS.get((type(defaults).__name__, f.name), type(default))
            values[f.name] = self(key_of(f.name), parse, default)
        return replace(defaults, **values)  # type: ignore[type-var]


_PARSERS: dict[tuple[str, str], Callable[[str], Any]] = {
    ("MemoryPolicy", "budget_mb"): _budget,
    ("OutpaintSettings", "fill"): _fill,
    ("QueuePolicy", "timeout_s"): _number,
    ("QueuePolicy", "join_wait_ms"): _number,
}
