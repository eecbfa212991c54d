"""`InpaintClient`: the gRPC client of the sdserve pipeline model."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient  # type: ignore[import-untyped]
from PIL import Image
from tritonclient.utils import (  # type: ignore[import-untyped]
    InferenceServerException,
    np_to_triton_dtype,
)

from .errors import InvalidRequestError, SdserveError
from .images import ImageLike, MaskLike
from .request import (
    OUTPUT_IMAGES,
    OUTPUT_NAMES,
    OUTPUT_SEEDS,
    GenerationRequest,
    add_batch_dim,
    check_request,
    encode_request,
)
from .rules import Limits, config_parameters, limits_from_parameters

if TYPE_CHECKING:
    from typing_extensions import Self

P = ParamSpec("P")
T = TypeVar("T")
Array = npt.NDArray[Any]


class TritonClient(Protocol):
    """The part of `tritonclient.grpc.InferenceServerClient` the SDK uses (inject a fake)."""

    def infer(self, model_name: str, inputs: list[Any], **kwargs: Any) -> Any: ...
    def async_infer(
        self, model_name: str, inputs: list[Any], callback: Any, **kwargs: Any
    ) -> Any: ...
    def get_model_config(self, model_name: str, **kwargs: Any) -> Any: ...
    def get_model_repository_index(self, **kwargs: Any) -> Any: ...
    def is_server_ready(self, **kwargs: Any) -> Any: ...
    def is_model_ready(self, model_name: str, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """Images returned by the pipeline model.

    Args:
        images (`list[PIL.Image.Image]`): the generated RGB images.
        seeds (`list[int]`): the seed behind each image.
        arrays (`np.ndarray`): the raw uint8 output of shape (N, H, W, 3).
    """

    images: list[Image.Image]
    seeds: list[int]
    arrays: npt.NDArray[np.uint8]

    @classmethod
    def from_outputs(
        cls, images: Array | None, seeds: Array | None, batched: bool = False
    ) -> GenerationResult:
        """Builds a result from the `images` and `seeds` output arrays, checking their shapes.

        Args:
            images (`np.ndarray`): uint8 (N, H, W, 3), or (1, N, H, W, 3) when `batched`.
            seeds (`np.ndarray`): int64 (N,), or (1, N) when `batched`.
            batched (`bool`, *optional*, defaults to `False`): strip a leading batch dimension.
        """
        images = _unbatch(OUTPUT_IMAGES, images, batched)  # (N, H, W, 3)
        seeds = _unbatch(OUTPUT_SEEDS, seeds, batched)  # (N,)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise SdserveError(
                f"expected {OUTPUT_IMAGES!r} as uint8 (N, H, W, 3), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if seeds.shape != images.shape[:1]:
            raise SdserveError(
                f"got {len(images)} images but {OUTPUT_SEEDS!r} of shape {tuple(seeds.shape)}"
            )
        pil_images = [Image.fromarray(array) for array in images]
        return cls(images=pil_images, seeds=[int(seed) for seed in seeds], arrays=images)


class InpaintClient:
    """Client of the sdserve pipeline model on a Triton server, over gRPC.

    Args:
        url (`str`, *optional*, defaults to `"127.0.0.1:8001"`): Triton's gRPC `host:port`.
        model (`str`, *optional*, defaults to `"inpaint"`): name of the pipeline model.
        timeout (`float`, *optional*):
            Default per-call limit in seconds (tritonclient's `client_timeout`); `None` waits.
        client (`TritonClient`, *optional*):
            A ready `tritonclient.grpc.InferenceServerClient` (or a fake for tests); `url` is then
            unused.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        model: str = "inpaint",
        timeout: float | None = None,
        *,
        client: TritonClient | None = None,
    ) -> None:
        self.url = url
        self.model = model
        self.timeout = timeout
        self._client: TritonClient = (
            client if client is not None else _call(grpcclient.InferenceServerClient, url)
        )
        self._batched: bool | None = None
        self._limits: Limits | None = None

    def inpaint(
        self,
        image: ImageLike,
        mask: MaskLike,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Regenerates the masked part of an image.

        Args:
            image (`PIL.Image.Image` or `np.ndarray`): the image, any PIL mode or uint8 (H, W, 3).
            mask (`PIL.Image.Image` or `np.ndarray`): same size; white (255) is regenerated.
            prompt (`str`): the text to guide generation.
            timeout (`float`, *optional*): limit in seconds for this call.
            **options: any other `GenerationRequest` field (`steps`, `seed`, ...).
        """
        request = GenerationRequest(prompt, image=image, mask=mask, **options)
        return self.generate(request, timeout=timeout)

    def text_to_image(
        self,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Generates images from text alone.

        Args:
            prompt (`str`): the text to guide generation.
            height (`int`, *optional*): image height in pixels (server default).
            width (`int`, *optional*): image width in pixels (server default).
            timeout (`float`, *optional*): limit in seconds for this call.
            **options: any other `GenerationRequest` field.
        """
        request = GenerationRequest(prompt, height=height, width=width, **options)
        return self.generate(request, timeout=timeout)

    def outpaint(
        self,
        image: ImageLike,
        prompt: str,
        left: int = 0,
        top: int = 0,
        right: int = 0,
        bottom: int = 0,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Extends an image by the given number of pixels on each side.

        Args:
            image (`PIL.Image.Image` or `np.ndarray`): the image, any PIL mode or uint8 (H, W, 3).
            prompt (`str`): the text to guide generation.
            left, top, right, bottom (`int`, *optional*, default to 0): pixels to add.
            timeout (`float`, *optional*): limit in seconds for this call.
            **options: any other `GenerationRequest` field.
        """
        sides = (left, top, right, bottom)
        if sides == (0, 0, 0, 0):
            raise InvalidRequestError("outpaint needs left, top, right or bottom > 0, got all 0")
        request = GenerationRequest(prompt, image=image, outpaint=sides, **options)
        return self.generate(request, timeout=timeout)

    def generate(
        self, request: GenerationRequest, *, timeout: float | None = None
    ) -> GenerationResult:
        """Sends one request to the pipeline model.

        Args:
            request (`GenerationRequest`): the request; checked before anything is sent.
            timeout (`float`, *optional*): limit in seconds for this call.
        """
        inputs, outputs, batched = self._prepare(request, timeout)
        result = _call(
            self._client.infer,
            self.model,
            inputs,
            outputs=outputs,
            client_timeout=self._timeout(timeout),
        )
        return _result(result, batched)

    def submit(
        self, request: GenerationRequest, *, timeout: float | None = None
    ) -> PendingGeneration:
        """Sends one request without waiting; the handle can be awaited or cancelled.

        Cancelling stops the server's denoising loop at its next step.

        Args:
            request (`GenerationRequest`): the request; checked before anything is sent.
            timeout (`float`, *optional*): deadline in seconds for this call.
        """
        inputs, outputs, batched = self._prepare(request, timeout)
        future: Future[GenerationResult] = Future()

        def done(result: Any, error: InferenceServerException | None) -> None:
            if error is not None:
                future.set_exception(SdserveError.from_triton(error))
                return
            try:
                future.set_result(_result(result, batched))
            except SdserveError as exc:
                future.set_exception(exc)

        context = _call(
            self._client.async_infer,
            self.model,
            inputs,
            done,
            outputs=outputs,
            client_timeout=self._timeout(timeout),
        )
        return PendingGeneration(future, context)

    def _prepare(
        self, request: GenerationRequest, timeout: float | None
    ) -> tuple[list[Any], list[Any], bool]:
        tensors = encode_request(request)  # the rules every model shares, before any call
        batched = self._is_batched(timeout)
        check_request(request, self._limits)  # and this model's own limits
        if batched:
            tensors = add_batch_dim(tensors)
        inputs = [_call(_infer_input, name, array) for name, array in tensors.items()]
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUT_NAMES]
        return inputs, outputs, batched

    def list_models(self, *, timeout: float | None = None) -> list[str]:
        """Returns the names of the ready models in the server's repository index."""
        index = _call(
            self._client.get_model_repository_index,
            as_json=True,
            client_timeout=self._timeout(timeout),
        )
        names = [m["name"] for m in index.get("models", []) if m.get("state") == "READY"]
        return list(dict.fromkeys(names))

    def is_ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server and the pipeline model are ready; `False` when unreachable."""
        client_timeout = self._timeout(timeout)
        try:
            return bool(self._client.is_server_ready(client_timeout=client_timeout)) and bool(
                self._client.is_model_ready(self.model, client_timeout=client_timeout)
            )
        except InferenceServerException:
            return False

    def close(self) -> None:
        """Closes the underlying gRPC channel."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    def _is_batched(self, timeout: float | None) -> bool:
        """Whether the model's first dimension is a batch dimension; its config, with its
        `limit_*` parameters, is fetched once."""
        if self._batched is None:
            response = _call(
                self._client.get_model_config,
                self.model,
                as_json=True,
                client_timeout=self._timeout(timeout),
            )
            config = response.get("config", response)
            self._batched = int(config.get("max_batch_size", 0)) > 0
            self._limits = limits_from_parameters(config_parameters(config), strict=False)
        return self._batched

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class PendingGeneration:
    """A request in flight (from `InpaintClient.submit`)."""

    def __init__(self, future: Future[GenerationResult], context: Any) -> None:
        self._future = future
        self._context = context

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Waits for the images; raises `SdserveError` (also when cancelled)."""
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise SdserveError(f"no result within {timeout} s") from None

    def cancel(self) -> None:
        """Cancels the request; the server stops at its next denoising step."""
        self._context.cancel()

    def done(self) -> bool:
        return self._future.done()


def _result(result: Any, batched: bool) -> GenerationResult:
    images, seeds = result.as_numpy(OUTPUT_IMAGES), result.as_numpy(OUTPUT_SEEDS)
    return GenerationResult.from_outputs(images, seeds, batched)


def _infer_input(name: str, array: Array) -> Any:
    infer_input = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    infer_input.set_data_from_numpy(array)
    return infer_input


def _unbatch(name: str, array: Array | None, batched: bool) -> Array:
    if array is None:
        raise SdserveError(f"the response has no {name!r} output")
    if not batched:
        return array
    if array.ndim == 0 or array.shape[0] != 1:
        raise SdserveError(f"expected {name!r} with batch size 1, got shape {tuple(array.shape)}")
    return array.reshape(array.shape[1:])


def _call(method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Calls a tritonclient method, turning its exceptions into `SdserveError`."""
    try:
        return method(*args, **kwargs)
    except InferenceServerException as exc:
        raise SdserveError.from_triton(exc) from None
