"""What a pipeline model's config advertises is what it enforces, on a real tritonserver.

The repository is a copy of the exported one with its `inpaint` config edited: a shorter
`schedulers` list and lowered image limits (which the SDK must apply before sending).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import make_case, served
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from sdserve_client import InpaintClient, InvalidRequestError
from sdserve_client.webui.server_info import fetch_model_info

pytestmark = pytest.mark.e2e
PROMPT = "a red bicycle"
SCHEDULERS = "euler,ddim"  # the model's list; diffusers' other schedulers are left out
MAX_PIXELS = 64 * 64  # an input image of 64x64 fits, 64x80 does not
MAX_CANVAS_PIXELS = 64 * 96  # a 64x64 image outpainted by 32 fits, by 40 does not


def _edit_config(model_dir: Path, **params: str) -> None:
    config_file = model_dir / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), mc.ModelConfig())
    for key, value in params.items():
        config.parameters[key].string_value = value
    config_file.write_text(text_format.MessageToString(config))


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("edited") / "repo"
    shutil.copytree(repository, repo)
    _edit_config(
        repo / "inpaint", schedulers=SCHEDULERS, limit_max_pixels=str(MAX_PIXELS),
        limit_max_canvas_pixels=str(MAX_CANVAS_PIXELS),
    )  # fmt: skip
    with served(repo, tmp_path_factory.mktemp("triton-edited")) as srv:
        yield srv


def _inpaint(width: int = 64, **extra: np.ndarray) -> list[grpcclient.InferInput]:
    """A small inpainting request as raw tritonclient inputs (with the batch dim of 1)."""
    image, mask = make_case(64, width, seed=1)
    tensors = {
        "prompt": np.array([PROMPT.encode()], np.object_), "image": image, "mask": mask,
        "steps": np.array([2], np.int32), "seed": np.array([1], np.int64), **extra,
    }  # fmt: skip
    inputs = []
    for name, item in tensors.items():
        array = item[np.newaxis]
        infer_input = grpcclient.InferInput(
            name, list(array.shape), np_to_triton_dtype(array.dtype)
        )
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def test_only_the_listed_schedulers_are_served(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert fetch_model_info(client, "inpaint").schedulers == ("euler", "ddim")  # the UI's list
    for name in ("ddim", "EULER"):
        scheduler = np.array([name.encode()], np.object_)
        result = client.infer("inpaint", _inpaint(scheduler=scheduler))
        assert result.as_numpy("images").shape == (1, 1, 64, 64, 3)
    with pytest.raises(InferenceServerException) as refused:  # diffusers has it; not listed
        client.infer("inpaint", _inpaint(scheduler=np.array([b"pndm"], np.object_)))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.message() == (
        "scheduler: 'pndm' is unknown to this model; valid: euler, ddim"
    )
    taken = _requests_taken(server, at_least=3)  # the three above, once Triton counted them
    with InpaintClient(server.grpc_url) as sdk, pytest.raises(InvalidRequestError) as err:
        sdk.inpaint(*make_case(64, 64), PROMPT, steps=2, scheduler="dpmpp_2m")
    assert err.value.message == "scheduler: 'dpmpp_2m' is unknown to this model; valid: euler, ddim"
    client.infer("inpaint", _inpaint())  # a marker: counted after anything the SDK sent
    # The SDK read the list too: refused before sending, so only the marker was taken.
    assert _requests_taken(server, at_least=taken + 1) == taken + 1


def _requests_taken(server, at_least: int = 0) -> int:
    """Requests the server's pipeline model was handed (refused ones included: the pipeline
    answers through response senders, so Triton counts every request `execute` took).

    Triton records a request's statistics after its response may already have reached the
    client, so this waits (up to 30 s) until at least `at_least` requests are counted."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    deadline = time.monotonic() + 30
    while True:
        stats = client.get_inference_statistics("inpaint", headers=server.admin_key.grpc_headers)
        taken = sum(s.inference_count + s.inference_stats.fail.count for s in stats.model_stats)
        if taken >= at_least or time.monotonic() > deadline:
            return taken
        time.sleep(0.05)


def test_the_sdk_applies_the_models_image_limits_before_sending(server):
    too_wide, mask = make_case(64, 80, seed=2)
    square, _ = make_case(64, 64, seed=2)
    before = _requests_taken(server)
    with InpaintClient(server.grpc_url) as sdk:
        sdk.inpaint(*make_case(64, 64), PROMPT, steps=2, seed=1)  # within both limits
        taken = _requests_taken(server, at_least=before + 1)
        with pytest.raises(InvalidRequestError) as image_refused:
            sdk.inpaint(too_wide, mask, PROMPT, steps=2, seed=1)
        with pytest.raises(InvalidRequestError) as canvas_refused:
            sdk.outpaint(square, PROMPT, right=40, steps=2, seed=1)
        sdk.outpaint(square, PROMPT, right=32, steps=2, seed=1)  # 64x96: within
        # Refused before any inference: only the outpainting within the limit was taken.
        assert _requests_taken(server, at_least=taken + 1) == taken + 1
    # The server refuses the same requests with the same words.
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    outpaint = {"outpaint": np.array([40, 0, 0, 0], np.int32)}
    for sent, sdk_error in (
        (_inpaint(width=80), image_refused.value),
        (_inpaint(**outpaint), canvas_refused.value),
    ):
        with pytest.raises(InferenceServerException) as server_error:
            raw.infer("inpaint", sent)
        assert server_error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert sdk_error.message == server_error.value.message()
    assert image_refused.value.message == f"image: size 64x80 = 5120 pixels exceeds {MAX_PIXELS}"
    assert canvas_refused.value.message.startswith("outpaint: canvas 64x104 = 6656 pixels")
