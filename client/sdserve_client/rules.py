"""TEMPORARY during the issue 15 move: see `sdserve_protocol`."""

from sdserve_protocol.auth import *
from sdserve_protocol.contract import RANGES, check_seed  # noqa: F401
from sdserve_protocol.rules import *
from sdserve_protocol.settings import LIMIT_PREFIX, config_parameters  # noqa: F401

SCHEDULERS_PARAMETER = "schedulers"


def limits_from_parameters(params, strict=True):
    from sdserve_protocol.settings import PipelineSettings

    return PipelineSettings.from_parameters(params, strict=strict).limits


def limit_parameters(limits):
    from dataclasses import asdict

    return {f"limit_{k}": str(v) for k, v in asdict(limits).items()}


def scheduler_names(text):
    from sdserve_protocol.settings import _scheduler_names

    return _scheduler_names(text)
