"""The recognition stage: read the text of every crop with a `Recognizer`, streaming.

Crops come as a table or as record batches (e.g. read from the crops file) and are handed to the
recognizer one batch at a time, as it asks for them: a shard of 100,000 regions never holds all of
its crop images, and a recognizer that keeps many requests in flight takes the next crop as soon
as one finishes. Only small per-row results (text, confidence, status, error, page_id, region, task) are kept,
and with a ``sink`` each finished prefix of rows is written out in crops order and released. With
a cache, answers already paid for (an earlier run of the same partition, crashed or not) are read
back instead; only final answers are cached, and the partition's cache is compacted at the end.

Every row starts unanswered and becomes ``ok`` or ``error`` only when its result (or a cache
hit, an upstream error, or a skip) is recorded: a row nobody answered fails the step.

A row's ``confidence`` is the recognizer's (null where no text was read: errors, skips, blank
answers, or a recognizer that gives none); the report's ``mean_confidence`` is their mean over
the partition weighted by characters read, 0.0 when no region has one (``confident_regions``
says how many do), so the key is in every partition's metadata and Dagster plots it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from ocr_assets.backends.recognition.base import Crop, Recognized, Recognizer, text_weight
from ocr_assets.recognition_cache import RecognitionCache
from ocr_assets.schemas import PAGE_ERROR_REGION, RECOGNITION
from ocr_assets.stages.output import Sink, StageOutput
from ocr_assets.timing import StageReport, timed_stage

# Rows per record batch taken from the crops (a few MB of encoded crops), and per sink call.
CHUNK_ROWS = 1024

Crops = pa.Table | Iterable[pa.RecordBatch]


def crop_batches(crops: Crops, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``chunk_rows`` rows, pulled from ``crops`` only as they are asked for."""
    step = max(1, int(chunk_rows))
    source = crops.to_batches(max_chunksize=step) if isinstance(crops, pa.Table) else crops
    for batch in source:
        for start in range(0, batch.num_rows, step):
            yield batch.slice(start, step)


def _to_read(task: str | None, status: str | None) -> bool:
    """Whether the recognizer reads this row: not failed upstream, not kept as an image."""
    return status != "error" and task != "skip"


def _batch_crops(batch: pa.RecordBatch) -> Iterator[tuple[int, Crop]]:
    """(row within the batch, crop) for every row of one batch that the recognizer reads."""
    tasks = batch.column("task").to_pylist()
    statuses = batch.column("status").to_pylist()
    images = batch.column("image")
    widths = batch.column("width").to_pylist()
    heights = batch.column("height").to_pylist()
    for j, (task, status) in enumerate(zip(tasks, statuses)):
        if _to_read(task, status):
            yield j, Crop(task, images[j].as_py() or b"", widths[j] or 0, heights[j] or 0)


def readable_crops(crops: Crops, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, Crop]]:
    """(row, crop) for every row the recognizer reads (not skip, not failed upstream), in crops order.

    ``crops`` is a CROPS table or an iterable of its record batches, read in one pass.
    """
    offset = 0
    for batch in crop_batches(crops, chunk_rows):
        for j, crop in _batch_crops(batch):
            yield offset + j, crop
        offset += batch.num_rows


def reachable_keys(crops: Crops, recognizer: Recognizer, chunk_rows: int = CHUNK_ROWS) -> set[str]:
    """The cache keys the current settings would look up for these crops (what pruning keeps)."""
    return {recognizer.cache_key(crop) for _, crop in readable_crops(crops, chunk_rows)}


