"""Run a built model repository in-process: the pipeline model's code on ORT sessions.

Same parameters, same assets and same loop as inside tritonserver, minus Triton; used by
the parity tests and the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sdserve_pipeline.assets import ASSETS_DIR, VERSION
from sdserve_pipeline.components import ComponentSpec
from sdserve_pipeline.onnx_runtime import RunnerSettings
from sdserve_pipeline.ort_runner import OrtRunner
from sdserve_pipeline.service import PipelineService
from sdserve_protocol.settings import PipelineSettings, config_parameters


def read_parameters(model_dir: Path) -> dict[str, str]:
    """Parameters of the `config.pbtxt` in a Triton model folder."""
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    return config_parameters(config)


def load_service(repository: str | Path, pipeline: str = "inpaint") -> PipelineService:
    """The pipeline model `pipeline` of a built repository, on in-process ORT sessions (a
    shared-graph checkpoint's components on its weights, as its BLS calls ask for)."""
    repository = Path(repository)
    pipeline_dir = repository / pipeline
    settings = PipelineSettings.from_parameters(read_parameters(pipeline_dir))
    checkpoint = pipeline if settings.shared_graph else ""

    def make_runner(spec: ComponentSpec, model_name: str) -> OrtRunner:
        runner = RunnerSettings.from_parameters(read_parameters(repository / model_name))
        version_dir = repository / model_name / VERSION
        session = runner.session(version_dir)
        return OrtRunner(spec, session, runner.variants(version_dir, session), checkpoint)

    return PipelineService.from_settings(settings, pipeline_dir / VERSION / ASSETS_DIR, make_runner)
