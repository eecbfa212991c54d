"""A Gradio web UI over the sdserve gRPC SDK (optional extra: `pip install "./client[ui]"`).

Start it with `python -m sdserve_client.webui --server 127.0.0.1:8001`. `callbacks`,
`backend` and `server_info` import no Gradio; `app` does.
"""

from .callbacks import Generation, Settings, UIError, error_message, make_settings
from .server_info import ModelInfo, QueueState, pipeline_models

__all__ = [
    "Generation",
    "ModelInfo",
    "QueueState",
    "Settings",
    "UIError",
    "error_message",
    "make_settings",
    "pipeline_models",
]
