"""The local PP-OCRv6 recognizer and the recognition stage, on crops rendered in the test."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

from ocr_assets.backends.recognition.base import Crop, Recognized, content_key
from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer, reading_order_lines
from ocr_assets.imaging import encode_image
from ocr_assets.schemas import CROPS, PAGE_ERROR_REGION, RECOGNITION
from ocr_assets.stages.recognition import run_recognition

LINE = "The quick brown fox jumps over the lazy dog"
PARAGRAPH = ["Layout regions are read one", "crop at a time in reading", "order by the local model"]


def _f1(predicted: str, reference: str) -> float:
    """Word F1 of two texts, as bags of lowercase words."""
    pred, ref = Counter(predicted.lower().split()), Counter(reference.lower().split())
    matched = sum((pred & ref).values())
    if not matched:
        return 0.0
    precision, recall = matched / sum(pred.values()), matched / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def _render(lines: list[str], size: int = 26) -> np.ndarray:
    """BGR crop with the lines drawn in black, 1.5 line spacing, a small margin."""
    font = ImageFont.truetype("DejaVuSans.ttf", size) if _has_dejavu() else ImageFont.load_default(size)
    width = int(max(font.getlength(line) for line in lines)) + 16
    image = Image.new("RGB", (width, int(len(lines) * size * 1.5) + 12), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((8, 6 + int(i * size * 1.5)), line, fill="black", font=font)
    return np.asarray(image)[:, :, ::-1].copy()


def _has_dejavu() -> bool:
    try:
        ImageFont.truetype("DejaVuSans.ttf", 10)
        return True
    except OSError:
        return False


def _crop(task: str, lines: list[str]) -> Crop:
    image = _render(lines)
    return Crop(task, encode_image(image), image.shape[1], image.shape[0])


@pytest.fixture(scope="module")
def recognizer() -> RapidOcrRecognizer:
    return RapidOcrRecognizer(batch_size=2)


def test_reads_a_line_and_a_paragraph_and_survives_a_corrupt_crop(recognizer):
    line, paragraph, corrupt = recognizer.recognize(
        [_crop("text", [LINE]), _crop("text", PARAGRAPH), Crop("text", b"\x89PNG broken", 10, 10)]
    )
    assert line.status == "ok" and _f1(line.text, LINE) >= 0.9, line.text
    assert paragraph.status == "ok" and _f1(paragraph.text, " ".join(PARAGRAPH)) >= 0.9, paragraph.text
    assert paragraph.text.count("\n") == len(PARAGRAPH) - 1  # one text line per rendered line, in order
    assert paragraph.text.split("\n")[0].lower().startswith("layout")
    assert corrupt.status == "error" and corrupt.text == "" and corrupt.error


def test_reading_order_groups_rows_and_sorts_left_to_right():
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    boxes = np.array([box(200, 52, 300, 80), box(0, 0, 90, 30), box(0, 50, 100, 78), box(120, 2, 200, 28)])
    assert reading_order_lines(boxes, ["d", "a", "c", "b"]) == [["a", "b"], ["c", "d"]]


def test_stage_schema_pass_through_and_counts(recognizer):
    line = _crop("text", [LINE])
    table_crop = _crop("table", ["Name    Value"])
    crops = pa.Table.from_pylist(
        [
            dict(page_id="p", region=0, task="text", image=line.image, format="png", width=line.width,
                 height=line.height, status="ok", error=None),
            dict(page_id="p", region=1, task="skip", image=line.image, format="png", width=line.width,
                 height=line.height, status="ok", error=None),
            dict(page_id="p", region=2, task="text", image=b"", format=None, width=0, height=0,
                 status="error", error="empty box"),
            dict(page_id="p", region=3, task="table", image=table_crop.image, format="png",
                 width=table_crop.width, height=table_crop.height, status="ok", error=None),
            dict(page_id="q", region=PAGE_ERROR_REGION, task="skip", image=b"", format=None, width=0,
                 height=0, status="error", error="layout failed"),
        ],
        schema=CROPS,
    )
    table, report = run_recognition(crops, recognizer, chunk_rows=2)
    assert table.schema == RECOGNITION
    rows = table.to_pylist()
    assert [(r["page_id"], r["region"]) for r in rows] == [("p", 0), ("p", 1), ("p", 2), ("p", 3), ("q", -1)]
    assert _f1(rows[0]["text"], LINE) >= 0.9
    assert rows[1] == dict(page_id="p", region=1, task="skip", text="", confidence=None, status="ok", error=None)
    assert rows[0]["confidence"] > 0.9 and rows[3]["confidence"] > 0.9  # clean print
    assert rows[2]["confidence"] is None and rows[4]["confidence"] is None  # nothing read
    assert (rows[2]["status"], rows[2]["error"]) == ("error", "empty box")
    assert "name" in rows[3]["text"].lower() and rows[3]["status"] == "ok"
    assert (rows[4]["status"], rows[4]["error"]) == ("error", "layout failed")
    assert report.counts == {"regions": 4, "recognized": 2, "skipped": 1, "errors": 2, "region_errors": 1,
                             "empty_text": 0, "cache_hits": 0, "confident_regions": 2}
    assert report.info["mean_confidence"] > 0.9
    assert report.pages == 2 and report.parts["recognize"] > 0


class ForgetfulRecognizer:
    """Answers every crop it is sent except those in ``forget``; answers those in ``twice`` twice."""

    name, batch_size, version = "forgetful", 4, "1"

    def __init__(self, forget=(), twice=()):
        self.forget, self.twice = set(forget), set(twice)

    def recognize_stream(self, items):
        for key, crop in items:
            if key not in self.forget:
                yield key, Recognized(f"text {key}", cacheable=True)
            if key in self.twice:
                yield key, Recognized(f"text {key} again", cacheable=True)

    def cache_key(self, crop):
        return content_key(crop.image, self.name)

    def run_metadata(self):
        return {}


def _plain_crops(n: int) -> pa.Table:
    return pa.Table.from_pylist([dict(page_id=f"page-{i}", region=0, task="text", image=b"png-%d" % i,
                                      format="png", width=8, height=8, status="ok", error=None)
                                 for i in range(n)], schema=CROPS)


def test_a_row_never_answered_fails_the_stage():
    table, report = run_recognition(_plain_crops(5), ForgetfulRecognizer())
    assert table.column("status").to_pylist() == ["ok"] * 5 and report.counts["recognized"] == 5
    with pytest.raises(RuntimeError, match=r"never answered 2 of 5 regions, on pages page-1, page-3"):
        run_recognition(_plain_crops(5), ForgetfulRecognizer(forget={1, 3}))
    with pytest.raises(RuntimeError, match="twice"):
        run_recognition(_plain_crops(5), ForgetfulRecognizer(twice={2}))


class PoisonedBatchRecognizer(ForgetfulRecognizer):
    """A batch recognizer whose every call containing the crop ``b"png-3"`` fails as a whole."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def recognize(self, crops):
        self.calls.append(len(crops))
        if any(c.image == b"png-3" for c in crops):
            raise MemoryError("the batch could not be allocated")
        return [Recognized(c.image.decode(), cacheable=True) for c in crops]

    def recognize_stream(self, items):
        from ocr_assets.backends.recognition.base import recognize_in_batches

        return recognize_in_batches(self, items)


