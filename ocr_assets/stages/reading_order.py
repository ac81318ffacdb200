"""Reading order of a page's regions: columns left to right, top to bottom, bands between wide regions.

Layout models without an order head (CDLA) give boxes only. Columns are found from gutters:
x positions inside the content that (almost) no column-width region covers. A region that
crosses a gutter (a title, a full-width table) is "wide": wide regions cut the page into
bands, and within a band each column is read top to bottom before the next column. One,
two and three columns come out of the same rule.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ocr_assets.backends.layout.base import Detection

WIDE_FRACTION = 0.7  # regions at least this share of the content width never define columns
GUTTER_COVERAGE = 0.1  # x positions covered by < this share of the peak column coverage are gutter


def _gutters(boxes: np.ndarray, x_lo: int, x_hi: int) -> np.ndarray:
    """Centres of the column gutters (sorted x positions) of boxes whose content spans [x_lo, x_hi)."""
    widths = boxes[:, 2] - boxes[:, 0]
    narrow = boxes[widths < WIDE_FRACTION * (x_hi - x_lo)]
    if len(narrow) == 0:
        return np.empty(0)
    # per x, the summed height of the column-width boxes over it (difference array, then cumsum)
    span = x_hi - x_lo + 1
    diff = np.zeros(span + 1)
    heights = np.maximum(narrow[:, 3] - narrow[:, 1], 1)
    np.add.at(diff, np.clip(narrow[:, 0] - x_lo, 0, span), heights)
    np.add.at(diff, np.clip(narrow[:, 2] - x_lo, 0, span), -heights)
    coverage = np.cumsum(diff[:span])
    low = coverage < GUTTER_COVERAGE * coverage.max()
    # runs of low coverage strictly inside the covered extent of the narrow boxes
    covered = np.flatnonzero(~low)
    if covered.size == 0:
        return np.empty(0)
    low[: covered[0]] = False
    low[covered[-1] + 1:] = False
    edges = np.diff(low.astype(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return x_lo + (starts + ends) / 2.0


def reading_order(boxes: np.ndarray, page_width: int, page_height: int) -> np.ndarray:
    """Indices of ``boxes`` (N, 4: x0, y0, x1, y1 in page pixels) in reading order.

    Wide regions (crossing a column gutter) separate horizontal bands; inside a band the
    regions of the left column come first, top to bottom, then the next column.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    n = len(boxes)
    if n <= 1:
        return np.arange(n)
    x_lo = int(max(0, boxes[:, 0].min()))
    x_hi = int(min(max(page_width, 1), boxes[:, 2].max()))
    x_hi = max(x_hi, x_lo + 1)
    gutters = _gutters(boxes, x_lo, x_hi)
    tolerance = max(2.0, 0.01 * page_width)
    if gutters.size:
        # wide: extends past some gutter centre on both sides
        wide = ((boxes[:, 0, None] < gutters[None, :] - tolerance)
                & (boxes[:, 2, None] > gutters[None, :] + tolerance)).any(axis=1)
    else:
        wide = np.zeros(n, dtype=bool)
    x_mid = (boxes[:, 0] + boxes[:, 2]) / 2.0
    y_mid = (boxes[:, 1] + boxes[:, 3]) / 2.0
    column = np.searchsorted(gutters, x_mid)
    # band k holds the narrow regions above the k-th wide region (by centre); wide region k sits at 2k+1
    wide_mid = np.sort(y_mid[wide])
    band = 2 * np.searchsorted(wide_mid, y_mid, side="right")
    wide_idx = np.flatnonzero(wide)
    wide_rank = np.argsort(np.argsort(y_mid[wide_idx] + boxes[wide_idx, 0] * 1e-6, kind="stable"), kind="stable")
    band[wide_idx] = 2 * wide_rank + 1
    column[wide] = 0
    y_key = boxes[:, 1].copy()
    if wide_idx.size:
        # a narrow region level with a wide one (a title's stray word) joins its row, read left to right
        heights = np.maximum(boxes[:, 3] - boxes[:, 1], 1)
        shared = np.clip(
            np.minimum(boxes[:, 3, None], boxes[None, wide_idx, 3])
            - np.maximum(boxes[:, 1, None], boxes[None, wide_idx, 1]), 0, None
        ) / heights[:, None]
        shared[wide_idx] = 0
        level = (shared > 0.5).any(axis=1)
        row = wide_idx[np.argmax(shared, axis=1)]
        band[level] = band[row[level]]
        column[level] = 0
        y_key[wide] = 0
        y_key[level] = 0
    return np.lexsort((boxes[:, 0], y_key, column, band))


def order_detections(detections: Sequence[Detection], page_width: int, page_height: int) -> np.ndarray:
    """Indices of ``detections`` in reading order; the model's own order wins where it gives one.

    If every detection carries ``order``, that order is used. If only some do (model regions
    plus recovered ones), the geometric order places all of them and the model's regions are
    then put, in the model's order, into the slots that model regions took.
    """
    n = len(detections)
    if n == 0:
        return np.arange(0)
    ranks = [d.order for d in detections]
    has_order = np.array([r is not None for r in ranks])
    if has_order.all():
        return np.argsort(np.array(ranks), kind="stable")
    boxes = np.array([[d.x0, d.y0, d.x1, d.y1] for d in detections], dtype=np.int64)
    geometric = reading_order(boxes, page_width, page_height)
    if not has_order.any():
        return geometric
    ordered = np.flatnonzero(has_order)
    by_model = ordered[np.argsort(np.array([ranks[i] for i in ordered]), kind="stable")]
    slots = has_order[geometric]
    result = geometric.copy()
    result[slots] = by_model
    return result
