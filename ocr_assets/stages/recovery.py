"""Text recovery: ink that no layout box covers becomes extra text regions, so no text is lost.

A layout model misses some text (marginal notes, stray lines, whole paragraphs on odd pages,
a scanned page boxed whole as one figure); OCR of its regions alone then loses that text. This
finds dark ink outside every model box (abandoned ones included: a dropped header is dropped
on purpose), and text lines inside picture boxes, with cheap image ops at half resolution:
binarise, drop ink that cannot be characters (speckle, scanner borders, photo blobs, rules),
merge characters into lines, keep text-like lines that no box already mostly holds, merge
them into blocks. Each block is a paid request in production, so speckle must give none.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MIN_CONTRAST = 40  # ink must be at least this much darker than the paper (0..255)
MAX_COVERED_SHARE = 0.5  # a line with more of its ink inside boxes than this is left to the boxes
MAX_BLOCK_OVERLAP = 0.05  # a block overlapping boxes more than this is split back into its lines
# what ink can be a character (S is the page's shorter side; pixel sizes are for S = 1275, a
# letter page at 150 dpi, and scale with S)
REFERENCE_SIDE = 1275
MIN_CHAR_SIDE = 8  # smaller both ways: a speck, unless it sits by a glyph (a full stop, an i's dot)
MIN_CHAR_INK = 16  # fewer ink pixels: a speck
MAX_CHAR_HEIGHT = 0.1  # × S: taller is a border, a frame, a photo (a 72 pt capital at 150 dpi is 0.08 S)
MAX_CHAR_WIDTH = 0.5  # × page width: wider is a rule or a border (words that touch stay well below)
MIN_CHAR_FILL = 0.06  # ink / bounding box below this: a curve, a frame, a diagonal, not a glyph
SOLID_FILL = 0.85  # ink / bounding box above this, and thicker than MAX_STROKE both ways: a blob
MAX_STROKE = 0.02  # × S: the thickest stroke of a glyph (a bullet, a bold capital I)
# what a text line can be: ink / line box (text is 0.15..0.5; scattered specks and solid areas are not)
LINE_FILL = (0.08, 0.75)
FIGURE_TEXT_SHARE = 0.5  # text blocks over this share of a picture box: the box is text, not a picture
# a picture box over this share of a landscape / portrait page is the scan's outline, not a figure
# (the PP-DocLayoutV3 backend's whole-page image rule, pp_postprocess.WHOLE_PAGE_IMAGE)
WHOLE_PAGE_PICTURE = (0.82, 0.93)
LABEL_ASPECT = 4.0  # a line kept in a real picture is this much wider than tall: a caption, not a tick


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


@dataclass(frozen=True)
class PageText:
    """Text found on a page by ``find_page_text``; boxes (x0, y0, x1, y1) in page pixels."""

    recovered: np.ndarray  # (M, 4) blocks of text outside every box
    in_pictures: list[np.ndarray]  # per picture box, (K, 4) blocks of text inside it
    picture_is_text: np.ndarray  # (P,) bool: its text blocks cover FIGURE_TEXT_SHARE of the box


EMPTY = np.empty((0, 4), dtype=np.int64)


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
    model found, abandoned ones included. See ``find_page_text`` for the parameters.
    """
    return find_page_text(image, covered, margin=margin, padding=padding, min_height=min_height,
                          min_ink=min_ink).recovered


