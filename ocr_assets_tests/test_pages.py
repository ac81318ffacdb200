"""Header parsing against PIL's sizes, and the `pages` stage on good and bad rows."""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ocr_assets.dataset import open_shard
from ocr_assets.image_header import ImageHeaderError, read_header
from ocr_assets.schemas import PAGES
from ocr_assets.stages.pages import extract_pages

# (PIL format, save options, expected format name)
CASES = [
    ("PNG", {}, "png"),
    ("JPEG", {"quality": 80}, "jpeg"),
    ("JPEG", {"progressive": True}, "jpeg"),
    ("JPEG", {"exif": b"Exif\x00\x00" + b"\x00" * 2000, "icc_profile": b"\x00" * 5000}, "jpeg"),
    ("GIF", {}, "gif"),
    ("BMP", {}, "bmp"),
    ("WEBP", {"quality": 70}, "webp"),
    ("WEBP", {"lossless": True}, "webp"),
    ("WEBP", {"exif": b"Exif\x00\x00\x00"}, "webp"),  # written as VP8X
    ("TIFF", {}, "tiff"),
    ("TIFF", {"compression": "tiff_lzw"}, "tiff"),
]


def _encode(size: tuple[int, int], fmt: str, mode: str = "RGB", **options) -> bytes:
    pixels = np.random.default_rng(size[0]).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("pil_format, options, name", CASES)
@pytest.mark.parametrize("size", [(1, 1), (333, 77), (70, 300)])
def test_header_matches_pil(pil_format, options, name, size):
    data = _encode(size, pil_format, **options)
    assert read_header(data) == (name, *Image.open(io.BytesIO(data)).size)
    assert read_header(memoryview(data)) == (name, *size)
    assert read_header(pa.py_buffer(data)) == (name, *size)  # a signed-byte buffer view reads the same


def test_header_of_big_endian_tiff_with_long_tags_and_top_down_bmp():
    # MM TIFF, one IFD: width as LONG, height as SHORT.
    entries = struct.pack(">HHII", 256, 4, 1, 70000) + struct.pack(">HHIHH", 257, 3, 1, 321, 0)
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 2) + entries + b"\x00" * 4
    assert read_header(tiff) == ("tiff", 70000, 321)
    bmp = bytearray(_encode((20, 10), "BMP"))
    bmp[22:26] = struct.pack("<i", -10)  # top-down rows
    assert read_header(bytes(bmp)) == ("bmp", 20, 10)
    assert read_header(_encode((9, 4), "JPEG", mode="L")) == ("jpeg", 9, 4)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty image bytes"),
        (b"hello world", "not an image \\(starts with b'hello wo'\\)"),
        (b"%PDF-1.7\n", "not an image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "truncated PNG header"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated JPEG header"),
        (b"\xff\xd8\xff\xd9", "JPEG ends before its frame header"),
        (b"\xff\xd8\xff\xda\x00\x08", "scan starts before any frame header"),
        (b"\xff\xd8\x00\x00", "corrupt JPEG"),
        (b"GIF89a\x01", "truncated GIF header"),
        (b"GIF89a\x00\x00\x05\x00", "empty size 0x5"),
        (b"RIFF\x00\x00\x00\x00WEBPVP9 ", "unknown WebP chunk"),
        (b"II*\x00\xff\xff\xff\x00", "truncated TIFF header"),
        (b"II+\x00\x08\x00\x00\x00", "BigTIFF"),
    ],
)
def test_bad_headers_raise_readable_errors(data, message):
    with pytest.raises(ImageHeaderError, match=message):
        read_header(data)


def test_every_truncation_of_real_headers_fails_cleanly():
    for pil_format, options, name in CASES:
        data = _encode((40, 30), pil_format, **options)
        for end in range(0, min(len(data), 600)):
            try:
                assert read_header(data[:end]) == (name, 40, 30)
            except ImageHeaderError as exc:
                assert exc.format in (None, name), (pil_format, end, exc)


def test_long_fill_byte_run_in_jpeg_is_bounded():
    with pytest.raises(ImageHeaderError, match="JPEG"):
        read_header(b"\xff\xd8" + b"\xff" * 1_000_000)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
                            b"II*\x00", b"MM\x00*"]),
    tail=st.binary(max_size=200),
)
def test_random_bytes_give_a_header_or_an_image_header_error(prefix, tail):
    try:
        header = read_header(prefix + tail)
    except ImageHeaderError:
        return
    assert header.width > 0 and header.height > 0


def _shard_with_rows(tmp_path, rows: list, ids: list[str] | None = None):
    # Written with pyarrow in the `datasets` Image layout: datasets refuses rows with neither bytes nor path.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"image": pa.array(rows, image_type)} | ({} if ids is None else {"id": pa.array(ids, pa.string())})
    table = pa.table(columns)
    (tmp_path / "ds").mkdir()
    with pa.ipc.new_stream(str(tmp_path / "ds" / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    return open_shard(str(tmp_path / "ds"), "data-00000-of-00001", id_column=None if ids is None else "id")


def test_extract_pages_turns_bad_rows_into_error_rows(tmp_path):
    png, jpeg, webp = _encode((64, 32), "PNG"), _encode((50, 20), "JPEG"), _encode((30, 31), "WEBP")
    rows = [
        {"bytes": png, "path": None},
        {"bytes": b"", "path": None},
        None,
        {"bytes": b"hello", "path": None},
        {"bytes": png[:20], "path": None},
        {"bytes": jpeg, "path": None},
        {"bytes": None, "path": None},
        {"bytes": webp, "path": None},
    ]
    table, report = extract_pages(_shard_with_rows(tmp_path, rows))
    assert table.schema == PAGES
    got = table.to_pylist()
    assert [r["status"] for r in got] == ["ok", "error", "error", "error", "error", "ok", "error", "ok"]
    assert [r["page_id"] for r in got] == [f"data-00000-of-00001/{i}" for i in range(8)]
    assert got[0] | {"page_id": None} == {
        "page_id": None, "shard": "data-00000-of-00001", "row": 0, "format": "png", "width": 64, "height": 32,
        "nbytes": len(png), "status": "ok", "error": None,
    }
    assert (got[5]["format"], got[5]["width"], got[5]["height"]) == ("jpeg", 50, 20)
    assert (got[7]["format"], got[7]["width"], got[7]["height"]) == ("webp", 30, 31)
    assert got[1]["error"] == "empty image bytes" and got[1]["nbytes"] == 0
    assert "null in column 'image'" in got[2]["error"] and got[2]["nbytes"] is None
    assert got[3]["error"].startswith("not an image") and got[3]["format"] is None
    assert got[4]["error"].startswith("truncated PNG header") and got[4]["format"] == "png"
    assert "null" in got[6]["error"]
    assert all(r["width"] is None and r["height"] is None for r in got if r["status"] == "error")
    assert report.pages == 8 and report.stage_seconds > 0 and "header" in report.parts
    assert report.counts == {"pages": 8, "ok": 3, "errors": 5, "format_jpeg": 1, "format_png": 1, "format_webp": 1}


def test_extract_pages_uses_the_id_column(tmp_path):
    rows = [{"bytes": _encode((8, 8 + i), "PNG"), "path": None} for i in range(3)]
    table, _ = extract_pages(_shard_with_rows(tmp_path, rows, ids=["a", "b", "c"]))
    assert table.column("page_id").to_pylist() == ["a", "b", "c"]
    assert table.column("height").to_pylist() == [8, 9, 10]
    assert table.column("row").to_pylist() == [0, 1, 2]
