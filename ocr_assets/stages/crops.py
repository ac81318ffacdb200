"""The crops stage: cut every layout region out of its page and store it as an encoded image.

Layout rows are read in record batches and cut in groups of whole pages: each group's pages
are read from the shard at once (``Shard.read_pages``), each page is decoded once, all of its
regions are numpy slices of that one array, each encoded once, and the group's crops go out
together. No more than one group of pages and crops is held, whatever the size of the shard.
Pages are worked on a small thread pool: cv2 decode and encode release the GIL, so two cores
are both busy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from ocr_assets.config import ENV_ID_COLUMN
from ocr_assets.imaging import decode_page, encode_image, vlm_crop
from ocr_assets.schemas import CROPS, PAGE_ERROR_REGION
from ocr_assets.sources.base import DatasetError, Pixels, Shard
from ocr_assets.stages.output import Sink, StageOutput
from ocr_assets.timing import StageReport, timed_stage
from ocr_assets.upright import NO_TURN, Turn, turn_page

VLM_FORMAT = "vlm-jpeg"  # JPEG, resized to the VLM's patch grid and pixel bounds
GROUP_PAGES = 16  # pages read, cut and written together
NO_BOX = -(2**31)  # null box coordinates, filled for numpy


def _page_map(pages: Mapping[str, tuple[int, int]] | pa.Table) -> Mapping[str, tuple[int, int]]:
    """page_id → (source row, page), from a mapping or the PAGES table (its page_id, row and page
    columns); a page_id on two pages is refused (its regions could be cut from the other page)."""
    if not isinstance(pages, pa.Table):
        return pages
    where: dict[str, tuple[int, int]] = {}
    for page_id, row, page in zip(pages.column("page_id").to_pylist(), pages.column("row").to_pylist(),
                                  pages.column("page").to_pylist()):
        first = where.setdefault(page_id, (row, page))
        if first != (row, page):
            raise DatasetError(
                f"page id {page_id!r} is on row {first[0]} page {first[1]} and row {row} page {page} of "
                f"the pages table; page ids must be unique ({ENV_ID_COLUMN})")
    return where


def _tables(layout: pa.Table | Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.Table]:
    if isinstance(layout, pa.Table):
        yield layout
        return
    for batch in layout:
        yield pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch


def _run_starts(page_ids: np.ndarray) -> list[int]:
    """Where each run of equal page ids starts."""
    return [0, *(np.flatnonzero(page_ids[1:] != page_ids[:-1]) + 1).tolist()] if len(page_ids) else []


def _page_groups(layout: pa.Table | Iterable[pa.RecordBatch | pa.Table], group_pages: int) -> Iterator[pa.Table]:
    """Slices of the layout rows holding up to ``group_pages`` whole pages each, in order: a page's
    rows (contiguous in LAYOUT) are kept together across the edges of the batches read."""
    waiting: pa.Table | None = None  # rows read but not yet handed out, from a page's first row on
    tables = _tables(layout)
    following = next(tables, None)
    while following is not None:
        table, following = following, next(tables, None)  # one batch ahead: is this the last one?
        if waiting is not None and waiting.num_rows:
            table = pa.concat_tables([waiting, table.cast(waiting.schema)])
        if not table.num_rows:
            continue
        starts = _run_starts(np.asarray(table.column("page_id").to_numpy(zero_copy_only=False), dtype=object))
        ends = [*starts[1:], table.num_rows]
        if following is None:  # the last batch: every page is whole, and the last group may be short
            handed = len(starts)
        else:  # the last page may go on in the next batch; a short group waits to grow
            handed = (len(starts) - 1) // group_pages * group_pages
        for k in range(0, handed, group_pages):
            last = min(k + group_pages, handed) - 1
            yield table.slice(starts[k], ends[last] - starts[k])
        waiting = table.slice(ends[handed - 1] if handed else 0)


def _page_crops(
    data: Pixels | None,
    boxes: np.ndarray,
    fmt: str,
    jpeg_quality: int,
    padding: int,
    turn: Turn = NO_TURN,
) -> tuple[list, dict[str, float]]:
    """Decode one page (an array is taken as it is), turn it upright as layout did (``turn``: the boxes
    are in the turned page's pixels) and cut its boxes: one (image, width, height, error) per box,
    plus part seconds."""
    parts = {"decode": 0.0, "turn": 0.0, "crop": 0.0, "encode": 0.0}
    start = time.perf_counter()
    if data is None:
        return [(None, 0, 0, "no image bytes for this page's source row")] * len(boxes), parts
    try:
        page = decode_page(data)
    except Exception as exc:  # one bad page must not stop the shard
        reason = f"page image could not be decoded: {exc}"
        return [(None, 0, 0, reason)] * len(boxes), parts
    parts["decode"] = time.perf_counter() - start
    if not turn.identity:
        start = time.perf_counter()
        page = turn_page(page, turn)
        parts["turn"] = time.perf_counter() - start
    height, width = page.shape[:2]
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        t0 = time.perf_counter()
        if min(x0, y0, x1, y1) == NO_BOX:  # null box coordinates
            out.append((None, 0, 0, "region has no box"))
            continue
        cx0, cy0 = max(0, x0 - padding), max(0, y0 - padding)
        cx1, cy1 = min(width, x1 + padding), min(height, y1 + padding)
        if x1 <= x0 or y1 <= y0 or cx1 <= cx0 or cy1 <= cy0:
            out.append((None, 0, 0, f"empty box ({x0},{y0},{x1},{y1}) on a {width}x{height} page"))
            continue
        crop = page[cy0:cy1, cx0:cx1]
        t1 = time.perf_counter()
        parts["crop"] += t1 - t0
        try:
            if fmt == VLM_FORMAT:  # resized and JPEG-encoded once, as the VLM request needs it
                image, w, h = vlm_crop(crop, jpeg_quality)
            else:
                image, w, h = encode_image(crop, fmt, jpeg_quality), cx1 - cx0, cy1 - cy0
        except Exception as exc:
            out.append((None, 0, 0, f"crop could not be encoded: {exc}"))
            continue
        finally:
            parts["encode"] += time.perf_counter() - t1
        out.append((image, w, h, None))
    return out, parts


def _page_turn(rotation, skew) -> Turn | str:
    """The turn layout applied to a page (its first row's rotation/skew; null = none), or why it is
    not one (the crops would not match the boxes)."""
    try:
        return Turn.recorded(rotation, skew)
    except ValueError as exc:
        return f"layout recorded a turn this page cannot be given: {exc}"


class _Cutter:
    """Cuts the regions of one group of pages at a time (see ``make_crops``)."""

    def __init__(self, shard: Shard, where: Mapping[str, tuple[int, int]], fmt: str, jpeg_quality: int,
                 padding: int, pool: ThreadPoolExecutor, report: StageReport) -> None:
        self.shard, self.where, self.fmt = shard, where, fmt
        self.stored_format = "jpeg" if fmt == VLM_FORMAT else fmt
        self.jpeg_quality, self.padding, self.pool, self.report = jpeg_quality, padding, pool, report

    def cut(self, layout: pa.Table) -> pa.Table:
        """The CROPS rows of ``layout`` (whole pages), one per row, same order."""
        report = self.report
        n = layout.num_rows
        page_ids = np.asarray(layout.column("page_id").to_numpy(zero_copy_only=False), dtype=object)
        regions = layout.column("region").to_numpy(zero_copy_only=False)
        in_status = np.asarray(layout.column("status").to_numpy(zero_copy_only=False), dtype=object)
        boxes = np.stack(
            [layout.column(c).fill_null(NO_BOX).to_numpy() for c in ("x0", "y0", "x1", "y1")], axis=1,
        ).astype(np.int64) if n else np.zeros((0, 4), np.int64)
        images: list = [b""] * n
        widths = np.zeros(n, np.int32)
        heights = np.zeros(n, np.int32)
        formats: list = [None] * n
        errors = layout.column("error").to_pylist()
        rotations = (layout.column("rotation").to_pylist() if "rotation" in layout.column_names
                     else [None] * n)
        skews = layout.column("skew").to_pylist() if "skew" in layout.column_names else [None] * n

        # Rows already failed at layout (the page's -1 row, or a failed region) pass through as
        # errors; every other row starts unanswered (None) and becomes ok only once it is cut.
        todo = (regions != PAGE_ERROR_REGION) & (in_status != "error")
        statuses: list = [None if cut else "error" for cut in todo.tolist()]
        for i in np.flatnonzero(~todo).tolist():
            errors[i] = errors[i] or "layout gave this page no region to cut"
        for i in np.flatnonzero(todo).tolist():
            errors[i] = None

        def fail(idx: np.ndarray, reason: str) -> None:
            for i in idx.tolist():
                statuses[i], errors[i] = "error", reason

        starts = _run_starts(page_ids)
        jobs: list[tuple[np.ndarray, tuple[int, int], Turn | str]] = []
        for lo, hi in zip(starts, [*starts[1:], n]):
            idx = lo + np.flatnonzero(todo[lo:hi])
            if not len(idx):
                continue
            key = self.where.get(page_ids[lo])
            if key is None:
                fail(idx, f"page {page_ids[lo]!r} is not in the pages table")
            else:
                jobs.append((idx, (int(key[0]), int(key[1])), _page_turn(rotations[idx[0]], skews[idx[0]])))
        with report.part("read"):
            pixels = self.shard.read_pages([key for _, key, _ in jobs]) if jobs else []
        if len(pixels) != len(jobs):
            raise RuntimeError(f"shard {self.shard.key!r} gave {len(pixels)} pages for {len(jobs)} asked: "
                               f"a bug in the source")

        def work(k: int):
            idx, (row, page), turn = jobs[k]
            data = pixels[k]
            if isinstance(data, Exception) or data is None:
                reason = f"page {page} of source row {row} could not be read from the dataset: {data or 'no pixels'}"
                return idx, [(None, 0, 0, reason)] * len(idx), {}
            if isinstance(turn, str):
                return idx, [(None, 0, 0, turn)] * len(idx), {}
            try:
                out, parts = _page_crops(data, boxes[idx], self.fmt, self.jpeg_quality, self.padding, turn)
            except Exception as exc:  # one page must not stop the shard
                reason = f"crops failed on this page: {type(exc).__name__}: {exc}"
                return idx, [(None, 0, 0, reason)] * len(idx), {}
            return idx, out, parts

        for idx, out, parts in self.pool.map(work, range(len(jobs))):
            for name, seconds in parts.items():
                report.parts[name] = report.parts.get(name, 0.0) + seconds
            if len(out) != len(idx):  # a short answer: no region of the page may stay unanswered
                out = [(None, 0, 0, f"the crop worker gave {len(out)} results for this page's {len(idx)} regions")
                       ] * len(idx)
            for i, (image, w, h, err) in zip(idx.tolist(), out):
                if err is None:
                    images[i], widths[i], heights[i], formats[i] = image, w, h, self.stored_format
                    statuses[i], errors[i] = "ok", None
                else:
                    statuses[i], errors[i] = "error", err
        del pixels
        unanswered = [i for i, s in enumerate(statuses) if s is None]
        if unanswered:
            raise RuntimeError(
                f"crops left {len(unanswered)} region(s) unanswered, for example on page "
                f"{page_ids[unanswered[0]]!r}: a bug in the crops stage, not in the pages"
            )
        report.pages += len(starts)
        report.count("regions", int(np.count_nonzero(regions != PAGE_ERROR_REGION)))
        report.count("errors", statuses.count("error"))
        return pa.table(
            {
                "page_id": layout.column("page_id").cast(pa.string()),
                "region": layout.column("region").cast(pa.int32()),
                "task": layout.column("task").cast(pa.string()),
                "image": pa.array(images, pa.binary()),
                "format": pa.array(formats, pa.string()),
                "width": pa.array(widths, pa.int32()),
                "height": pa.array(heights, pa.int32()),
                "status": pa.array(statuses, pa.string()),
                "error": pa.array(errors, pa.string()),
            },
            schema=CROPS,
        )


def make_crops(
    layout: pa.Table | Iterable[pa.RecordBatch | pa.Table],
    shard: Shard,
    pages: Mapping[str, tuple[int, int]] | pa.Table,
    *,
    fmt: str = "png",
    jpeg_quality: int = 92,
    padding: int = 4,
    workers: int | None = None,
    report: StageReport | None = None,
    sink: Sink | None = None,
    group_pages: int = GROUP_PAGES,
) -> tuple[pa.Table | None, StageReport]:
    """Cut every region of ``layout`` out of its page: one CROPS row per LAYOUT row, same order.

    ``layout`` is the LAYOUT table or its record batches (a page's rows contiguous, as the layout
    stage writes them); ``pages`` maps page_id → (source row, page), as a mapping or the PAGES
    table (page_id, row and page columns); pixels come from ``shard.read_pages``, ``group_pages``
    pages at a time. Boxes get ``padding`` pixels of margin, clipped to the page. ``fmt`` is png,
    jpeg, or ``vlm-jpeg``: JPEG resized so both sides are multiples of 28 and the pixels lie
    within the VLM's bounds (``width``/``height`` are then the stored size). ``skip`` regions are
    stored too. Layout error rows (a failed page's ``region = -1`` row) pass through with an empty
    image; a page that cannot be read or decoded here gives every one of its regions status error;
    an empty box is an error for that region only. Every region starts unanswered and is ``ok``
    only once its crop is stored; one left unanswered is a bug and raises RuntimeError.

    With a ``sink``, each group's CROPS table goes to it in order and the table returned is None;
    without one, the whole table is returned. Each page is turned as layout turned it (the
    ``rotation``/``skew`` of its first layout row) before its boxes are cut. Parts (``read``,
    ``decode``, ``turn``, ``crop``, ``encode``)
    are summed over the worker threads, so together they can exceed ``stage_seconds``.
    """
    if fmt not in ("png", "jpeg", "jpg", VLM_FORMAT):
        raise ValueError(f"unknown crop format {fmt!r}: use 'png', 'jpeg' or {VLM_FORMAT!r}")
    fmt = "jpeg" if fmt == "jpg" else fmt
    report = report if report is not None else StageReport()
    out = StageOutput(sink, CROPS)
    with timed_stage(report):
        report.count("regions", 0)
        report.count("errors", 0)
        for part in ("read", "decode", "turn", "crop", "encode"):  # every key in every partition, for the plots
            report.parts.setdefault(part, 0.0)
        where = _page_map(pages)
        workers = workers or min(4, len(os.sched_getaffinity(0)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crops") as pool:
            cutter = _Cutter(shard, where, fmt, jpeg_quality, padding, pool, report)
            for group in _page_groups(layout, max(1, int(group_pages))):
                out.write(cutter.cut(group))
    return out.result(), report
