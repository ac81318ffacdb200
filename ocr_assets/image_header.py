"""Image format and size from the header bytes alone: no decode, no PIL.

Supports PNG, JPEG, GIF, BMP, WebP (VP8, VP8L, VP8X) and TIFF. Every parser checks
lengths before reading and does bounded work, so hostile bytes give an
``ImageHeaderError`` quickly rather than a crash or a long loop.

The size is the upright page's: cv2 applies an EXIF orientation when it decodes (JPEG, PNG,
WebP, TIFF), and orientations 5-8 swap the sides, so the header's size is swapped to match.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# JPEG start-of-frame markers that carry the frame size (SOF0-3, 5-7, 9-11, 13-15).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# JPEG markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
_JPEG_MAX_SEGMENTS = 1024
_TIFF_MAX_ENTRIES = 4096
_TIFF_MAX_FRAMES = 100_000
_CHUNK_MAX = 256  # PNG / WebP chunks walked looking for EXIF
_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageHeader(NamedTuple):
    """What the header says: lower-case format name and pixel size."""

    format: str
    width: int
    height: int


class ImageHeaderError(ValueError):
    """The bytes are not an image header this module can read; ``format`` is set when it was recognised."""

    def __init__(self, message: str, format: str | None = None) -> None:
        super().__init__(message)
        self.format = format


def read_header(data: bytes | memoryview) -> ImageHeader:
    """Format, width and height of encoded image bytes, read from the header only.

    The size is the upright one (an EXIF orientation of 5-8 swaps width and height), as
    ``imaging.decode_page`` returns the page. Raises ``ImageHeaderError`` with a readable
    reason for empty, truncated, unknown or malformed input.
    """
    header, orientation = _read(data)
    if orientation >= 5:
        return ImageHeader(header.format, header.height, header.width)
    return header


def read_orientation(data: bytes | memoryview) -> int:
    """The EXIF orientation (1-8) of encoded image bytes; 1 where there is none or it cannot be read."""
    try:
        return _read(data)[1]
    except ImageHeaderError:
        return 1


def _read(data: bytes | memoryview) -> tuple[ImageHeader, int]:
    """The header as stored (not rotated) and the EXIF orientation."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    n = len(view)
    if n == 0:
        raise ImageHeaderError("empty image bytes")
    head = bytes(view[:16])
    orientation = 1
    if head.startswith(_PNG_SIGNATURE):
        header, orientation = _png(view), _png_orientation(view)
    elif head.startswith(b"\xff\xd8"):
        header, orientation = _jpeg(view)
    elif head.startswith((b"GIF87a", b"GIF89a")):
        header = _gif(view)
    elif head.startswith(b"BM"):
        header = _bmp(view)
    elif head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        header, orientation = _webp(view), _webp_orientation(view)
    elif head.startswith((b"II", b"MM")) and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+"):
        header, orientation = _tiff(view)
    else:
        raise ImageHeaderError(f"not an image (starts with {head[:8]!r})")
    if header.width <= 0 or header.height <= 0:
        raise ImageHeaderError(
            f"{header.format.upper()} header gives an empty size {header.width}x{header.height}", header.format
        )
    return header, orientation


def _need(view: memoryview, size: int, fmt: str) -> None:
    if len(view) < size:
        raise ImageHeaderError(f"truncated {fmt.upper()} header ({len(view)} bytes)", fmt)


def _png(view: memoryview) -> ImageHeader:
    _need(view, 24, "png")
    if bytes(view[12:16]) != b"IHDR":
        raise ImageHeaderError("PNG does not start with an IHDR chunk", "png")
    width, height = struct.unpack_from(">II", view, 16)
    return ImageHeader("png", width, height)


