"""The GPU production path, checked on the CPU wherever a CPU can check it.

Engine profiles and plan names (`sdserve_export.engine_profiles`, `plan_names`), the GPU
repository variants (`built_repository`, `gpu_variant`, `engine_targets`, `engine_store`,
the `gpu-repository` command), the rows per component call the specs declare, the Docker
image, its entrypoint, the compose file and the Kubernetes manifests (`docker/`). Tests
marked `gpu` build real TensorRT engines from the demo repository and compare them with ONNX
Runtime; they skip cleanly without TensorRT or a CUDA device.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from cases import make_case
from google.protobuf import text_format
from helpers import Spy, wire
from tritonclient.grpc import model_config_pb2 as mc

from sdserve_export import (
    built_repository,
    cli,
    engine_parity,
    engine_profiles,
    engine_store,
    engine_targets,
    gpu_variant,
    plan_names,
    tensorrt_build,
)
from sdserve_pipeline.components import (
    CLIP_VOCAB_SIZE,
    EXAMPLE_MAX_CLIP_SKIP,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_XL,
    UNET,
    UNET_XL,
    VAE_DECODER,
    VAE_ENCODER,
    components_for,
)
from sdserve_protocol.sizes import SizeBucket, parse_buckets

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
SD15_SIZES = {
    "sequence_length": 77,
    "hidden_size": 768,
    "unet_in_channels": 9,
    "latent_channels": 4,
    "image_channels": 3,
}
SDXL_SIZES = {  # SDXL base / inpainting
    "sequence_length": 77,
    "hidden_size": 768,
    "hidden_size_2": 1280,
    "projection_dim": 1280,
    "cross_attention_dim": 2048,
    "time_ids": 6,
    "unet_in_channels": 9,
    "latent_channels": 4,
    "image_channels": 3,
}
SQUARE_128 = SizeBucket(height=128, width=128)  # the demo checkpoints' own size
TRITON_PORTS = {8000, 8001, 8002}
# NGC Triton release → TensorRT major.minor of its backend (release notes).
TRITON_TENSORRT = {"24.10": "10.5"}
KEY = plan_names.EngineKey(
    component="unet",
    trt_version="10.5.0",
    compute_capability=(9, 0),
    precision="fp16",
    batch=(2, 2, 8),
    profiles=("512x512", "768x768"),
    onnx_digest="0123456789ab",
)


# ------------------------------------------------------------------------------ profiles


def test_unet_profiles_are_static_buckets_with_cfg_batches() -> None:
    buckets = [SizeBucket(height=512, width=512), SizeBucket(height=896, width=1152)]
    profiles = engine_profiles.derive_profiles(UNET, SD15_SIZES, buckets, vae_scale_factor=8)

    assert [p.name for p in profiles] == ["512x512", "1152x896"]
    square, wide = profiles
    assert square.shapes["sample"] == engine_profiles.ShapeRange(
        (2, 9, 64, 64), (2, 9, 64, 64), (8, 9, 64, 64)
    )
    assert wide.shapes["sample"].max == (8, 9, 112, 144)  # (B, C, H/8, W/8)
    assert square.shapes["timestep"] == engine_profiles.ShapeRange((2,), (2,), (8,))
    text = engine_profiles.ShapeRange((2, 77, 768), (2, 77, 768), (8, 77 * 4, 768))
    assert square.shapes["encoder_hidden_states"] == text  # one to limit_max_prompt_chunks
    for profile in profiles:
        assert list(profile.shapes) == UNET.input_names
        for name, shape in profile.shapes.items():
            fixed = 2 if name == "encoder_hidden_states" else 1  # batch (and text length) vary
            assert shape.min[fixed:] == shape.opt[fixed:] == shape.max[fixed:]
            assert all(b % 2 == 0 for b in (shape.min[0], shape.opt[0], shape.max[0]))


def test_unet_batch_range_comes_from_spec_in_units_of_two() -> None:
    assert engine_profiles.batch_range(UNET).as_tuple() == UNET.trt_batch
    assert engine_profiles.batch_range(UNET).unit == 2
    with pytest.raises(ValueError, match="units of 2"):
        engine_profiles.batch_range(UNET, (1, 2, 8))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        engine_profiles.BatchRange(4, 2, 8)


def test_vae_profiles_use_pixel_and_latent_sizes() -> None:
    bucket = [SizeBucket(height=1216, width=832)]
    (encoder,) = engine_profiles.derive_profiles(
        VAE_ENCODER, SD15_SIZES, bucket, vae_scale_factor=8
    )
    (decoder,) = engine_profiles.derive_profiles(
        VAE_DECODER, SD15_SIZES, bucket, vae_scale_factor=8
    )

    assert encoder.shapes["image"].opt == (1, 3, 1216, 832)  # (B, 3, H, W)
    assert decoder.shapes["latent_sample"].opt == (1, 4, 152, 104)  # (B, 4, H/8, W/8)
    assert decoder.shapes["latent_sample"].max == (4, 4, 152, 104)


def test_text_encoder_has_one_static_profile_with_fixed_sequence() -> None:
    (profile,) = engine_profiles.derive_profiles(
        TEXT_ENCODER, SD15_SIZES, engine_profiles.DEFAULT_BUCKETS
    )
    assert profile.name == engine_profiles.STATIC_PROFILE
    assert profile.shapes == {
        "input_ids": engine_profiles.ShapeRange((1, 77), (1, 77), (4, 77)),
        "clip_skip": engine_profiles.ShapeRange((1,), (1,), (4,)),  # one per row
    }


def test_default_buckets_are_sd_and_sdxl_sizes_on_the_latent_grid() -> None:
    names = {b.name for b in engine_profiles.DEFAULT_BUCKETS}
    assert {"512x512", "768x768", "1024x1024", "1152x896", "896x1152"} <= names
    assert {"1216x832", "832x1216", "1344x768", "768x1344"} <= names
    for (
        bucket
    ) in engine_profiles.DEFAULT_BUCKETS:  # latents divisible by 8: three UNet downsamplings
        assert all(side % 8 == 0 for side in bucket.latent(8))


def test_size_bucket_parsing_and_latent_checks() -> None:
    assert SizeBucket.parse("1152x896") == SizeBucket(height=896, width=1152)
    assert parse_buckets("768x768, 512x512,512x512") == (
        SizeBucket(height=512, width=512),
        SizeBucket(height=768, width=768),
    )
    assert SizeBucket(height=768, width=1344).latent(8) == (96, 168)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        SizeBucket.parse("512")
    with pytest.raises(ValueError, match="multiple of the VAE scale factor"):
        SizeBucket(height=512, width=500).latent(8)


def test_sizes_from_config_reads_fixed_dims_and_rejects_drift() -> None:
    dims = {"input_ids": [-1, 77], "clip_skip": [-1], "last_hidden_state": [-1, 77, 768]}
    assert engine_profiles.sizes_from_config(TEXT_ENCODER, dims) == {
        "sequence_length": 77,
        "hidden_size": 768,
    }
    with pytest.raises(ValueError, match="both 77 and 64"):
        engine_profiles.sizes_from_config(
            TEXT_ENCODER, {**dims, "last_hidden_state": [-1, 64, 768]}
        )
    with pytest.raises(ValueError, match="not in"):
        engine_profiles.sizes_from_config(TEXT_ENCODER, {"input_ids": [-1, 77]})


def test_sdxl_vae_is_kept_fp32_by_default() -> None:
    assert engine_profiles.default_fp32_components(0.13025) == {"vae_encoder", "vae_decoder"}
    assert engine_profiles.default_fp32_components(0.18215) == frozenset()
    assert engine_profiles.default_fp32_components(0.18215, "sdxl") == {
        "vae_encoder",
        "vae_decoder",
    }


def test_profile_inputs_follow_the_spec() -> None:
    (profile,) = engine_profiles.derive_profiles(
        UNET, SD15_SIZES, [SizeBucket(height=512, width=512)]
    )
    inputs = engine_parity.profile_inputs(UNET, profile)
    assert inputs["sample"].shape == (2, 9, 64, 64) and inputs["sample"].dtype == np.float32
    assert ((inputs["timestep"] >= 0) & (inputs["timestep"] < 1000)).all()
    (static,) = engine_profiles.derive_profiles(TEXT_ENCODER, SD15_SIZES)
    ids = engine_parity.profile_inputs(TEXT_ENCODER, static)["input_ids"]
    assert ids.shape == (1, 77) and ids.dtype == np.int64 and ids.max() < CLIP_VOCAB_SIZE
    (max_batch,) = engine_profiles.derive_profiles(
        TEXT_ENCODER, SD15_SIZES, batch=engine_profiles.BatchRange(64, 64, 64)
    )
    skips = engine_parity.profile_inputs(TEXT_ENCODER, max_batch)["clip_skip"]
    assert skips.shape == (64,) and skips.dtype == np.int64  # per row, within the layers
    assert set(skips.tolist()) == set(range(EXAMPLE_MAX_CLIP_SKIP + 1))
    (wide,) = engine_profiles.derive_profiles(
        UNET_XL, SDXL_SIZES, [SizeBucket(height=640, width=1536)]
    )
    time_ids = engine_parity.profile_inputs(UNET_XL, wide)["time_ids"]
    assert time_ids.tolist() == [[640, 1536, 0, 0, 640, 1536]] * 2  # (H, W, crop, H, W)


def test_compare_outputs_flags_nan_and_shape_mismatch() -> None:
    want = {"x": np.ones((2, 3), np.float32)}
    assert engine_parity.compare_outputs({"x": np.ones((2, 3), np.float32) * 1.5}, want) == (
        0.5,
        1.0,
    )
    assert engine_parity.compare_outputs({"x": np.full((2, 3), np.nan, np.float32)}, want)[
        0
    ] == float("inf")
    assert engine_parity.compare_outputs({"x": np.ones((3, 2), np.float32)}, want)[0] == float(
        "inf"
    )
    parity = engine_parity.EngineParity("unet", "512x512", float("inf"), 1.0, 1.0)
    assert not parity.ok


# ---------------------------------------------------------------------------- plan naming


def test_plan_name_round_trip() -> None:
    assert KEY.filename == "unet.trt10.5.0.sm90.fp16.b2-8.512x512_768x768.onnx-0123456789ab.plan"
    assert plan_names.EngineKey.parse(KEY.filename) == KEY
    other = plan_names.EngineKey(
        "base_vae_decoder", "10.13.0", (12, 0), "fp32", (1, 2, 4), ("static",), "f" * 12
    )
    assert ".sm120." in other.filename and ".b1-2-4." in other.filename
    assert plan_names.EngineKey.parse(other.filename) == other


@pytest.mark.parametrize(
    "name",
    [
        "unet.plan",
        "unet.trt10.5.sm90.fp16.b2-8.512x512.onnx-0123456789ab.plan",
        "unet.trt10.5.0.sm90.int8.b2-8.512x512.onnx-0123456789ab.plan",
        "unet.trt10.5.0.sm90.fp16.b2.512x512.onnx-0123456789ab.plan",
        "unet.trt10.5.0.sm90.fp16.b2-8.512x512.plan",
    ],
)
def test_plan_name_parser_rejects_other_names(name: str) -> None:
    with pytest.raises(ValueError):
        plan_names.EngineKey.parse(name)


def test_find_engine_accepts_exact_matches_only(tmp_path: Path) -> None:
    variants = [
        plan_names.EngineKey(**{**KEY.__dict__, "trt_version": "10.6.0"}),
        plan_names.EngineKey(**{**KEY.__dict__, "compute_capability": (8, 0)}),
        plan_names.EngineKey(**{**KEY.__dict__, "precision": "fp32"}),
        plan_names.EngineKey(**{**KEY.__dict__, "batch": (2, 2, 16)}),
        plan_names.EngineKey(**{**KEY.__dict__, "profiles": ("512x512",)}),
        plan_names.EngineKey(**{**KEY.__dict__, "onnx_digest": "ba9876543210"}),
    ]
    for key in variants:
        (tmp_path / key.filename).write_bytes(b"plan")
    (tmp_path / "unet.plan").write_bytes(b"plan")
    assert plan_names.find_engine(tmp_path, KEY) is None
    assert set(plan_names.stale_engines(tmp_path, KEY)) == {tmp_path / k.filename for k in variants}

    (tmp_path / KEY.filename).write_bytes(b"")  # an interrupted copy is not an engine
    assert plan_names.find_engine(tmp_path, KEY) is None
    (tmp_path / KEY.filename).write_bytes(b"plan")
    assert plan_names.find_engine(tmp_path, KEY) == tmp_path / KEY.filename


def test_versions_and_capabilities_are_normalised() -> None:
    assert plan_names.normalize_trt_version("10.5.0.18") == "10.5.0"
    assert plan_names.normalize_trt_version("10.5.0.post1") == "10.5.0"
    assert tensorrt_build.parse_compute_capability("9.0\n") == (9, 0)
    assert (
        plan_names.timing_cache_path(Path("e"), "10.5.0", (8, 9)).name
        == "timing.trt10.5.0.sm89.cache"
    )


def test_onnx_digest_covers_external_data(tmp_path: Path) -> None:
    weight = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4096])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4096])],
        [weight],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(
        onnx.helper.make_model(graph),
        path,
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    before = plan_names.onnx_digest(path)
    assert re.fullmatch(r"[0-9a-f]{12}", before) and plan_names.onnx_digest(path) == before
    data = bytearray((tmp_path / "model.onnx.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "model.onnx.data").write_bytes(bytes(data))
    assert plan_names.onnx_digest(path) != before


class FakeTensorRT:
    """Stand-in for the `tensorrt` module: records what `build_engine` asks of the API."""

    __version__ = "10.5.0.18"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class BuilderFlag:
        FP16 = "FP16"
        PREFER_PRECISION_CONSTRAINTS = "PREFER_PRECISION_CONSTRAINTS"

    class LayerType:
        NORMALIZATION = "NORMALIZATION"
        CONVOLUTION = "CONVOLUTION"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    float32 = "float32"

    def __init__(self, input_names: list[str]) -> None:
        self.input_names = input_names
        self.calls: list[tuple] = []
        fake = self

        class Layer:
            def __init__(self, kind: str) -> None:
                self.type, self.precision = kind, None

        class Input:
            def __init__(self, name: str) -> None:
                self.name = name

        class Network:
            num_inputs = len(input_names)
            num_layers = 2

            def __init__(self) -> None:
                self.layers = [Layer("CONVOLUTION"), Layer("NORMALIZATION")]

            def get_input(self, i: int) -> Input:
                return Input(input_names[i])

            def get_layer(self, i: int) -> Layer:
                return self.layers[i]

        class Profile:
            def set_shape(self, *args: object) -> None:
                fake.calls.append(("set_shape", *args))

        class Cache:
            def serialize(self) -> bytes:
                return b"timing"

        class Config:
            def set_flag(self, flag: str) -> None:
                fake.calls.append(("set_flag", flag))

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls.append(("pool", pool, size))

            def add_optimization_profile(self, profile: Profile) -> None:
                fake.calls.append(("add_profile",))

            def create_timing_cache(self, data: bytes) -> Cache:
                fake.calls.append(("timing_cache_in", data))
                return Cache()

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
                pass

            def get_timing_cache(self) -> Cache:
                return Cache()

        class Builder:
            def __init__(self, logger: object) -> None:
                self.network = Network()

            def create_network(self, flags: int) -> Network:
                fake.calls.append(("create_network", flags))
                return self.network

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                fake.network = network
                return b"serialized plan"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: Network, logger: object) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parse", path))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_build_engine_drives_the_tensorrt_api(tmp_path: Path, monkeypatch) -> None:
    fake = FakeTensorRT(UNET.input_names)
    monkeypatch.setattr(tensorrt_build, "trt", fake)
    profiles = engine_profiles.derive_profiles(
        UNET, SD15_SIZES, [SizeBucket(height=512, width=512), SizeBucket(height=768, width=768)]
    )
    options = tensorrt_build.BuildOptions(
        timing_cache=tmp_path / "timing.cache", workspace_bytes=1 << 30
    )
    plan = tensorrt_build.build_engine(
        tmp_path / "model.onnx", profiles, tmp_path / KEY.filename, options, log=print
    )

    assert plan.read_bytes() == b"serialized plan"
    assert (tmp_path / "timing.cache").read_bytes() == b"timing"
    assert ("create_network", 0) in fake.calls  # explicit batch, TensorRT 10
    assert {("set_flag", "FP16"), ("set_flag", "PREFER_PRECISION_CONSTRAINTS")} <= set(fake.calls)
    assert ("pool", "WORKSPACE", 1 << 30) in fake.calls
    shapes = [c[1:] for c in fake.calls if c[0] == "set_shape"]
    assert shapes[0] == ("sample", (2, 9, 64, 64), (2, 9, 64, 64), (8, 9, 64, 64))
    assert len(shapes) == 2 * len(UNET.input_names)
    assert fake.calls.count(("add_profile",)) == 2
    assert [layer.precision for layer in fake.network.layers] == [None, "float32"]
    assert tensorrt_build.tensorrt_version() == "10.5.0"

    with pytest.raises(tensorrt_build.EngineBuildError, match="network has"):
        tensorrt_build.build_engine(
            tmp_path / "m.onnx",
            engine_profiles.derive_profiles(VAE_DECODER, SD15_SIZES),
            tmp_path / "x.plan",
        )


def test_without_tensorrt_an_engine_build_says_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tensorrt_build, "trt", None)  # as on a machine without the package
    profiles = engine_profiles.derive_profiles(VAE_DECODER, SD15_SIZES)
    with pytest.raises(
        tensorrt_build.TensorRTUnavailable, match="`tensorrt` package is not installed"
    ):
        tensorrt_build.build_engine(
            tmp_path / "model.onnx", profiles, tmp_path / KEY.filename, log=print
        )
    assert list(tmp_path.iterdir()) == []  # nothing written


# --------------------------------------------------------------------- repository variants


def _dummy_plans(repository: Path, tmp_path: Path) -> dict[str, gpu_variant.EnginePlan]:
    plans = {}
    for target in engine_targets.engine_targets(built_repository.read_repository(repository)):
        path = tmp_path / f"{target.component.name}.plan"
        path.write_bytes(b"not a real plan")
        plans[target.component.name] = gpu_variant.EnginePlan(
            path, tuple(p.name for p in target.profiles)
        )
    return plans


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _onnx_io(path: Path) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(values):
        return {
            v.name: [
                d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
            ]
            for v in values
        }

    return dims(graph.input), dims(graph.output)


def _assert_same_tensors(config: dict[str, list[int]], model: dict[str, list[int]]) -> None:
    """Same names and ranks; a dim fixed in the ONNX file has that value in the config too
    (a dynamic ONNX dim accepts a fixed config dim, as Triton's backends do)."""
    assert config.keys() == model.keys()
    for name, dims in config.items():
        assert len(dims) == len(model[name]), name
        assert all(m in (-1, c) for c, m in zip(dims, model[name], strict=True)), (name, dims)


def test_read_repository_finds_pipeline_and_components(repository: Path) -> None:
    source = built_repository.read_repository(repository)
    assert [p.name for p in source.pipelines] == ["inpaint"]
    assert dict(source.pipelines[0].components) == {
        "text_encoder": "text_encoder",
        "unet": "unet",
        "vae_encoder": "vae_encoder",
        "vae_decoder": "vae_decoder",
    }
    assert {c.name: c.spec.name for c in source.components} == {
        name: name for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    }
    unet = next(c for c in source.components if c.name == "unet")
    assert unet.sizes["unet_in_channels"] == 9 and unet.sizes["hidden_size"] == 64
    assert "text_length" not in unet.sizes  # dynamic: one window per chunk of the prompt


def test_prefixed_component_names_keep_their_roles(repository: Path, tmp_path: Path) -> None:
    source = tmp_path / "repo"
    shutil.copytree(repository, source)
    (source / "unet").rename(source / "base_unet")
    unet = _parse(source / "base_unet" / "config.pbtxt")
    unet.name = "base_unet"
    (source / "base_unet" / "config.pbtxt").write_text(text_format.MessageToString(unet))
    pipeline = _parse(source / "inpaint" / "config.pbtxt")
    pipeline.parameters["unet_model"].string_value = "base_unet"
    (source / "inpaint" / "config.pbtxt").write_text(text_format.MessageToString(pipeline))

    targets = {
        t.component.name: t
        for t in engine_targets.engine_targets(built_repository.read_repository(source))
    }
    assert targets["base_unet"].component.spec is UNET
    key = targets["base_unet"].key("10.5.0", (9, 0), "0" * 12)
    assert key.filename.startswith("base_unet.trt10.5.0.sm90.fp16.b2-8.")
    out = tmp_path / "gpu"
    gpu_variant.write_gpu_repository(source, out, gpu_variant.ONNXRUNTIME, log=lambda _msg: None)
    assert _parse(out / "base_unet" / "config.pbtxt").name == "base_unet"


@pytest.mark.parametrize("platform", gpu_variant.PLATFORMS)
def test_gpu_variant_configs_parse_and_match_the_onnx_files(
    repository: Path, tmp_path: Path, platform: str
) -> None:
    plans = _dummy_plans(repository, tmp_path) if platform == gpu_variant.TENSORRT else None
    out = tmp_path / "gpu"
    gpu_variant.write_gpu_repository(repository, out, platform, plans, log=lambda _msg: None)

    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        config = _parse(out / name / "config.pbtxt")
        assert config.name == name and config.platform == platform and not config.backend
        assert config.default_model_filename == gpu_variant.MODEL_FILES[platform]
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        model_file = out / name / "1" / gpu_variant.MODEL_FILES[platform]
        assert model_file.is_file() and not (out / name / "1" / "model.py").exists()
        onnx_inputs, onnx_outputs = _onnx_io(repository / name / "1" / "model.onnx")
        _assert_same_tensors({t.name: list(t.dims) for t in config.input}, onnx_inputs)
        _assert_same_tensors({t.name: list(t.dims) for t in config.output}, onnx_outputs)


def test_gpu_variant_keeps_the_pipeline_model_but_its_memory_budget(
    repository: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gpu"
    gpu_variant.write_gpu_repository(
        repository, out, gpu_variant.ONNXRUNTIME, log=lambda _msg: None
    )
    source, copy = repository / "inpaint", out / "inpaint"
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    for relative in files:
        if relative.name != "config.pbtxt":
            assert (copy / relative).read_bytes() == (source / relative).read_bytes()
    config, original = _parse(copy / "config.pbtxt"), _parse(source / "config.pbtxt")
    assert config.parameters.pop("memory_budget_mb").string_value == "0"  # GPU memory: off
    original.parameters.pop("memory_budget_mb")
    assert config == original


def test_tensorrt_variant_lists_every_profile(repository: Path, tmp_path: Path) -> None:
    plans = _dummy_plans(repository, tmp_path)
    out = tmp_path / "gpu"
    gpu_variant.write_gpu_repository(
        repository, out, gpu_variant.TENSORRT, plans, link=False, log=lambda _m: None
    )

    (unet_group,) = _parse(out / "unet" / "config.pbtxt").instance_group
    assert list(unet_group.profile) == [str(i) for i in range(len(plans["unet"].profiles))]
    assert len(unet_group.profile) == len(engine_profiles.SD_BUCKETS) + 1  # + the demo's own 128²
    (text_group,) = _parse(out / "text_encoder" / "config.pbtxt").instance_group
    assert list(text_group.profile) == []  # one profile: Triton's default
    plan_file = out / "unet" / "1" / "model.plan"
    assert not plan_file.is_symlink() and plan_file.read_bytes() == b"not a real plan"
    pipeline = _parse(out / "inpaint" / "config.pbtxt")  # batched calls fit the engines
    parameters = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert parameters["max_unet_batch"] == str(UNET.trt_batch[2])
    for spec in (TEXT_ENCODER, VAE_ENCODER, VAE_DECODER):
        assert parameters[f"max_{spec.name}_batch"] == str(spec.trt_batch[2])
    buckets = parse_buckets(pipeline.parameters["size_buckets"].string_value)
    assert buckets == tuple(
        sorted((b.height, b.width) for b in (*engine_profiles.SD_BUCKETS, SQUARE_128))
    )


def test_onnx_variant_links_model_and_external_data(repository: Path, tmp_path: Path) -> None:
    source = tmp_path / "repo"
    shutil.copytree(repository, source)
    (source / "unet" / "1" / "model.onnx.data").write_bytes(b"weights")
    out = tmp_path / "gpu"
    gpu_variant.write_gpu_repository(source, out, gpu_variant.ONNXRUNTIME, log=lambda _msg: None)
    for name in ("model.onnx", "model.onnx.data"):
        link = out / "unet" / "1" / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (source / "unet" / "1" / name).resolve()


def test_tensorrt_variant_needs_a_plan_per_component(repository: Path, tmp_path: Path) -> None:
    with pytest.raises(built_repository.RepositoryError, match="no TensorRT plan"):
        gpu_variant.write_gpu_repository(
            repository, tmp_path / "gpu", gpu_variant.TENSORRT, {}, log=lambda _m: None
        )


def test_cli_writes_the_onnxruntime_variant(repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    argv = ["--repository", str(repository), "--platform", "onnxruntime_onnx", "--out", str(out)]
    assert cli.main(["gpu-repository", *argv]) == 0
    assert _parse(out / "unet" / "config.pbtxt").platform == "onnxruntime_onnx"
    # admission by memory counts CPU memory; on a GPU activations live in GPU memory
    source = _parse(repository / "inpaint" / "config.pbtxt").parameters["memory_budget_mb"]
    served = _parse(out / "inpaint" / "config.pbtxt").parameters["memory_budget_mb"]
    assert (source.string_value, served.string_value) == ("auto", "0")
    if tensorrt_build.trt is None:
        argv = ["--repository", str(repository), "--platform", "tensorrt_plan", "--out", str(out)]
        assert cli.main(["gpu-repository", *argv]) == 1  # clear error, no traceback


def test_engine_targets_for_the_demo_repository(repository: Path) -> None:
    source = built_repository.read_repository(repository)
    targets = {
        t.component.name: t
        for t in engine_targets.engine_targets(source, [SizeBucket(height=512, width=512)])
    }
    unet = targets["unet"]
    assert [p.name for p in unet.profiles] == ["128x128", "512x512"]  # + the demo's own size
    assert unet.profiles[0].shapes["sample"].opt == (2, 9, 16, 16)
    assert unet.batch.as_tuple() == UNET.trt_batch
    assert {t.precision for t in targets.values()} == {"fp16"}
    assert [p.name for p in targets["text_encoder"].profiles] == ["static"]
    fp32 = engine_targets.engine_targets(source, fp32_components={"vae_decoder"})
    assert {t.component.name: t.precision for t in fp32}["vae_decoder"] == "fp32"


def test_unet_engines_take_as_many_text_windows_as_the_pipeline_allows(repository: Path) -> None:
    """The UNet's text length runs from one window to `limit_max_prompt_chunks` windows."""
    from dataclasses import replace

    source = built_repository.read_repository(repository)

    def text_range(repo: built_repository.Repository) -> tuple[int, int, int]:
        unet = next(t for t in engine_targets.engine_targets(repo) if t.component.name == "unet")
        shapes = {p.shapes["encoder_hidden_states"] for p in unet.profiles}
        assert len({(s.min[1], s.opt[1], s.max[1]) for s in shapes}) == 1
        shape = shapes.pop()
        return shape.min[1], shape.opt[1], shape.max[1]

    assert text_range(source) == (77, 77, 4 * 77)
    pipeline = source.pipelines[0]
    limits = replace(pipeline.settings.limits, max_prompt_chunks=2)
    two = replace(pipeline, settings=replace(pipeline.settings, limits=limits))
    assert text_range(replace(source, pipelines=(two,))) == (77, 77, 2 * 77)


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_specs_declare_the_rows_the_pipeline_sends(
    service, num_images: int, guidance_scale: float
) -> None:
    """`ComponentSpec.rows` (what engines' batch ranges are checked against) is what the
    in-process pipeline sends for one request: text-to-image and inpainting at strength
    0.6 (two VAE-encoder calls), alone."""
    image, mask = make_case(64, 64, seed=5)
    controls = {"steps": 2, "seed": 1, "num_images": num_images, "guidance_scale": guidance_scale}
    guidance = guidance_scale > 1
    for request in (
        wire(height=64, width=64, **controls),
        wire(image, mask, strength=0.6, **controls),
    ):
        spy = Spy(service)
        spy.service.generate(request)
        specs = components_for(service.loop.facts.architecture)
        assert set(spy.rows) == {spec.name for spec in specs}
        for spec in specs:
            want = spec.rows.count(num_images, guidance)
            assert set(spy.rows[spec.name]) == {want}, (spec.name, spy.rows[spec.name])
            low, high = spec.rows.bounds(max_images=num_images)
            assert low <= want <= high


def test_batch_coverage_reports_requests_engines_would_reject(repository: Path) -> None:
    source = built_repository.read_repository(repository)
    max_images = source.pipelines[0].settings.limits.max_images
    wide = {  # cross-request UNet calls are split at max_unet_batch: one request must fit
        "unet": (2, 2, 2 * max_images),
        "vae_decoder": (1, 1, max_images),
        "text_encoder": (1, 2, 2),
    }
    problems = engine_targets.batch_coverage_problems(
        source, engine_targets.engine_targets(source, batch_overrides=wide)
    )
    assert len(problems) == 1 and "unet" in problems[0]  # guidance <= 1 sends odd batches
    assert "batch 1.." in problems[0]
    narrow = {**wide, "unet": (2, 2, 2 * max_images - 2)}  # one request's 2N rows: too many
    problems = engine_targets.batch_coverage_problems(
        source, engine_targets.engine_targets(source, batch_overrides=narrow)
    )
    assert len(problems) == 1 and f"1..{2 * max_images}" in problems[0]


def test_ensure_engines_builds_missing_plans_once(
    repository: Path, tmp_path: Path, monkeypatch
) -> None:
    built, checked = [], []

    def fake_build(onnx_file, profiles, out, options, log):
        built.append((out.name, options.precision))
        out.write_bytes(b"plan")
        return out

    def fake_parity(plan, onnx_file, spec, profiles, **kwargs):
        checked.append(kwargs["component"])
        return [engine_parity.EngineParity(kwargs["component"], profiles[0].name, 0.0, 1.0, 1e-3)]

    monkeypatch.setattr(engine_store, "tensorrt_version", lambda: "10.5.0")
    monkeypatch.setattr(engine_store, "gpu_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(engine_store, "build_engine", fake_build)
    monkeypatch.setattr(engine_store, "check_engine_parity", fake_parity)
    source = built_repository.read_repository(repository)
    settings = engine_store.EngineSettings(
        tmp_path / "engines", buckets=(SizeBucket(height=512, width=512),)
    )

    plans = engine_store.ensure_engines(source, settings, log=lambda _m: None)
    assert (
        sorted(checked) == sorted(plans) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    )
    assert plans["unet"].profiles == ("128x128", "512x512")
    assert plan_names.EngineKey.parse(plans["unet"].path.name).compute_capability == (9, 0)
    assert engine_store.ensure_engines(source, settings, log=lambda _m: None) == plans
    assert len(built) == 4  # the second call found every plan by name

    no_build = engine_store.EngineSettings(tmp_path / "empty", build_missing=False)
    with pytest.raises(built_repository.RepositoryError, match="no engine"):
        engine_store.ensure_engines(source, no_build, log=lambda _m: None)


def test_a_plan_failing_parity_is_deleted(repository: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(engine_store, "tensorrt_version", lambda: "10.5.0")
    monkeypatch.setattr(engine_store, "gpu_compute_capability", lambda: (8, 9))
    monkeypatch.setattr(
        engine_store, "build_engine", lambda o, p, out, *a: out.write_bytes(b"x") and out
    )
    monkeypatch.setattr(
        engine_store,
        "check_engine_parity",
        lambda *a, **k: [
            engine_parity.EngineParity(k["component"], "static", float("nan"), 1.0, 1e-3)
        ],
    )
    settings = engine_store.EngineSettings(tmp_path / "engines")
    with pytest.raises(built_repository.RepositoryError, match="parity failed"):
        engine_store.ensure_engines(
            built_repository.read_repository(repository), settings, log=lambda _m: None
        )
    assert list((tmp_path / "engines").glob("*.plan")) == []


def test_tensorrt_runtime_version_check(tmp_path: Path) -> None:
    (tmp_path / "libnvinfer.so.10").write_bytes(b"")
    (tmp_path / "libnvinfer.so.10.5.0").write_bytes(b"")
    assert tensorrt_build.triton_tensorrt_version([tmp_path / "missing", tmp_path]) == "10.5.0"
    assert tensorrt_build.triton_tensorrt_version([tmp_path / "missing"]) is None
    assert tensorrt_build.check_tensorrt_match("10.5.0", "10.5.0") is None
    assert tensorrt_build.check_tensorrt_match("10.5.0", None) is None
    assert "tensorrt==10.5.0" in tensorrt_build.check_tensorrt_match("10.6.0", "10.5.0")


def test_exported_onnx_loads_in_the_image_backends(repository: Path) -> None:
    """Triton 24.10: ONNX Runtime 1.19 reads IR <= 10; TensorRT 10.5 parses opset <= 20."""
    for path in sorted(repository.glob("*/1/model.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version <= 10, path
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 20


# ------------------------------------------------------- SDXL profiles, size buckets served


def test_buckets_are_per_architecture_on_the_latent_grid() -> None:
    sdxl = {b.name for b in engine_profiles.default_buckets("sdxl")}
    assert sdxl == {
        "1024x1024", "1152x896", "896x1152", "1216x832", "832x1216",
        "1344x768", "768x1344", "1536x640", "640x1536",
    }  # fmt: skip
    assert {b.name for b in engine_profiles.default_buckets("sd15")} == {
        "512x512",
        "768x768",
        "768x512",
        "512x768",
    }
    for bucket in engine_profiles.default_buckets(
        "sdxl"
    ):  # about one megapixel, latents divisible by 8
        assert 0.9e6 < bucket.width * bucket.height < 1.1e6
        assert all(side % 8 == 0 for side in bucket.latent(8))
    with pytest.raises(ValueError, match="unknown architecture"):
        engine_profiles.default_buckets("sd3")


def test_sdxl_unet_profiles_carry_pooled_embeds_and_time_ids() -> None:
    profiles = engine_profiles.derive_profiles(
        UNET_XL, SDXL_SIZES, engine_profiles.SDXL_BUCKETS, vae_scale_factor=8
    )
    assert [p.name for p in profiles] == [  # by width, as plans have always been named
        "640x1536", "768x1344", "832x1216", "896x1152", "1024x1024",
        "1152x896", "1216x832", "1344x768", "1536x640",
    ]  # fmt: skip
    by_name = {p.name: p for p in profiles}
    square = by_name["1024x1024"]
    assert list(square.shapes) == UNET_XL.input_names
    assert square.shapes["sample"] == engine_profiles.ShapeRange(
        (2, 9, 128, 128), (2, 9, 128, 128), (8, 9, 128, 128)
    )
    assert square.shapes["encoder_hidden_states"].opt == (2, 77, 2048)
    assert square.shapes["text_embeds"] == engine_profiles.ShapeRange(
        (2, 1280), (2, 1280), (8, 1280)
    )
    assert square.shapes["time_ids"].max == (8, 6)
    assert by_name["1536x640"].shapes["sample"].opt == (2, 9, 80, 192)  # (B, C, H/8, W/8)
    assert by_name["640x1536"].shapes["sample"].opt == (2, 9, 192, 80)


def test_sdxl_text_encoders_have_one_static_profile() -> None:
    (first,) = engine_profiles.derive_profiles(
        TEXT_ENCODER_XL, SDXL_SIZES, engine_profiles.SDXL_BUCKETS
    )
    (second,) = engine_profiles.derive_profiles(
        TEXT_ENCODER_2, SDXL_SIZES, engine_profiles.SDXL_BUCKETS
    )
    for profile in (first, second):
        assert profile.name == engine_profiles.STATIC_PROFILE
        assert profile.shapes == {
            "input_ids": engine_profiles.ShapeRange((1, 77), (1, 77), (4, 77)),
            "clip_skip": engine_profiles.ShapeRange((1,), (1,), (4,)),
        }


def test_repository_with_sd15_and_sdxl_pipelines_reads_both(xl_repository: Path) -> None:
    source = built_repository.read_repository(xl_repository)
    pipelines = {p.name: p for p in source.pipelines}
    assert {n: p.architecture for n, p in pipelines.items()} == {
        "inpaint": "sd15",
        "inpaint_xl": "sdxl",
    }
    xl = pipelines["inpaint_xl"]
    assert dict(xl.components) == {
        role: f"xl_{role}"
        for role in ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
    }
    specs = {c.name: c.spec for c in source.components}
    assert specs["xl_unet"] is UNET_XL and specs["unet"] is UNET
    assert specs["xl_text_encoder"] is TEXT_ENCODER_XL and specs["text_encoder"] is TEXT_ENCODER
    assert specs["xl_text_encoder_2"] is TEXT_ENCODER_2


def test_sdxl_engine_targets_use_sdxl_buckets_and_fp32_vae(xl_repository: Path) -> None:
    source = built_repository.read_repository(xl_repository)
    targets = {t.component.name: t for t in engine_targets.engine_targets(source)}
    order = engine_profiles.profile_order
    sd15 = sorted({*engine_profiles.SD_BUCKETS, SQUARE_128}, key=order)
    sdxl = sorted({*engine_profiles.SDXL_BUCKETS, SQUARE_128}, key=order)
    for role in ("unet", "vae_encoder", "vae_decoder"):
        assert [p.name for p in targets[role].profiles] == [b.name for b in sd15]
        assert [p.name for p in targets[f"xl_{role}"].profiles] == [b.name for b in sdxl]
    assert [p.name for p in targets["xl_text_encoder_2"].profiles] == [
        engine_profiles.STATIC_PROFILE
    ]
    assert {name: t.precision for name, t in targets.items() if t.precision == "fp32"} == {
        "xl_vae_encoder": "fp32",
        "xl_vae_decoder": "fp32",
    }
    xl_unet = targets["xl_unet"]
    assert set(xl_unet.profiles[0].shapes) == {*UNET_XL.input_names}
    key = xl_unet.key("10.5.0", (9, 0), "0" * 12)
    assert key.filename.startswith("xl_unet.trt10.5.0.sm90.fp16.b2-8.")
    assert plan_names.EngineKey.parse(key.filename) == key
    problems = engine_targets.batch_coverage_problems(source, list(targets.values()))
    assert any("xl_unet" in p for p in problems)  # as SD 1.5's: odd batches without CFG
    assert not any("text_encoder_2" in p for p in problems)  # 1 or 2 rows, within (1, 4)

    chosen = engine_targets.engine_targets(
        source,
        buckets=[SizeBucket(height=512, width=512)],
        xl_buckets=[SizeBucket(height=832, width=1216)],
    )
    names = {t.component.name: [p.name for p in t.profiles] for t in chosen}
    assert names["unet"] == ["128x128", "512x512"]
    assert names["xl_unet"] == ["128x128", "1216x832"]
    only = {t.component.name: [p.name for p in t.profiles] for t in engine_targets.engine_targets(
        source, buckets=[SizeBucket(height=512, width=512)]
    )}  # fmt: skip
    assert only["xl_unet"] == ["128x128", "512x512"]  # --buckets alone: every pipeline


def test_tensorrt_variant_of_sd15_and_sdxl_writes_each_pipelines_buckets(
    xl_repository: Path, tmp_path: Path
) -> None:
    plans = _dummy_plans(xl_repository, tmp_path)
    out = tmp_path / "gpu"
    gpu_variant.write_gpu_repository(
        xl_repository, out, gpu_variant.TENSORRT, plans, log=lambda _m: None
    )

    for path in sorted(out.glob("*/config.pbtxt")):  # every config parses as a ModelConfig
        config = _parse(path)
        assert config.name == path.parent.name
    for name in plans:
        config = _parse(out / name / "config.pbtxt")
        assert config.platform == "tensorrt_plan" and not config.backend
        (group,) = config.instance_group
        profiles = len(plans[name].profiles)
        assert len(group.profile) == (profiles if profiles > 1 else 0)
    expected = {
        "inpaint": {*engine_profiles.SD_BUCKETS, SQUARE_128},
        "inpaint_xl": {*engine_profiles.SDXL_BUCKETS, SQUARE_128},
    }
    for pipeline, buckets in expected.items():
        config = _parse(out / pipeline / "config.pbtxt")
        assert config.backend == "python"
        written = config.parameters["size_buckets"].string_value
        assert parse_buckets(written) == tuple(sorted((b.height, b.width) for b in buckets))
        assert parse_buckets(written) == tuple(sorted(buckets))  # one format both sides
        assert config.parameters["max_unet_batch"].string_value == str(UNET_XL.trt_batch[2])
    assert _parse(out / "xl_text_encoder_2" / "config.pbtxt").input[0].name == "input_ids"


def test_pipeline_buckets_come_from_the_plans(xl_repository: Path, tmp_path: Path) -> None:
    source = built_repository.read_repository(xl_repository)
    xl = next(p for p in source.pipelines if p.name == "inpaint_xl")
    plans = _dummy_plans(xl_repository, tmp_path)
    plans["xl_vae_decoder"] = gpu_variant.EnginePlan(
        plans["xl_vae_decoder"].path, ("1024x1024", "1152x896"), (1, 1, 4)
    )
    plans["xl_unet"] = gpu_variant.EnginePlan(
        plans["xl_unet"].path, plans["xl_unet"].profiles, (2, 4, 16)
    )
    settings = gpu_variant.tensorrt_pipeline_settings(xl.settings, xl, plans)
    assert settings.max_batch["unet"] == 16  # the plan's batch, not the spec's
    assert settings.max_batch["vae_decoder"] == 4
    assert settings.max_batch["text_encoder_2"] == TEXT_ENCODER_2.trt_batch[2]
    assert settings.size_buckets == ((896, 1152), (1024, 1024))
    parameters = settings.to_parameters()
    assert (
        parameters["max_unet_batch"] == "16" and parameters["size_buckets"] == "1152x896,1024x1024"
    )

    plans["xl_vae_encoder"] = gpu_variant.EnginePlan(plans["xl_vae_encoder"].path, ("640x1536",))
    with pytest.raises(built_repository.RepositoryError, match="share no size bucket"):
        gpu_variant.served_buckets(xl, plans)


def test_cli_takes_sdxl_buckets() -> None:
    args = cli.parse_args(
        ["gpu-repository", "--repository", "r", "--platform", "tensorrt_plan", "--out", "o",
         "--xl-buckets", "1024x1024,1536x640"]
    )  # fmt: skip
    assert args.buckets is None  # per architecture
    assert args.xl_buckets == (  # sorted by (height, width)
        SizeBucket(height=640, width=1536),
        SizeBucket(height=1024, width=1024),
    )
    settings = cli.engine_settings(args)
    assert settings.buckets is None and settings.xl_buckets == args.xl_buckets


# -------------------------------------------------------------------------------- docker/


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuations joined, comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def _dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKER / "Dockerfile")


def _args(instruction: str) -> list[str]:
    return [arguments for keyword, arguments in _dockerfile() if keyword == instruction]


def _env() -> dict[str, str]:
    env = {}
    for arguments in _args("ENV"):
        for item in shlex.split(arguments):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_dockerfile_is_from_a_pinned_triton_image() -> None:
    (base,) = _args("FROM")
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", base)
    assert match, base
    assert match.group(1) == "24.10"  # server 2.51, as the local nvidia-pytriton wheel
    (trt_arg,) = [a for a in _args("ARG") if a.startswith("TENSORRT_VERSION=")]
    assert trt_arg.split("=")[1].startswith(TRITON_TENSORRT[match.group(1)] + ".")


def test_dockerfile_exposes_triton_ports_and_runs_the_entrypoint() -> None:
    (exposed,) = _args("EXPOSE")
    assert {int(p) for p in exposed.split()} == TRITON_PORTS
    (entrypoint,) = _args("ENTRYPOINT")
    command = json.loads(entrypoint)
    copies = [shlex.split(a) for a in _args("COPY")]
    targets = {words[-1] for words in copies}
    assert command[-1] in targets
    assert [a for a in _args("VOLUME")] == [json.dumps([_env()["SDSERVE_BUILD_DIR"]])]


def test_dockerfile_copies_paths_that_exist() -> None:
    ignored = {
        line.strip().removeprefix("**/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for words in (shlex.split(a) for a in _args("COPY")):
        for source in (w for w in words[:-1] if not w.startswith("--")):
            assert (ROOT / source).exists(), source
            assert Path(source).parts[0] not in ignored, source


def test_dockerfile_installs_only_the_pipeline_dependencies() -> None:
    runs = " ".join(_args("RUN"))
    # requirements.txt less its test-only tools (manifest validators)
    assert "grep -v '# tests only' requirements.txt >requirements-image.txt" in runs
    assert "pip install -r requirements-image.txt" in runs
    pins = (ROOT / "requirements.txt").read_text().splitlines()
    image = [
        p.split("==")[0] for p in pins if p and not p.startswith("#") and "# tests only" not in p
    ]
    assert {"torch", "onnxruntime", "nvidia-pytriton"} <= set(image)
    assert "kubernetes-validate" not in image
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and "^torch==" in runs
    assert "tensorrt-cu12==${TENSORRT_VERSION}" in runs
    assert "pip install --no-deps ./model_repository ./client ./export" in runs
    assert "download.pytorch.org/whl/cu" in " ".join(_args("ARG"))


def test_python_backend_stub_the_image_uses_ships_in_the_pinned_wheel() -> None:
    import importlib.metadata

    import pytriton

    pin = next(
        line for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.startswith("nvidia-pytriton==")
    )  # fmt: skip
    assert importlib.metadata.version("nvidia-pytriton") == pin.split("==")[1]
    stub = Path(pytriton.__file__).parent / "tritonserver/python_backend_stubs/3.11"
    assert (stub / "triton_python_backend_stub").is_file()
    assert "python_backend_stubs/3.11/triton_python_backend_stub" in " ".join(_args("RUN"))


def test_entrypoint_is_valid_bash_without_eval() -> None:
    script = (DOCKER / "entrypoint.sh").read_text()
    subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")], check=True)
    assert not re.search(r"\beval\b", script) and "bash -c" not in script
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)


FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "python $*" >>"$CALLS"
if [[ "$2" == sdserve_export && "$3" == repository ]]; then
    mkdir -p "$7/$9" && touch "$7/$9/config.pbtxt"
fi
"""
FAKE_TRITON = """#!/usr/bin/env bash
printf '%s\\n' "tritonserver $*" >>"$CALLS"
"""


def _run_entrypoint(tmp_path: Path, **env: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python3", FAKE_PYTHON), ("tritonserver", FAKE_TRITON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    environment = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "SDSERVE_BUILD_DIR": str(tmp_path / "build"),
        "SDSERVE_WATCHDOG": "0",  # started in the background: it would race these records
        **env,
    }
    command = ["bash", str(DOCKER / "entrypoint.sh"), "--log-verbose=1"]
    subprocess.run(command, env=environment, check=True, capture_output=True, text=True)
    return [line.split() for line in calls.read_text().splitlines()]


def test_entrypoint_exports_once_then_execs_tritonserver(tmp_path: Path) -> None:
    build = tmp_path / "build"
    first = _run_entrypoint(tmp_path)
    assert [c[:4] for c in first[:3]] == [
        ["python", "-m", "sdserve_export", "demo-pipeline"],
        ["python", "-m", "sdserve_export", "repository"],
        ["python", "-m", "sdserve_export", "gpu-repository"],
    ]
    assert first[1][4:] == [
        "--source", f"{build}/demo-pipeline", "--out", f"{build}/model_repository",
        "--name", "inpaint",
    ]  # fmt: skip
    triton = first[3]
    assert triton[0] == "tritonserver" and triton[-1] == "--log-verbose=1"
    assert f"--model-repository={build}/model_repository_gpu" in triton
    assert {
        f"--{kind}-port={port}"
        for kind, port in zip(("http", "grpc", "metrics"), (8000, 8001, 8002), strict=True)
    } <= set(triton)

    args = cli.parse_args(first[2][3:])  # the entrypoint's flags are the CLI's
    assert args.platform == "tensorrt_plan" and args.out == build / "model_repository_gpu"
    assert args.engines == build / "engines"

    second = _run_entrypoint(
        tmp_path, SDSERVE_PLATFORM="onnxruntime_onnx", SDSERVE_BUCKETS="512x512"
    )
    assert [c[2:4] for c in second[:-1]] == [["sdserve_export", "gpu-repository"]]  # no re-export
    assert cli.parse_args(second[0][3:]).buckets == (SizeBucket(height=512, width=512),)

    third = _run_entrypoint(tmp_path, SDSERVE_SOURCE="/models/other")
    assert third[0][3:6] == ["repository", "--source", "/models/other"]  # source changed


def test_entrypoint_commands_parse_in_the_export_cli(tmp_path: Path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(cli, "save_demo_pipeline", lambda *a: seen.append(("demo", a)) or a[0])
    monkeypatch.setattr(cli, "build_repository", lambda *a, **k: seen.append(("repo", a, k)))
    for command in _run_entrypoint(tmp_path)[:2]:
        assert cli.main(command[3:]) == 0
    assert [s[0] for s in seen] == ["demo", "repo"]
    assert seen[1][2]["pipeline_name"] == "inpaint"


# --------------------------------------------------------------------- compose and k8s


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _container_port(mapping: str) -> int:
    return int(mapping.rsplit(":", 1)[1])


def test_compose_builds_the_image_with_a_gpu_ports_and_volume() -> None:
    service = _compose()["services"]["sdserve"]
    context = (DOCKER / service["build"]["context"]).resolve()
    assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()
    assert {_container_port(p) for p in service["ports"]} == TRITON_PORTS
    assert all(p.startswith("${SDSERVE_BIND:-127.0.0.1}:") for p in service["ports"])
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    build_dir = _env()["SDSERVE_BUILD_DIR"]
    assert service["environment"]["SDSERVE_BUILD_DIR"] == build_dir
    volume, target = service["volumes"][0].split(":")[:2]
    assert target == build_dir and volume in _compose()["volumes"]
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["shm_size"]


def _k8s() -> dict[str, dict]:
    documents = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "metadata" in document:  # the Kustomization has none
                documents[f"{document['kind']}/{document['metadata']['name']}"] = document
    return documents


def test_k8s_manifests_parse_and_are_all_applied() -> None:
    documents = _k8s()
    assert {
        "Deployment/sdserve",
        "Service/sdserve",
        "HorizontalPodAutoscaler/sdserve",
        "PersistentVolumeClaim/sdserve-build",
        "PersistentVolumeClaim/sdserve-models",
    } <= set(documents)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / resource).is_file() for resource in kustomization["resources"])


def _container(documents: dict[str, dict]) -> dict:
    (container,) = documents["Deployment/sdserve"]["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_deployment_requests_a_gpu_and_probes_triton_health() -> None:
    container = _container(_k8s())
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["containerPort"] for p in container["ports"]} == TRITON_PORTS


def test_k8s_deployment_mounts_what_the_entrypoint_uses() -> None:
    documents = _k8s()
    pod = documents["Deployment/sdserve"]["spec"]["template"]["spec"]
    container = _container(documents)
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[env["SDSERVE_BUILD_DIR"]]]["persistentVolumeClaim"]["claimName"] in {
        name.split("/")[1] for name in documents if name.startswith("PersistentVolumeClaim/")
    }
    repository_mount = next(m for m in mounts if env["SDSERVE_GPU_REPOSITORY"].startswith(m + "/"))
    assert "emptyDir" in volumes[mounts[repository_mount]]  # per pod, never shared
    assert any(env["SDSERVE_SOURCE"].startswith(m + "/") for m in mounts)
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    annotations = documents["Deployment/sdserve"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8002"


def test_k8s_service_exposes_grpc_http_and_metrics() -> None:
    documents = _k8s()
    service = documents["Service/sdserve"]["spec"]
    ports = {p["name"]: p for p in service["ports"]}
    assert {n: p["port"] for n, p in ports.items()} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    container_ports = {p["name"]: p["containerPort"] for p in _container(documents)["ports"]}
    assert all(container_ports[p["targetPort"]] == p["port"] for p in ports.values())
    labels = documents["Deployment/sdserve"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()


def test_k8s_hpa_scales_the_deployment_on_the_adapter_queue_metric() -> None:
    # the first metric, outstanding denoising steps: tests/test_k8s_manifests.py
    hpa = _k8s()["HorizontalPodAutoscaler/sdserve"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sdserve",
    }
    metrics = {m["pods"]["metric"]["name"]: m for m in hpa["spec"]["metrics"]}
    assert all(m["type"] == "Pods" for m in metrics.values())
    metric = metrics["sdserve_queue_duration_us_per_request"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    rule = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}[
        metric["pods"]["metric"]["name"]
    ]
    assert rule["name"]["as"] == "sdserve_queue_duration_us_per_request"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "500000"}
    # the pipeline's own queue counter (Triton's queue metrics stay ~0: its batcher holds it)
    assert "sdserve_queue_duration_us" in rule["seriesQuery"]
    query = rule["metricsQuery"]
    assert "rate(sdserve_queue_duration_us{" in query
    assert "rate(nv_inference_request_success{" in query
    assert "nv_inference_queue_duration_us" not in query
    assert query.count('model="inpaint"') == 2


def test_docker_readme_documents_deployment() -> None:
    readme = (DOCKER / "README.md").read_text()
    for needle in (
        "docker build",
        "docker compose",
        "kubectl apply -k docker/k8s",
        "prometheus-adapter",
    ):
        assert needle in readme


# --------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def gpu() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_demo_engines_match_onnxruntime(
    gpu, repository: Path, tmp_path: Path, precision: str
) -> None:
    source = built_repository.read_repository(repository)
    buckets = [SizeBucket(height=128, width=192)]
    fp32 = {"text_encoder", "unet", "vae_encoder", "vae_decoder"} if precision == "fp32" else set()
    for target in engine_targets.engine_targets(source, buckets, fp32_components=fp32):
        component = target.component
        options = tensorrt_build.BuildOptions(
            fp16=precision == "fp16", timing_cache=tmp_path / "timing.cache"
        )
        plan = tensorrt_build.build_engine(
            component.onnx_file, target.profiles, tmp_path / f"{component.name}.plan", options
        )
        rtol = 5e-3 if precision == "fp32" else 5e-2  # fp32 engines use TF32 kernels
        for result in engine_parity.check_engine_parity(
            plan, component.onnx_file, component.spec, target.profiles, rtol=rtol
        ):
            print(f"[{precision}] {result}")
            assert result.ok, str(result)


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_repository_builds_once_and_reuses_engines(
    gpu, repository: Path, tmp_path: Path
) -> None:
    source = built_repository.read_repository(repository)
    settings = engine_store.EngineSettings(
        engine_dir=tmp_path / "engines", buckets=(SizeBucket(height=128, width=128),)
    )
    plans = engine_store.ensure_engines(source, settings, log=print)
    stamps = {name: plan.path.stat().st_mtime_ns for name, plan in plans.items()}
    again = engine_store.ensure_engines(source, settings, log=print)
    assert {name: plan.path.stat().st_mtime_ns for name, plan in again.items()} == stamps
    for plan in plans.values():
        key = plan_names.EngineKey.parse(plan.path.name)
        assert key.trt_version == tensorrt_build.tensorrt_version()
        assert key.compute_capability == tensorrt_build.gpu_compute_capability()
    out = tmp_path / "gpu"
    gpu_variant.write_gpu_repository(repository, out, gpu_variant.TENSORRT, plans, log=print)
    assert _parse(out / "unet" / "config.pbtxt").platform == "tensorrt_plan"
    pipeline = _parse(out / "inpaint" / "config.pbtxt")  # requests snap to the engines' size
    assert pipeline.parameters["size_buckets"].string_value == "128x128"
