"""The crops stage: cut every layout region out of its page and store it as an encoded image.

Each page is decoded once; all of its regions are numpy slices of that one array, each
encoded once. Pages are worked on a small thread pool: cv2 decode and encode release the
GIL, so two cores are both busy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from ocr_assets.imaging import decode_page, encode_image, vlm_crop
from ocr_assets.schemas import CROPS, PAGE_ERROR_REGION
from ocr_assets.timing import StageReport, timed_stage

ImageAt = Callable[[int], "bytes | memoryview | None"]
VLM_FORMAT = "vlm-jpeg"  # JPEG, resized to the VLM's patch grid and pixel bounds


def _row_map(rows: Mapping[str, int] | pa.Table) -> Mapping[str, int]:
    """page_id → source row, from a mapping or the PAGES table; a page_id on two rows is refused
    (its regions could be cut from the other row's page)."""
    if not isinstance(rows, pa.Table):
        return rows
    row_of: dict[str, int] = {}
    for page_id, row in zip(rows.column("page_id").to_pylist(), rows.column("row").to_pylist()):
        if row_of.setdefault(page_id, row) != row:
            raise ValueError(f"page id {page_id!r} is on rows {row_of[page_id]} and {row} of the pages table; "
                             f"page ids must be unique (OCR_ASSETS_ID_COLUMN)")
    return row_of


def _page_crops(
    data: bytes | memoryview | None,
    boxes: np.ndarray,
    fmt: str,
    jpeg_quality: int,
    padding: int,
) -> tuple[list, dict[str, float]]:
    """Decode one page and cut its boxes: one (image, width, height, error) per box, plus part seconds."""
    parts = {"decode": 0.0, "crop": 0.0, "encode": 0.0}
    start = time.perf_counter()
    if data is None:
        return [(None, 0, 0, "no image bytes for this page's source row")] * len(boxes), parts
    try:
        page = decode_page(data)
    except Exception as exc:  # one bad page must not stop the shard
        reason = f"page image could not be decoded: {exc}"
        return [(None, 0, 0, reason)] * len(boxes), parts
    parts["decode"] = time.perf_counter() - start
    height, width = page.shape[:2]
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        t0 = time.perf_counter()
        if min(x0, y0, x1, y1) < -(2**30):  # null box coordinates (filled sentinel)
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


def make_crops(
    layout: pa.Table,
    image_at: ImageAt,
    rows: Mapping[str, int] | pa.Table,
    *,
    fmt: str = "png",
    jpeg_quality: int = 92,
    padding: int = 4,
    workers: int | None = None,
    report: StageReport | None = None,
) -> tuple[pa.Table, StageReport]:
    """Cut every region of ``layout`` out of its page: one CROPS row per LAYOUT row, same order.

    ``image_at(row)`` returns a page's encoded bytes for its source row; ``rows`` maps page_id →
    source row (a mapping, or the PAGES table). Boxes get ``padding`` pixels of margin, clipped to
    the page. ``fmt`` is png, jpeg, or ``vlm-jpeg``: JPEG resized so both sides are multiples of
    28 and the pixels lie within the VLM's bounds (``width``/``height`` are then the stored size). ``skip`` regions are stored too. Layout error rows (a failed page's ``region = -1``
    row) pass through with an empty image; a page that cannot be decoded here gives every one of
    its regions status error; an empty box is an error for that region only. Every region starts
    unanswered and is ``ok`` only once its crop is stored; one left unanswered is a bug and
    raises RuntimeError.

    Parts (``decode``, ``crop``, ``encode``) are summed over the worker threads, so together they
    can exceed ``stage_seconds``.
    """
    if fmt not in ("png", "jpeg", "jpg", VLM_FORMAT):
        raise ValueError(f"unknown crop format {fmt!r}: use 'png', 'jpeg' or {VLM_FORMAT!r}")
    fmt = "jpeg" if fmt == "jpg" else fmt
    stored_format = "jpeg" if fmt == VLM_FORMAT else fmt
    report = report or StageReport()
    with timed_stage(report):
        row_of = _row_map(rows)
        n = layout.num_rows
        page_ids = np.asarray(layout.column("page_id").to_numpy(zero_copy_only=False), dtype=object)
        regions = layout.column("region").to_numpy(zero_copy_only=False)
        in_status = np.asarray(layout.column("status").to_numpy(zero_copy_only=False), dtype=object)
        boxes = np.stack(
            [layout.column(c).fill_null(-(2**31)).to_numpy() for c in ("x0", "y0", "x1", "y1")],
            axis=1,
        ).astype(np.int64) if n else np.zeros((0, 4), np.int64)

        images: list = [b""] * n
        widths = np.zeros(n, np.int32)
        heights = np.zeros(n, np.int32)
        formats: list = [None] * n
        errors = layout.column("error").to_pylist()

        # Rows already failed at layout (the page's -1 row, or a failed region) pass through as
        # errors; every other row starts unanswered (None) and becomes ok only once it is cut.
        todo = (regions != PAGE_ERROR_REGION) & (in_status != "error")
        statuses: list = [None if cut else "error" for cut in todo.tolist()]
        for i in np.flatnonzero(~todo).tolist():
            errors[i] = errors[i] or "layout gave this page no region to cut"
        for i in np.flatnonzero(todo).tolist():
            errors[i] = None
        todo_idx = np.flatnonzero(todo)
        if len(todo_idx):
            # Group the rows to cut by page, keeping the first-seen page order.
            uniq, first, inverse = np.unique(page_ids[todo_idx], return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")
            by_page = np.argsort(inverse, kind="stable")
            bounds = np.searchsorted(inverse[by_page], np.arange(len(uniq) + 1))
            groups = {k: todo_idx[by_page[bounds[k]:bounds[k + 1]]] for k in range(len(uniq))}

            def work(k: int):
                page_id = uniq[k]
                idx = groups[k]
                row = row_of.get(page_id)
                if row is None:
                    return idx, [(None, 0, 0, f"page {page_id!r} is not in the pages table")] * len(idx), {}
                try:
                    data = image_at(int(row))
                except Exception as exc:
                    return idx, [(None, 0, 0, f"could not read source row {row}: {exc}")] * len(idx), {}
                try:
                    out, parts = _page_crops(data, boxes[idx], fmt, jpeg_quality, padding)
                except Exception as exc:  # one page must not stop the shard
                    reason = f"crops failed on this page: {type(exc).__name__}: {exc}"
                    return idx, [(None, 0, 0, reason)] * len(idx), {}
                return idx, out, parts

            workers = workers or min(4, len(os.sched_getaffinity(0)))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for idx, out, parts in pool.map(work, order.tolist()):
                    for name, seconds in parts.items():
                        report.parts[name] = report.parts.get(name, 0.0) + seconds
                    if len(out) != len(idx):  # a short answer: no region of the page may stay unanswered
                        reason = f"the crop worker gave {len(out)} results for this page's {len(idx)} regions"
                        out = [(None, 0, 0, reason)] * len(idx)
                    for i, (image, w, h, err) in zip(idx.tolist(), out):
                        if err is None:
                            images[i], widths[i], heights[i], formats[i] = image, w, h, stored_format
                            statuses[i], errors[i] = "ok", None
                        else:
                            statuses[i], errors[i] = "error", err
        unanswered = [i for i, s in enumerate(statuses) if s is None]
        if unanswered:
            raise RuntimeError(
                f"crops left {len(unanswered)} region(s) unanswered, for example rows {unanswered[:3]}: "
                f"a bug in the crops stage, not in the pages"
            )

        table = pa.table(
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
        report.pages = len(set(page_ids.tolist()))
        report.count("regions", int(np.count_nonzero(regions != PAGE_ERROR_REGION)))
        report.count("errors", statuses.count("error"))
    return table, report
