"""A fixed set of requests whose served images must not change when the code is reorganised.

One real tritonserver serves the three demo pipelines (SD 1.5 inpainting `inpaint`, the
4-channel `sd15_base`, SDXL `inpaint_xl`); each request below goes through the SDK and gRPC,
and its images and seeds are compared with `tests/data/golden_images.npz`, recorded by this
test (`SDSERVE_RECORD_GOLDEN=1 pytest tests/test_golden_images_e2e.py`) before a refactoring.

On the CPU that recorded them (same instruction-set flags, same ONNX Runtime) the images must
be equal byte for byte. Elsewhere ONNX Runtime may pick other kernels, whose float rounding can
move a pixel by a level: there the bound is the fp32 fidelity promise, 2/255.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from cases import make_case, max_abs, served

GOLDEN = Path(__file__).parent / "data" / "golden_images.npz"
RECORD = os.environ.get("SDSERVE_RECORD_GOLDEN") == "1"
PROMPT = "a red bicycle"


def _cases() -> dict[str, tuple[str, dict]]:
    """name → (model, `GenerationRequest` fields)."""
    image, mask = make_case(64, 64, seed=1)
    wide, wide_mask = make_case(48, 80, seed=2)
    return {
        "inpaint_default": ("inpaint", dict(image=image, mask=mask, steps=4, seed=1)),
        "inpaint_ddim_strength": ("inpaint", dict(
            image=image, mask=mask, steps=6, seed=2, scheduler="ddim", strength=0.7,
            guidance_scale=5.0, negative_prompt="blurry")),
        "inpaint_euler_a_two": ("inpaint", dict(
            image=wide, mask=wide_mask, steps=4, seed=3, scheduler="euler_a", num_images=2)),
        "inpaint_karras_unpreserved": ("inpaint", dict(
            image=image, mask=mask, steps=4, seed=4, scheduler="dpmpp_2m_karras",
            preserve_unmasked=False)),
        "outpaint_unipc": ("inpaint", dict(
            image=wide, outpaint=(8, 0, 16, 8), steps=4, seed=5, scheduler="unipc")),
        "text_to_image_lms": ("inpaint", dict(height=64, width=96, steps=4, seed=6,
                                              scheduler="lms")),
        "base_text_to_image_euler": ("sd15_base", dict(height=64, width=64, steps=4, seed=7,
                                                       scheduler="euler")),
        "base_inpaint_pndm": ("sd15_base", dict(image=image, mask=mask, steps=4, seed=8,
                                                scheduler="pndm")),
        "xl_inpaint": ("inpaint_xl", dict(image=wide, mask=wide_mask, steps=4, seed=9)),
        "xl_text_to_image_ddpm": ("inpaint_xl", dict(height=64, width=64, steps=4, seed=10,
                                                     scheduler="ddpm")),
        "xl_outpaint": ("inpaint_xl", dict(image=image, outpaint=(0, 16, 0, 0), steps=4,
                                           seed=11)),
    }  # fmt: skip


def _machine() -> str:
    """What decides ONNX Runtime's kernels here: the CPU's flags and the ORT version."""
    flags = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                flags = line
                break
    digest = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return f"cpu-flags-{digest} onnxruntime-{onnxruntime.__version__}"


@pytest.fixture(scope="module")
def golden_server(xl_repository, base_pipeline_dir, tmp_path_factory):
    from sdserve_export.repository import build_repository

    out = tmp_path_factory.mktemp("golden") / "model_repository"
    shutil.copytree(xl_repository, out)
    build_repository(base_pipeline_dir, out, pipeline_name="sd15_base",
                     component_prefix="base_", log=lambda _msg: None)  # fmt: skip
    with served(out, tmp_path_factory.mktemp("golden-build")) as server:
        yield server


@pytest.mark.e2e
@pytest.mark.slow
def test_served_images_equal_the_recorded_ones(golden_server):
    from sdserve_client import GenerationRequest, InpaintClient

    results: dict[str, np.ndarray] = {}
    for name, (model, fields) in _cases().items():
        with InpaintClient(golden_server.grpc_url, model=model) as client:
            result = client.generate(GenerationRequest(PROMPT, **fields))
        results[f"{name}/images"] = result.arrays
        results[f"{name}/seeds"] = np.array(result.seeds, np.int64)
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        np.savez_compressed(GOLDEN, machine=np.array(_machine()), **results)
        pytest.skip(f"recorded {len(results) // 2} requests into {GOLDEN}")
    golden = np.load(GOLDEN)
    assert sorted(results) == sorted(k for k in golden.files if k != "machine")
    same_machine = str(golden["machine"]) == _machine()
    report = {}
    for key, array in results.items():
        assert array.shape == golden[key].shape, key
        report[key] = max_abs(array, golden[key]) if array.dtype == np.uint8 else None
        if key.endswith("/seeds"):
            assert array.tolist() == golden[key].tolist(), key
    worst = {k: v for k, v in report.items() if v}
    if same_machine:
        assert not worst, f"images changed (max level difference): {json.dumps(worst)}"
    else:
        assert all(v <= 2 for v in worst.values()), json.dumps(worst)
