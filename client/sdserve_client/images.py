"""Conversion of user images and masks into the arrays of the wire contract."""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from .errors import InvalidRequestError

ImageLike: TypeAlias = Image.Image | npt.NDArray[Any]
"""A PIL image (any mode) or a uint8 array of shape (H, W, 3)."""

MaskLike: TypeAlias = Image.Image | npt.NDArray[Any]
"""A PIL image (any mode) or a uint8/bool array of shape (H, W), (H, W, 1) or (H, W, 3)."""


def to_rgb_array(image: ImageLike) -> npt.NDArray[np.uint8]:
    """Converts an image into the `image` tensor: RGB uint8 of shape (H, W, 3).

    Args:
        image (`PIL.Image.Image` or `np.ndarray`):
            A PIL image of any mode (turned upright by its EXIF orientation, 16-bit samples
            scaled to 8 bits, converted to RGB; alpha is dropped), or a uint8 array of shape
            (H, W, 3) holding RGB.

    Returns:
        `np.ndarray`: a C-contiguous uint8 array of shape (H, W, 3).
    """
    if isinstance(image, Image.Image):
        array = np.asarray(_convert(_upright_8bit(image), "RGB", "image"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InvalidRequestError(f"image array must have dtype uint8, got {image.dtype}")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise InvalidRequestError(
                f"image array must have shape (H, W, 3), got {tuple(image.shape)}"
            )
        array = image
    else:
        raise _type_error("image", image)
    _check_not_empty("image", array)
    return np.ascontiguousarray(array, dtype=np.uint8)


def to_mask_array(mask: MaskLike) -> npt.NDArray[np.uint8]:
    """Converts a mask into the `mask` tensor: uint8 of shape (H, W), 255 = regenerate, 0 = keep.

    Args:
        mask (`PIL.Image.Image` or `np.ndarray`):
            A PIL image of any mode (upright and 8-bit as an image, converted to "L"), a uint8
            array of shape (H, W), a bool
            array of shape (H, W) (`True` becomes 255), or an array of shape (H, W, 1) or
            (H, W, 3) reduced to one channel the way PIL converts RGB to "L".

    Returns:
        `np.ndarray`: a C-contiguous uint8 array of shape (H, W).
    """
    if isinstance(mask, Image.Image):
        array = np.asarray(_convert(_upright_8bit(mask), "L", "mask"))
    elif isinstance(mask, np.ndarray):
        array = _mask_from_array(mask)
    else:
        raise _type_error("mask", mask)
    _check_not_empty("mask", array)
    return np.ascontiguousarray(array, dtype=np.uint8)


def _mask_from_array(mask: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * np.uint8(255)
    elif mask.dtype != np.uint8:
        raise InvalidRequestError(f"mask array must have dtype uint8 or bool, got {mask.dtype}")
    if mask.ndim == 3 and mask.shape[-1] == 1:
        return mask[..., 0]
    if mask.ndim == 3 and mask.shape[-1] == 3:
        return np.asarray(Image.fromarray(np.ascontiguousarray(mask)).convert("L"))
    if mask.ndim != 2:
        raise InvalidRequestError(
            f"mask array must have shape (H, W), (H, W, 1) or (H, W, 3), got {tuple(mask.shape)}"
        )
    return mask


_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # one channel, more than 8 bits


def _upright_8bit(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (phone photos are
    often stored sideways with a tag saying so), 16-bit samples scaled to 8 bits."""
    upright = ImageOps.exif_transpose(image)
    if upright.mode not in _WIDE_MODES:
        return upright
    samples = np.asarray(upright).astype(np.uint32)
    if samples.max(initial=0) > 255:  # 16-bit values: keep the top 8 bits
        samples >>= 8
    return Image.fromarray(samples.astype(np.uint8), mode="L")


def _convert(image: Image.Image, mode: str, name: str) -> Image.Image:
    """`image.convert(mode)`, going through RGB where PIL has no direct conversion."""
    for path in ((mode,), ("RGB", mode)):
        try:
            for step in path:
                image = image.convert(step)
            return image
        except (ValueError, OSError):
            continue
    raise InvalidRequestError(f"cannot convert {name} of mode {image.mode!r} to {mode!r}")


def _check_not_empty(name: str, array: npt.NDArray[Any]) -> None:
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidRequestError(f"{name} must not be empty, got size {size_text(array)}")


def _type_error(name: str, value: object) -> InvalidRequestError:
    return InvalidRequestError(
        f"{name} must be a PIL.Image.Image or a numpy array, got {type(value).__name__}"
    )


def size_text(array: npt.NDArray[Any]) -> str:
    """Formats an array's spatial size as PIL does: width x height."""
    return f"{array.shape[1]}x{array.shape[0]}"
