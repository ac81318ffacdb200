"""The layout stage: regions of every page, labelled with a task and numbered in reading order.

Each batch of pages is read from the shard (``Shard.read_pages``: encoded bytes, or arrays for
rendered PDF pages), decoded once and preprocessed by the backend (on a worker thread, one batch
ahead of the model, so reading and decoding overlap inference), the backend detects regions in batches,
abandoned labels (headers, footers) are dropped, ink outside every model box is recovered as
extra text regions, and the kept regions are put in reading order. A page that cannot be
decoded or fails in the model becomes one error row; the partition goes on. A page with no
regions gives no row. A fault of the device (a CUDA error, or out of memory with one page
alone) raises ``DeviceFault``: the step fails rather than turn every later page into an error.
Rows go out in tables of whole pages as batches finish: no more than two batches of pages are
held at once, whatever the size of the shard.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets import config
from ocr_assets.backends.layout.base import (
    DeviceFault, Detection, LayoutBackend, PreparedPage, device_fault_kind, free_device_memory,
)
from ocr_assets.schemas import PAGE_ERROR_REGION, layout_schema
from ocr_assets.sources.base import Shard
from ocr_assets.stages.reading_order import order_detections
from ocr_assets.stages.recovery import covers_page, find_page_text
from ocr_assets.stages.output import Sink, StageOutput
from ocr_assets.timing import StageReport, timed_stage

BATCH_ROWS = 4096  # region rows gathered before a table goes to the sink (whole pages only)
DUPLICATE_IOU = 0.8  # two labels for (nearly) the same box: one of them stands
MERGE_SHARE = 0.2  # same-task regions sharing this much of the smaller box are read as one
# what became of a page: nothing yet, its regions, none found, an error row
UNANSWERED, REGIONS, NO_REGIONS, FAILED = range(4)


def _answers(results, count: int) -> list:
    """``results`` as a list, checked to hold one answer per page: a short answer must not drop a page."""
    results = list(results)
    if len(results) != count:
        raise ValueError(f"the layout backend gave {len(results)} results for {count} page(s)")
    return results


def _device_fault(page_ids: list[str], exc: Exception) -> DeviceFault:
    """The DeviceFault to raise for ``exc``, naming the pages and the settings to change."""
    named = ", ".join(repr(p) for p in page_ids[:3])
    if len(page_ids) > 3:
        named += f" and {len(page_ids) - 3} more"
    what = ("ran out of device memory with one page alone" if device_fault_kind(exc) == "memory"
            else "hit a device error")
    return DeviceFault(
        f"the layout model {what} on page {named} ({type(exc).__name__}: {exc}); lower "
        f"{config.ENV_LAYOUT_BATCH_SIZE}, or set {config.ENV_DEVICE} to another GPU or to cpu"
    )


def _prepare(
    backend: LayoutBackend, shard: Shard, keys: list[tuple[int, int]], page_ids: list[str]
) -> list[PreparedPage | str]:
    """The backend's prepared pages for the (row, page) ``keys``, or per page the reason it failed.

    The batch's pixels are read from the shard at once (PDF pages render in parallel there). Where
    preparing the batch fails, each page is prepared alone, so one bad page fails alone. Raises
    only ``DeviceFault``, or what ``read_pages`` raises (a fault of the whole shard, not a page's).
    """
    pixels = shard.read_pages(keys)
    if len(pixels) != len(keys):
        raise RuntimeError(f"shard {shard.key!r} gave {len(pixels)} pages for {len(keys)} asked: a bug in the source")
    blobs: list = []
    unread: dict[int, str] = {}
    for n, got in enumerate(pixels):
        if isinstance(got, Exception) or got is None:
            blobs.append(None)
            unread[n] = f"page could not be read from the dataset: {got or 'no pixels'}"
        else:
            blobs.append(got)
    del pixels
    try:
        prepared = _answers(backend.prepare(blobs), len(blobs))
    except Exception as exc:
        if device_fault_kind(exc) == "device":
            raise _device_fault(page_ids, exc) from exc
        prepared = [_prepare_alone(backend, blob, page_id) for blob, page_id in zip(blobs, page_ids)]
    return [unread.get(n, p) for n, p in enumerate(prepared)]


def _prepare_alone(backend: LayoutBackend, blob, page_id: str) -> PreparedPage | str:
    try:
        return _answers(backend.prepare([blob]), 1)[0]
    except Exception as exc:
        if device_fault_kind(exc) is not None:
            raise _device_fault([page_id], exc) from exc
        return f"page could not be prepared for the layout model: {type(exc).__name__}: {exc}"


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
    """(detection, task, source) of one page's kept regions, in reading order.

    With ``recover_text``, a picture box (task ``skip``) covering the whole page is dropped, as the
    PP-DocLayoutV3 backend drops a whole-page image, and its ink is searched as uncovered ink; the
    other picture boxes are searched for text lines (source ``figure``), and a picture that its
    text fills is dropped for that text.
    """
    found = len(dets)
    whole = 0
    if recover_text:
        pictures_left = [d for d in dets if not (label_tasks.get(d.label) == "skip"
                                                 and covers_page((d.x0, d.y0, d.x1, d.y1), page.height, page.width))]
        whole, dets = len(dets) - len(pictures_left), pictures_left
    # every model box but a picture counts as covered, abandoned and duplicate ones included
    covered = np.array([[d.x0, d.y0, d.x1, d.y1] for d in dets if label_tasks.get(d.label, "text") != "skip"],
                       dtype=np.int64).reshape(-1, 4)
    dets = _drop_duplicates(dets, label_tasks)
    kept: list[tuple[Detection, str, str]] = []
    abandoned = 0
    for d in dets:
        task = label_tasks.get(d.label, "text")
        if task == config.ABANDON:
            abandoned += 1
            continue
        kept.append((d, task, config.SOURCE_MODEL))
    kept = _merge_overlapping(kept)
    report.count("abandoned_regions", abandoned)
    report.count("whole_page_pictures", whole)
    report.count("duplicate_regions", found - whole - len(kept) - abandoned)
    if recover_text:
        with report.part("recovery"):
            kept = _with_page_text(page, kept, covered, report)
    order = order_detections([k[0] for k in kept], page.width, page.height)
    return [kept[i] for i in order.tolist()]


def _with_page_text(
    page: PreparedPage, kept: list[tuple[Detection, str, str]], covered: np.ndarray, report: StageReport
) -> list[tuple[Detection, str, str]]:
    """``kept`` with the text recovered outside every box and the text lines found in its pictures;
    a picture filled by its text lines is dropped for them."""
    pictures = [i for i, (_, task, _) in enumerate(kept) if task == "skip"]
    boxes = np.array([[kept[i][0].x0, kept[i][0].y0, kept[i][0].x1, kept[i][0].y1] for i in pictures],
                     dtype=np.int64).reshape(-1, 4)
    text = find_page_text(page.image, covered, boxes, scale=page.host_scale)
    filled = {i for i, is_text in zip(pictures, text.picture_is_text.tolist()) if is_text}
    out = [k for i, k in enumerate(kept) if i not in filled]
    found = [(box, config.SOURCE_RECOVERED) for box in text.recovered.tolist()]
    found += [(box, config.SOURCE_FIGURE) for blocks in text.in_pictures for box in blocks.tolist()]
    for (x0, y0, x1, y1), source in found:
        out.append((Detection(config.RECOVERED_LABEL, 0.0, x0, y0, x1, y1), "text", source))
    report.count("figure_regions", sum(len(b) for b in text.in_pictures))
    report.count("pictures_read_as_text", len(filled))
    return out


def run_layout(
    pages: pa.Table,
    shard: Shard,
    backend: LayoutBackend,
    *,
    recover_text: bool = True,
    report: StageReport | None = None,
    sink: Sink | None = None,
    batch_rows: int = BATCH_ROWS,
) -> tuple[pa.Table | None, StageReport]:
    """Layout regions of the ``ok`` pages of ``pages``, as LAYOUT rows (with polygons where the
    backend keeps them).

    ``pages`` needs only the columns page_id, row, page and status of the PAGES table; each page's
    pixels come from ``shard.read_pages`` one batch at a time. Regions are numbered ``region``
    0..n-1 in reading order per page; source is ``model``, ``recovered`` (ink outside every model
    box) or ``figure`` (text lines inside a picture box), the last two when ``recover_text``. Each
    page is turned upright by the backend before layout (its quarter turn and skew, on every row
    as ``rotation``/``skew``; null on an error row), so boxes are in the turned page's pixels;
    pages turned are counted as ``rotated_pages`` and ``deskewed_pages``, and the work timed as
    the parts ``orientation`` and ``deskew``. Every ``ok`` page ends with regions, none (no row;
    counted as ``pages_without_regions``) or one error row; a page left unanswered is a bug and raises
    RuntimeError. A device fault raises ``DeviceFault``.

    With a ``sink``, tables of whole pages (about ``batch_rows`` rows) go to it in page order and
    the table returned is None; without one, the whole table is returned.
    """
    report = report if report is not None else StageReport()
    report.info["backend"] = backend.name
    report.info["batch_size"] = backend.batch_size
    report.info.update(backend.info)
    for name in ("regions", "recovered_regions", "errors", "abandoned_regions", "pages_without_regions",
                 "rotated_pages", "deskewed_pages", "figure_regions", "pictures_read_as_text", "whole_page_pictures"):
        report.count(name, 0)
    for part in ("orientation", "deskew"):  # every key in every partition, for the plots
        report.parts.setdefault(part, 0.0)
    schema = layout_schema(backend.keep_polygons)
    cols: dict[str, list] = {name: [] for name in schema.names}
    out = StageOutput(sink, schema)

    def emit(page_id, region, label, task, score, box, source, status="ok", error=None, polygon=None,
             turn=None):
        for name, value in zip(
            ("page_id", "region", "label", "task", "score", "source", "rotation", "skew", "status", "error"),
            (page_id, region, label, task, score, source, None if turn is None else turn.rotation,
             None if turn is None else turn.skew, status, error),
        ):
            cols[name].append(value)
        for name, value in zip(("x0", "y0", "x1", "y1"), box):
            cols[name].append(value)
        if "polygon" in cols:
            cols["polygon"].append(list(polygon) if polygon else None)

    def emit_error(page_id, reason):
        report.count("errors")
        emit(page_id, PAGE_ERROR_REGION, "page", "skip", None, (None,) * 4, None, "error", reason)

    def flush() -> None:
        if cols["page_id"]:
            out.write(pa.table(cols, schema=schema))
            for values in cols.values():
                values.clear()

    with timed_stage(report):
        todo = pages.select(["page_id", "row", "page", "status"]).filter(pc.equal(pages.column("status"), "ok"))
        page_ids = todo.column("page_id").to_pylist()
        keys = list(zip(todo.column("row").to_pylist(), todo.column("page").to_pylist()))
        del todo
        state = [UNANSWERED] * len(keys)
        size = max(1, int(backend.batch_size))
        batches = [range(i, min(i + size, len(keys))) for i in range(0, len(keys), size)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layout-prepare") as pool:
            def submit(batch: range) -> Future:
                return pool.submit(_prepare, backend, shard, [keys[i] for i in batch],
                                   [page_ids[i] for i in batch])

            pending = submit(batches[0]) if batches else None
            for b, batch in enumerate(batches):
                prepared = pending.result()
                # the next batch is read, decoded and preprocessed while the model runs on this one
                pending = submit(batches[b + 1]) if b + 1 < len(batches) else None
                for p in prepared:
                    if isinstance(p, PreparedPage):
                        for part, seconds in (("decode", p.decode_seconds), ("preprocess", p.preprocess_seconds),
                                              ("orientation", p.orientation_seconds),
                                              ("deskew", p.deskew_seconds)):
                            report.parts[part] = report.parts.get(part, 0.0) + seconds
                report.pages += len(batch)
                report.advance(len(batch), len(keys))
                good = [(i, p) for i, p in zip(batch, prepared) if isinstance(p, PreparedPage)]
                # per page: detections, or the reason it failed; a page missing here stays unanswered
                outcome = {i: p for i, p in zip(batch, prepared) if isinstance(p, str)}
                found = _detect(backend, [p for _, p in good], [page_ids[i] for i, _ in good], report)
                outcome.update(zip((i for i, _ in good), found))
                pages_by_index = dict(good)
                for i in batch:
                    answer = outcome.get(i)
                    if answer is None:
                        continue
                    if isinstance(answer, str):
                        emit_error(page_ids[i], answer)
                        state[i] = FAILED
                        continue
                    try:
                        regions = _page_regions(
                            pages_by_index[i], answer, backend.label_tasks, recover_text, report
                        )
                    except Exception as exc:  # one page's odd boxes must not stop the shard
                        emit_error(page_ids[i], f"regions of this page could not be kept and ordered: "
                                                f"{type(exc).__name__}: {exc}")
                        state[i] = FAILED
                        continue
                    turn = pages_by_index[i].turn
                    for n, (d, task, source) in enumerate(regions):
                        emit(page_ids[i], n, d.label, task, d.score, (d.x0, d.y0, d.x1, d.y1), source,
                             polygon=d.polygon, turn=turn)
                    report.count("rotated_pages", int(turn.rotation != 0))
                    report.count("deskewed_pages", int(turn.skew != 0.0))
                    report.count("regions", len(regions))
                    report.count("recovered_regions", sum(s == "recovered" for _, _, s in regions))
                    state[i] = REGIONS if regions else NO_REGIONS
                del prepared, good, pages_by_index  # free the pages before the next batch
                if len(cols["page_id"]) >= batch_rows:
                    flush()
        unanswered = [page_ids[i] for i, s in enumerate(state) if s == UNANSWERED]
        if unanswered:
            raise RuntimeError(
                f"layout left {len(unanswered)} page(s) unanswered, for example {unanswered[:3]}: "
                f"a bug in the layout stage, not in the pages"
            )
        report.count("pages_without_regions", state.count(NO_REGIONS))
        flush()
    return out.result(), report


def _detect(backend: LayoutBackend, images: list[PreparedPage], page_ids: list[str], report: StageReport) -> list:
    """Detections per image, or per page the reason it failed.

    A failing batch is halved (8 → 4 + 4 → ... → each page alone), the device's cached memory
    freed between tries: a batch too large for the GPU still runs, and a page that fails alone
    gets the error. A device error, or running out of memory with one page alone, raises
    ``DeviceFault`` instead: every later page would fail the same way.
    """
    if not images:
        return []
    try:
        return _answers(backend.detect(images, report), len(images))
    except Exception as exc:
        kind = device_fault_kind(exc)
        if kind == "device" or (kind == "memory" and len(images) == 1):
            raise _device_fault(page_ids, exc) from exc
        reason = f"layout model failed on this page: {type(exc).__name__}: {exc}"
    free_device_memory()  # after the except block: the failed try's tensors are released by now
    if len(images) == 1:
        return [reason]
    half = (len(images) + 1) // 2
    return (_detect(backend, images[:half], page_ids[:half], report)
            + _detect(backend, images[half:], page_ids[half:], report))
