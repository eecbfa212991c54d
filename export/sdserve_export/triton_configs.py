"""Triton `config.pbtxt` files generated from the component specs and the wire contract.

Built as `ModelConfig` protobuf messages and printed in text format, so every generated
config parses by construction; tests parse them back all the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sdserve_pipeline.components import ComponentSpec
from sdserve_pipeline.onnx_runtime import RunnerSettings
from sdserve_protocol.adapters import LIST_OUTPUT, LIST_QUERY
from sdserve_protocol.checkpoints import CHECKPOINTS_MODEL
from sdserve_protocol.checkpoints import LIST_OUTPUT as CHECKPOINTS_OUTPUT
from sdserve_protocol.checkpoints import LIST_QUERY as CHECKPOINTS_QUERY
from sdserve_protocol.contract import INPUTS, OUTPUTS
from sdserve_protocol.events import CANCELLED, EVENT_OUTPUTS, STREAM_ID, STREAM_OUTPUTS
from sdserve_protocol.settings import PipelineSettings


def component_config(
    spec: ComponentSpec,
    sizes: Mapping[str, int],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    instances: int = 1,
    model_name: str | None = None,
    runner: RunnerSettings | None = None,
) -> mc.ModelConfig:
    """Config of one ONNX Runtime runner model (Python backend), named as its spec; `runner`
    (default: `providers` alone) gives its session's and adapters' parameters."""
    config = mc.ModelConfig(name=model_name or spec.name, backend="python", max_batch_size=0)
    for t in spec.inputs:
        config.input.add(name=t.name, data_type=_dtype(t.dtype), dims=t.resolve(dict(sizes)))
    for t in spec.outputs:
        config.output.add(name=t.name, data_type=_dtype(t.dtype), dims=t.resolve(dict(sizes)))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    runner = runner or RunnerSettings(providers=tuple(providers))
    _set_parameters(config, runner.to_parameters())
    return config


def pipeline_config(name: str, settings: PipelineSettings, instances: int = 1) -> mc.ModelConfig:
    """Config of the pipeline model: the wire contract, and its settings as parameters.

    Args:
        name: Triton model name (`inpaint`).
        settings: component model names, limits, queue, memory, outpainting, schedulers, ...
            (`PipelineSettings.to_parameters`).
        instances: pipeline model instances.

    `max_batch_size` is 1: every wire tensor has a leading batch dim of 1 (the SDK adds and
    strips it), and each `execute` call hands one request to the running batch.
    """
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=1)
    for t in (*INPUTS, STREAM_ID):  # stream_id: set by the stream model only
        config.input.add(
            name=t.name, data_type=_dtype(t.dtype), dims=t.dims, optional=not t.required
        )
    for t in OUTPUTS:
        config.output.add(name=t.name, data_type=_dtype(t.dtype), dims=t.dims)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    _set_parameters(config, settings.to_parameters())
    return config


def stream_config(name: str, pipeline: str) -> mc.ModelConfig:
    """Config of a pipeline's stream model (decoupled): the pipeline's wire inputs, and
    the events the pipeline sends back (`stream_id` and the event tensors as inputs, with
    a leading dim for the several streams' events of one call); the result's and the
    events' outputs (`sdserve_protocol.events`).

    Args:
        name: Triton model name (`inpaint_stream`).
        pipeline: the pipeline model it hands requests to (`inpaint`).
    """
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=1)
    config.model_transaction_policy.decoupled = True
    for t in INPUTS:
        config.input.add(name=t.name, data_type=_dtype(t.dtype), dims=t.dims,
                         optional=not t.required)  # fmt: skip
    for t in (STREAM_ID, *EVENT_OUTPUTS):  # k events, each to its own stream
        config.input.add(name=t.name, data_type=_dtype(t.dtype), dims=(-1, *t.dims),
                         optional=True)  # fmt: skip
    for t in (*STREAM_OUTPUTS, CANCELLED):
        config.output.add(name=t.name, data_type=_dtype(t.dtype), dims=t.dims)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _set_parameters(config, {"pipeline_model": pipeline})
    return config


def adapters_config(
    name: str, pipeline: str, architecture: str, components: Mapping[str, str]
) -> mc.ModelConfig:
    """Config of a pipeline's adapter listing model (`sdserve_protocol.adapters`).

    Args:
        name: Triton model name (`inpaint_adapters`).
        pipeline: the pipeline whose adapter folder it lists (`inpaint`).
        architecture: the checkpoint's (`sd15`, `sdxl`).
        components: component role → Triton model name (parameters `lora_<role>`, not
            `<role>_model`, which mark a pipeline): where the weight maps adapters are checked
            against are.
    """
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=1)
    config.input.add(name=LIST_QUERY, data_type=_dtype("BYTES"), dims=(1,))
    config.output.add(name=LIST_OUTPUT, data_type=_dtype("BYTES"), dims=(1,))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    params = {"pipeline_model": pipeline, "architecture": architecture}
    _set_parameters(config, params | {f"lora_{role}": m for role, m in components.items()})
    return config


def checkpoints_config() -> mc.ModelConfig:
    """Config of the repository's checkpoint listing model (`sdserve_protocol.checkpoints`)."""
    config = mc.ModelConfig(name=CHECKPOINTS_MODEL, backend="python", max_batch_size=1)
    config.input.add(name=CHECKPOINTS_QUERY, data_type=_dtype("BYTES"), dims=(1,))
    config.output.add(name=CHECKPOINTS_OUTPUT, data_type=_dtype("BYTES"), dims=(1,))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
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
