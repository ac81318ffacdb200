"""Post-processing of PP-DocLayoutV3 outputs: raw queries → boxes in page pixels, in reading order.

The steps of GLM-OCR's layout pipeline, vectorised: top-k over queries × classes, global and
per-class thresholds, the model's reading order, class-aware NMS, dropping an ``image`` box
that is the whole page, the per-class containment rules (``large`` keeps the container,
``small`` the contained box), and boxes clipped to the page. The batch-wide tensor work runs
on the model's device; what is left per page (tens of boxes) is small matrix work on the CPU.
Mask → polygon conversion is per-box CPU work, done only when polygons are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

NMS_IOU_SAME = 0.6  # boxes of one class overlapping this much are one region
NMS_IOU_OTHER = 0.98  # boxes of different classes must be (nearly) identical to suppress each other
CONTAINED_SHARE = 0.8  # a box with this share of its area inside another is contained by it
NEVER_CONTAINED = ("image", "seal", "chart")  # kept even when inside another box
WHOLE_PAGE_IMAGE = (0.82, 0.93)  # an image box over this share of a landscape / portrait page is dropped
MERGE_MODES = ("large", "small", "union")


@dataclass(frozen=True)
class PostprocessSettings:
    """Thresholds and merge rules, by label name (unknown labels are refused at load time)."""

    threshold: float = 0.3
    threshold_by_label: dict[str, float] = field(default_factory=dict)
    nms: bool = True
    merge_modes: dict[str, str] = field(default_factory=dict)  # label → large / small / union
    keep_polygons: bool = False


def default_merge_modes(labels: list[str]) -> dict[str, str]:
    """GLM-OCR's shipped rule: every class keeps the larger box, except ``reference`` the smaller."""
    return {label: ("small" if label == "reference" else "large") for label in labels}


def reading_ranks(order_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q) reading-order rank of every query from the pairwise order head (B, Q, Q).

    ``sigmoid(logits[i, j])`` says query i comes before j; each query's rank is the order of
    its summed votes for coming later.
    """
    p = order_logits.float().sigmoid()
    votes = p.triu(diagonal=1).sum(dim=1) + (1.0 - p.transpose(1, 2)).tril(diagonal=-1).sum(dim=1)
    pointers = votes.argsort(dim=1)
    return torch.empty_like(pointers).scatter_(
        1, pointers, torch.arange(pointers.shape[1], device=pointers.device).expand_as(pointers)
    )


@dataclass
class RawDetections:
    """One page's candidates after thresholding, on the CPU: the input of the per-page rules."""

    labels: np.ndarray  # (n,) class ids
    scores: np.ndarray  # (n,)
    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1 in page pixels (float)
    ranks: np.ndarray  # (n,) the model's reading-order rank
    queries: np.ndarray  # (n,) query index, to find the mask


def select(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    order_logits: torch.Tensor,
    sizes: list[tuple[int, int]],
    thresholds: torch.Tensor,
) -> list[RawDetections]:
    """Top-k (queries × classes), thresholds per class, boxes scaled to each page's (height, width)."""
    batch, queries, classes = logits.shape
    scores, flat = logits.float().sigmoid().flatten(1).topk(queries, dim=1)
    labels = flat % classes
    query = flat // classes
    keep = scores >= thresholds.to(scores.device)[labels]
    centre, extent = pred_boxes.float().split(2, dim=-1)
    corners = torch.cat([centre - extent / 2, centre + extent / 2], dim=-1)  # (B, Q, 4) in 0..1
    scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32, device=corners.device)
    corners = corners * scale[:, None, :]
    boxes = corners.gather(1, query[..., None].expand(-1, -1, 4))
    ranks = reading_ranks(order_logits).gather(1, query)
    # one transfer of the small kept tensors, not one per tensor per page
    packed = torch.cat(
        [labels[..., None].float(), scores[..., None], boxes, ranks[..., None].float(), query[..., None].float()],
        dim=-1,
    )
    packed, keep = packed.cpu().numpy(), keep.cpu().numpy()
    out = []
    for b in range(batch):
        rows = packed[b][keep[b]]
        out.append(RawDetections(rows[:, 0].astype(np.int64), rows[:, 1], rows[:, 2:6].astype(np.float64),
                                 rows[:, 6].astype(np.int64), rows[:, 7].astype(np.int64)))
    return out


