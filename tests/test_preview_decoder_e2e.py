"""A repository exported with `--preview-decoder` (a tiny VAE), served by a real tritonserver:
its streamed previews come from the preview decoder model (BLS), and streaming changes no
result (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
from cases import make_case, max_abs, served
from helpers import PROMPT, streamed

from sdserve_client import GenerationRequest, InpaintClient
from sdserve_client.request import encode_request
from sdserve_pipeline.streaming import linear_decoder
from sdserve_protocol.events import Preview

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(taesd_repository, tmp_path_factory):
    with served(taesd_repository, tmp_path_factory.mktemp("taesd-build")) as server:
        yield server


def _previews(events: list) -> list[Preview]:
    return [e for e in events if isinstance(e, Preview)]


@pytest.mark.slow
def test_streamed_previews_come_from_the_preview_decoder(server, taesd_service):
    image, mask = make_case(64, 64, seed=51)
    request = GenerationRequest(PROMPT, image=image, mask=mask, steps=4, seed=2,
                                scheduler="euler", preview_every=1)  # fmt: skip
    with InpaintClient(server.grpc_url) as client:
        unary = client.generate(request)
        *events, result = list(client.stream(request))
    assert np.array_equal(result.arrays, unary.arrays), "streamed images differ from unary"
    shown = _previews(events)
    assert [p.step for p in shown] == [1, 2, 3]
    assert all(p.images.shape == (1, 64, 64, 3) for p in shown)  # the request's size
    # In-process, the same request: with the preview decoder, and with the linear projection
    wire = encode_request(request)
    _, tiny = streamed(taesd_service, wire)
    _, linear = streamed(taesd_service, wire, preview=linear_decoder("sd15"))
    for served_one, tiny_one, linear_one in zip(
        shown, _previews(tiny), _previews(linear), strict=True
    ):
        assert max_abs(served_one.images, tiny_one.images) <= 1  # same ONNX model, by BLS
        assert max_abs(served_one.images, linear_one.images) > 16  # not the linear projection
