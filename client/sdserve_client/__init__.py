"""sdserve_client: thin gRPC SDK and CLI of the sdserve Stable Diffusion pipeline on Triton."""

from .errors import InvalidRequestError, SdserveError
from .images import ImageLike, MaskLike, to_mask_array, to_rgb_array
from .request import GenerationRequest, add_batch_dim, encode_request
from .sdk import GenerationResult, InpaintClient

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "ImageLike",
    "InpaintClient",
    "InvalidRequestError",
    "MaskLike",
    "SdserveError",
    "add_batch_dim",
    "encode_request",
    "to_mask_array",
    "to_rgb_array",
]
