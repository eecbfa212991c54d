"""Test inputs and the diffusers reference they are compared with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from sdserve_pipeline.triton_server import TritonServer


def make_case(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random RGB image and a rectangular mask (255 = regenerate) over its middle."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 5 : 3 * width // 5] = 255
    return image, mask


def diffusers_inpaint(pipe, image, mask, prompt="a red bicycle", seed=42, steps=10, **kwargs):
    """diffusers' own result as (H, W, 3) uint8 (its PIL output)."""
    height, width = mask.shape
    result = pipe(
        prompt,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask),
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return np.asarray(result.images[0])


def infer_inputs(tensors: dict[str, np.ndarray], batched: bool = True) -> list:
    """`tritonclient.grpc.InferInput`s of numpy arrays (`sdserve_client.infer_inputs`), with
    the pipeline model's batch dim of 1 added when `batched`."""
    from sdserve_client import add_batch_dim
    from sdserve_client import infer_inputs as sdk_infer_inputs

    return sdk_infer_inputs(add_batch_dim(tensors) if batched else tensors)


def max_abs(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@contextlib.contextmanager
def served(repository, build_dir, **options) -> Iterator[TritonServer]:
    """A real tritonserver on 127.0.0.1 (free ports) serving `repository`, ready, then stopped."""
    with TritonServer(
        repository, http_port=0, grpc_port=0, metrics_port=0, build_dir=build_dir, **options
    ) as server:
        server.wait_ready(timeout_s=300)
        yield server
