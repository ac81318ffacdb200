"""Text recovery: ink that no layout box covers becomes extra text regions, so no text is lost.

A layout model misses some text (marginal notes, stray lines, whole paragraphs on odd pages);
OCR of its regions alone then loses that text. This finds dark ink outside every model box
(abandoned ones included: a dropped header is dropped on purpose) with cheap image ops at
half resolution: binarise, merge characters into lines, drop specks and lines that a box
already mostly holds, merge the remaining lines into blocks.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_CONTRAST = 40  # ink must be at least this much darker than the paper (0..255)
MAX_COVERED_SHARE = 0.5  # a line with more of its ink inside boxes than this is left to the boxes
MAX_BLOCK_OVERLAP = 0.05  # a block overlapping boxes more than this is split back into its lines


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def _ink_mask(gray: np.ndarray) -> np.ndarray | None:
    """Binary (uint8 0/1) mask of ink darker than the paper, or None for a blank or flat page."""
    sample = gray[::4, ::4]  # the paper level needs no full histogram
    median = int(np.searchsorted(np.cumsum(np.bincount(sample.ravel(), minlength=256)), sample.size / 2))
    if median < 128:  # light ink on a dark page: read it as dark on light
        gray = cv2.bitwise_not(gray)
        median = 255 - median
    otsu, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = min(otsu, median - MIN_CONTRAST)
    if threshold <= 0:
        return None
    ink = (gray < threshold).view(np.uint8)
    return ink


def recover_text_boxes(
    image: np.ndarray,
    covered: np.ndarray,
    *,
    margin: int = 4,
    padding: int = 4,
    min_height: int = 6,
    min_ink: int = 24,
) -> np.ndarray:
    """Boxes (M, 4: x0, y0, x1, y1, page pixels) around ink that lies outside every ``covered`` box.

    ``image`` is the page (BGR or gray uint8); ``covered`` (N, 4) holds every box the layout
    model found, abandoned ones included. ``margin`` widens the covered boxes, ``padding`` the
    returned ones; components shorter than ``min_height`` or with fewer than ``min_ink`` ink
    pixels (full-resolution units) are specks. A text line with more than half its ink inside
    covered boxes is left to those boxes.
    """
    height, width = image.shape[:2]
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    f = 2 if min(height, width) >= 800 else 1  # half resolution is plenty for text lines
    if f > 1:
        # bilinear at exactly half size averages each 2×2 block (INTER_AREA's result, 4× faster)
        gray = cv2.resize(gray, (width // f, height // f), interpolation=cv2.INTER_LINEAR)
    empty = np.empty((0, 4), dtype=np.int64)
    ink = _ink_mask(gray)
    if ink is None:
        return empty
    h, w = ink.shape

    covered = np.asarray(covered, dtype=np.float64).reshape(-1, 4)
    cover_mask = np.zeros((h, w), dtype=np.uint8)
    for x0, y0, x1, y1 in covered:
        cover_mask[max(0, int((y0 - margin) // f)): max(0, int(-(-(y1 + margin) // f))),
                   max(0, int((x0 - margin) // f)): max(0, int(-(-(x1 + margin) // f)))] = 1

    # characters → lines: a wide, short dilation bridges letter and word gaps, not line gaps
    kw = _odd(0.012 * width / f)
    kh = 3
    lines = cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_RECT, (kw, kh)))
    n, labels, stats, _ = _components(lines, kw * kh)
    if n <= 1:
        return empty
    ys, xs = cv2.findNonZero(ink).reshape(-1, 2).T[::-1]
    at_labels = labels[ys, xs]
    ink_count = np.bincount(at_labels, minlength=n)
    covered_count = np.bincount(at_labels, weights=cover_mask[ys, xs], minlength=n)
    # ink-tight extents (undo the dilation)
    lx0 = stats[:, 0] + kw // 2
    ly0 = stats[:, 1] + kh // 2
    lw = stats[:, 2] - (kw - 1)
    lh = stats[:, 3] - (kh - 1)
    keep = (
        (lh * f >= min_height)
        & (lw * f >= 2)
        & (ink_count * f * f >= min_ink)
        & (covered_count <= MAX_COVERED_SHARE * ink_count)
    )
    keep[0] = False  # background
    line_idx = np.flatnonzero(keep)
    if line_idx.size == 0:
        return empty
    line_boxes = np.stack(
        [lx0[line_idx], ly0[line_idx], lx0[line_idx] + lw[line_idx], ly0[line_idx] + lh[line_idx]], axis=1
    )

    # lines → blocks: filled line rectangles, bridged vertically across a line gap, drawn only
    # over the area the kept lines span
    kv = _odd(0.008 * height / f)
    ox, oy = line_boxes[:, 0].min(), max(0, line_boxes[:, 1].min() - kv)
    ex, ey = line_boxes[:, 2].max(), line_boxes[:, 3].max() + kv
    rects = np.zeros((ey - oy, ex - ox), dtype=np.uint8)
    for x0, y0, x1, y1 in (line_boxes - [ox, oy, ox, oy]).tolist():
        rects[y0:y1, x0:x1] = 1
    blocks = cv2.dilate(rects, cv2.getStructuringElement(cv2.MORPH_RECT, (1, kv)))
    _, block_labels, bstats, _ = _components(blocks, kv)
    by0 = bstats[1:, 1] + kv // 2 + oy
    bx0 = bstats[1:, 0] + ox
    block_boxes = np.stack([bx0, by0, bx0 + bstats[1:, 2], by0 + bstats[1:, 3] - (kv - 1)], axis=1)
    # a block whose box reaches over model boxes goes back to its lines, to avoid duplicate text
    overlap = _overlap_share(block_boxes * f, covered)
    split = overlap > MAX_BLOCK_OVERLAP
    out = [block_boxes[~split]]
    if split.any():
        cy = (line_boxes[:, 1] + line_boxes[:, 3] - 1) // 2
        cx = (line_boxes[:, 0] + line_boxes[:, 2] - 1) // 2
        owner = block_labels[cy - oy, cx - ox] - 1
        out.append(line_boxes[split[owner]])
    result = np.concatenate(out).astype(np.int64) * f
    result[:, :2] -= padding
    result[:, 2:] += padding
    np.clip(result[:, 0::2], 0, width, out=result[:, 0::2])
    np.clip(result[:, 1::2], 0, height, out=result[:, 1::2])
    return result


def _components(mask: np.ndarray, min_pixels: int):
    """connectedComponentsWithStats, with 16-bit labels (much faster) where they cannot overflow."""
    # each component of a mask dilated by a k-pixel kernel holds at least k pixels
    ltype = cv2.CV_16U if mask.size // max(1, min_pixels) < 65535 else cv2.CV_32S
    return cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=ltype)


def _overlap_share(boxes: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Share of each box's area that lies inside the covered boxes (summed, so at most an estimate)."""
    if len(covered) == 0 or len(boxes) == 0:
        return np.zeros(len(boxes))
    ix = np.clip(np.minimum(boxes[:, None, 2], covered[None, :, 2]) - np.maximum(boxes[:, None, 0], covered[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, None, 3], covered[None, :, 3]) - np.maximum(boxes[:, None, 1], covered[None, :, 1]), 0, None)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1)
    return (ix * iy).sum(axis=1) / area
