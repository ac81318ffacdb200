"""Decoding and encoding page images: one decode per page, from the bytes as stored."""

from __future__ import annotations

import cv2
import numpy as np

from ocr_assets import config
from ocr_assets.image_header import ImageHeaderError, read_header


class ImageDecodeError(ValueError):
    """The bytes of one page or crop could not be decoded."""


def check_pixels(width: int, height: int, cap: int | None = None) -> None:
    """Refuse a page whose header declares more than ``cap`` pixels (a decompression bomb)."""
    cap = config.max_pixels() if cap is None else cap
    if width * height > cap:
        raise ImageDecodeError(
            f"the image declares {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{cap:,}; raise {config.ENV_MAX_PIXELS} to read it"
        )


def decode_page(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """A page's BGR uint8 array (H, W, 3), from its encoded bytes (decoded with cv2, without
    copying the input) or from an array already decoded (a rendered PDF page, a TIFF frame),
    returned as it is.

    cv2 turns the page upright by its EXIF orientation (JPEG, PNG, WebP, TIFF); ``read_header``
    reports that upright size, and the GPU decode path turns its pages the same way.

    Either way a page of more pixels than OCR_ASSETS_MAX_PIXELS is refused; encoded bytes are
    refused from their header, before anything is allocated for the page.
    """
    if isinstance(data, np.ndarray) and data.ndim != 1:
        if data.ndim != 3 or data.shape[2] != 3 or data.dtype != np.uint8:
            raise ImageDecodeError(f"a decoded page must be a BGR uint8 array (H, W, 3), not "
                                   f"{data.dtype} {data.shape}")
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise ImageDecodeError(f"empty page array {data.shape}")
        check_pixels(data.shape[1], data.shape[0])
        return data
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.size == 0:
        raise ImageDecodeError("empty image bytes")
    try:
        header = read_header(memoryview(buf))
    except ImageHeaderError:
        header = None  # a format the header reader does not know: cv2 decides
    if header is not None:
        check_pixels(header.width, header.height)
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


def vlm_size(width: int, height: int, patch: int = config.VLM_PATCH, min_pixels: int = config.VLM_MIN_PIXELS,
             max_pixels: int = config.VLM_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) for a VLM: both multiples of ``patch``, pixels within [min, max], aspect kept.

    Rounds each side to the nearest multiple, then scales down (or up) by the square root of
    the pixel ratio when the area falls outside the bounds.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot size an empty {width}x{height} image")
    w = max(patch, round(width / patch) * patch)
    h = max(patch, round(height / patch) * patch)
    if w * h > max_pixels:
        scale = (width * height / max_pixels) ** 0.5
        w = max(patch, int(width / scale / patch) * patch)
        h = max(patch, int(height / scale / patch) * patch)
    elif w * h < min_pixels:
        scale = (min_pixels / (width * height)) ** 0.5
        w = max(patch, -(-int(width * scale) // patch) * patch)
        h = max(patch, -(-int(height * scale) // patch) * patch)
    return w, h


def vlm_crop(image: np.ndarray, jpeg_quality: int = 92) -> tuple[bytes, int, int]:
    """A crop as the VLM request needs it: resized to ``vlm_size`` and JPEG-encoded; (bytes, w, h)."""
    h0, w0 = image.shape[:2]
    w, h = vlm_size(w0, h0)
    if (w, h) != (w0, h0):
        shrink = w * h < w0 * h0
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return encode_image(image, "jpeg", jpeg_quality), w, h