def _jpeg(view: memoryview) -> tuple[ImageHeader, int]:
    n = len(view)
    i = 2
    orientation = 1
    for _ in range(_JPEG_MAX_SEGMENTS):
        if i >= n:
            break
        if view[i] != 0xFF:
            raise ImageHeaderError(f"corrupt JPEG: expected a marker at byte {i}", "jpeg")
        # Skip fill bytes (runs of 0xFF) before the marker code; a long run costs one more segment.
        j = i + 1
        while j < n and view[j] == 0xFF and j - i < 64:
            j += 1
        if j >= n:
            break
        marker = view[j]
        if marker == 0xFF:
            i = j
            continue
        if marker in _JPEG_STANDALONE:
            i = j + 1
            continue
        if marker == 0xD9:
            raise ImageHeaderError("JPEG ends before its frame header", "jpeg")
        if j + 3 > n:
            break
        (length,) = struct.unpack_from(">H", view, j + 1)
        if length < 2:
            raise ImageHeaderError(f"corrupt JPEG: segment length {length} at byte {j + 1}", "jpeg")
        if marker in _JPEG_SOF:
            if j + 8 > n:
                break
            height, width = struct.unpack_from(">HH", view, j + 4)
            return ImageHeader("jpeg", width, height), orientation
        if marker == 0xE1 and bytes(view[j + 3:j + 9]) == b"Exif\x00\x00":  # APP1: EXIF, before the frame
            orientation = _exif_orientation(view[j + 9:min(n, j + 1 + length)])
        if marker == 0xDA:
            raise ImageHeaderError("JPEG scan starts before any frame header", "jpeg")
        i = j + 1 + length
    else:
        raise ImageHeaderError(f"no JPEG frame header in the first {_JPEG_MAX_SEGMENTS} segments", "jpeg")
    raise ImageHeaderError(f"truncated JPEG header (no frame header in {n} bytes)", "jpeg")


def _gif(view: memoryview) -> ImageHeader:
    _need(view, 10, "gif")
    width, height = struct.unpack_from("<HH", view, 6)
    return ImageHeader("gif", width, height)


def _bmp(view: memoryview) -> ImageHeader:
    _need(view, 18, "bmp")
    (dib_size,) = struct.unpack_from("<I", view, 14)
    if dib_size == 12:  # BITMAPCOREHEADER: 16-bit unsigned sizes
        _need(view, 22, "bmp")
        width, height = struct.unpack_from("<HH", view, 18)
    elif dib_size >= 40 or dib_size in (16, 64):
        _need(view, 26, "bmp")
        width, height = struct.unpack_from("<ii", view, 18)
        height = abs(height)  # negative height means rows stored top-down
    else:
        raise ImageHeaderError(f"unknown BMP header size {dib_size}", "bmp")
    return ImageHeader("bmp", width, height)


def _webp(view: memoryview) -> ImageHeader:
    _need(view, 16, "webp")
    chunk = bytes(view[12:16])
    if chunk == b"VP8 ":
        _need(view, 30, "webp")
        if bytes(view[23:26]) != b"\x9d\x01\x2a":
            raise ImageHeaderError("corrupt WebP: VP8 start code missing", "webp")
        width, height = struct.unpack_from("<HH", view, 26)
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        _need(view, 25, "webp")
        if view[20] != 0x2F:
            raise ImageHeaderError("corrupt WebP: VP8L signature missing", "webp")
        (bits,) = struct.unpack_from("<I", view, 21)
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        _need(view, 30, "webp")
        width = int.from_bytes(view[24:27], "little") + 1
        height = int.from_bytes(view[27:30], "little") + 1
        return ImageHeader("webp", width, height)
    raise ImageHeaderError(f"unknown WebP chunk {chunk!r}", "webp")


def _tiff(view: memoryview) -> tuple[ImageHeader, int]:
    order, ifd = _tiff_start(view)
    width, height, orientation, _ = _tiff_ifd(view, order, ifd)
    return ImageHeader("tiff", width, height), orientation


def _tiff_start(view: memoryview) -> tuple[str, int]:
    """(byte order, offset of the first IFD) of a classic TIFF."""
    _need(view, 8, "tiff")
    order = "<" if bytes(view[:2]) == b"II" else ">"
    (magic,) = struct.unpack_from(order + "H", view, 2)
    if magic != 42:
        raise ImageHeaderError("BigTIFF is not supported", "tiff")
    (ifd,) = struct.unpack_from(order + "I", view, 4)
    return order, ifd


