"""Admission by memory (`sdserve_pipeline.admission`): the estimate, the budget, the steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import wire

from sdserve_pipeline.admission import (
    MB,
    UNET_SCORE_BUFFERS,
    MemoryBudget,
    MemoryModel,
    OverMemoryBudget,
    budget_bytes,
    denoising_steps,
    memory_limit_bytes,
    memory_model_for,
    outpaint_bands,
)
from sdserve_pipeline.outcomes import OVERLOADED, outcome_of
from sdserve_protocol.canvas import Extension, build_canvas, plan_bands
from sdserve_protocol.settings import MemoryPolicy, PipelineSettings


def test_the_estimate_is_linear_in_pixels_plus_quadratic_attention():
    model = MemoryModel(bytes_per_pixel=700, request_bytes=0)
    k = UNET_SCORE_BUFFERS
    # 512², one image, CFG: UNet k buffers x 4 B x 2 rows x 8 heads x 4096² tokens²; VAE
    # 2 x 4 B x (1 + 1) x 4096²; convolutions 700 B x 512² x (1 + 1)
    expected = k * 4 * 2 * 8 * 4096**2 + 2 * 4 * 2 * 4096**2 + 700 * 512**2 * 2
    assert model.generation_bytes(512, 512, 1, cfg=True) == expected
    no_cfg = model.generation_bytes(512, 512, 1, cfg=False)
    assert no_cfg == expected - k * 4 * 8 * 4096**2
    four = model.generation_bytes(256, 256, 4, cfg=True)
    assert four == k * 4 * 8 * 8 * 1024**2 + 2 * 4 * 5 * 1024**2 + 700 * 256**2 * 5


def test_sdxl_attends_from_half_resolution_so_it_estimates_less_at_one_size():
    sd15, sdxl = MemoryModel("sd15"), MemoryModel("sdxl")
    assert sdxl.generation_bytes(1024, 1024, 1, True) < sd15.generation_bytes(1024, 1024, 1, True)
    assert MemoryModel("future").generation_bytes(64, 64, 1, True) == sd15.generation_bytes(
        64, 64, 1, True
    )  # an unknown architecture is estimated as SD 1.5


def test_the_estimate_covers_what_was_measured_on_the_demo_pipeline():
    """Peak RSS above idle of tritonserver and its stubs (sum of VmRSS), one request per fresh
    server (tiny demo, ONNX Runtime CPU, 2 steps; README "Admission by memory")."""
    measured_mb = {  # (side, images, cfg): MB
        (256, 1, True): 206, (256, 1, False): 211, (256, 4, True): 1296,
        (384, 1, True): 852, (384, 2, True): 3002, (512, 1, True): 2506,
    }  # fmt: skip
    demo = MemoryModel(bytes_per_pixel=700)
    for (side, images, cfg), peak in measured_mb.items():
        estimate = demo.generation_bytes(side, side, images, cfg) / MB
        assert peak <= estimate <= 3 * peak, (side, images, cfg, estimate)
    # three admitted together under a 3000 MB budget (the e2e burst): 4 + 4 + 1 images at
    # 256², batched into one growing UNet call; +3451 and +3946 MB in two runs
    together = 2 * demo.generation_bytes(256, 256, 4, True) + demo.generation_bytes(
        256, 256, 1, True
    )
    assert together / MB >= 3946


def test_the_request_estimate_uses_the_generation_size_and_outpainting_bands(service):
    model = memory_model_for(service, MemoryPolicy(bytes_per_pixel=700))
    assert model.bytes_per_pixel == 700 and model.architecture == "sd15"
    assert (
        memory_model_for(service, MemoryPolicy()).bytes_per_pixel == MemoryModel().bytes_per_pixel
    )
    odd = service.parse(wire(steps=2, height=60, width=100))  # padded to 64 x 104
    assert model.request_bytes_of(service, odd) == model.generation_bytes(64, 104, 1, True)
    image = np.zeros((64, 64, 3), np.uint8)
    outpaint = wire(image, np.zeros((64, 64), np.uint8), steps=2, num_images=3)
    outpaint["outpaint"] = np.array([0, 0, 200, 0], np.int32)  # 64 x 264, native 128
    params = service.parse(outpaint)
    band = model.generation_bytes(64, 128, 1, True)  # one band, one image at a time
    assert model.request_bytes_of(service, params) == band + 64 * 64 * 264 * 3


@pytest.mark.parametrize(
    ("size", "ext"),
    [((64, 64), (16, 0, 8, 0)), ((64, 64), (0, 0, 200, 0)), ((96, 64), (64, 64, 64, 64)),
     ((64, 128), (0, 300, 0, 0)), ((128, 128), (128, 128, 128, 128))],
)  # fmt: skip
def test_outpainting_bands_are_the_plan_of_the_canvas(service, size, ext):
    height, width = size
    request = wire(np.zeros((height, width, 3), np.uint8), np.zeros(size, np.uint8), steps=2)
    request["outpaint"] = np.array(ext, np.int32)
    settings = service.outpaint
    canvas = build_canvas(
        np.zeros((height, width, 3), np.uint8), Extension(*ext), overlap=settings.overlap
    )
    native = settings.native
    plan = plan_bands(*canvas.size, canvas.known, native, min(settings.context, native // 4))
    assert outpaint_bands(service, service.parse(request)) == len(plan)


def test_denoising_steps_follow_strength_as_diffusers_truncates(service):
    assert denoising_steps(service, service.parse(wire(steps=50, height=64, width=64))) == 50
    image, mask = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)
    half = service.parse(wire(image, mask, steps=25, strength=0.5))
    assert denoising_steps(service, half) == 12  # int(25 x 0.5)
    short = service.parse(wire(image, mask, steps=3, strength=0.4))
    assert denoising_steps(service, short) == 1  # int(1.2)


def test_the_budget_refuses_what_would_pass_it_and_frees_on_release():
    budget = MemoryBudget(100 * MB)
    budget.reserve(60 * MB)
    with pytest.raises(OverMemoryBudget) as refused:
        budget.reserve(50 * MB)
    message = str(refused.value)
    assert "needs about 50 MB" in message and "budget is 100 MB" in message
    assert "in progress hold 60 MB" in message and "whole budget" not in message
    assert outcome_of(refused.value) == OVERLOADED  # UNAVAILABLE, counted as overloaded
    assert budget.reserved == 60 * MB  # nothing reserved by a refusal
    budget.release(60 * MB)
    budget.reserve(100 * MB)  # exactly the budget fits
    with pytest.raises(OverMemoryBudget, match="more than the whole budget"):
        MemoryBudget(10 * MB).reserve(11 * MB)
    unlimited = MemoryBudget(0)
    unlimited.reserve(1 << 50)
    assert unlimited.reserved == 1 << 50


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("1024", 1024 * MB), (" 512.5 ", int(512.5 * MB)), ("auto", 4096 * MB),
     ("AUTO", 4096 * MB), ("", 4096 * MB)],
)  # fmt: skip
def test_budget_parameter(value, expected):
    budget = PipelineSettings.from_parameters({"memory_budget_mb": value}).memory.budget_mb
    assert budget_bytes(budget, limit_bytes=8192 * MB) == expected


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf", "1e999x"])
def test_budget_parameter_rejects_what_is_not_a_size(value):
    with pytest.raises(ValueError, match="memory_budget_mb"):
        PipelineSettings.from_parameters({"memory_budget_mb": value})


def test_memory_limit_is_the_cgroup_limit_when_lower_than_the_machine(tmp_path: Path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:       16384 kB\nMemFree: 1 kB\n")
    assert memory_limit_bytes(tmp_path) == 16 * MB
    cgroup = tmp_path / "sys/fs/cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text("max\n")  # no limit
    assert memory_limit_bytes(tmp_path) == 16 * MB
    (cgroup / "memory.max").write_text(f"{8 * MB}\n")
    assert memory_limit_bytes(tmp_path) == 8 * MB
    (cgroup / "memory.max").write_text(f"{1 << 62}\n")  # v1 "unlimited" style: the machine's
    assert memory_limit_bytes(tmp_path) == 16 * MB
    assert memory_limit_bytes() > 0  # this machine


def test_config_writes_the_memory_parameters():
    from sdserve_export.triton_configs import pipeline_config

    params = pipeline_config("inpaint", PipelineSettings()).parameters
    assert params["memory_budget_mb"].string_value == "auto"
    assert params["memory_bytes_per_pixel"].string_value == "6000"
    custom = pipeline_config("inpaint", PipelineSettings(memory=MemoryPolicy(budget_mb=0)))
    assert custom.parameters["memory_budget_mb"].string_value == "0"