def _iou(boxes: np.ndarray) -> np.ndarray:
    """(n, n) IoU with the inclusive-pixel convention of PaddleOCR's NMS (+1 on each side)."""
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt + 1, 0, None), axis=2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2] + 1, axis=1)
    return inter / (area[:, None] + area[None, :] - inter)


def nms(raw: RawDetections) -> np.ndarray:
    """Indices kept by greedy NMS in score order: 0.6 IoU within a class, 0.98 across classes."""
    order = np.argsort(-raw.scores, kind="stable")
    iou = _iou(raw.boxes[order])
    same = raw.labels[order][:, None] == raw.labels[order][None, :]
    suppresses = iou >= np.where(same, NMS_IOU_SAME, NMS_IOU_OTHER)
    alive = np.ones(order.size, dtype=bool)
    for i in range(order.size):
        if alive[i]:
            alive[i + 1:] &= ~suppresses[i, i + 1:]
    return order[alive]


def _contained(boxes: np.ndarray) -> np.ndarray:
    """(n, n): box i has CONTAINED_SHARE of its area inside box j (i != j)."""
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    share = np.divide(inter, area[:, None], out=np.zeros_like(inter), where=area[:, None] > 0)
    contained = share >= CONTAINED_SHARE
    np.fill_diagonal(contained, False)
    return contained


def merge_keep(labels: np.ndarray, boxes: np.ndarray, modes: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """Mask of boxes kept by the containment rules.

    ``modes`` (per class id: 0 union, 1 large, 2 small). ``large`` for class c drops a box lying
    inside a class-c box; ``small`` for class c drops a box that holds a class-c box, unless it
    is itself held by one. Protected classes (image, seal, chart) are never the dropped inner box.
    """
    contained = _contained(boxes) & ~protected[labels][:, None]  # [i, j]: i inside j
    mode_of = modes[labels]
    large = (contained & (mode_of == 1)[None, :]).any(axis=1)
    by_small = contained & (mode_of == 2)[:, None]
    holds_small = by_small.any(axis=0)
    held_small = by_small.any(axis=1)
    return ~large & (~holds_small | held_small)


def page_image_too_large(labels: np.ndarray, boxes: np.ndarray, image_id: int | None, height: int, width: int) -> np.ndarray:
    """Mask of ``image`` boxes that cover (nearly) the whole page: a scan's own outline, not a figure."""
    if image_id is None or len(labels) < 2:
        return np.zeros(len(labels), dtype=bool)
    clipped = np.clip(boxes, 0, [width, height, width, height])
    area = np.prod(clipped[:, 2:] - clipped[:, :2], axis=1)
    share = WHOLE_PAGE_IMAGE[0] if width > height else WHOLE_PAGE_IMAGE[1]
    drop = (labels == image_id) & (area > share * width * height)
    return drop if not drop.all() else np.zeros(len(labels), dtype=bool)


def mask_polygon(mask: np.ndarray, box: np.ndarray, mask_scale: tuple[float, float]) -> tuple[int, ...]:
    """Outline (x, y, ...) in page pixels of one query's mask within its box; the box's corners if none.

    ``mask`` is the query's binary mask at the model's mask resolution; ``mask_scale`` maps page
    pixels to mask pixels (x, y).
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    rect = (x0, y0, x1, y0, x1, y1, x0, y1)
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        return rect
    mh, mw = mask.shape
    sx, sy = mask_scale
    mx0, mx1 = np.clip([round(x0 * sx), round(x1 * sx)], 0, mw)
    my0, my1 = np.clip([round(y0 * sy), round(y1 * sy)], 0, mh)
    part = mask[my0:my1, mx0:mx1]
    if part.size == 0 or not part.any():
        return rect
    part = cv2.resize(part.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return rect
    outline = max(contours, key=cv2.contourArea)
    outline = cv2.approxPolyDP(outline, 0.004 * cv2.arcLength(outline, True), True).reshape(-1, 2)
    if len(outline) < 4:
        return rect
    return tuple(int(v) for v in (outline + [x0, y0]).ravel())
