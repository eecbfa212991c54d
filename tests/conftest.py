"""Shared fixtures: the tiny demo pipeline, its exported repository, diffusers references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: starts a real tritonserver on 127.0.0.1")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (TensorRT, CUDA EP)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def demo_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdserve_export.demo_pipeline import save_demo_pipeline

    return save_demo_pipeline(tmp_path_factory.mktemp("demo") / "demo-pipeline")


@pytest.fixture(scope="session")
def export_reports(demo_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from sdserve_export.repository import build_repository

    out = tmp_path_factory.mktemp("repo") / "model_repository"
    reports = build_repository(demo_pipeline_dir, out, log=lambda _msg: None)
    return out, reports


@pytest.fixture(scope="session")
def repository(export_reports) -> Path:
    return export_reports[0]


@pytest.fixture(scope="session")
def diffusers_pipe(demo_pipeline_dir: Path):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(demo_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def service(repository: Path):
    from sdserve_pipeline.inprocess import load_service

    return load_service(repository)


@pytest.fixture(scope="session")
def base_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo pipeline as a standard 4-channel text-to-image checkpoint."""
    from sdserve_export.demo_pipeline import save_demo_pipeline

    return save_demo_pipeline(tmp_path_factory.mktemp("demo4") / "base-pipeline", in_channels=4)


@pytest.fixture(scope="session")
def combined_repository(repository: Path, base_pipeline_dir: Path, tmp_path_factory) -> Path:
    """One repository serving `inpaint` (9-channel) and `sd15_base` (4-channel) side by side."""
    import shutil

    from sdserve_export.repository import build_repository

    out = tmp_path_factory.mktemp("combined") / "model_repository"
    shutil.copytree(repository, out)
    build_repository(
        base_pipeline_dir, out, pipeline_name="sd15_base", component_prefix="base_",
        log=lambda _msg: None,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def base_service(combined_repository: Path):
    from sdserve_pipeline.inprocess import load_service

    return load_service(combined_repository, "sd15_base")


# SDXL: the tiny SDXL inpainting demo, served beside SD 1.5 from one repository.


@pytest.fixture(scope="session")
def demo_xl_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdserve_export.demo_pipeline import save_demo_xl_pipeline

    return save_demo_xl_pipeline(tmp_path_factory.mktemp("demo-xl") / "demo-pipeline-xl")


@pytest.fixture(scope="session")
def xl_export(repository: Path, demo_xl_pipeline_dir: Path, tmp_path_factory):
    """(repository with `inpaint` + `inpaint_xl` (components `xl_*`), the XL parity reports)."""
    import shutil

    from sdserve_export.repository import build_repository

    out = tmp_path_factory.mktemp("with-xl") / "model_repository"
    shutil.copytree(repository, out)
    reports = build_repository(
        demo_xl_pipeline_dir, out, pipeline_name="inpaint_xl", component_prefix="xl_",
        log=lambda _msg: None,
    )  # fmt: skip
    return out, reports


@pytest.fixture(scope="session")
def xl_repository(xl_export) -> Path:
    return xl_export[0]


@pytest.fixture(scope="session")
def xl_service(xl_repository: Path):
    from sdserve_pipeline.inprocess import load_service

    return load_service(xl_repository, "inpaint_xl")


@pytest.fixture(scope="session")
def diffusers_xl_pipe(demo_xl_pipeline_dir: Path):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(demo_xl_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A preview decoder (tiny random AutoencoderTiny, TAESD's architecture): the demo pipeline
# exported with `--preview-decoder`.


@pytest.fixture(scope="session")
def preview_decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdserve_export.demo_pipeline import save_demo_preview_decoder

    return save_demo_preview_decoder(tmp_path_factory.mktemp("taesd") / "preview-decoder")


@pytest.fixture(scope="session")
def taesd_export(demo_pipeline_dir: Path, preview_decoder_dir: Path, tmp_path_factory):
    """(repository of the demo pipeline with its preview decoder, the parity reports)."""
    from sdserve_export.repository import build_repository

    out = tmp_path_factory.mktemp("repo-taesd") / "model_repository"
    reports = build_repository(
        demo_pipeline_dir, out, preview_decoder=preview_decoder_dir, log=lambda _msg: None
    )
    return out, reports


@pytest.fixture(scope="session")
def taesd_repository(taesd_export) -> Path:
    return taesd_export[0]


@pytest.fixture(scope="session")
def taesd_service(taesd_repository: Path):
    from sdserve_pipeline.inprocess import load_service

    return load_service(taesd_repository)


@pytest.fixture(scope="session")
def adapters_dir(repository: Path, demo_pipeline_dir: Path) -> Path:
    """The demo repository's adapter folder with the test adapters (diffusers and kohya
    layouts; UNet attention and convs, text encoder)."""
    from sdserve_export.demo_adapters import (
        TEXT_ATTENTION,
        UNET_ATTENTION,
        UNET_WITH_CONV,
        make_adapter,
    )

    folder = repository / "inpaint" / "adapters"
    made = {
        "unet_convs": dict(unet=UNET_WITH_CONV, seed=1),
        "with_text": dict(unet=UNET_ATTENTION, text=TEXT_ATTENTION, seed=2, rank=2, alpha=4),
        "text_only": dict(unet=(), text=TEXT_ATTENTION, seed=3, strength=0.1),
        "kohya": dict(unet=UNET_WITH_CONV, text=TEXT_ATTENTION, seed=4, kohya=True),
    }
    for name, kwargs in made.items():
        make_adapter(demo_pipeline_dir, folder / f"{name}.safetensors", **kwargs)
    return folder
