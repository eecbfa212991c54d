"""Triton Python-backend model: lists the LoRA adapters of a pipeline (`<pipeline>_adapters`).

Reads the adapter folder at each request (`sdserve_pipeline.adapters.AdapterCatalog`), so a
file added or removed shows at once; see `sdserve_protocol.adapters` for the answer's form.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from sdserve_pipeline.adapters import LORA_COMPONENTS, describe_catalog
from sdserve_pipeline.service import adapter_catalog
from sdserve_protocol.adapters import LIST_OUTPUT
from sdserve_protocol.settings import config_parameters


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = config_parameters(json.loads(args["model_config"]))
        pipeline_dir = Path(args["model_repository"]).parent / params["pipeline_model"]
        architecture = params["architecture"]
        models = {c: params.get(f"lora_{c}", c) for c in LORA_COMPONENTS.get(architecture, ())}
        self.catalog = adapter_catalog(pipeline_dir, models, architecture)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._answer() for _ in requests]

    def _answer(self) -> Any:
        try:
            listing = describe_catalog(self.catalog)
        except Exception as err:  # noqa: BLE001 (answer the error, keep serving)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
        text = np.array([json.dumps(listing).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse([pb_utils.Tensor(LIST_OUTPUT, text[np.newaxis])])
