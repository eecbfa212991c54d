"""Helpers shared by the tests: wire requests, services with some runners or settings replaced
(a call spy, a gated UNet), and tiny Triton Python models for launcher and security tests."""

from __future__ import annotations

import textwrap
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sdserve_pipeline.batcher import ContinuousBatcher
from sdserve_pipeline.generation import GenerationLoop
from sdserve_pipeline.service import PipelineService
from sdserve_protocol.contract import INPUTS_BY_NAME
from sdserve_protocol.settings import COMPONENT_ROLES as ROLES

PROMPT = "a red bicycle"


def wire(image=None, mask=None, **controls):
    """A wire request (the pipeline's input tensors, no batch dim) with `controls`."""
    tensors = {"prompt": np.array([PROMPT.encode()], dtype=object)}
    if image is not None:  # without a mask: image-to-image
        tensors |= {"image": image, "preserve_unmasked": np.array([False])}
    if mask is not None:
        tensors["mask"] = mask
    for name, value in controls.items():
        if isinstance(value, str):
            tensors[name] = np.array([value.encode()], dtype=object)
        else:  # the contract's dtype; outpaint's four sides, any other a scalar
            tensors[name] = np.array(value, INPUTS_BY_NAME[name].numpy_dtype).reshape(-1)
    return tensors


WAIT_S = 300  # generous: only a hang fails on it, never a slow machine


def variant(
    service: PipelineService,
    max_rows: Mapping[str, int] | None = None,
    size_buckets: Sequence[tuple[int, int]] | None = None,
    **runners,
) -> PipelineService:
    """A copy of `service` whose loop has some component runners (`unet=...`), its rows per
    call or its size buckets replaced; the rest (limits, outpainting, schedulers) is kept."""
    loop = service.loop
    changed = GenerationLoop(
        replace(loop.components, **runners), loop.assets, feather_radius=loop.feather_radius,
        max_rows=loop.executor.max_rows if max_rows is None else max_rows,
        size_buckets=loop.sizing.buckets if size_buckets is None else size_buckets,
    )  # fmt: skip
    return PipelineService(changed, service.limits, service.outpaint, service.schedulers)


def gated_unet(service: PipelineService, gate: threading.Event, before=None, broken_height=0):
    """A copy of `service` whose UNet calls first tell `before` (if given), then wait for
    `gate`, and fail on latents `broken_height` high."""
    unet = service.loop.components.unet

    def gated(*inputs):
        if before is not None:
            before()
        gate.wait(WAIT_S)
        if inputs[0].shape[2] == broken_height:
            raise RuntimeError("unet: engine lost")
        return unet(*inputs)

    return variant(service, unet=gated)


def streamed(service: PipelineService, request, **batcher_options):
    """One wire request streamed through a `ContinuousBatcher` on `service`: (its outcome, the
    events its listener heard)."""
    events: list = []
    outcome: list = []
    answered = threading.Event()

    def done(result) -> None:
        outcome.append(result)
        answered.set()

    batcher = ContinuousBatcher(service, **batcher_options)
    try:
        batcher.submit(request, done, listener=events.append)
        assert answered.wait(WAIT_S)
    finally:
        batcher.close()
    return outcome[0], events


class Spy:
    """A copy of `service` recording the rows of every call per component; `fail(role, n)`
    makes the n-th call of `role` raise; `settings` as `variant`'s."""

    def __init__(self, service: PipelineService, fail=None, **settings) -> None:
        self.rows: dict[str, list[int]] = defaultdict(list)
        self._fail = fail or (lambda role, index: False)
        components = service.loop.components
        wrapped = {
            role: self._wrap(role, getattr(components, role))
            for role in ROLES
            if getattr(components, role) is not None
        }
        self.service = variant(service, **settings, **wrapped)
        self.loop = self.service.loop

    def _wrap(self, role, run):
        def call(*inputs):
            self.rows[role].append(inputs[0].shape[0])
            if self._fail(role, len(self.rows[role])):
                raise RuntimeError(f"{role} call {len(self.rows[role])} failed")
            return run(*inputs)

        return call


# --- tiny Triton Python models --------------------------------------------------------------

TENSOR_CONFIG = """
backend: "python"
max_batch_size: 0
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""

ADD_ONE = """
import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""


def write_model(repository: Path, name: str, model_py: str) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(TENSOR_CONFIG)
    (version / "model.py").write_text(textwrap.dedent(model_py))


def infer_add_one(grpc_url: str, model: str = "add_one") -> npt.NDArray[np.float32]:
    import tritonclient.grpc as grpcclient

    x = np.array([1.0, 2.5, -3.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(grpc_url) as client:
        request = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        result = client.infer(model, [request])
    output: npt.NDArray[np.float32] = result.as_numpy("OUTPUT0")
    return output
