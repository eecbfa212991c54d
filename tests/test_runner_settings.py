"""Component runner settings: its config parameters and the ONNX Runtime session they make."""

from __future__ import annotations

import pytest

from sdserve_pipeline.onnx_runtime import RunnerSettings


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), (" No ", False)],
)
def test_allow_spinning_reads_booleans(value: str, expected: bool) -> None:
    assert RunnerSettings.from_parameters({"allow_spinning": value}).allow_spinning is expected


def test_absent_parameters_keep_the_defaults_and_bad_ones_fail() -> None:
    assert RunnerSettings.from_parameters({}) == RunnerSettings()
    with pytest.raises(ValueError, match="not a boolean"):
        RunnerSettings.from_parameters({"allow_spinning": "off"})
    with pytest.raises(ValueError, match="'many'"):
        RunnerSettings.from_parameters({"intra_op_threads": "many"})


def test_parameters_round_trip() -> None:
    settings = RunnerSettings(
        "unet.onnx", ("CUDAExecutionProvider", "CPUExecutionProvider"), 3, True
    )
    params = settings.to_parameters()
    assert params["execution_providers"] == "CUDAExecutionProvider,CPUExecutionProvider"
    assert RunnerSettings.from_parameters(params) == settings


@pytest.mark.parametrize("spinning", [True, False])
def test_session_follows_the_settings(repository, spinning: bool) -> None:
    settings = RunnerSettings(intra_op_threads=1, allow_spinning=spinning)
    session = settings.session(repository / "vae_encoder" / "1")
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spinning))
    assert options.intra_op_num_threads == 1
