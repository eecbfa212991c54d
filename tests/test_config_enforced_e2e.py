"""What a pipeline model's config advertises is what it enforces, on a real tritonserver.

The repository is a copy of the exported one with its `inpaint` config edited: a shorter
`schedulers` list.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import infer_inputs, make_case, served
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from sdserve_client import InpaintClient, SdserveError
from sdserve_client.webui.server_info import fetch_model_info

pytestmark = pytest.mark.e2e
PROMPT = "a red bicycle"
SCHEDULERS = "euler,ddim"  # the model's list; diffusers' other schedulers are left out


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
    _edit_config(repo / "inpaint", schedulers=SCHEDULERS)
    with served(repo, tmp_path_factory.mktemp("triton-edited")) as srv:
        yield srv


def _inpaint(**extra: np.ndarray) -> list[grpcclient.InferInput]:
    image, mask = make_case(64, 64, seed=1)
    return infer_inputs({
        "prompt": np.array([PROMPT.encode()], np.object_), "image": image, "mask": mask,
        "steps": np.array([2], np.int32), "seed": np.array([1], np.int64), **extra,
    })  # fmt: skip


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
    with InpaintClient(server.grpc_url) as sdk, pytest.raises(SdserveError) as err:
        sdk.inpaint(*make_case(64, 64), PROMPT, steps=2, scheduler="dpmpp_2m")
    assert err.value.status == "StatusCode.INVALID_ARGUMENT"
    assert err.value.message.endswith("valid: euler, ddim")