def find_page_text(
    image: np.ndarray,
    covered: np.ndarray,
    pictures: np.ndarray | None = None,
    *,
    scale: int = 1,
    margin: int = 4,
    padding: int = 4,
    min_height: int = 6,
    min_ink: int = 24,
) -> PageText:
    """Text lines of a page outside every box, and inside each picture box, as blocks.

    ``image`` is the page (BGR or gray uint8); ``covered`` (N, 4) holds the model's boxes that
    are not searched (text, tables, abandoned ones...), ``pictures`` (P, 4) those searched for
    text (figures, images, charts). ``margin`` widens every box, ``padding`` the returned ones;
    lines shorter than ``min_height`` or with fewer than ``min_ink`` ink pixels (full-resolution
    units) are specks. A line with more than half its ink inside the boxes is not recovered; one
    mostly inside a picture (and not mostly inside a covered box) is that picture's. A picture
    whose text blocks cover FIGURE_TEXT_SHARE of it is text; in a real picture only lines
    LABEL_ASPECT times wider than tall are kept (a caption or label, not a tick mark).
    ``image`` may be a downscale of the page by a whole ``scale`` (boxes stay in page pixels).
    """
    height, width = image.shape[0] * scale, image.shape[1] * scale
    covered = np.asarray(covered, dtype=np.float64).reshape(-1, 4)
    pictures = np.asarray(pictures if pictures is not None else EMPTY, dtype=np.float64).reshape(-1, 4)
    found = PageText(EMPTY, [EMPTY] * len(pictures), np.zeros(len(pictures), dtype=bool))
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    # half resolution is plenty for text lines (a downscale handed in is taken as it is)
    f = max(scale, 2 if min(height, width) >= 800 else 1)
    if f > scale:
        # bilinear at exactly half size averages each 2×2 block (INTER_AREA's result, 4× faster)
        gray = cv2.resize(gray, (width // f, height // f), interpolation=cv2.INTER_LINEAR)
    ink = _ink_mask(gray)
    if ink is None:
        return found
    ink = _character_ink(ink, f, min(height, width), width)
    if ink is None:
        return found
    h, w = ink.shape
    # bit 1: a covered box, bit 2: a picture box
    box_mask = np.zeros((h, w), dtype=np.uint8)
    for bit, boxes in ((1, covered), (2, pictures)):
        for x0, y0, x1, y1 in boxes:
            box_mask[max(0, int((y0 - margin) // f)): max(0, int(-(-(y1 + margin) // f))),
                     max(0, int((x0 - margin) // f)): max(0, int(-(-(x1 + margin) // f)))] |= bit

    # characters → lines: a wide, short dilation bridges letter and word gaps, not line gaps
    kw = _odd(0.012 * width / f)
    kh = 3
    lines = cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_RECT, (kw, kh)))
    n, labels, stats, _ = _components(lines, kw * kh)
    if n <= 1:
        return found
    ys, xs = cv2.findNonZero(ink).reshape(-1, 2).T[::-1]
    at_labels = labels[ys, xs]
    at_boxes = box_mask[ys, xs]
    ink_count = np.bincount(at_labels, minlength=n)
    in_boxes = np.bincount(at_labels, weights=at_boxes > 0, minlength=n)
    in_covered = np.bincount(at_labels, weights=at_boxes & 1, minlength=n)
    # ink-tight extents (undo the dilation)
    lx0 = stats[:, 0] + kw // 2
    ly0 = stats[:, 1] + kh // 2
    lw = np.maximum(stats[:, 2] - (kw - 1), 1)
    lh = np.maximum(stats[:, 3] - (kh - 1), 1)
    fill = ink_count / (lw * lh)
    text = (
        (lh * f >= min_height)
        & (lw * f >= 2)
        & (ink_count * f * f >= min_ink)
        & (fill >= LINE_FILL[0]) & (fill <= LINE_FILL[1])
    )
    text[0] = False  # background
    line_boxes = np.stack([lx0, ly0, lx0 + lw, ly0 + lh], axis=1)
    outside = text & (in_boxes <= MAX_COVERED_SHARE * ink_count)
    every_box = np.concatenate([covered, pictures])
    recovered = _page_boxes(_blocks(line_boxes[outside], every_box, f, height), f, padding, width, height)
    if len(pictures) == 0:
        return PageText(recovered, [], found.picture_is_text)
    inside = np.flatnonzero(text & ~outside & (in_covered <= MAX_COVERED_SHARE * ink_count))
    owner = _owners(line_boxes[inside] * f, pictures)
    in_pictures, is_text = [], np.zeros(len(pictures), dtype=bool)
    for p, picture in enumerate(pictures):
        mine = line_boxes[inside[owner == p]]
        blocks = _page_boxes(_blocks(mine, covered, f, height), f, padding, width, height)
        is_text[p] = _overlap_share(picture[None], blocks)[0] >= FIGURE_TEXT_SHARE
        if not is_text[p] and len(mine):
            labels_only = mine[(mine[:, 2] - mine[:, 0]) >= LABEL_ASPECT * (mine[:, 3] - mine[:, 1])]
            blocks = _page_boxes(_blocks(labels_only, covered, f, height), f, padding, width, height)
        in_pictures.append(blocks)
    return PageText(recovered, in_pictures, is_text)


def covers_page(box: tuple[float, float, float, float], height: int, width: int) -> bool:
    """Whether a picture box covers (nearly) the whole page: WHOLE_PAGE_PICTURE of its area."""
    x0, y0, x1, y1 = np.clip(np.asarray(box, dtype=np.float64), 0, [width, height, width, height])
    share = WHOLE_PAGE_PICTURE[0] if width > height else WHOLE_PAGE_PICTURE[1]
    return bool((x1 - x0) * (y1 - y0) > share * width * height)


def _character_ink(ink: np.ndarray, f: int, short_side: int, width: int) -> np.ndarray | None:
    """``ink`` without the components that cannot be characters, or None when nothing is left.

    Speckle, scanner borders, rules, frames and photo blobs go before lines are formed: bridged
    into lines, scattered specks would look like text. A speck touching a glyph's neighbourhood
    stays (a full stop, the dot of an i).
    """
    # 16-bit labels (much faster) where there are too few ink pixels to overflow them
    ltype = cv2.CV_16U if cv2.countNonZero(ink) < 65535 else cv2.CV_32S
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8, ltype=ltype)
    if n <= 1:
        return None
    cw, ch, area = stats[:, 2] * f, stats[:, 3] * f, stats[:, 4] * (f * f)
    box_fill = area / (cw * ch)
    unit = short_side / REFERENCE_SIDE
    speck = ((cw < MIN_CHAR_SIDE * unit) & (ch < MIN_CHAR_SIDE * unit)) | (area < MIN_CHAR_INK * unit * unit)
    not_char = (
        (ch > MAX_CHAR_HEIGHT * short_side) | (cw > MAX_CHAR_WIDTH * width)
        | (box_fill < MIN_CHAR_FILL)
        | ((box_fill > SOLID_FILL) & (np.minimum(cw, ch) > MAX_STROKE * short_side))
    )
    # 0: not ink, 1: a character, 2: a speck
    kind = np.where(not_char, 0, np.where(speck, 2, 1)).astype(np.uint8)
    kind[0] = 0
    if not (kind[1:] == 1).any():
        return None
    if (kind[1:] == 1).all():
        return ink
    kinds = np.take(kind, labels)
    chars = (kinds == 1).view(np.uint8)
    if (kind == 2).any():
        near = cv2.dilate(chars, cv2.getStructuringElement(cv2.MORPH_RECT, (7, 7)))
        chars |= (kinds == 2).view(np.uint8) & near
    return chars


def _owners(boxes: np.ndarray, pictures: np.ndarray) -> np.ndarray:
    """Per box, the smallest picture holding its centre (-1 for none)."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    holds = ((pictures[None, :, 0] <= cx[:, None]) & (cx[:, None] <= pictures[None, :, 2])
             & (pictures[None, :, 1] <= cy[:, None]) & (cy[:, None] <= pictures[None, :, 3]))
    area = (pictures[:, 2] - pictures[:, 0]) * (pictures[:, 3] - pictures[:, 1])
    ranked = np.where(holds, area[None, :], np.inf)
    return np.where(holds.any(axis=1), ranked.argmin(axis=1), -1)


def _blocks(line_boxes: np.ndarray, covered: np.ndarray, f: int, height: int) -> np.ndarray:
    """Blocks of lines (working pixels): lines bridged vertically across a line gap; a block
    reaching over ``covered`` boxes (page pixels) goes back to its lines, to avoid duplicate text."""
    if len(line_boxes) == 0:
        return EMPTY
    kv = _odd(0.008 * height / f)
    # filled line rectangles, drawn only over the area the lines span
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
    split = _overlap_share(block_boxes * f, covered) > MAX_BLOCK_OVERLAP
    out = [block_boxes[~split]]
    if split.any():
        cy = (line_boxes[:, 1] + line_boxes[:, 3] - 1) // 2
        cx = (line_boxes[:, 0] + line_boxes[:, 2] - 1) // 2
        owner = block_labels[cy - oy, cx - ox] - 1
        out.append(line_boxes[split[owner]])
    return np.concatenate(out)


def _page_boxes(boxes: np.ndarray, f: int, padding: int, width: int, height: int) -> np.ndarray:
    """Working-resolution boxes in page pixels, padded and clipped to the page."""
    result = boxes.astype(np.int64) * f
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
