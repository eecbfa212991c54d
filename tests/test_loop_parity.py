"""Our loop, in-process on ONNX Runtime, against diffusers' own pipeline on the same weights."""

import numpy as np
import pytest
from cases import diffusers_inpaint, make_case, max_abs


def wire(image, mask, seed=42, steps=10, preserve=False, prompt="a red bicycle"):
    return {
        "prompt": np.array([prompt.encode()], dtype=object),
        "image": image,
        "mask": mask,
        "steps": np.array([steps], np.int32),
        "seed": np.array([seed], np.int64),
        "preserve_unmasked": np.array([preserve]),
    }


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 64), (64, 112)])
def test_matches_diffusers_pndm_10_steps(service, diffusers_pipe, height, width):
    image, mask = make_case(height, width)
    ours = service.generate(wire(image, mask))
    reference = diffusers_inpaint(diffusers_pipe, image, mask)
    assert ours["images"].shape == (1, height, width, 3)
    assert max_abs(ours["images"][0], reference) <= 2
    assert ours["seeds"].tolist() == [42]


def test_seed_changes_the_image_and_reproduces_it(service):
    image, mask = make_case(64, 64)
    a = service.generate(wire(image, mask, seed=1))["images"]
    b = service.generate(wire(image, mask, seed=2))["images"]
    again = service.generate(wire(image, mask, seed=1))["images"]
    assert max_abs(a, b) > 10
    np.testing.assert_array_equal(a, again)


def test_random_seed_is_returned_and_reproduces(service):
    image, mask = make_case(64, 64)
    first = service.generate({k: v for k, v in wire(image, mask).items() if k != "seed"})
    (seed,) = first["seeds"].tolist()
    np.testing.assert_array_equal(
        service.generate(wire(image, mask, seed=seed))["images"], first["images"]
    )


def test_preserve_unmasked_keeps_input_pixels_exactly(service):
    image, mask = make_case(64, 96)
    out = service.generate(wire(image, mask, preserve=True))["images"][0]
    keep = mask < 128
    np.testing.assert_array_equal(out[keep], image[keep])
    assert max_abs(out[~keep], image[~keep]) > 10  # the masked area was regenerated
