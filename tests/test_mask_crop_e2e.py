"""A phone photo through a real tritonserver (issue 19, items 1 and 7): a 4032x3024 JPEG
stored sideways with an EXIF orientation tag and a small mask, inpainted with
`padding_mask_crop` from the CLI (a subprocess) and the web UI's handler, comes back at the
photo's shown size with every pixel outside the crop (and outside the mask) untouched, equal
to the in-process result (whose parity with diffusers is test_mask_crop.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cases import infer_inputs, max_abs, served
from helpers import wire
from PIL import Image, ImageOps
from tritonclient.utils import InferenceServerException

from sdserve_client import InpaintClient
from sdserve_client.webui import callbacks as cb

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHOWN = (3024, 4032)  # (height, width) as the photo is shown: landscape
MASK_BOX = (slice(1400, 1464), slice(2500, 2564))  # 64 x 64, drawn on the shown photo


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    with served(repository, tmp_path_factory.mktemp("triton-crop")) as srv:
        yield srv


@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory):
    """(JPEG path, mask PNG path, the photo as shown, the mask): the JPEG holds the photo
    turned a quarter counter-clockwise with EXIF orientation 6 ("rotate 90° clockwise")."""
    folder = tmp_path_factory.mktemp("photo")
    rows, cols = np.mgrid[0 : SHOWN[0], 0 : SHOWN[1]]
    noise = np.random.default_rng(0).integers(0, 40, (*SHOWN, 3))
    shown = np.stack([rows * 200 // SHOWN[0], cols * 200 // SHOWN[1], (rows + cols) % 200], -1)
    stored = Image.fromarray(np.rot90(shown + noise, k=1).astype(np.uint8))  # (4032, 3024)
    exif = stored.getexif()
    exif[0x0112] = 6
    path = folder / "photo.jpg"
    stored.save(path, quality=92, exif=exif.tobytes())
    mask = np.zeros(SHOWN, np.uint8)
    mask[MASK_BOX] = 255
    mask_path = folder / "mask.png"
    Image.fromarray(mask).save(mask_path)
    with Image.open(path) as loaded:
        assert loaded.size == (3024, 4032)  # stored portrait
        upright = np.asarray(ImageOps.exif_transpose(loaded).convert("RGB"))
    assert upright.shape == (*SHOWN, 3)
    return path, mask_path, upright, mask


def test_cli_inpaints_a_rotated_12_megapixel_jpeg_outside_pixels_untouched(
    server, service, phone_photo, tmp_path
):
    path, mask_path, upright, mask = phone_photo
    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "sdserve_client.cli", "inpaint", "--server",
               server.grpc_url, "--image", str(path), "--mask", str(mask_path), "--prompt",
               "a red bicycle", "--steps", "3", "--seed", "5", "--padding-mask-crop", "32",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    result = np.asarray(Image.open(out).convert("RGB"))
    assert result.shape == (*SHOWN, 3)  # the photo's size, as it is shown
    request = wire(upright, mask, steps=3, seed=5, padding_mask_crop=32)
    request["preserve_unmasked"] = np.array([True])  # the CLI's default
    box = service.parse(request).crop.box
    assert box == (2468, 1368, 2596, 1496)  # 64 + 2 x 32, square: the model's 128 x 128
    x1, y1, x2, y2 = box
    outside_crop = np.ones(SHOWN, bool)
    outside_crop[y1:y2, x1:x2] = False
    assert np.array_equal(result[outside_crop], upright[outside_crop])
    assert np.array_equal(result[mask < 128], upright[mask < 128])  # preserve_unmasked
    assert max_abs(result[MASK_BOX], upright[MASK_BOX]) > 8  # the masked area was generated
    local = service.generate(request)["images"][0]
    assert max_abs(result, local) <= 1


def test_web_ui_handler_inpaints_the_photo_as_the_cli_does(server, phone_photo):
    """The web UI's inpaint handler on the photo as its editor holds it (upright RGBA, the mask
    painted on a layer), with "only the masked area", against the same server."""
    _, _, upright, mask = phone_photo
    background = np.dstack([upright, np.full(SHOWN, 255, np.uint8)])
    layer = np.zeros((*SHOWN, 4), np.uint8)
    layer[MASK_BOX] = (255, 255, 255, 217)
    settings = cb.Settings("a red bicycle", steps=3, seed=5)
    editor = {"background": background, "layers": [layer], "composite": background}
    with InpaintClient(server.grpc_url) as client:
        generation = cb.run_inpaint(client, settings, editor, crop=True, crop_padding=32)
        cli_like = client.inpaint(upright, mask, "a red bicycle", steps=3, seed=5,
                                  padding_mask_crop=32).arrays[0]  # fmt: skip
    assert generation.images[0].shape == (*SHOWN, 3)
    assert np.array_equal(generation.images[0], cli_like)
    unmasked = mask < 128
    assert np.array_equal(generation.images[0][unmasked], upright[unmasked])


def test_server_refuses_bad_crops_by_name(server):
    """Sent raw (past the SDK's own check): a padding larger than the image and an image over
    the input limit are INVALID_ARG naming the input; the server serves on."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    image = np.zeros((48, 64, 3), np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 10:20] = 255
    with pytest.raises(InferenceServerException) as err:
        client.infer("inpaint", infer_inputs(wire(image, mask, padding_mask_crop=65)))
    assert "padding_mask_crop: 65 is larger than the image (64x48)" in err.value.message()
    big = np.zeros((3025, 4033, 3), np.uint8)
    big_mask = np.zeros((3025, 4033), np.uint8)
    big_mask[:8, :8] = 255
    with pytest.raises(InferenceServerException) as err:
        client.infer("inpaint", infer_inputs(wire(big, big_mask, padding_mask_crop=8)))
    assert "image: size 3025x4033 = 12199825 pixels exceeds the input limit 12192768" in (
        err.value.message()
    )
    ok = client.infer("inpaint", infer_inputs(wire(image, mask, steps=2, padding_mask_crop=4)))
    assert ok.as_numpy("images").shape == (1, 1, 48, 64, 3)
