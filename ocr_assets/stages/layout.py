"""The layout stage: regions of every page, labelled with a task and numbered in reading order.

Each page is decoded once and preprocessed by the backend (on a worker thread, one batch
ahead of the model, so decoding overlaps inference), the backend detects regions in batches,
abandoned labels (headers, footers) are dropped, ink outside every model box is recovered as
extra text regions, and the kept regions are put in reading order. A page that cannot be
decoded or fails in the model becomes one error row; the partition goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets import config
from ocr_assets.backends.layout.base import Detection, LayoutBackend, PreparedPage
from ocr_assets.schemas import PAGE_ERROR_REGION, layout_schema
from ocr_assets.stages.reading_order import order_detections
from ocr_assets.stages.recovery import recover_text_boxes
from ocr_assets.timing import StageReport, timed_stage

ImageAt = Callable[[int], "bytes | memoryview | None"]
DUPLICATE_IOU = 0.8  # two labels for (nearly) the same box: one of them stands
MERGE_SHARE = 0.2  # same-task regions sharing this much of the smaller box are read as one


def _prepare(backend: LayoutBackend, image_at: ImageAt, rows: list[int]) -> list[PreparedPage | str]:
    """The backend's prepared pages for source rows ``rows``, or per page the reason it failed; never raises."""
    blobs: list = []
    unread: dict[int, str] = {}
    for n, row in enumerate(rows):
        try:
            blobs.append(image_at(row))
        except Exception as exc:  # one unreadable row must not stop the shard
            blobs.append(None)
            unread[n] = f"page image could not be read from the dataset: {exc}"
    try:
        prepared = backend.prepare(blobs)
    except Exception as exc:
        return [f"page could not be prepared for the layout model: {type(exc).__name__}: {exc}"] * len(rows)
    return [unread.get(n, p) for n, p in enumerate(prepared)]


def _pairwise_intersection(boxes: np.ndarray) -> np.ndarray:
    """(n, n) intersection areas of corner boxes."""
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    return np.prod(np.clip(rb - lt, 0, None), axis=2)


def _drop_duplicates(dets: list[Detection], label_tasks: dict[str, str]) -> list[Detection]:
    """Drop detections that repeat another's box under a second label (CDLA often says header *and* text).

    An abandon label wins (the region is dropped on purpose), otherwise the better score.
    """
    if len(dets) < 2:
        return dets
    boxes = np.array([[d.x0, d.y0, d.x1, d.y1] for d in dets], dtype=np.float64)
    abandon = [label_tasks.get(d.label) == config.ABANDON for d in dets]
    order = np.lexsort(([-d.score for d in dets], np.logical_not(abandon)))
    b = boxes[order]
    inter = _pairwise_intersection(b)
    area = np.prod(b[:, 2:] - b[:, :2], axis=1)
    iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
    # a box is a duplicate if a box ranked before it overlaps it that much
    dup = (np.triu(iou, k=1) > DUPLICATE_IOU).any(axis=0)
    return [dets[i] for i in sorted(order[~dup].tolist())]


def _merge_overlapping(regions: list[tuple[Detection, str, str]]) -> list[tuple[Detection, str, str]]:
    """Merge regions of the same task that overlap by MERGE_SHARE of the smaller one into their union.

    CDLA often boxes one paragraph twice, offset (or once inside a larger box): read apart,
    the shared lines would be read twice. A box wholly inside another simply disappears.
    """
    regions = list(regions)
    while len(regions) > 1:
        boxes = np.array([[d.x0, d.y0, d.x1, d.y1] for d, _, _ in regions], dtype=np.float64)
        tasks = np.array([t for _, t, _ in regions])
        inter = _pairwise_intersection(boxes)
        area = np.maximum(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1), 1e-9)
        share = inter / np.minimum(area[:, None], area[None, :])
        share[(tasks[:, None] != tasks[None, :]) | np.tri(len(regions), dtype=bool)] = 0
        i, j = np.unravel_index(int(np.argmax(share)), share.shape)
        if share[i, j] < MERGE_SHARE:
            break
        (a, task, source), (b, _, _) = regions[i], regions[j]
        keep = a if area[i] >= area[j] else b  # the larger box names the merged region
        merged = Detection(keep.label, max(a.score, b.score), min(a.x0, b.x0), min(a.y0, b.y0),
                           max(a.x1, b.x1), max(a.y1, b.y1), keep.order)
        regions = [r for k, r in enumerate(regions) if k not in (i, j)] + [(merged, task, source)]
    return regions


