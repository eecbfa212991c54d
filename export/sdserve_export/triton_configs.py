"""Triton `config.pbtxt` files generated from the component specs and the wire contract.

Built as `ModelConfig` protobuf messages and printed in text format, so every generated
config parses by construction; tests parse them back all the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sdserve_client.rules import SCHEDULERS_PARAMETER, limit_parameters
from sdserve_pipeline import contract
from sdserve_pipeline.components import ComponentSpec
from sdserve_pipeline.outpaint import OutpaintSettings
from sdserve_pipeline.request import Limits
from sdserve_pipeline.schedulers import SCHEDULER_NAMES

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class QueuePolicy:
    """How much work the pipeline model takes before refusing, and for how long it waits.

    The pipeline's batcher holds this queue, not Triton's dynamic batcher (which, in Triton
    2.51, sometimes left a request queued ~500 ms beside a free instance; see
    `sdserve_pipeline.batcher`). Written as the pipeline parameters `max_active_requests`,
    `max_queue_size` and `queue_timeout_s`.

    Args:
        max_active: requests denoised together (continuous batching: a request joins the
            running batch at the next step).
        max_queue_size: requests waiting beyond those; more are refused at once with
            UNAVAILABLE "Exceeds maximum queue size".
        timeout_s: a request still waiting to start after this long is answered with
            UNAVAILABLE "Request timeout expired" (0: no limit). A client may set its own
            (`timeout` on the request).
        join_wait_ms: after a step that answered k requests, how long the batcher waits for
            up to k newcomers before the next step, so clients that send their next request
            on each answer join the next step rather than the one after (0: no wait). It
            ends as soon as k have arrived; its cost is at most this much idle time per step
            that answered someone and got fewer newcomers (benchmarks/README.md).
    """

    max_active: int = 8
    max_queue_size: int = 16
    timeout_s: int = 120
    join_wait_ms: int = 5


@dataclass(frozen=True)
class MemoryPolicy:
    """Admission by memory: the pipeline estimates each request's peak memory (from its
    size, images and the architecture: `sdserve_pipeline.admission.MemoryModel`) and refuses
    at once, with UNAVAILABLE and the numbers, a request that would take the estimated total
    of the requests it holds (queued and running) past the budget. Written as the pipeline
    parameters `memory_budget_mb` and `memory_bytes_per_pixel`.

    Args:
        budget_mb: MB the requests taken may hold, per pipeline model instance; `"auto"`: half
            the memory the server may use (its cgroup's limit, else the machine's), read when
            the model loads; 0: no admission by memory. Serving several pipeline models from
            one server, give each its share.
        bytes_per_pixel: the estimate's linear term (VAE and pipeline tensors per generated
            pixel); the default covers the full-size SD 1.5 / SDXL VAE, measured at 4-6 kB per
            pixel for its decoder on ONNX Runtime (the tiny demo needs ~700).
    """

    budget_mb: int | str = "auto"
    bytes_per_pixel: int = 6000


def component_config(
    spec: ComponentSpec,
    sizes: Mapping[str, int],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    instances: int = 1,
    model_name: str | None = None,
) -> mc.ModelConfig:
    """Config of one ONNX Runtime runner model (Python backend), named as its spec."""
    config = mc.ModelConfig(name=model_name or spec.name, backend="python", max_batch_size=0)
    for t in spec.inputs:
        config.input.add(name=t.name, data_type=_dtype(t.dtype), dims=t.resolve(dict(sizes)))
    for t in spec.outputs:
        config.output.add(name=t.name, data_type=_dtype(t.dtype), dims=t.resolve(dict(sizes)))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    _set_parameters(
        config,
        {
            "onnx_file": ONNX_FILE,
            "execution_providers": ",".join(providers),
            "intra_op_threads": 0,
            # Idle ORT threads must not busy-wait: each component is its own process, and the
            # pipeline works between their calls (benchmarks/results/ort_tuning.md: +14 %
            # images/s at concurrency 1, +23 % at 8 on the demo, 2 cores).
            "allow_spinning": "false",
        },
    )
    return config


def pipeline_config(
    name: str,
    component_models: Mapping[str, str],
    limits: Limits = Limits(),
    feather_radius: int = 4,
    instances: int = 1,
    queue: QueuePolicy = QueuePolicy(),
    outpaint: OutpaintSettings = OutpaintSettings(),
    memory: MemoryPolicy = MemoryPolicy(),
) -> mc.ModelConfig:
    """Config of the pipeline model: the wire contract plus limits and component model names.

    Args:
        name: Triton model name (`inpaint`).
        component_models: role (`unet`, ...) → Triton model name that BLS calls.
        limits: request limits, enforced before any allocation.
        feather_radius: blend ramp width, pixels, for `preserve_unmasked`.
        instances: pipeline model instances (concurrent requests in flight).
        outpaint: band size (the checkpoint's native size), seam overlap, context, pre-fill.
        queue: bounds of the request queue, which the pipeline's batcher holds.
        memory: the memory budget of the requests taken and the estimate's per-pixel term.

    `max_batch_size` is 1: every wire tensor has a leading batch dim of 1 (the SDK adds and
    strips it), and each `execute` call hands one request to the running batch.
    """
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=1)
    for t in contract.INPUTS:
        config.input.add(
            name=t.name,
            data_type=_dtype(t.dtype),
            dims=t.dims,
            optional=t.name not in contract.REQUIRED_INPUTS,
        )
    for t in contract.OUTPUTS:
        config.output.add(name=t.name, data_type=_dtype(t.dtype), dims=t.dims)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    params = {f"{role}_model": model for role, model in component_models.items()}
    params |= limit_parameters(limits)
    params["feather_radius"] = feather_radius
    params["max_active_requests"] = queue.max_active
    params["max_queue_size"] = queue.max_queue_size
    params["queue_timeout_s"] = queue.timeout_s
    params["join_wait_ms"] = queue.join_wait_ms
    params["memory_budget_mb"] = memory.budget_mb
    params["memory_bytes_per_pixel"] = memory.bytes_per_pixel
    params |= {f"outpaint_{k}": v for k, v in asdict(outpaint).items()}
    # discoverable via get_model_config; the server accepts these and no others
    params[SCHEDULERS_PARAMETER] = ",".join(SCHEDULER_NAMES)
    _set_parameters(config, params)
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _dtype(name: str) -> int:
    return mc.DataType.Value(f"TYPE_{'STRING' if name == 'BYTES' else name}")


def _set_parameters(config: mc.ModelConfig, params: Mapping[str, object]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
