"""The crops stage on a rendered page: sizes, pixels, pass-through of skip and error rows."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from ocr_assets.imaging import decode_page
from ocr_assets.schemas import CROPS, LAYOUT, PAGE_ERROR_REGION, PAGES
from ocr_assets.stages.crops import make_crops
from ocr_assets_tests.memory_shard import MemoryShard


def _page() -> np.ndarray:
    """A 600×400 BGR page with two lines of text and a grey figure."""
    image = Image.new("RGB", (600, 400), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(24)
    draw.text((40, 40), "Crops keep every pixel", fill="black", font=font)
    draw.text((40, 120), "second paragraph here", fill=(20, 40, 200), font=font)
    draw.rectangle((300, 200, 560, 380), fill=(120, 130, 140))
    return np.asarray(image)[:, :, ::-1].copy()


def _layout_row(page_id, region, task, box, status="ok", error=None):
    x0, y0, x1, y1 = box
    return dict(page_id=page_id, region=region, label=task, task=task, score=0.9, x0=x0, y0=y0,
                x1=x1, y1=y1, source="model", status=status, error=error)


def _pages_table(ids):
    return pa.Table.from_pylist(
        [dict(page_id=p, shard="s", row=i, page=0, format="png", width=600, height=400, nbytes=1, status="ok",
              error=None) for i, p in enumerate(ids)],
        schema=PAGES,
    )


def test_crops_match_page_slices_and_pass_through_errors():
    page = _page()
    encoded = [cv2.imencode(".png", page)[1].tobytes(), b"not an image"]
    boxes = [(40, 40, 400, 80), (0, 110, 320, 160), (300, 200, 600, 400)]
    rows = [_layout_row("a", i, task, box) for i, (task, box) in enumerate(zip(("text", "text", "skip"), boxes))]
    rows.append(_layout_row("a", 3, "text", (50, 50, 50, 90)))  # zero width
    rows.append(_layout_row("b", 0, "text", (0, 0, 10, 10)))  # page that does not decode
    rows.append(_layout_row("c", PAGE_ERROR_REGION, "skip", (0, 0, 0, 0), "error", "layout failed: boom"))
    layout = pa.Table.from_pylist(rows, schema=LAYOUT)

    table, report = make_crops(layout, MemoryShard(encoded), _pages_table(["a", "b", "c"]), padding=4)

    assert table.schema == CROPS
    got = table.to_pylist()
    assert [r["region"] for r in got] == [0, 1, 2, 3, 0, PAGE_ERROR_REGION]
    for r, (x0, y0, x1, y1) in zip(got[:3], boxes):
        expected = page[max(0, y0 - 4):min(400, y1 + 4), max(0, x0 - 4):min(600, x1 + 4)]
        assert r["status"] == "ok" and r["format"] == "png"
        assert (r["height"], r["width"]) == expected.shape[:2]
        np.testing.assert_array_equal(decode_page(r["image"]), expected)
    assert got[2]["task"] == "skip"
    assert got[3]["status"] == "error" and "empty box" in got[3]["error"]
    assert got[4]["status"] == "error" and "decoded" in got[4]["error"]
    assert got[5]["status"] == "error" and got[5]["error"] == "layout failed: boom" and got[5]["image"] == b""
    assert report.pages == 3
    assert report.counts == {"regions": 5, "errors": 3}


def test_jpeg_crops_and_missing_pages():
    page = _page()
    encoded = cv2.imencode(".png", page)[1].tobytes()
    layout = pa.Table.from_pylist(
        [_layout_row("a", 0, "text", (40, 40, 400, 80)), _layout_row("zz", 0, "text", (0, 0, 5, 5))],
        schema=LAYOUT,
    )
    table, _ = make_crops(layout, MemoryShard([encoded]), {"a": (0, 0)}, fmt="jpeg", padding=0)
    a, missing = table.to_pylist()
    assert a["format"] == "jpeg" and a["image"][:2] == b"\xff\xd8"
    assert (a["width"], a["height"]) == (360, 40)
    assert missing["status"] == "error" and "not in the pages table" in missing["error"]


def _two_pages():
    page = _page()
    encoded = [cv2.imencode(".png", page)[1].tobytes(), cv2.imencode(".png", page[:, ::-1].copy())[1].tobytes()]
    boxes = [(40, 40, 400, 80), (0, 110, 320, 160), (300, 200, 600, 400)]
    rows = [_layout_row(p, i, "text", box) for p in ("a", "b") for i, box in enumerate(boxes)]
    return pa.Table.from_pylist(rows, schema=LAYOUT), encoded


def test_a_short_answer_from_the_page_worker_gives_error_rows(monkeypatch):
    from ocr_assets.stages import crops

    real = crops._page_crops

    def drops_the_last_region(data, boxes, *args):
        out, parts = real(data, boxes, *args)
        return (out[:-1] if data == encoded[1] else out), parts

    layout, encoded = _two_pages()
    monkeypatch.setattr(crops, "_page_crops", drops_the_last_region)
    table, report = make_crops(layout, MemoryShard(encoded), _pages_table(["a", "b"]))
    got = table.to_pylist()
    assert [r["status"] for r in got] == ["ok"] * 3 + ["error"] * 3
    for r in got[3:]:  # no ok row with an empty image: each says why
        assert r["image"] == b"" and "2 results" in r["error"] and "3 regions" in r["error"]
    assert all(r["image"] and r["error"] is None for r in got[:3])
    assert report.counts["errors"] == 3


def test_a_page_worker_that_raises_fails_only_its_own_regions(monkeypatch):
    from ocr_assets.stages import crops

    real = crops._page_crops

    def breaks_on_b(data, *args):
        if data == encoded[1]:
            raise MemoryError("no room for this page")
        return real(data, *args)

    layout, encoded = _two_pages()
    monkeypatch.setattr(crops, "_page_crops", breaks_on_b)
    table, _ = make_crops(layout, MemoryShard(encoded), _pages_table(["a", "b"]))
    got = table.to_pylist()
    assert [r["status"] for r in got] == ["ok"] * 3 + ["error"] * 3
    assert all("MemoryError: no room for this page" in r["error"] and r["image"] == b"" for r in got[3:])


def test_a_layout_error_row_never_becomes_an_ok_crop():
    # a page's -1 row that layout (wrongly) left ok: it has nothing to cut, so it is no ok crop
    row = _layout_row("a", PAGE_ERROR_REGION, "skip", (0, 0, 0, 0), status="ok")
    table, _ = make_crops(pa.Table.from_pylist([row], schema=LAYOUT), MemoryShard([b""]), _pages_table(["a"]))
    (got,) = table.to_pylist()
    assert got["status"] == "error" and got["error"] and got["image"] == b""


def test_a_page_id_on_two_rows_is_refused_not_cut_from_the_wrong_page():
    import pytest

    pages = pa.table({"page_id": ["doc", "doc"], "row": [0, 0], "page": [0, 1]})
    layout = pa.Table.from_pylist([_layout_row("doc", 0, "text", (0, 0, 10, 10))], schema=LAYOUT)
    with pytest.raises(ValueError, match="page id 'doc' is on row 0 page 0 and row 0 page 1.*OCR_ASSETS_ID_COLUMN"):
        make_crops(layout, MemoryShard([[b"", b""]]), pages)


def _pages_of(keys: dict) -> pa.Table:
    return pa.Table.from_pylist(
        [dict(page_id=p, shard="s", row=r, page=k, format="png", width=600, height=400, nbytes=1, status="ok",
              error=None) for p, (r, k) in keys.items()],
        schema=PAGES,
    )


def test_rendered_pages_and_pages_of_multi_page_rows_are_cut_from_the_right_page():
    page = _page()
    flipped = page[::-1].copy()
    # row 0 holds two pages: a PNG and an array already decoded (a rendered PDF page)
    shard = MemoryShard([[cv2.imencode(".png", page)[1].tobytes(), flipped]])
    layout = pa.Table.from_pylist([_layout_row("d/0", 0, "text", (40, 40, 400, 80)),
                                   _layout_row("d/1", 0, "text", (40, 40, 400, 80))], schema=LAYOUT)
    table, report = make_crops(layout, shard, _pages_of({"d/0": (0, 0), "d/1": (0, 1)}), padding=0)
    first, second = table.to_pylist()
    np.testing.assert_array_equal(decode_page(first["image"]), page[40:80, 40:400])
    np.testing.assert_array_equal(decode_page(second["image"]), flipped[40:80, 40:400])
    assert shard.reads == [[(0, 0), (0, 1)]]  # one read for the group, each page once


def test_crops_stream_groups_of_pages_from_layout_batches():
    """Layout read in small record batches (a page's rows across batch edges): each group of pages is
    read, cut and handed to the sink on its own, and the rows are those of the whole-table run."""
    page = _page()
    names = [f"p{i}" for i in range(5)]
    shard = MemoryShard([cv2.imencode(".png", page[:, i * 10:].copy())[1].tobytes() for i in range(5)])
    boxes = [(40, 40, 300, 80), (0, 110, 320, 160), (300, 200, 500, 380)]
    layout = pa.Table.from_pylist(
        [_layout_row(p, r, "text", box) for p in names for r, box in enumerate(boxes)]
        + [_layout_row("p9", PAGE_ERROR_REGION, "skip", (0, 0, 0, 0), "error", "layout failed: boom")],
        schema=LAYOUT,
    )
    pages = _pages_of({p: (i, 0) for i, p in enumerate(names)})
    whole, whole_report = make_crops(layout, MemoryShard(shard.rows), pages)
    seen: list[pa.Table] = []
    table, report = make_crops(layout.to_batches(max_chunksize=2), shard, pages, sink=seen.append, group_pages=2)
    assert table is None and pa.concat_tables(seen).equals(whole)
    # groups of at most two whole pages: never every crop of the shard at once
    assert [t.column("page_id").to_pylist() for t in seen] == [
        ["p0"] * 3 + ["p1"] * 3, ["p2"] * 3 + ["p3"] * 3, ["p4"] * 3 + ["p9"]]
    assert shard.reads == [[(0, 0), (1, 0)], [(2, 0), (3, 0)], [(4, 0)]]  # p9 failed at layout: nothing to read
    assert report.pages == whole_report.pages == 6 and report.counts == whole_report.counts