def _page_regions(
    page: PreparedPage, dets: list[Detection], label_tasks: dict[str, str], recover_text: bool,
    report: StageReport,
) -> list[tuple[Detection, str, str]]:
    """(detection, task, source) of one page's kept regions, in reading order."""
    found = len(dets)
    # every model box counts as covered, abandoned and duplicate ones included
    covered = np.array([[d.x0, d.y0, d.x1, d.y1] for d in dets], dtype=np.int64).reshape(-1, 4)
    dets = _drop_duplicates(dets, label_tasks)
    kept: list[tuple[Detection, str, str]] = []
    abandoned = 0
    for d in dets:
        task = label_tasks.get(d.label, "text")
        if task == config.ABANDON:
            abandoned += 1
            continue
        kept.append((d, task, "model"))
    kept = _merge_overlapping(kept)
    report.count("abandoned_regions", abandoned)
    report.count("duplicate_regions", found - len(kept) - abandoned)
    if recover_text:
        with report.part("recovery"):
            for x0, y0, x1, y1 in recover_text_boxes(page.image, covered).tolist():
                kept.append((Detection(config.RECOVERED_LABEL, 0.0, x0, y0, x1, y1), "text", "recovered"))
    order = order_detections([k[0] for k in kept], page.width, page.height)
    return [kept[i] for i in order.tolist()]


def run_layout(
    pages: pa.Table,
    image_at: ImageAt,
    backend: LayoutBackend,
    *,
    recover_text: bool = True,
    report: StageReport | None = None,
) -> tuple[pa.Table, StageReport]:
    """Layout regions of the ``ok`` pages of a PAGES table, as a LAYOUT table.

    ``image_at(row)`` returns the stored image bytes of source row ``row``. Regions are
    numbered ``region`` 0..n-1 in reading order per page; source is ``model`` or
    ``recovered`` (ink outside every model box, when ``recover_text``).
    """
    report = report if report is not None else StageReport()
    report.info["backend"] = backend.name
    report.info["batch_size"] = backend.batch_size
    report.info.update(backend.info)
    for name in ("regions", "recovered_regions", "errors", "abandoned_regions"):
        report.count(name, 0)
    schema = layout_schema(backend.keep_polygons)
    cols: dict[str, list] = {name: [] for name in schema.names}

    def emit(page_id, region, label, task, score, box, source, status="ok", error=None, polygon=None):
        for name, value in zip(
            ("page_id", "region", "label", "task", "score", "source", "status", "error"),
            (page_id, region, label, task, score, source, status, error),
        ):
            cols[name].append(value)
        for name, value in zip(("x0", "y0", "x1", "y1"), box):
            cols[name].append(value)
        if "polygon" in cols:
            cols["polygon"].append(list(polygon) if polygon else None)

    def emit_error(page_id, reason):
        report.count("errors")
        emit(page_id, PAGE_ERROR_REGION, "page", "skip", None, (None,) * 4, None, "error", reason)

    with timed_stage(report):
        ok = pc.equal(pages.column("status"), "ok")
        todo = pages.filter(ok)
        page_ids = todo.column("page_id").to_pylist()
        rows = todo.column("row").to_pylist()
        size = max(1, int(backend.batch_size))
        batches = [range(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layout-prepare") as pool:
            def submit(batch: range) -> Future:
                return pool.submit(_prepare, backend, image_at, [rows[i] for i in batch])

            pending = submit(batches[0]) if batches else None
            for b, batch in enumerate(batches):
                prepared = pending.result()
                # the next batch is decoded and preprocessed while the model runs on this one
                pending = submit(batches[b + 1]) if b + 1 < len(batches) else None
                for p in prepared:
                    if isinstance(p, PreparedPage):
                        report.parts["decode"] = report.parts.get("decode", 0.0) + p.decode_seconds
                        report.parts["preprocess"] = report.parts.get("preprocess", 0.0) + p.preprocess_seconds
                report.pages += len(batch)
                report.advance(len(batch), len(rows))
                good = [(i, p) for i, p in zip(batch, prepared) if isinstance(p, PreparedPage)]
                # per page: detections, or the reason it failed
                outcome = {i: p for i, p in zip(batch, prepared) if isinstance(p, str)}
                outcome.update(zip((i for i, _ in good), _detect(backend, [p for _, p in good], report)))
                pages_by_index = dict(good)
                for i in batch:
                    if isinstance(outcome[i], str):
                        emit_error(page_ids[i], outcome[i])
                        continue
                    regions = _page_regions(
                        pages_by_index[i], outcome[i], backend.label_tasks, recover_text, report
                    )
                    for n, (d, task, source) in enumerate(regions):
                        emit(page_ids[i], n, d.label, task, d.score, (d.x0, d.y0, d.x1, d.y1), source,
                             polygon=d.polygon)
                    report.count("regions", len(regions))
                    report.count("recovered_regions", sum(s == "recovered" for _, _, s in regions))
                del prepared, good, pages_by_index  # free the pages before the next batch
        table = pa.table(cols, schema=schema)
    return table, report


def _detect(backend: LayoutBackend, images: list[PreparedPage], report: StageReport) -> list:
    """Detections per image; where the batch fails, each page alone, a failing page giving its reason."""
    if not images:
        return []
    try:
        return backend.detect(images, report)
    except Exception as exc:
        if len(images) == 1:
            return [f"layout model failed on this page: {type(exc).__name__}: {exc}"]
    out: list = []
    for image in images:
        try:
            out.append(backend.detect([image], report)[0])
        except Exception as exc:
            out.append(f"layout model failed on this page: {type(exc).__name__}: {exc}")
    return out
