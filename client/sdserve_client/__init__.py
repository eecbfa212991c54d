"""sdserve_client: thin gRPC SDK and CLI of the sdserve Stable Diffusion pipeline on Triton."""

from sdserve_protocol.canvas import (
    Canvas,
    Extension,
    Window,
    band_mask,
    build_canvas,
    plan_bands,
    seam_alpha,
)

from .errors import InvalidRequestError, SdserveError
from .images import ImageLike, MaskLike, to_mask_array, to_rgb_array
from .replicas import FailoverPolicy
from .request import GenerationRequest, add_batch_dim, encode_request
from .sdk import GenerationResult, InpaintClient, PendingGeneration, infer_inputs
from .tls import TlsSettings

__all__ = [
    "Canvas",
    "Extension",
    "FailoverPolicy",
    "GenerationRequest",
    "GenerationResult",
    "ImageLike",
    "InpaintClient",
    "InvalidRequestError",
    "MaskLike",
    "PendingGeneration",
    "SdserveError",
    "TlsSettings",
    "Window",
    "add_batch_dim",
    "band_mask",
    "build_canvas",
    "encode_request",
    "infer_inputs",
    "plan_bands",
    "seam_alpha",
    "to_mask_array",
    "to_rgb_array",
]
