"""One orientation everywhere: a page with an EXIF orientation is the same way up on every path.

cv2 turns a page upright when it decodes it (JPEG, PNG, WebP, TIFF); the header reader (the
pages table's width and height), the layout backends' prepared pages and the GPU decode path
must agree with it, or boxes land on the wrong pixels.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ocr_assets.backends.layout.picodet_cdla import PicodetCdlaBackend
from ocr_assets.backends.layout.pp_doclayout_v3 import apply_exif_orientation
from ocr_assets.image_header import ImageHeaderError, read_header, read_orientation
from ocr_assets.imaging import decode_page

ORIENTATIONS = range(1, 9)


def _picture(width: int = 64, height: int = 40) -> Image.Image:
    """An RGB picture with no symmetry: every flip and turn of it is a different array."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[:8, :16] = (255, 0, 0)  # a red corner top-left
    return Image.fromarray(pixels)


def exif_image(orientation: int, fmt: str = "JPEG", picture: Image.Image | None = None) -> bytes:
    """``picture`` stored as ``fmt`` with EXIF orientation ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    (picture or _picture()).save(buf, fmt, exif=exif.tobytes(), **options)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_the_header_gives_the_upright_size(fmt, orientation):
    data = exif_image(orientation, fmt)
    height, width = decode_page(data).shape[:2]
    assert (height, width) == ((64, 40) if orientation >= 5 else (40, 64))  # cv2 turned it
    assert read_header(data)[1:] == (width, height)
    assert read_orientation(data) == orientation


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientation_on_a_tensor_matches_cv2(orientation):
    data = exif_image(orientation)
    stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    turned = apply_exif_orientation(torch.from_numpy(stored).permute(2, 0, 1), orientation)
    np.testing.assert_array_equal(turned.permute(1, 2, 0).numpy(), decode_page(data))


def test_picodet_prepares_the_page_at_the_pages_table_size():
    backend = PicodetCdlaBackend()
    for orientation in ORIENTATIONS:
        data = exif_image(orientation)
        (page,) = backend.prepare([data])
        width, height = read_header(data)[1:]
        assert (page.height, page.width) == (height, width) == decode_page(data).shape[:2]


def test_broken_exif_reads_as_upright_or_fails_with_a_reason():
    data = exif_image(6)
    app1 = data.index(b"Exif\x00\x00")
    for end in range(app1, app1 + 120):
        try:
            fmt, width, height = read_header(data[:end])
            assert width > 0 and height > 0
        except ImageHeaderError as exc:
            assert str(exc)
        assert read_orientation(data[:end]) in ORIENTATIONS
    # a value out of range counts as upright; a tag of another type is read as a SHORT: as cv2 does
    tag = data.index(b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06")  # PIL writes big-endian EXIF
    out_of_range = data[:tag + 8] + b"\x00\x09" + data[tag + 10:]
    wrong_type = data[:tag + 2] + b"\x00\x04" + data[tag + 4:]
    for bad, upright in ((out_of_range, True), (wrong_type, False)):
        height, width = decode_page(bad).shape[:2]
        assert read_header(bad)[1:] == (width, height) == ((64, 40) if upright else (40, 64))
