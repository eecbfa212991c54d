"""Outpainting in-process: single band equals diffusers on our canvas; bands bound memory."""

from __future__ import annotations

import numpy as np
import pytest
from cases import diffusers_inpaint, make_case, max_abs
from helpers import variant

from sdserve_pipeline.service import PipelineService
from sdserve_protocol.canvas import Extension, build_canvas
from sdserve_protocol.settings import OutpaintSettings


def wire(image, extension, seed=7, steps=8, preserve=True, mask=None):
    tensors = {
        "prompt": np.array([b"a red bicycle"], dtype=object),
        "image": image,
        "outpaint": np.array(extension, np.int32),
        "steps": np.array([steps], np.int32),
        "seed": np.array([seed], np.int64),
        "preserve_unmasked": np.array([preserve]),
    }
    return tensors if mask is None else {**tensors, "mask": mask}


def test_single_band_equals_diffusers_on_our_canvas(service, diffusers_pipe):
    image, _ = make_case(48, 64, seed=3)
    extension = (16, 8, 24, 0)
    out = service.generate(wire(image, extension, preserve=False))["images"][0]
    canvas = build_canvas(image, Extension(*extension), overlap=service.outpaint.overlap)
    assert out.shape == (48 + 8, 64 + 16 + 24, 3) == canvas.image.shape
    reference = diffusers_inpaint(diffusers_pipe, canvas.image, canvas.mask, seed=7, steps=8)
    assert max_abs(out, reference) <= 2


def test_original_pixels_outside_the_overlap_band_come_back_exactly(service):
    image, _ = make_case(48, 64, seed=4)
    overlap = service.outpaint.overlap
    out = service.generate(wire(image, (16, 0, 16, 8)))["images"][0]
    top, left = 0, 16
    inner = out[top : top + 48 - overlap, left + overlap : left + 64 - overlap]
    np.testing.assert_array_equal(inner, image[: 48 - overlap, overlap : 64 - overlap])


def test_user_mask_on_the_original_is_regenerated_too(service):
    image, mask = make_case(64, 64, seed=5)
    out = service.generate(wire(image, (0, 0, 32, 0), mask=mask))["images"][0]
    inside = mask >= 128
    assert max_abs(out[:64, :64][inside], image[inside]) > 10


def test_large_extension_runs_in_bands_of_bounded_size(service):
    shapes: list[tuple[int, ...]] = []
    unet = service.loop.components.unet

    def spy(*inputs):
        shapes.append(tuple(inputs[0].shape))
        return unet(*inputs)

    loop = variant(service, unet=spy).loop
    banded = PipelineService(loop, service.limits, OutpaintSettings(native=64, context=16))
    image, _ = make_case(64, 64, seed=6)
    out = banded.generate(wire(image, (64, 64, 64, 64), steps=2))["images"]
    assert out.shape == (1, 192, 192, 3)
    overlap = banded.outpaint.overlap
    inner = slice(64 + overlap, 128 - overlap)
    np.testing.assert_array_equal(out[0, inner, inner], image[overlap:-overlap, overlap:-overlap])
    assert len(shapes) > 2 * 4  # several bands, 2+ steps each
    assert max(s[2] for s in shapes) * 8 <= 64 and max(s[3] for s in shapes) * 8 <= 64


@pytest.mark.parametrize("extension", [(-1, 0, 0, 0), (0, 0, 0, 0), (5000, 0, 0, 0)])
def test_bad_extensions_are_request_errors(service, extension):
    from sdserve_protocol.rules import RequestError

    image, _ = make_case(32, 32)
    with pytest.raises(RequestError) as err:
        service.generate(wire(image, extension))
    assert err.value.name == "outpaint"
