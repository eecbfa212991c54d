"""Component runner settings: boolean config parameters and ONNX Runtime session options."""

from __future__ import annotations

import pytest

from sdserve_pipeline.onnx_runtime import create_session
from sdserve_pipeline.triton_params import flag


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), (" No ", False)],
)
def test_flag_reads_booleans(value: str, expected: bool) -> None:
    assert flag({"allow_spinning": value}, "allow_spinning", default=not expected) is expected


def test_flag_defaults_when_absent_and_rejects_anything_else() -> None:
    assert flag({}, "allow_spinning", default=True) is True
    with pytest.raises(ValueError, match="'off' is not a boolean"):
        flag({"allow_spinning": "off"}, "allow_spinning", default=True)


@pytest.mark.parametrize("spinning", [True, False])
def test_session_spinning_follows_the_setting(repository, spinning: bool) -> None:
    session = create_session(
        repository / "vae_encoder" / "1" / "model.onnx", intra_op_threads=1, allow_spinning=spinning
    )
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spinning))
    assert options.intra_op_num_threads == 1
