"""Decoding and encoding page images: one decode per page, from the bytes as stored."""

from __future__ import annotations

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    """The bytes of one page or crop could not be decoded."""


def decode_page(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """Decode encoded image bytes to a BGR uint8 array (H, W, 3) with cv2, without copying the input."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.size == 0:
        raise ImageDecodeError("empty image bytes")
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageDecodeError("the bytes are not an image cv2 can decode")
    return image


def encode_image(image: np.ndarray, fmt: str = "png", jpeg_quality: int = 92) -> bytes:
    """Encode a BGR (or grayscale) array as PNG or JPEG bytes."""
    if fmt == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif fmt in ("jpeg", "jpg"):
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        raise ValueError(f"unknown crop format {fmt!r}: use 'png' or 'jpeg'")
    if not ok:
        raise ImageDecodeError(f"cv2 could not encode a {image.shape} array as {fmt}")
    return buf.tobytes()
