"""Header parsing against PIL's sizes, and the `pages` stage on good and bad rows."""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ocr_assets.image_header import ImageHeaderError, read_header
from ocr_assets.schemas import PAGES
from ocr_assets.sources.base import DatasetError
from ocr_assets.stages.pages import extract_pages
from ocr_assets.storage import ParquetStore
from ocr_assets_tests.memory_shard import MemoryShard

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


def _bgr(width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), 255, np.uint8)


def test_extract_pages_turns_bad_pages_into_error_rows(monkeypatch):
    png, jpeg, webp = _encode((64, 32), "PNG"), _encode((50, 20), "JPEG"), _encode((30, 31), "WEBP")
    monkeypatch.setenv("OCR_ASSETS_MAX_PIXELS", "100000")
    rows = [png, b"", None, b"hello", png[:20], jpeg, ValueError("the PDF is encrypted"), webp, _bgr(400, 300)]
    table, report = extract_pages(MemoryShard(rows, key="data-00000-of-00001"))
    assert table.schema == PAGES
    got = table.to_pylist()
    assert [r["status"] for r in got] == ["ok", "error", "error", "error", "error", "ok", "error", "ok", "error"]
    assert [r["page_id"] for r in got] == [f"data-00000-of-00001/{i}" for i in range(9)]
    assert [r["row"] for r in got] == list(range(9)) and {r["page"] for r in got} == {0}
    assert got[0] | {"page_id": None} == {
        "page_id": None, "shard": "data-00000-of-00001", "row": 0, "page": 0, "format": "png", "width": 64,
        "height": 32, "nbytes": len(png), "status": "ok", "error": None,
    }
    assert (got[5]["format"], got[5]["width"], got[5]["height"]) == ("jpeg", 50, 20)
    assert (got[7]["format"], got[7]["width"], got[7]["height"]) == ("webp", 30, 31)
    assert got[1]["error"] == "empty image bytes" and got[1]["nbytes"] == 0
    assert "null" in got[2]["error"] and got[2]["nbytes"] is None
    assert got[3]["error"].startswith("not an image") and got[3]["format"] is None
    assert got[4]["error"].startswith("truncated PNG header") and got[4]["format"] == "png"
    assert got[6]["error"] == "the PDF is encrypted"
    # a page over OCR_ASSETS_MAX_PIXELS keeps the size it declared, and the reason names the setting
    assert (got[8]["width"], got[8]["height"]) == (400, 300) and "OCR_ASSETS_MAX_PIXELS" in got[8]["error"]
    assert all(r["width"] is None and r["height"] is None for r in got[1:7] if r["status"] == "error")
    assert report.pages == 9 and report.stage_seconds > 0 and "header" in report.parts
    assert report.counts == {"source_rows": 9, "multi_page_rows": 0, "pages": 9, "ok": 3, "errors": 6,
                             "format_jpeg": 1, "format_png": 1, "format_webp": 1}


def test_pages_of_multi_page_rows_get_their_index_and_single_page_rows_keep_their_id():
    png = _encode((8, 9), "PNG")
    rows = [png, [png, None, _bgr(20, 10)], [png], png]
    for ids, expected in (
        (None, ["mem/0", "mem/1/0", "mem/1/1", "mem/1/2", "mem/2", "mem/3"]),
        (["a", "b", "c", None], ["a", "b/0", "b/1", "b/2", "c", "mem/3"]),
    ):
        table, report = extract_pages(MemoryShard(rows, ids=ids))
        assert table.column("page_id").to_pylist() == expected
        assert table.column("row").to_pylist() == [0, 1, 1, 1, 2, 3]
        assert table.column("page").to_pylist() == [0, 0, 1, 2, 0, 0]
        assert table.column("status").to_pylist() == ["ok", "ok", "error", "ok", "ok", "ok"]
        assert table.column("width").to_pylist()[3] == 20 and table.column("format").to_pylist()[3] == "pdf"
        assert report.counts["source_rows"] == 4 and report.counts["multi_page_rows"] == 1
        assert report.pages == 6


def test_a_page_id_given_twice_is_refused_naming_the_id_column():
    png = _encode((8, 8), "PNG")
    # the id column says "a/1" for row 0, and row 1 ("a") has two pages: "a/0", "a/1"
    shard = MemoryShard([png, [png, png]], ids=["a/1", "a"], id_column="doc")
    with pytest.raises(DatasetError, match=r"'a/1'.*row 0 page 0 and row 1 page 1.*OCR_ASSETS_ID_COLUMN"):
        extract_pages(shard)


def test_extract_pages_streams_batches_to_a_sink():
    png = _encode((8, 8), "PNG")
    shard = MemoryShard([png, [png, png, png], png, [png, png]])
    whole, _ = extract_pages(shard)
    seen: list[pa.Table] = []
    table, report = extract_pages(shard, sink=seen.append, batch_pages=3)
    assert table is None and report.pages == 7
    assert [t.num_rows for t in seen] == [3, 3, 1]
    assert all(t.schema == PAGES for t in seen) and pa.concat_tables(seen).equals(whole)


def test_a_sink_into_the_store_writes_row_groups(tmp_path):
    png = _encode((8, 8), "PNG")
    store = ParquetStore(str(tmp_path))
    with store.writer("pages", "mem", PAGES, row_group_rows=2) as out:
        _, report = extract_pages(MemoryShard([png] * 5), sink=out.write, batch_pages=2)
    assert out.rows == 5 and out.uri.endswith("pages/mem.parquet")
    assert pq.ParquetFile(tmp_path / "pages" / "mem.parquet").num_row_groups == 3
    assert store.read("pages", "mem").column("page_id").to_pylist() == [f"mem/{i}" for i in range(5)]


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_tiff_frames_walks_the_directory_chain_as_pil_does(compression):
    from ocr_assets.image_header import ImageHeaderError, tiff_frames

    frames = [Image.new("RGB", (50 + 2 * k, 30 + k), "white") for k in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:], **({"compression": compression} if compression else {}))
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        expected = []
        for k in range(im.n_frames):
            im.seek(k)
            expected.append(im.size)
    assert tiff_frames(data) == expected == [(50, 30), (52, 31), (54, 32), (56, 33)]
    order = "<" if data[:2] == b"II" else ">"
    (first,) = struct.unpack_from(order + "I", data, 4)
    (count,) = struct.unpack_from(order + "H", data, first)
    looped = bytearray(data)
    struct.pack_into(order + "I", looped, first + 2 + 12 * count, first)  # the first IFD points at itself
    with pytest.raises(ImageHeaderError, match="loops"):
        tiff_frames(bytes(looped))
