"""Hostile and unusual images through the whole pipeline: nothing crashes, nothing is lost.

A real sample page stored in every format and pixel layout a dataset may hold comes out with
its text; broken, empty, tiny, blank, huge-declaring and strip-shaped images each reach
`documents` with a status and, when not ok, a readable reason. Random and mutated bytes go
through the header reader and the decoder (hypothesis) without an exception other than the
two documented error types.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.evaluation import corpus_word_scores
from ocr_assets.image_header import ImageHeaderError, read_header
from ocr_assets.imaging import ImageDecodeError, decode_page
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.sample import render_page


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _png_16bit(page: Image.Image) -> bytes:
    gray = np.asarray(page.convert("L"), dtype=np.uint16) * 257
    ok, buf = cv2.imencode(".png", gray)
    assert ok
    return buf.tobytes()


def _huge_png_header() -> bytes:
    """A valid PNG signature and IHDR declaring 100000 x 100000 pixels, with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 64)
    body = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + body + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _real_pages() -> dict[str, bytes]:
    page, _ = render_page(0)
    return {
        "png_rgb": _save(page, "PNG"),
        "png_16bit_gray": _png_16bit(page),
        "png_gray": _save(page.convert("L"), "PNG"),
        "png_rgba": _save(page.convert("RGBA"), "PNG"),
        "png_palette": _save(page.convert("P", palette=Image.ADAPTIVE, colors=64), "PNG"),
        "jpeg_cmyk": _save(page.convert("CMYK"), "JPEG", quality=92),
        "jpeg_progressive": _save(page, "JPEG", quality=92, progressive=True),
        "webp": _save(page, "WEBP", quality=92),
        "tiff": _save(page, "TIFF", compression="tiff_lzw"),
        "gif": _save(page.convert("P", palette=Image.ADAPTIVE, colors=64), "GIF"),
        "bmp": _save(page, "BMP"),
    }