@dataclass
class _Chunk:
    """The results of one batch of crop rows, held until every row of it is answered."""

    start: int
    ids: pa.RecordBatch  # page_id, region, task: never the images
    text: list[str]
    confidence: list[float | None]
    status: list[str | None]  # None: unanswered; never ok by default
    error: list[str | None]
    open: int = 0  # rows still unanswered

    def table(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays(
            [self.ids.column(0).cast(pa.string()), self.ids.column(1).cast(pa.int32()),
             self.ids.column(2).cast(pa.string()), pa.array(self.text, pa.string()),
             pa.array(self.confidence, pa.float32()), pa.array(self.status, pa.string()),
             pa.array(self.error, pa.string())],
            schema=RECOGNITION,
        )


@dataclass
class _InOrder:
    """Results in crops order: a prefix of fully answered chunks goes to ``sink`` and is released."""

    sink: Sink
    chunk_rows: int
    held: deque[_Chunk] = field(default_factory=deque)
    ready: list[pa.RecordBatch] = field(default_factory=list)
    ready_rows: int = 0
    rows: int = 0

    def add(self, batch: pa.RecordBatch) -> _Chunk:
        n = batch.num_rows
        chunk = _Chunk(self.rows, pa.RecordBatch.from_arrays(
            [batch.column("page_id"), batch.column("region"), batch.column("task")], ["page_id", "region", "task"]),
            [""] * n, [None] * n, [None] * n, [None] * n)
        self.rows += n
        self.held.append(chunk)
        return chunk

    def flush(self, final: bool = False) -> None:
        """Write the answered prefix once it holds ``chunk_rows`` rows (everything ready when ``final``)."""
        while self.held and self.held[0].open == 0:
            chunk = self.held.popleft()
            self.ready.append(chunk.table())
            self.ready_rows += len(chunk.status)
        if self.ready and (final or self.ready_rows >= self.chunk_rows):
            ready, self.ready, self.ready_rows = self.ready, [], 0
            self.sink(pa.Table.from_batches(ready, schema=RECOGNITION))


def run_recognition(
    crops: Crops,
    recognizer: Recognizer,
    *,
    cache: RecognitionCache | None = None,
    chunk_rows: int = CHUNK_ROWS,
    report: StageReport | None = None,
    sink: Sink | None = None,
    rows: int | None = None,
) -> tuple[pa.Table | None, StageReport]:
    """Read every crop: one RECOGNITION row per CROPS row, same order.

    ``crops`` is a CROPS table or an iterable of its record batches (read once, a batch at a time,
    as the recognizer asks for crops). ``skip`` crops get empty text and status ok without calling
    the recognizer; rows already in error (a failed page's ``region = -1`` row, a failed crop) keep
    their status and reason. The rest go to ``recognizer.recognize_stream``, unless ``cache`` has
    their answer; only results marked ``cacheable`` are cached, and the cache is compacted when the
    stage completes. With ``sink``, rows are handed to it in order, in tables of about
    ``chunk_rows`` rows, as soon as every row before them is answered, and None is returned in
    place of the table. ``rows`` (the crops' row count, where known without reading them, e.g.
    from the file's footer) lets the progress line say how far the stage is; a table gives it.
    Raises RuntimeError when the recognizer never answered some rows (a bug, not a region's fault).
    Counts: regions, recognized, skipped, errors, region_errors (errors of regions, failed pages'
    rows excluded), empty_text (a non-empty crop read as no text), cache_hits, confident_regions
    (regions read with a confidence); info: mean_confidence (see the module docstring).
    """
    report = report or StageReport()
    with timed_stage(report):
        for name in ("regions", "recognized", "skipped", "errors", "region_errors", "empty_text", "cache_hits",
                     "confident_regions"):
            report.counts.setdefault(name, 0)
        report.parts.setdefault("recognize", 0.0)
        total = crops.num_rows if isinstance(crops, pa.Table) else rows
        output = StageOutput(sink, RECOGNITION)
        out = _InOrder(output.write, max(1, int(chunk_rows)))
        page_ids: set[str] = set()
        sent: dict[int, tuple[_Chunk, int, str | None, bool]] = {}  # in flight: chunk, row in it, cache key, empty crop
        lock = threading.Lock()  # cache hits are answered on the recognizer's thread, results on this one
        to_read = 0
        exhausted = False
        weighted = [0.0, 0]  # sum of confidence x characters, characters: the partition's mean confidence

        def done(chunk: _Chunk, j: int, status: str, error: str | None = None) -> None:
            """Record one row's outcome (under ``lock``) and write what is ready."""
            chunk.status[j], chunk.error[j] = status, error
            chunk.open -= 1
            if status == "error":
                report.count("errors")
                if chunk.ids.column(1)[j].as_py() != PAGE_ERROR_REGION:
                    report.count("region_errors")
            if total:
                report.advance(1, total, "regions")
            out.flush()

        def finish(chunk: _Chunk, j: int, result: Recognized, empty_crop: bool) -> None:
            if result.status != "ok":
                done(chunk, j, "error", result.error or f"recognizer {recognizer.name!r} gave status {result.status!r}")
                return
            chunk.text[j] = result.text or ""
            weight = text_weight(chunk.text[j])
            if weight and result.confidence is not None:
                confidence = min(1.0, max(0.0, float(result.confidence)))
                chunk.confidence[j] = confidence
                weighted[0] += confidence * weight
                weighted[1] += weight
                report.count("confident_regions")
            report.count("recognized")
            if not chunk.text[j].strip() and not empty_crop:
                report.count("empty_text")
            done(chunk, j, "ok")

        def register(batch: pa.RecordBatch) -> _Chunk:
            """Hold one batch's small columns; rows failed upstream or skipped are done at once."""
            nonlocal to_read
            with lock:
                chunk = out.add(batch)
                chunk.open = batch.num_rows
                page_ids.update(batch.column("page_id").to_pylist())
                regions = batch.column("region").to_pylist()
                report.count("regions", sum(r != PAGE_ERROR_REGION for r in regions))
                errors = batch.column("error").to_pylist()
                for j, (task, status) in enumerate(zip(batch.column("task").to_pylist(),
                                                       batch.column("status").to_pylist())):
                    if status == "error":  # failed upstream: carry the reason
                        done(chunk, j, "error", errors[j] or "failed before recognition")
                    elif task == "skip":  # kept as an image: nothing to read, so done
                        report.count("skipped")
                        done(chunk, j, "ok")
                    else:
                        to_read += 1
            return chunk

        def pending() -> Iterator[tuple[int, Crop]]:
            """Crops still to read, in crops order, a batch at a time; cache hits are answered here."""
            nonlocal exhausted
            for batch in crop_batches(crops, chunk_rows):
                chunk = register(batch)
                for j, crop in _batch_crops(batch):
                    key = recognizer.cache_key(crop) if cache is not None else None
                    hit = cache.get(key) if key is not None else None
                    if hit is not None:
                        with lock:
                            report.count("cache_hits")
                            finish(chunk, j, hit, not crop.image)
                        continue
                    i = chunk.start + j
                    with lock:
                        sent[i] = (chunk, j, key, not crop.image)
                    yield i, crop
            exhausted = True

        def answer(i: int, result: Recognized) -> None:
            with lock:
                entry = sent.pop(i, None)
                if entry is None:
                    raise RuntimeError(
                        f"recognizer {recognizer.name!r} answered row {i} twice, or a row it was not sent")
            chunk, j, key, empty_crop = entry
            if key is not None and result.cacheable:
                cache.put(key, result)  # first: paid for, even if writing the row fails
            with lock:
                finish(chunk, j, result, empty_crop)

        items = pending()
        stream = recognizer.recognize_stream(items)
        try:
            with report.part("recognize"):
                for i, result in stream:
                    answer(i, result)
            if not exhausted:  # the recognizer stopped asking: read on, so its unanswered rows are known
                for _ in items:
                    pass
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # stop the recognizer's requests now, not whenever the stream is collected
            try:
                items.close()  # let go of the crops' source now
            except ValueError:  # still running on a recognizer thread that did not stop in time
                pass
            if cache is not None:
                cache.flush()  # what was paid for survives a failure of the rest
        if cache is not None:
            cache.compact()
        unanswered = [(chunk, j) for chunk in out.held for j, status in enumerate(chunk.status) if status is None]
        if unanswered:
            pages = sorted({chunk.ids.column(0)[j].as_py() for chunk, j in unanswered})
            more = f" and {len(pages) - 10} more" if len(pages) > 10 else ""
            raise RuntimeError(
                f"recognizer {recognizer.name!r} never answered {len(unanswered)} of {to_read} regions, "
                f"on pages {', '.join(map(str, pages[:10]))}{more}: a bug in the pipeline, not in the data"
            )
        out.flush(final=True)
        report.pages = len(page_ids)
        report.info["mean_confidence"] = round(weighted[0] / weighted[1], 4) if weighted[1] else 0.0
    return output.result(), report
