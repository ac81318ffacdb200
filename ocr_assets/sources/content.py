"""One source row's stored content turned into pages: an image, a list, a PDF, a multi-frame TIFF, a path.

The layouts (Arrow / Parquet columns, WebDataset members) hand over a row as ``RowContent``: the
stored objects it holds, in order, or the reason it holds none. ``PageReader`` expands each
object into its pages from headers alone (a PDF's page boxes, a TIFF's frame directory) and gives
the pixels of a page that has no bytes of its own (a TIFF frame). The format is taken from the
bytes' magic numbers, never from what the column or the member's name claims.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
from PIL import Image

from ocr_assets import config
from ocr_assets.image_header import ImageHeaderError, read_header, tiff_frames
from ocr_assets.imaging import ImageDecodeError, check_pixels
from ocr_assets.sources.base import PageInfo
from ocr_assets.sources.pdf import PdfError, pdf_page_sizes

PageKind = Literal["bytes", "pdf", "frame", "error"]

_PDF_HEADER_WINDOW = 1024  # PDF readers find "%PDF-" anywhere in the first KiB
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# TIFF orientation tag → the PIL transpose that turns the frame upright (as cv2 does for one frame)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class PageReadError(ValueError):
    """One page (or its row) cannot be read; the message says why."""


def sniff(data: bytes | memoryview) -> str | None:
    """The stored format from the magic numbers: ``pdf``, ``png``, ``jpeg``, ``tiff``, ``webp``,
    ``gif``, ``bmp``, ``jp2``; None when the bytes start like none of them."""
    head = bytes(memoryview(data)[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head.startswith((_JP2_SIGNATURE, b"\xff\x4f\xff\x51")):
        return "jp2"
    if head.startswith(b"%PDF-") or b"%PDF-" in bytes(memoryview(data)[:_PDF_HEADER_WINDOW]):
        return "pdf"
    return None


@dataclass(frozen=True)
class Item:
    """One stored object of a row: its bytes (a view where the layout allows), or only a path.

    ``claim`` is what the dataset says it is (``image`` / ``pdf``, from a feature or a member's
    extension), used only to word the error when the bytes are neither.
    """

    data: memoryview | bytes | None
    path: str | None = None
    claim: str | None = None


# A row's content: its objects in order (an element that is null is the reason it cannot be
# read), or the reason the whole row holds nothing (a null, an empty list, a sample without content).
RowContent = Union[str, tuple[Union[Item, str], ...]]


@dataclass(frozen=True)
class Page:
    """One page of a row: what ``pages`` records, and where its pixels come from.

    ``kind`` ``bytes``: ``data`` is the encoded image; ``pdf``: page ``index`` of the PDF in ``data``;
    ``frame``: frame ``index`` of the TIFF in ``data``; ``error``: ``info.error`` says why not.
    ``item`` is the object's index in its row (a PDF's document key).
    """

    info: PageInfo
    kind: PageKind
    data: memoryview | bytes | None = None
    item: int = 0
    index: int = 0


@dataclass(frozen=True)
class _Part:
    """A page of one stored object, before it knows its place in the row."""

    kind: PageKind
    format: str | None = None
    width: int | None = None
    height: int | None = None
    nbytes: int | None = None
    error: str | None = None
    data: memoryview | bytes | None = None
    index: int = 0


def _error(reason: str, format: str | None = None, nbytes: int | None = None) -> _Part:
    return _Part("error", format, nbytes=nbytes, error=reason)


def _sized(fmt: str, width: int, height: int, nbytes: int, kind: PageKind, data, index: int = 0) -> _Part:
    try:
        check_pixels(width, height)
    except ImageDecodeError as exc:  # too many pixels: refused before anything is decoded, size kept
        return _Part("error", fmt, width, height, nbytes, str(exc))
    return _Part(kind, fmt, width, height, nbytes, data=data, index=index)


class PageReader:
    """Expands rows into pages. ``read_path`` reads a path-only object (OSError naming the path);
    ``dpi`` is the resolution PDF page sizes are given at."""

    def __init__(self, read_path: Callable[[str], bytes], dpi: int) -> None:
        self._read_path = read_path
        self.dpi = dpi

    def expand(self, row: int, content: RowContent) -> list[Page]:
        """The pages of one row, never an empty list; a row that fails gives its one error page."""
        if isinstance(content, str):
            return [Page(PageInfo(row, 0, error=content), "error")]
        parts: list[tuple[int, _Part]] = []
        for item_index, item in enumerate(content):
            if isinstance(item, str):
                parts.append((item_index, _error(item)))
                continue
            try:
                found = self._item_pages(item)
            except Exception as exc:  # one object's fault (a parser bug, a hostile file) stays its own
                found = [_error(f"could not read the stored object: {type(exc).__name__}: {exc}")]
            parts.extend((item_index, part) for part in found)
        if not parts:
            return [Page(PageInfo(row, 0, error="the row holds no pages"), "error")]
        return [Page(PageInfo(row, page, p.format, p.width, p.height, p.nbytes, p.error), p.kind, p.data, item, p.index)
                for page, (item, p) in enumerate(parts)]

    def _item_pages(self, item: Item) -> list[_Part]:
        data = item.data
        if data is None:
            if not item.path:
                return [_error("no bytes and no path (null)")]
            try:
                data = self._read_path(item.path)
            except OSError as exc:
                return [_error(str(exc))]
        nbytes = len(data)
        fmt = sniff(data)
        if fmt == "pdf":
            return self._pdf_pages(data, nbytes)
        if fmt is None and item.claim == "pdf":
            head = bytes(memoryview(data)[:8])
            return [_error("empty PDF bytes" if nbytes == 0 else f"not a PDF (starts with {head!r})",
                           nbytes=nbytes)]
        if fmt == "tiff":
            frames = _tiff_frames(data)
            if len(frames) > 1:
                return [_sized("tiff", w, h, nbytes, "frame", data, k) for k, (w, h) in enumerate(frames)]
        try:
            if fmt == "jp2":  # the header reader does not parse JPEG 2000 boxes; PIL reads only the header
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
            else:
                fmt, width, height = read_header(data)
        except ImageHeaderError as exc:
            return [_error(str(exc), format=exc.format, nbytes=nbytes)]
        except Exception as exc:
            return [_error(f"unreadable {fmt} header: {exc}", format=fmt, nbytes=nbytes)]
        return [_sized(fmt, width, height, nbytes, "bytes", data)]

    def _pdf_pages(self, data: bytes | memoryview, nbytes: int) -> list[_Part]:
        try:
            sizes = pdf_page_sizes(data, self.dpi)
        except PdfError as exc:
            return [_error(str(exc), format="pdf", nbytes=nbytes)]
        if not sizes:
            return [_error("the PDF has no pages", format="pdf", nbytes=nbytes)]
        return [_Part("pdf", "pdf", w, h, nbytes, data=data, index=k) for k, (w, h) in enumerate(sizes)]


def _tiff_frames(data: bytes | memoryview) -> list[tuple[int, int]]:
    """Upright (width, height) of every frame of a TIFF from its directory chain, no frame decoded;
    [] where the chain cannot be walked (the header reader then gives the reason)."""
    try:
        return tiff_frames(data)
    except ImageHeaderError:
        return []


def _orientation(im: Image.Image) -> int:
    tags = getattr(im, "tag_v2", None)
    value = tags.get(0x0112, 1) if tags is not None else 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_frame(data: bytes | memoryview, index: int) -> np.ndarray:
    """Frame ``index`` of a multi-frame TIFF alone, upright, as a BGR uint8 array (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(index)
        check_pixels(*im.size, config.max_pixels())
        frame = im.convert("RGB")
        transpose = _TRANSPOSE.get(_orientation(im))
        if transpose is not None:
            frame = frame.transpose(transpose)
        return np.ascontiguousarray(np.asarray(frame)[:, :, ::-1])
