"""Per-request schedulers, all from diffusers, built from the checkpoint's scheduler config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sdserve_client.rules import SCHEDULERS_PARAMETER, scheduler_names

# name → (class, config overrides), as `Class.from_config(checkpoint_config, **overrides)`.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "lms": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def served_schedulers(params: Mapping[str, str]) -> tuple[str, ...]:
    """The scheduler names a pipeline model accepts: its `schedulers` config parameter, or
    every name of `SCHEDULER_NAMES` when the parameter is absent.

    Args:
        params: the pipeline config's parameters, {key: string value}.

    Raises:
        ValueError: the parameter lists no name, or a name not in `SCHEDULER_NAMES` (a
            load-time error: the model does not load).
    """
    if SCHEDULERS_PARAMETER not in params:
        return SCHEDULER_NAMES
    value = params[SCHEDULERS_PARAMETER]
    names = scheduler_names(value)
    unknown = [name for name in names if name not in SCHEDULERS]
    if unknown or not names:
        problem = f"unknown {', '.join(unknown)}" if unknown else "no name"
        raise ValueError(
            f"parameter {SCHEDULERS_PARAMETER}: {value!r} lists {problem}; "
            f"known: {', '.join(SCHEDULER_NAMES)} (absent: all of them)"
        )
    return names


def make_scheduler(name: str | None, checkpoint_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for one request.

    Args:
        name: one of `SCHEDULER_NAMES`, or None for the checkpoint's own scheduler.
        checkpoint_config: the checkpoint's `scheduler_config.json` contents.
    """
    if name is None:
        cls = getattr(diffusers, checkpoint_config["_class_name"])
        return cls.from_config(checkpoint_config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(checkpoint_config, **overrides)
