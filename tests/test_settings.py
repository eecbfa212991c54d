"""The pipeline model's config parameters, one typed object (`sdserve_protocol.settings`).

The export writes them with `PipelineSettings.to_parameters`; the pipeline model, the
in-process runner, the SDK and the web UI read them with `from_parameters`.
"""

from __future__ import annotations

import pytest

from sdserve_protocol.rules import Limits
from sdserve_protocol.settings import (
    SCHEDULER_NAMES,
    MemoryPolicy,
    OutpaintSettings,
    PipelineSettings,
    QueuePolicy,
    config_parameters,
    is_pipeline,
)
from sdserve_protocol.sizes import SizeBucket

CUSTOM = PipelineSettings(
    architecture="sdxl",
    components={"text_encoder": "xl_te", "text_encoder_2": "xl_te2", "unet": "xl_unet",
                "vae_encoder": "xl_enc", "vae_decoder": "xl_dec"},
    limits=Limits(max_steps=60, max_guidance_scale=12.5),
    feather_radius=7,
    queue=QueuePolicy(max_active=3, max_queue_size=9, timeout_s=2.5, join_wait_ms=0),
    memory=MemoryPolicy(budget_mb=1536.5, bytes_per_pixel=700),
    outpaint=OutpaintSettings(native=1024, overlap=8, context=64, fill="blur"),
    schedulers=("euler", "ddim"),
    size_buckets=(SizeBucket(896, 1152), SizeBucket(1024, 1024)),
    max_batch={"unet": 4, "vae_decoder": 2},
    load_on_demand=True,
)  # fmt: skip


def test_every_setting_round_trips_through_the_parameters() -> None:
    params = CUSTOM.to_parameters()
    assert all(isinstance(v, str) for v in params.values())
    assert params["size_buckets"] == "1152x896,1024x1024"  # WIDTHxHEIGHT, by (height, width)
    assert params["queue_timeout_s"] == "2.5" and params["join_wait_ms"] == "0"
    assert params["max_unet_batch"] == "4" and params["unet_model"] == "xl_unet"
    assert params["load_on_demand"] == "true"
    assert PipelineSettings.from_parameters(params) == CUSTOM
    assert PipelineSettings.from_parameters(params, strict=False) == CUSTOM


def test_absent_parameters_read_as_the_defaults() -> None:
    default = PipelineSettings()
    assert PipelineSettings.from_parameters({}) == default
    assert default.schedulers == SCHEDULER_NAMES and default.size_buckets == ()
    assert default.component_model("unet") == "unet"
    assert PipelineSettings.from_parameters(default.to_parameters()) == default


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("limit_max_pixels", "lots", "parameter limit_max_pixels: 'lots' is not valid"),
        ("feather_radius", "4.5", "parameter feather_radius: '4.5'"),
        ("memory_budget_mb", "-1", "parameter memory_budget_mb: '-1'"),
        ("memory_budget_mb", "nan", "parameter memory_budget_mb: 'nan'"),
        ("size_buckets", "512", "parameter size_buckets: '512'"),
        ("outpaint_fill", "mirror", "parameter outpaint_fill: 'mirror'"),
        ("architecture", "sd3", "parameter architecture: 'sd3'"),
        ("schedulers", "ddim,warp_drive", "schedulers: 'ddim,warp_drive' lists unknown warp_drive"),
        ("schedulers", " , ", "lists no name"),
        ("load_on_demand", "sometimes", "parameter load_on_demand: 'sometimes'"),
    ],
)
def test_a_bad_value_fails_the_server_and_keeps_the_default_in_a_client(key, value, message):
    params = {**PipelineSettings().to_parameters(), key: value}
    with pytest.raises(ValueError, match=message):
        PipelineSettings.from_parameters(params)
    lenient = PipelineSettings.from_parameters(params, strict=False)
    if key != "schedulers":  # a client takes the server's list as it is (a newer server's too)
        assert lenient == PipelineSettings()


def test_schedulers_are_read_in_lower_case_without_blanks_or_repeats() -> None:
    read = PipelineSettings.from_parameters({"schedulers": " Euler, ddim,,euler"})
    assert read.schedulers == ("euler", "ddim")


BUDGETS = [("auto", "auto"), ("", "auto"), (" AUTO ", "auto"), ("0", 0), ("1024", 1024),
           ("512.5", 512.5)]  # fmt: skip


@pytest.mark.parametrize(("text", "budget"), BUDGETS)
def test_memory_budget_is_auto_or_megabytes(text: str, budget: float | str) -> None:
    assert PipelineSettings.from_parameters({"memory_budget_mb": text}).memory.budget_mb == budget


def test_is_pipeline_is_naming_every_shared_component() -> None:
    assert is_pipeline(CUSTOM.to_parameters())
    roles = {"text_encoder_model": "a", "unet_model": "b", "vae_encoder_model": "c"}
    assert not is_pipeline(roles)
    assert is_pipeline({**roles, "vae_decoder_model": "d"})


def test_config_parameters_read_the_json_config_empty_values_included() -> None:
    """`get_model_config(as_json=True)` (SDK) and a Python backend's `model_config` (server)
    both drop an empty `string_value`; it reads as "" on both sides."""
    config = {"parameters": {"limit_max_steps": {"string_value": "7"}, "size_buckets": {}}}
    assert config_parameters(config) == {"limit_max_steps": "7", "size_buckets": ""}
    assert PipelineSettings.from_parameters(config_parameters(config)).limits.max_steps == 7
    assert config_parameters({}) == {}


def test_the_exported_config_holds_exactly_the_settings(export_reports) -> None:
    from sdserve_export.triton_configs import parse_pbtxt, pipeline_config

    repository, _ = export_reports
    config = parse_pbtxt((repository / "inpaint" / "config.pbtxt").read_text())
    params = config_parameters(config)  # a ModelConfig protobuf, read as JSON configs are
    assert params == {k: v.string_value for k, v in config.parameters.items()}
    settings = PipelineSettings.from_parameters(params)
    assert settings.architecture == "sd15" and settings.outpaint.native == 128  # demo size
    assert set(settings.components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert params == settings.to_parameters()
    written = pipeline_config("x", CUSTOM).parameters
    assert {k: v.string_value for k, v in written.items()} == CUSTOM.to_parameters()
