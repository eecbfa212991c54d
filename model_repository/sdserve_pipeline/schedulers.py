"""Per-request schedulers, all from diffusers, built from the checkpoint's scheduler config."""

from __future__ import annotations

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

from sdserve_protocol.settings import SCHEDULER_NAMES

# name → (class, config overrides), as `Class.from_config(checkpoint_config, **overrides)`.
SCHEDULERS: dict[str, tuple[Any, dict[str, Any]]] = {  # (a SchedulerMixin class, ...)
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
if tuple(SCHEDULERS) != SCHEDULER_NAMES:  # the names the protocol promises, each built here
    raise ImportError(f"schedulers {tuple(SCHEDULERS)} differ from {SCHEDULER_NAMES}")


def make_scheduler(name: str | None, checkpoint_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for one request.

    Args:
        name: one of `SCHEDULER_NAMES`, or None for the checkpoint's own scheduler.
        checkpoint_config: the checkpoint's `scheduler_config.json` contents.
    """
    if name is None:
        cls: Any = getattr(diffusers, checkpoint_config["_class_name"])
        scheduler: SchedulerMixin = cls.from_config(checkpoint_config)
        return scheduler
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    cls, overrides = SCHEDULERS[name]
    scheduler = cls.from_config(checkpoint_config, **overrides)
    return scheduler
