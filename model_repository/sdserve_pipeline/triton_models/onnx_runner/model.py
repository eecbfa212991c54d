"""Triton Python-backend model: one exported component on ONNX Runtime.

Generic: tensor names come from this model's config (generated from the component spec);
the session from its parameters (`sdserve_pipeline.onnx_runtime.RunnerSettings`).

A call's adapter set (`ADAPTERS_PARAMETER`) picks a weight variant, the sets the pipeline's
running requests hold (`HELD_PARAMETER`) stay cached; a set it cannot use (a bad set, an
adapter removed or replaced by a bad file) is answered INVALID_ARG with a message that starts
with `ADAPTER_REFUSED`, which the pipeline answers its request with.

A call's checkpoint (`CHECKPOINT_PARAMETER`, sent by a pipeline exported with
`--share-graph-with`) runs this model's graph on that checkpoint's weights
(`sdserve_pipeline.shared_graph`); one it cannot use (a bad name, no weights file, weights of
another graph) is answered INVALID_ARG with a message that starts with `WEIGHTS_REFUSED`.
"""

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from sdserve_pipeline.onnx_runtime import (
    ADAPTER_REFUSED,
    ADAPTERS_PARAMETER,
    HELD_PARAMETER,
    AdapterError,
    RunnerSettings,
    decode_adapter_set,
    decode_held_sets,
)
from sdserve_pipeline.server_state import state_dir, write_variants
from sdserve_pipeline.shared_graph import (
    CHECKPOINT_PARAMETER,
    WEIGHTS_REFUSED,
    CheckpointWeightsError,
)
from sdserve_protocol.settings import config_parameters


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        settings = RunnerSettings.from_parameters(config_parameters(config))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.session = settings.session(version_dir)
        self.variants = settings.variants(version_dir, self.session)  # LoRA, checkpoints
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.model_name = args["model_name"]
        self.listed: list[Any] = []  # the variants last written for the checkpoint listing

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._run(request) for request in requests]

    def _run(self, request: Any) -> Any:
        try:
            feeds = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            }
            parameters = json.loads(request.parameters() or "{}")
            adapters = parameters.get(ADAPTERS_PARAMETER)
            checkpoint = str(parameters.get(CHECKPOINT_PARAMETER, ""))
            if adapters or checkpoint:
                held = decode_held_sets(parameters.get(HELD_PARAMETER, "[]"))
                adapter_set = decode_adapter_set(adapters) if adapters else ()
                with self.variants.session(adapter_set, held, checkpoint) as session:
                    outputs = session.run(self.output_names, feeds)
                self._list_variants()
            else:
                outputs = self.session.run(self.output_names, feeds)
        except AdapterError as err:  # the caller's adapter set (never raised by ORT)
            return _refused(f"{ADAPTER_REFUSED}{err}")
        except CheckpointWeightsError as err:  # the caller's checkpoint (never raised by ORT)
            return _refused(f"{WEIGHTS_REFUSED}{err}")
        except Exception as err:  # a bad tensor must not take the instance down
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{type(err).__name__}: {err}")
            )
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(n, o) for n, o in zip(self.output_names, outputs, strict=True)]
        )

    def _list_variants(self) -> None:
        """Record the cached variants for `sdserve-client models` when they changed."""
        variants = self.variants.describe()
        if variants != self.listed:
            write_variants(state_dir(), self.model_name, variants)
            self.listed = variants


def _refused(message: str) -> Any:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )
