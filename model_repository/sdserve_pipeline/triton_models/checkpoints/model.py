"""Triton Python-backend model: lists the repository's checkpoints (`checkpoints`).

Which pipelines are loaded, on disk or in use, and the memory of their component models and
LoRA variants, read at each request (`sdserve_pipeline.checkpoints.describe_checkpoints`);
see `sdserve_protocol.checkpoints` for the answer's form.
"""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from sdserve_pipeline.admission import budget_bytes
from sdserve_pipeline.checkpoints import (
    checkpoint_budget_mb,
    describe_checkpoints,
    registry_snapshot,
    stub_rss_bytes,
)
from sdserve_pipeline.server_state import read_variants, state_dir
from sdserve_protocol.checkpoints import LIST_OUTPUT


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.repository = Path(args["model_repository"]).parent
        self.state_dir = state_dir()
        self.budget = budget_bytes(checkpoint_budget_mb())

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._answer() for _ in requests]

    def _answer(self) -> Any:
        try:
            listing = describe_checkpoints(
                self.repository,
                registry_snapshot(self.state_dir),
                self.budget,
                lambda model: bool(pb_utils.is_model_ready(model_name=model)),
                stub_rss_bytes(os.getppid()),  # the server is every stub's parent
                read_variants(self.state_dir),
            )
        except Exception as err:  # noqa: BLE001 (answer the error, keep serving)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
        text = np.array([json.dumps(listing).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse([pb_utils.Tensor(LIST_OUTPUT, text[np.newaxis])])
