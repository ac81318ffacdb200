"""The picodet-cdla backend, reading order and the layout stage, on pages rendered here with PIL."""

from __future__ import annotations

import random
from dataclasses import replace

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

from ocr_assets import config, schemas
from ocr_assets.backends.layout.base import Detection
from ocr_assets.backends.layout.picodet_cdla import PicodetCdlaBackend
from ocr_assets.stages.layout import run_layout
from ocr_assets.stages.reading_order import order_detections, reading_order
from ocr_assets_tests.memory_shard import MemoryShard

SERIF = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"
BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf"
WORDS = "the layout model finds regions of a page and each region is read in order so the page text comes back whole".split()
W, H = 1275, 1650


def _font(path: str, size: int):
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size=size)


def render_page(seed: int = 0, columns: int = 2) -> tuple[np.ndarray, dict]:
    """A BGR page: header, centred title, ``columns`` columns of paragraphs, footer; plus their ink boxes."""
    rng = random.Random(seed)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    body, small, title_font = _font(SERIF, 22), _font(SERIF, 16), _font(BOLD, 40)
    draw.text((100, 40), "Journal of Layout Studies  Vol. 3", font=small, fill="black")
    title = "Two Column Pages"
    tw = draw.textlength(title, font=title_font)
    draw.text(((W - tw) / 2, 110), title, font=title_font, fill="black")
    truth = {"title": list(draw.textbbox(((W - tw) / 2, 110), title, font=title_font)), "columns": []}
    margin, gutter = 100, 60
    colw = (W - 2 * margin - gutter * (columns - 1)) // columns
    for c in range(columns):
        x, y = margin + c * (colw + gutter), 220
        paras = []
        for _ in range(4):
            top = y
            right = x
            for _ in range(rng.randint(5, 8)):
                line, word = "", rng.choice(WORDS)
                while draw.textlength(f"{line} {word}", font=body) < colw:
                    line, word = f"{line} {word}".strip(), rng.choice(WORDS)
                draw.text((x, y), line, font=body, fill="black")
                right = max(right, draw.textbbox((x, y), line, font=body)[2])
                y += 30
            paras.append([x, top, right, y - 6])
            y += 30
        truth["columns"].append(paras)
    draw.text((W // 2 - 20, H - 70), "- 7 -", font=small, fill="black")
    return np.asarray(img)[:, :, ::-1].copy(), truth


@pytest.fixture(scope="module")
def backend() -> PicodetCdlaBackend:
    return PicodetCdlaBackend(batch_size=2)


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_backend_finds_text_regions_in_page_pixels(backend):
    page, truth = render_page(0)
    half = cv2.resize(page, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    full, small = backend.detect([page, half])
    for dets, scale, (h, w) in ((full, 1.0, (H, W)), (small, 0.5, (H // 2, W // 2))):
        assert all(0 <= d.x0 < d.x1 <= w and 0 <= d.y0 < d.y1 <= h for d in dets)
        text = np.array([(d.x0, d.y0, d.x1, d.y1) for d in dets if backend.label_tasks.get(d.label) == "text"])
        for para in (np.array(p) * scale for col in truth["columns"] for p in col):
            # some text box holds the paragraph's centre, and its left edge is the column's, in page pixels
            centre = (para[:2] + para[2:]) / 2
            holders = text[(text[:, :2] <= centre).all(axis=1) & (text[:, 2:] >= centre).all(axis=1)]
            assert len(holders) and (np.abs(holders[:, 0] - para[0]) <= 8 * scale + 2).any()
        assert any(_iou(t, np.array(truth["title"]) * scale) > 0.7 for t in text)
    assert {d.label for d in full} <= set(backend.labels)
    assert set(backend.labels) == set(config.CDLA_LABEL_TASKS)


def test_backend_agrees_with_rapid_layout(backend):
    from rapid_layout import RapidLayout

    reference = RapidLayout(model_type="pp_layout_cdla")
    pages = [render_page(1)[0], render_page(2, columns=3)[0], cv2.resize(render_page(3)[0], (900, 1300))]
    for page, ours in zip(pages, backend.detect(pages)):
        ref = reference(page)
        assert len(ours) == len(ref.boxes) > 0
        unmatched = list(ours)
        for box, label, score in zip(ref.boxes, ref.class_names, ref.scores):
            best = min(
                (d for d in unmatched if d.label == label),
                key=lambda d: np.abs(np.array([d.x0, d.y0, d.x1, d.y1]) - box).max(),
            )
            assert np.abs(np.array([best.x0, best.y0, best.x1, best.y1]) - box).max() <= 2
            assert best.score == pytest.approx(score, abs=1e-3)
            unmatched.remove(best)


def test_reading_order_columns_and_bands():
    # title, two columns of three, a full-width table, two columns of one
    boxes = np.array([
        [300, 50, 900, 100],  # 0 title
        [100, 150, 580, 300], [100, 320, 580, 500], [100, 520, 580, 700],  # 1-3 left
        [640, 150, 1150, 350], [640, 370, 1150, 560], [640, 580, 1150, 700],  # 4-6 right
        [100, 750, 1150, 1000],  # 7 full-width table
        [100, 1050, 580, 1500], [640, 1050, 1150, 1500],  # 8, 9
    ])
    shuffle = np.random.default_rng(0).permutation(len(boxes))
    order = shuffle[reading_order(boxes[shuffle], 1275, 1650)]
    assert order.tolist() == list(range(10))
    # three columns, no title
    three = np.array([[100 + 380 * c, 200 + 300 * r, 440 + 380 * c, 450 + 300 * r] for c in range(3) for r in range(3)])
    assert (three[::-1][reading_order(three[::-1], 1275, 1650)] == three).all()
    # one column: top to bottom
    one = np.array([[100, y, 1150, y + 100] for y in (900, 100, 500)])
    assert reading_order(one, 1275, 1650).tolist() == [1, 2, 0]


def test_model_order_wins_and_recovered_regions_fill_geometric_slots():
    dets = [Detection("text", 0.9, 100, 500, 500, 600, order=0), Detection("text", 0.9, 100, 100, 500, 200, order=1)]
    assert order_detections(dets, 1275, 1650).tolist() == [0, 1]
    recovered = Detection(config.RECOVERED_LABEL, 0.0, 100, 300, 500, 400)
    assert order_detections(dets + [recovered], 1275, 1650).tolist() == [0, 2, 1]
    assert order_detections([replace(d, order=None) for d in dets], 1275, 1650).tolist() == [1, 0]


def _pages_table(n: int, status: list[str]) -> pa.Table:
    return pa.table({
        "page_id": [f"shard/{i}" for i in range(n)], "shard": ["shard"] * n, "row": list(range(n)),
        "page": [0] * n, "format": ["png"] * n, "width": [W] * n, "height": [H] * n, "nbytes": [0] * n,
        "status": status, "error": [None] * n,
    }, schema=schemas.PAGES)


def test_run_layout_table(backend):
    rendered = [render_page(0), render_page(4), render_page(5)]
    images = [cv2.imencode(".png", p)[1].tobytes() for p, _ in rendered]
    images.insert(2, b"this is not an image")
    images.insert(3, images[0])  # status error: must be skipped
    pages = _pages_table(5, ["ok", "ok", "ok", "error", "ok"])
    shard = MemoryShard(images)
    table, report = run_layout(pages, shard, backend)

    assert table.schema == schemas.LAYOUT
    by_page = table.group_by("page_id").aggregate([("region", "count")]).to_pydict()
    assert sorted(by_page["page_id"]) == ["shard/0", "shard/1", "shard/2", "shard/4"]
    bad = table.filter(pa.compute.equal(table["page_id"], "shard/2")).to_pylist()
    assert len(bad) == 1 and bad[0]["region"] == schemas.PAGE_ERROR_REGION
    assert bad[0]["status"] == "error" and bad[0]["task"] == "skip" and "decoded" in bad[0]["error"]
    good = table.filter(pa.compute.equal(table["status"], "ok")).to_pylist()
    assert {r["label"] for r in good}.isdisjoint({"header", "footer"})
    assert all(r["task"] in config.TASKS and r["source"] in ("model", "recovered") for r in good)
    # the header and footer ink is neither boxed nor recovered
    assert not [r for r in good if r["y1"] <= 70 or r["y0"] >= H - 80]
    for page_id, (page, truth) in zip(["shard/0", "shard/1", "shard/4"], [rendered[0], rendered[1], rendered[2]]):
        rows = [r for r in good if r["page_id"] == page_id]
        assert [r["region"] for r in rows] == list(range(len(rows)))
        # title first, then the left column before the right one
        assert _iou([rows[0]["x0"], rows[0]["y0"], rows[0]["x1"], rows[0]["y1"]], truth["title"]) > 0.3
        centres = [(r["x0"] + r["x1"]) / 2 for r in rows[1:]]
        assert centres == sorted(centres, key=lambda x: x > W / 2)
    assert report.pages == 4 and report.counts["errors"] == 1
    assert report.counts["regions"] == len(good) and report.counts["abandoned_regions"] >= 3
    assert report.info["backend"] == "picodet-cdla"
    assert {"decode", "preprocess", "inference", "postprocess", "recovery"} <= set(report.parts)
    # pixels read one model batch at a time, the status-error page never
    assert shard.reads == [[(0, 0), (1, 0)], [(2, 0), (4, 0)]]


def test_run_layout_takes_rendered_pages_and_pages_of_multi_page_rows(backend):
    """A row of two pages: a PNG and a page already decoded (as a rendered PDF page arrives); the
    array is laid out as its PNG is, and rows go to the sink a batch of whole pages at a time."""
    page, _ = render_page(6)
    other, _ = render_page(7)
    shard = MemoryShard([[cv2.imencode(".png", page)[1].tobytes(), other], other,
                         ValueError("the PDF is truncated")])
    pages = pa.table({"page_id": ["d/0", "d/1", "e", "f"], "row": [0, 0, 1, 2], "page": [0, 1, 0, 0],
                      "status": ["ok"] * 4})
    seen: list[pa.Table] = []
    table, report = run_layout(pages, shard, backend, sink=seen.append, batch_rows=1)
    assert table is None and shard.reads == [[(0, 0), (0, 1)], [(1, 0), (2, 0)]]
    assert [sorted(set(t.column("page_id").to_pylist())) for t in seen] == [["d/0", "d/1"], ["e", "f"]]
    rows = pa.concat_tables(seen).to_pylist()
    boxes = {p: [(r["label"], r["x0"], r["y0"], r["x1"], r["y1"]) for r in rows if r["page_id"] == p]
             for p in ("d/1", "e")}
    assert boxes["d/1"] and boxes["d/1"] == boxes["e"]  # the same page, in the same row or alone
    (failed,) = [r for r in rows if r["page_id"] == "f"]
    assert failed["status"] == "error" and "could not be read" in failed["error"] and "truncated" in failed["error"]
    whole, _ = run_layout(pages, shard, backend)
    assert whole.equals(pa.concat_tables(seen))