def _tiff_ifd(view: memoryview, order: str, ifd: int) -> tuple[int, int, int, int]:
    """(width, height as stored, orientation, offset of the next IFD or 0) of the IFD at ``ifd``."""
    if ifd < 8 or ifd + 2 > len(view):
        raise ImageHeaderError(f"truncated TIFF header (IFD at byte {ifd}, {len(view)} bytes)", "tiff")
    (count,) = struct.unpack_from(order + "H", view, ifd)
    listed = min(count, _TIFF_MAX_ENTRIES, (len(view) - ifd - 2) // 12)
    width = height = None
    orientation = 1
    for k in range(listed):
        tag, kind, _ = struct.unpack_from(order + "HHI", view, ifd + 2 + 12 * k)
        if tag == _ORIENTATION_TAG:  # a SHORT; read as one whatever the type says, as cv2 does
            (value,) = struct.unpack_from(order + "H", view, ifd + 10 + 12 * k)
            orientation = value if 1 <= value <= 8 else 1
            continue
        if tag not in (256, 257):
            continue
        if kind == 3:  # SHORT: the value sits in the first two bytes of the field
            (value,) = struct.unpack_from(order + "H", view, ifd + 10 + 12 * k)
        elif kind == 4:  # LONG
            (value,) = struct.unpack_from(order + "I", view, ifd + 10 + 12 * k)
        else:
            raise ImageHeaderError(f"TIFF size tag {tag} has unsupported type {kind}", "tiff")
        if tag == 256:
            width = value
        else:
            height = value
    if width is None or height is None:
        raise ImageHeaderError("truncated TIFF header (no width/height tags in an IFD)", "tiff")
    after = ifd + 2 + 12 * count
    (following,) = struct.unpack_from(order + "I", view, after) if after + 4 <= len(view) else (0,)
    return width, height, orientation, following


def tiff_frames(data: bytes | memoryview) -> list[tuple[int, int]]:
    """Upright (width, height) of every frame of a TIFF (each IFD of its chain), nothing decoded.

    Raises ImageHeaderError for a malformed or looping chain, or more than _TIFF_MAX_FRAMES frames.
    """
    view = memoryview(data).cast("B")
    order, ifd = _tiff_start(view)
    sizes: list[tuple[int, int]] = []
    seen: set[int] = set()
    while ifd:
        if ifd in seen or len(sizes) >= _TIFF_MAX_FRAMES:
            raise ImageHeaderError("the TIFF's directory chain loops or is too long", "tiff")
        seen.add(ifd)
        width, height, orientation, ifd = _tiff_ifd(view, order, ifd)
        sizes.append((height, width) if orientation >= 5 else (width, height))
    return sizes


def _exif_orientation(tiff: memoryview) -> int:
    """The orientation tag (0x0112) of the first IFD of a TIFF-structured EXIF block; 1 if absent or unreadable."""
    if len(tiff) < 8 or bytes(tiff[:2]) not in (b"II", b"MM"):
        return 1
    order = "<" if bytes(tiff[:2]) == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd < 8 or ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for k in range(min(count, _TIFF_MAX_ENTRIES, (len(tiff) - ifd - 2) // 12)):
        (tag,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * k)
        if tag == _ORIENTATION_TAG:  # a SHORT; read as one whatever the type says, as cv2 does
            (value,) = struct.unpack_from(order + "H", tiff, ifd + 10 + 12 * k)
            return value if 1 <= value <= 8 else 1
    return 1


def _png_orientation(view: memoryview) -> int:
    """Orientation from a PNG ``eXIf`` chunk before the image data; 1 without one."""
    i = 8
    for _ in range(_CHUNK_MAX):
        if i + 8 > len(view):
            break
        (length,) = struct.unpack_from(">I", view, i)
        kind = bytes(view[i + 4:i + 8])
        if kind == b"eXIf":
            return _exif_orientation(view[i + 8:min(len(view), i + 8 + length)])
        if kind in (b"IDAT", b"IEND"):
            break
        i += 12 + length
    return 1


def _webp_orientation(view: memoryview) -> int:
    """Orientation from a WebP ``EXIF`` chunk (extended format only); 1 without one."""
    if bytes(view[12:16]) != b"VP8X" or len(view) < 21 or not view[20] & 0x08:  # the VP8X EXIF flag
        return 1
    i = 12
    for _ in range(_CHUNK_MAX):
        if i + 8 > len(view):
            break
        kind = bytes(view[i:i + 4])
        (length,) = struct.unpack_from("<I", view, i + 4)
        if kind == b"EXIF":
            block = view[i + 8:min(len(view), i + 8 + length)]
            return _exif_orientation(block[6:] if bytes(block[:6]) == b"Exif\x00\x00" else block)
        i += 8 + length + (length & 1)  # chunks are padded to an even size
    return 1