def _broken() -> dict[str, bytes | None]:
    good = _save(render_page(1)[0], "JPEG", quality=90)
    png = _save(render_page(1)[0], "PNG")
    middle = len(good) // 2
    return {
        "empty": b"",
        "text": b"this is a text file, not an image\n" * 4,
        "pdf_broken": b"%PDF-1.7 a PDF header over a text file\n" * 4,
        "png_truncated": png[: len(png) // 3],
        "jpeg_truncated": good[: len(good) // 3],
        "jpeg_random_middle": good[:middle] + np.random.default_rng(0).bytes(4000) + good[middle + 4000:],
        "one_pixel": _save(Image.new("RGB", (1, 1), "white"), "PNG"),
        "blank_page": _save(Image.new("RGB", (1275, 1650), "white"), "PNG"),
        "png_gigapixel_header": _huge_png_header(),
        "strip_20000x40": _save(Image.new("L", (20000, 40), 255), "PNG"),
        "null": None,
    }


def _dataset(folder, rows: list[bytes | None]) -> str:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([None if b is None else {"bytes": b, "path": None} for b in rows], type=image_type)
    table = pa.table({"image": images})
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return str(folder)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """The whole pipeline over every real-page format and every broken image, in one shard."""
    real, broken = _real_pages(), _broken()
    names = list(real) + list(broken)
    tmp = tmp_path_factory.mktemp("hostile")
    folder = _dataset(tmp / "dataset", list(real.values()) + list(broken.values()))
    resources = {"dataset": DatasetResource(path=folder), "storage": StorageResource(root=str(tmp / "out")),
                 "layout_model": LayoutResource(), "recognizer": RecognizerResource()}
    (tmp / "home").mkdir()
    # most pages here are broken on purpose: let the page error rate pass so documents runs
    with pytest.MonkeyPatch.context() as env, dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
        env.setenv("OCR_ASSETS_MAX_PAGE_ERROR_RATE", "1")
        instance.add_dynamic_partitions(SHARDS, ["data-00000-of-00001"])
        result = dg.materialize(ASSETS, partition_key="data-00000-of-00001", instance=instance,
                                resources=resources)
        assert result.success
    rows = pq.read_table(tmp / "out" / "documents" / "data-00000-of-00001.parquet").to_pylist()
    assert [r["row"] for r in rows] == list(range(len(names)))  # every source row, in order
    return dict(zip(names, rows)), set(real)


def test_a_real_page_in_every_format_comes_out_with_its_text(documents):
    rows, real = documents
    truth = render_page(0)[1]
    for name in sorted(real):
        row = rows[name]
        assert row["status"] == "ok", (name, row["error"])
        f1 = corpus_word_scores([(row["markdown"], truth)])[2]
        assert f1 >= 0.9, (name, f1)


def test_every_broken_image_reaches_documents_with_a_reason(documents):
    rows, _ = documents
    expected = {  # a word the reason must hold
        "empty": "empty", "text": "not an image", "pdf_broken": "PDF", "png_truncated": "could not be decoded",
        "jpeg_truncated": "",
        "jpeg_random_middle": "", "png_gigapixel_header": config.ENV_MAX_PIXELS, "null": "no image",
    }
    for name, word in expected.items():
        row = rows[name]
        if name in ("jpeg_truncated", "jpeg_random_middle"):  # cv2 may still decode what is there
            assert row["status"] in ("ok", "partial", "empty") or row["error"], (name, row)
            continue
        assert row["status"] == "error" and word in row["error"], (name, row)
    for name in ("one_pixel", "blank_page", "strip_20000x40"):  # no text to find: not an error
        assert rows[name]["status"] in ("empty", "ok"), (name, rows[name])


def test_a_gigapixel_header_is_refused_before_decoding(monkeypatch):
    data = _huge_png_header()
    assert read_header(data)[1:] == (100_000, 100_000)
    with pytest.raises(ImageDecodeError, match=config.ENV_MAX_PIXELS):
        decode_page(data)
    monkeypatch.setenv(config.ENV_MAX_PIXELS, "100")
    with pytest.raises(ImageDecodeError, match="over the limit of 100"):
        decode_page(_save(Image.new("RGB", (20, 20)), "PNG"))


def test_a_decoded_page_is_taken_as_it_is_within_the_pixel_limit(monkeypatch):
    page = np.zeros((30, 20, 3), np.uint8)
    assert decode_page(page) is page  # a rendered PDF page or a TIFF frame: no copy, no decode
    monkeypatch.setenv(config.ENV_MAX_PIXELS, "500")
    with pytest.raises(ImageDecodeError, match=f"20x30 = 600 pixels.*{config.ENV_MAX_PIXELS}"):
        decode_page(page)
    for wrong in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                  np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageDecodeError):
            decode_page(wrong)
    monkeypatch.delenv(config.ENV_MAX_PIXELS)
    png = np.frombuffer(_SMALL["png"], np.uint8)  # a flat uint8 array is still encoded bytes
    assert decode_page(png).shape == (200, 300, 3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=2000),
    st.tuples(st.sampled_from(["png", "jpeg", "gif", "bmp", "webp", "tiff"]), st.integers(0, 10_000),
              st.binary(min_size=1, max_size=64)),
))
def test_random_and_mutated_bytes_fail_only_with_readable_errors(sample):
    if isinstance(sample, tuple):
        fmt, at, noise = sample
        base = _SMALL[fmt]
        at %= len(base)
        data = base[:at] + noise + base[at + len(noise):]
    else:
        data = sample
    try:
        fmt, width, height = read_header(data)
        assert width > 0 and height > 0
    except ImageHeaderError as exc:
        assert str(exc)
    try:
        image = decode_page(data)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    except ImageDecodeError as exc:
        assert str(exc)


_PAGE = Image.fromarray(np.asarray(render_page(2)[0])[:200, :300])
_SMALL = {
    "png": _save(_PAGE, "PNG"), "jpeg": _save(_PAGE, "JPEG"), "gif": _save(_PAGE.convert("P"), "GIF"),
    "bmp": _save(_PAGE, "BMP"), "webp": _save(_PAGE, "WEBP"), "tiff": _save(_PAGE, "TIFF"),
}
