"""The server takes only the protocol from the client side, and the protocol stays light.

Each check runs in a fresh interpreter, so what is imported is exactly what one import pulls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_MODELS = ROOT / "model_repository" / "sdserve_pipeline" / "triton_models"

# Loads a Triton Python-backend model file as the backend stub does, with a stand-in for the
# stub's own `triton_python_backend_utils`, then lists the top-level packages imported.
LOAD_MODEL = """
import importlib.util, json, sys, types
utils = types.ModuleType("triton_python_backend_utils")
utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
sys.modules["triton_python_backend_utils"] = utils
spec = importlib.util.spec_from_file_location("model", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""
IMPORT = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def imported(script: str, argument: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", script, argument], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("model", ["pipeline", "onnx_runner", "adapters"])
def test_a_model_stub_imports_no_client_sdk_ui_or_tritonclient(model: str) -> None:
    packages = imported(LOAD_MODEL, str(TRITON_MODELS / model / "model.py"))
    assert {"sdserve_pipeline", "sdserve_protocol"} <= packages
    assert not packages & {"sdserve_client", "tritonclient", "gradio"}


def test_the_runner_stub_imports_no_torch() -> None:
    assert "torch" not in imported(LOAD_MODEL, str(TRITON_MODELS / "onnx_runner" / "model.py"))


@pytest.mark.parametrize(
    "module",
    ["sdserve_protocol.contract", "sdserve_protocol.settings", "sdserve_protocol.canvas",
     "sdserve_protocol.metrics", "sdserve_protocol.auth", "sdserve_protocol.adapters"],
)  # fmt: skip
def test_the_protocol_imports_neither_tritonclient_nor_gradio_nor_torch(module: str) -> None:
    packages = imported(IMPORT, module)
    assert not packages & {"tritonclient", "gradio", "torch", "sdserve_client", "sdserve_pipeline"}
