import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sdserve_pipeline.images import composite, feather_alpha, pad_to
from sdserve_pipeline.sizing import padded_size


@given(st.integers(1, 3000), st.integers(1, 3000), st.sampled_from([8, 16, 64]))
def test_padded_size_is_smallest_multiple(height, width, multiple):
    ph, pw = padded_size(height, width, multiple)
    assert ph % multiple == 0 and pw % multiple == 0
    assert height <= ph < height + multiple and width <= pw < width + multiple


@given(arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20), st.just(3))))
def test_pad_to_keeps_original_and_repeats_edge(image):
    h, w = image.shape[:2]
    padded = pad_to(image, *padded_size(h, w, 8))
    np.testing.assert_array_equal(padded[:h, :w], image)
    np.testing.assert_array_equal(padded[h:, :w], np.broadcast_to(image[-1:], padded[h:, :w].shape))


masks = arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)))


@settings(max_examples=60)
@given(masks, st.integers(0, 6))
def test_feather_alpha_is_zero_outside_mask_and_bounded(mask, radius):
    alpha = feather_alpha(mask, radius)
    assert alpha.shape == mask.shape
    assert np.all(alpha[mask < 128] == 0.0)
    assert np.all((alpha >= 0.0) & (alpha <= 1.0))


def test_feather_alpha_ramps_inside_and_reaches_one():
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255
    alpha = feather_alpha(mask, 4)
    assert alpha[32, 32] == 1.0  # deep inside
    assert 0.0 < alpha[8, 32] < 0.5  # at the edge, inside the mask: blended
    assert alpha[7, 32] == 0.0  # just outside: untouched
    assert np.array_equal(feather_alpha(mask, 0), (mask >= 128).astype(np.float32))


@settings(max_examples=40)
@given(masks, st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_composite_keeps_every_pixel_outside_the_mask(mask, radius, seed):
    rng = np.random.default_rng(seed)
    h, w = mask.shape
    original = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    out = composite(original, generated, feather_alpha(mask, radius))
    keep = mask < 128
    assert out.shape == generated.shape and out.dtype == np.uint8
    for image in out:
        np.testing.assert_array_equal(image[keep], original[keep])
    if radius == 0:  # hard edge: inside is the generated image
        np.testing.assert_array_equal(out[:, ~keep], generated[:, ~keep])
