"""The recognition stage: read the text of every crop with a `Recognizer`.

Crops are streamed to the recognizer from the crops table's record batches, so a shard of
100,000 regions never holds all of its crop images at once, and a recognizer that keeps many
requests in flight takes the next crop as soon as one finishes. With a cache, answers already
paid for (an earlier run of the same partition, crashed or not) are read back instead; only
final answers are cached, and the partition's cache is compacted into one file at the end.

Every row starts unanswered and becomes ``ok`` or ``error`` only when its result (or a cache
hit, an upstream error, or a skip) is recorded: a row nobody answered fails the step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets.backends.recognition.base import Crop, Recognized, Recognizer
from ocr_assets.recognition_cache import RecognitionCache
from ocr_assets.schemas import PAGE_ERROR_REGION, RECOGNITION
from ocr_assets.timing import StageReport, timed_stage

# Rows per Arrow record batch taken from the crops table (a few MB of encoded crops).
CHUNK_ROWS = 1024


def readable_crops(crops: pa.Table, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, Crop]]:
    """(row, crop) for every row the recognizer reads (not skip, not failed upstream), in table order."""
    tasks = crops.column("task").to_pylist()
    in_status = crops.column("status").to_pylist()
    offset = 0
    for batch in crops.select(["image", "width", "height"]).to_batches(max_chunksize=chunk_rows):
        images = batch.column("image")
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        for j in range(batch.num_rows):
            i = offset + j
            if in_status[i] != "error" and tasks[i] != "skip":
                yield i, Crop(tasks[i], images[j].as_py() or b"", widths[j] or 0, heights[j] or 0)
        offset += batch.num_rows


def reachable_keys(crops: pa.Table, recognizer: Recognizer, chunk_rows: int = CHUNK_ROWS) -> set[str]:
    """The cache keys the current settings would look up for this crops table (what pruning keeps)."""
    return {recognizer.cache_key(crop) for _, crop in readable_crops(crops, chunk_rows)}


def run_recognition(
    crops: pa.Table,
    recognizer: Recognizer,
    *,
    cache: RecognitionCache | None = None,
    chunk_rows: int = CHUNK_ROWS,
    report: StageReport | None = None,
) -> tuple[pa.Table, StageReport]:
    """Read every crop: one RECOGNITION row per CROPS row, same order.

    ``skip`` crops get empty text and status ok without calling the recognizer; rows already in
    error (a failed page's ``region = -1`` row, a failed crop) keep their status and reason. The
    rest go to ``recognizer.recognize_stream``, unless ``cache`` has their answer; only results
    marked ``cacheable`` are cached, and the cache is compacted when the stage completes.
    Raises RuntimeError when the recognizer never answered some rows (a bug, not a region's fault).
    Counts: regions, recognized, skipped, errors, empty_text (a non-empty crop read as no text),
    cache_hits.
    """
    report = report or StageReport()
    with timed_stage(report):
        for name in ("regions", "recognized", "skipped", "errors", "empty_text", "cache_hits"):
            report.counts.setdefault(name, 0)
        report.parts.setdefault("recognize", 0.0)
        n = crops.num_rows
        texts: list[str] = [""] * n
        statuses: list[str | None] = [None] * n  # None: unanswered; never ok by default
        errors: list[str | None] = [None] * n
        keys: dict[int, str] = {}
        tasks = crops.column("task").to_pylist()
        in_status = crops.column("status").to_pylist()
        in_error = crops.column("error").to_pylist()
        to_read = 0
        for i in range(n):
            if in_status[i] == "error":  # failed upstream: carry the reason
                statuses[i], errors[i] = "error", in_error[i] or "failed before recognition"
            elif tasks[i] == "skip":  # kept as an image: nothing to read, so done
                statuses[i] = "ok"
                report.count("skipped")
            else:
                to_read += 1

        lock = threading.Lock()  # cache hits are answered on the recognizer's thread, results on this one

        def finish(i: int, result: Recognized, empty_crop: bool) -> None:
            with lock:
                _finish(i, result, empty_crop)
                report.advance(1, to_read, "regions")

        def _finish(i: int, result: Recognized, empty_crop: bool) -> None:
            if statuses[i] is not None:
                raise RuntimeError(f"recognizer {recognizer.name!r} answered row {i} twice, or a row it was not sent")
            if result.status != "ok":
                statuses[i] = "error"
                errors[i] = result.error or f"recognizer {recognizer.name!r} gave status {result.status!r}"
                return
            statuses[i], texts[i] = "ok", result.text or ""
            report.count("recognized")
            if not texts[i].strip() and not empty_crop:
                report.count("empty_text")

        def pending() -> Iterator[tuple[int, Crop]]:
            """Crops still to read, in table order; cache hits are answered here."""
            for i, crop in readable_crops(crops, chunk_rows):
                if cache is not None:
                    keys[i] = recognizer.cache_key(crop)
                    hit = cache.get(keys[i])
                    if hit is not None:
                        with lock:
                            report.count("cache_hits")
                        finish(i, hit, not crop.image)
                        continue
                yield i, crop

        lengths = pc.binary_length(crops.column("image")).fill_null(0)
        empty = set(np.flatnonzero(lengths.to_numpy(zero_copy_only=False) == 0).tolist()) if n else set()
        stream = recognizer.recognize_stream(pending())
        try:
            with report.part("recognize"):
                for i, result in stream:
                    finish(i, result, i in empty)
                    key = keys.pop(i, None)
                    if cache is not None and key is not None and result.cacheable:
                        cache.put(key, result)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # stop the recognizer's requests now, not whenever the stream is collected
            if cache is not None:
                cache.flush()  # what was paid for survives a failure of the rest
        if cache is not None:
            cache.compact()
        unanswered = [i for i, status in enumerate(statuses) if status is None]
        if unanswered:
            pages = sorted(set(crops.column("page_id").take(unanswered).to_pylist()))
            more = f" and {len(pages) - 10} more" if len(pages) > 10 else ""
            raise RuntimeError(
                f"recognizer {recognizer.name!r} never answered {len(unanswered)} of {to_read} regions, "
                f"on pages {', '.join(map(str, pages[:10]))}{more}: a bug in the pipeline, not in the data"
            )
        report.count("errors", statuses.count("error"))
        table = pa.table(
            {
                "page_id": crops.column("page_id"),
                "region": crops.column("region"),
                "task": crops.column("task"),
                "text": pa.array(texts, pa.string()),
                "status": pa.array(statuses, pa.string()),
                "error": pa.array(errors, pa.string()),
            },
            schema=RECOGNITION,
        )
        regions = crops.column("region").to_numpy(zero_copy_only=False)
        report.count("regions", int(np.count_nonzero(regions != PAGE_ERROR_REGION)))
        report.pages = len(set(crops.column("page_id").to_pylist())) if n else 0
    return table, report
