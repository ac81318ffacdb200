"""The recognition stage: read the text of every crop with a `Recognizer`, batch by batch.

The crops table is walked in record batches, so a shard of 100,000 regions never holds all of
its crops as Python objects at once; only crops to read are handed to the recognizer.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets.backends.recognition.base import Crop, Recognizer
from ocr_assets.schemas import RECOGNITION
from ocr_assets.timing import StageReport, timed_stage

# Rows per Arrow record batch taken from the crops table (a few MB of encoded crops).
CHUNK_ROWS = 1024


def _recognize_chunk(
    batch: pa.RecordBatch, recognizer: Recognizer, report: StageReport, total: int
) -> pa.RecordBatch:
    """RECOGNITION rows for one record batch of CROPS rows."""
    tasks = batch.column("task").to_pylist()
    statuses = batch.column("status").to_pylist()
    errors = batch.column("error").to_pylist()
    n = batch.num_rows
    texts: list[str | None] = [""] * n
    out_status: list[str] = ["ok"] * n
    out_error: list[str | None] = [None] * n

    to_read = []
    for i in range(n):
        if statuses[i] == "error":  # failed upstream: carry the reason
            out_status[i], out_error[i] = "error", errors[i] or "failed before recognition"
            report.count("errors")
        elif tasks[i] == "skip":
            report.count("skipped")
        else:
            to_read.append(i)

    if to_read:
        images = batch.column("image")
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        step = max(1, int(getattr(recognizer, "batch_size", 16) or 16))
        for start in range(0, len(to_read), step):
            idx = to_read[start:start + step]
            crops = [Crop(tasks[i], images[i].as_py() or b"", widths[i] or 0, heights[i] or 0) for i in idx]
            with report.part("recognize"):
                results = recognizer.recognize(crops)
            report.advance(len(idx), total, "regions")
            if len(results) != len(crops):
                raise RuntimeError(
                    f"recognizer {recognizer.name!r} returned {len(results)} results for {len(crops)} crops"
                )
            for i, crop, result in zip(idx, crops, results):
                if result.status == "error":
                    out_status[i], out_error[i] = "error", result.error or "recognizer error"
                    report.count("errors")
                    continue
                texts[i] = result.text or ""
                report.count("recognized")
                if not texts[i].strip() and crop.image:
                    report.count("empty_text")

    return pa.record_batch(
        [
            batch.column("page_id"),
            batch.column("region"),
            batch.column("task"),
            pa.array(texts, pa.string()),
            pa.array(out_status, pa.string()),
            pa.array(out_error, pa.string()),
        ],
        schema=RECOGNITION,
    )


def run_recognition(
    crops: pa.Table,
    recognizer: Recognizer,
    *,
    chunk_rows: int = CHUNK_ROWS,
    report: StageReport | None = None,
) -> tuple[pa.Table, StageReport]:
    """Read every crop: one RECOGNITION row per CROPS row, same order.

    ``skip`` crops get empty text and status ok without calling the recognizer; rows already in
    error (a failed page's ``region = -1`` row, a failed crop) keep their status and reason. The
    rest go to ``recognizer.recognize`` in batches of ``recognizer.batch_size``.
    Counts: regions, recognized, skipped, errors, empty_text (a crop read as no text).
    """
    report = report or StageReport()
    with timed_stage(report):
        for name in ("regions", "recognized", "skipped", "errors", "empty_text"):
            report.counts.setdefault(name, 0)
        report.parts.setdefault("recognize", 0.0)
        crops = crops.select(RECOGNITION.names[:3] + ["image", "width", "height", "status", "error"])
        batches = [
            _recognize_chunk(batch, recognizer, report, crops.num_rows)
            for batch in crops.to_batches(max_chunksize=chunk_rows)
        ]
        table = pa.Table.from_batches(batches, schema=RECOGNITION)
        n_regions = pc.sum(pc.greater_equal(table.column("region"), 0)).as_py() or 0
        report.count("regions", int(n_regions))
        report.pages = pc.count_distinct(table.column("page_id")).as_py() if table.num_rows else 0
    return table, report