def test_a_batch_that_fails_as_a_whole_is_read_in_halves():
    recognizer = PoisonedBatchRecognizer()
    table, _ = run_recognition(_plain_crops(6), recognizer)
    assert table.column("status").to_pylist() == ["ok", "ok", "ok", "error", "ok", "ok"]
    assert table.column("text").to_pylist()[:3] == ["png-0", "png-1", "png-2"]
    assert "on this crop alone: MemoryError" in table.column("error")[3].as_py()
    assert recognizer.calls == [4, 2, 2, 1, 1, 2]  # 4 fails; 0-1 ok; 2-3 fails; 2 ok, 3 fails alone; 4-5


class ShufflingRecognizer(ForgetfulRecognizer):
    """Keeps up to ``window`` crops in flight and answers them last first, as a server under load may."""

    def __init__(self, window=5):
        super().__init__()
        self.window = window

    def recognize_stream(self, items):
        held = []
        for key, crop in items:
            held.append((key, crop))
            if len(held) == self.window:
                while held:
                    key, crop = held.pop()
                    yield key, Recognized(crop.image.decode(), cacheable=True)
        while held:
            key, crop = held.pop()
            yield key, Recognized(crop.image.decode(), cacheable=True)


def _mixed_crops(n: int) -> pa.Table:
    """Text crops, with a skip crop every 7th row and a failed page's row every 11th."""
    rows = []
    for i in range(n):
        row = dict(page_id=f"page-{i // 3}", region=i % 3, task="text", image=b"png-%d" % i, format="png",
                   width=8, height=8, status="ok", error=None)
        if i % 7 == 3:
            row["task"] = "skip"
        if i % 11 == 5:
            row.update(region=PAGE_ERROR_REGION, task="skip", image=b"", status="error", error="layout failed")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CROPS)


