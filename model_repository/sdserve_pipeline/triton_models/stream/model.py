"""Triton Python-backend model (decoupled): a pipeline model's requests, streamed.

A client's request (the pipeline's wire inputs, over gRPC's bidirectional stream) is handed
to the pipeline model (`parameters.pipeline_model`) by BLS with a random `stream_id`, so the
pipeline's continuous batcher serves it beside unary requests. The pipeline sends the
requests' events back here (`Queued`, `Progress`, `Preview`: `sdserve_protocol.events`),
several streams' events of one kind in one BLS request, each with its `stream_id`; each is
forwarded to its client at once, and the call is answered with `cancelled` per event (that
client closed the stream or cancelled), which stops its request at its next step. The
pipeline's answer is the stream's last response: the images with `event` = "result", or its
error, whose message starts with its gRPC status (`events.stream_error_text`).
"""

import json
import secrets
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from sdserve_protocol.contract import OUTPUTS
from sdserve_protocol.events import (
    CANCELLED,
    ERROR_STATUS,
    RESULT,
    STREAM_ID,
    parse_stream_error,
    stream_error_text,
    text_of,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.pipeline = config["parameters"]["pipeline_model"]["string_value"]
        self.streams: dict[str, tuple[Any, Any]] = {}  # stream_id → (sender, request)
        self.lock = threading.Lock()
        # TritonError code → its name (pb_utils has TritonError only once initialized)
        self.code_names = {getattr(pb_utils.TritonError, name): name for name in ERROR_STATUS}

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            stream = pb_utils.get_input_tensor_by_name(request, STREAM_ID.name)
            if stream is None:
                threading.Thread(target=self._forward, args=(request, sender), daemon=True).start()
            else:
                ids = [text_of(one) for one in stream.as_numpy().reshape(-1)]
                self._event(request, sender, ids)
        return None

    def _event(self, request: Any, sender: Any, stream_ids: list[str]) -> None:
        """Events from the pipeline, one per stream: each to its client, if still there."""
        tensors = [t for t in request.inputs() if t.name() != STREAM_ID.name]
        cancelled = []
        for i, stream_id in enumerate(stream_ids):
            with self.lock:
                client = self.streams.get(stream_id)
            gone = client is None or bool(client[1].is_cancelled())
            if client is not None and not gone:
                event = [pb_utils.Tensor(t.name(), t.as_numpy()[:, i]) for t in tensors]
                try:
                    client[0].send(pb_utils.InferenceResponse(event))
                except Exception:  # noqa: BLE001 (the client went away)
                    gone = True
            cancelled.append(gone)
        answer = pb_utils.Tensor(CANCELLED.name, np.asarray([cancelled], dtype=np.bool_))
        sender.send(pb_utils.InferenceResponse([answer]), flags=FINAL)

    def _forward(self, request: Any, sender: Any) -> None:
        """The client's request through the pipeline; its answer is the stream's last."""
        stream_id = secrets.token_hex(16)
        with self.lock:
            self.streams[stream_id] = (sender, request)
        try:
            inputs = [pb_utils.Tensor(t.name(), t.as_numpy()) for t in request.inputs()]
            inputs.append(
                pb_utils.Tensor(STREAM_ID.name, np.asarray([[stream_id.encode()]], np.object_))
            )
            response = pb_utils.InferenceRequest(
                model_name=self.pipeline,
                inputs=inputs,
                requested_output_names=[t.name for t in OUTPUTS],
                timeout=request.timeout(),
            ).exec()
        except Exception as err:  # noqa: BLE001
            response = pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(err), pb_utils.TritonError.INTERNAL)
            )
        finally:
            with self.lock:
                self.streams.pop(stream_id, None)
        if response.has_error():  # its status leads the message: a stream carries only that
            error = response.error()
            if parse_stream_error(error.message())[0] is None:  # not the pipeline's own
                text = stream_error_text(
                    self.code_names.get(error.code(), "INTERNAL"), error.message()
                )
                error = pb_utils.TritonError(text, error.code())
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
            return
        kind = pb_utils.Tensor("event", np.asarray([[RESULT.encode()]], dtype=np.object_))
        sender.send(pb_utils.InferenceResponse([*response.output_tensors(), kind]), flags=FINAL)