def test_batches_and_a_sink_give_the_table_in_order_written_as_it_goes():
    crops = _mixed_crops(60)
    expected, report = run_recognition(crops, ShufflingRecognizer(), chunk_rows=8)
    assert expected.column("page_id").to_pylist() == crops.column("page_id").to_pylist()
    texts = expected.column("text").to_pylist()
    assert [texts[i] for i in range(60) if i % 7 != 3 and i % 11 != 5] == [
        f"png-{i}" for i in range(60) if i % 7 != 3 and i % 11 != 5]

    streamed, streamed_report = run_recognition(iter(crops.to_batches(max_chunksize=5)), ShufflingRecognizer(),
                                                chunk_rows=8)
    assert streamed.equals(expected) and streamed_report.counts == report.counts
    assert streamed_report.pages == report.pages == 20

    written: list[pa.Table] = []
    result, _ = run_recognition(iter(crops.to_batches(max_chunksize=5)), ShufflingRecognizer(), chunk_rows=8,
                                sink=written.append)
    assert result is None and len(written) >= 5
    assert all(t.num_rows >= 8 for t in written[:-1])  # whole chunks, not a call per row
    assert pa.concat_tables(written).equals(expected)


class CountingBatches:
    """Record batches of a table, counting how many were taken so far."""

    def __init__(self, table: pa.Table, rows: int):
        self.batches, self.taken = table.to_batches(max_chunksize=rows), 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


def test_crops_are_read_a_batch_at_a_time_as_results_are_written():
    """Over 40 batches, each write comes while only a few batches past it were read: images are
    never all taken at once, whatever the shard's size."""
    crops = _plain_crops(160)
    source = CountingBatches(crops, 4)
    taken_at_write: list[tuple[int, int]] = []  # (batches taken, rows written before this write)
    written = 0

    def sink(table: pa.Table) -> None:
        nonlocal written
        taken_at_write.append((source.taken, written))
        written += table.num_rows

    run_recognition(source, ShufflingRecognizer(window=6), chunk_rows=4, sink=sink)
    assert written == 160 and len(taken_at_write) >= 20
    assert taken_at_write[0][0] <= 3  # the first rows are out before the 4th of 40 batches is read
    # at every write, the batches read reach at most a window's worth past what is written
    assert all(taken * 4 - before <= 4 + 6 + 4 for taken, before in taken_at_write)


def test_a_recognizer_that_stops_asking_leaves_its_rows_unanswered():
    class Quitter(ForgetfulRecognizer):
        def recognize_stream(self, items):
            for n, (key, crop) in enumerate(items):
                if n == 3:
                    return
                yield key, Recognized("text", cacheable=True)

    with pytest.raises(RuntimeError, match=r"never answered 7 of 10 regions, on pages page-3, page-4"):
        run_recognition(iter(_plain_crops(10).to_batches(max_chunksize=2)), Quitter())
