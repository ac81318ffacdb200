"""The `local` recognizer: rapidocr's shipped PP-OCRv6 detection + recognition models, in process.

Crops are small (a paragraph, a line, a table), so the detector is configured for them:
rapidocr's default resize (``limit_type: min, limit_side_len: 736``) would upscale a 40-px line
to 736 px and spend most of the time on white space; here the crop is kept at its own size and
only shrunk when its long side exceeds ``det_limit_side_len``. The angle classifier is off by
default (pages are upright).

A region's confidence is the mean of its lines' recognition scores (rapidocr's per-line mean of
the characters' CTC probabilities), weighted by each line's characters. Every line read counts,
including lines left out of the text for a score under ``Global.text_score``: a region whose
lines were partly unreadable is less certain than the lines it kept. Clean print scores about
1.0; text upside down, mirrored or sideways, which the models read as plausible garbage, about 0.7.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from rapidocr.ch_ppocr_rec import TextRecInput
from rapidocr.utils.process_img import get_rotate_crop_image

from ocr_assets.backends.recognition.base import (Crop, Recognized, content_key, recognize_in_batches, text_weight,
                                                 weighted_confidence)
from ocr_assets.imaging import decode_page

# Crop settings; the page engine keeps rapidocr's defaults (the benchmark baseline).
CROP_PARAMS: dict[str, Any] = {
    "Global.log_level": "error",
    "Global.use_cls": False,
    # Keep small crops at native size (150-dpi text is already at the det model's scale);
    # rapidocr upscales only crops whose short side is below min_side_len.
    "Global.min_side_len": 30,
    "Global.max_side_len": 2000,
    "Det.limit_type": "max",
    "Det.limit_side_len": 1280,
    # The lines of a chunk of crops are sorted by width before batching, so little is padded:
    # measured on 577 sample lines, 2 cores, 17-21 s at 8 against 22-24 s one at a time.
    "Rec.rec_batch_num": 8,
    # onnxruntime's arena reuses buffers between calls of varying line widths.
    "EngineConfig.onnxruntime.enable_cpu_mem_arena": True,
}


def _threads(threads: int | None) -> int:
    """onnxruntime intra-op threads: the caller's number, else the cores this process may use."""
    if threads:
        return int(threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def reading_order_lines(boxes: np.ndarray, texts: Sequence[str]) -> list[list[str]]:
    """Group detected lines into rows (overlapping vertical spans), top to bottom, each left to right.

    ``boxes`` is (N, 4, 2) quadrilaterals. A line joins the current row when its vertical
    centre falls inside the row's span so far; rows are ordered by their top edge.
    """
    if len(texts) == 0:
        return []
    boxes = np.asarray(boxes, dtype=np.float32).reshape(len(texts), -1, 2)
    top, bottom = boxes[:, :, 1].min(axis=1), boxes[:, :, 1].max(axis=1)
    left = boxes[:, :, 0].min(axis=1)
    centre = (top + bottom) / 2
    rows: list[list[int]] = []
    span_top = span_bottom = 0.0
    for i in np.argsort(centre, kind="stable").tolist():
        if rows and span_top <= centre[i] <= span_bottom:
            rows[-1].append(i)
            span_bottom = max(span_bottom, float(bottom[i]))
        else:
            rows.append([i])
            span_top, span_bottom = float(top[i]), float(bottom[i])
    return [[texts[i] for i in sorted(row, key=lambda j: left[j])] for row in rows]


def _join(task: str, rows: list[list[str]]) -> str:
    """Text of one crop: rows on lines; table cells of a row joined with " | "."""
    sep = " | " if task == "table" else " "
    return "\n".join(sep.join(cells) for cells in rows)


class RapidOcrRecognizer:
    """Reads crops with rapidocr's PP-OCRv6 models (CPU, onnxruntime), loaded once per instance."""

    name = "local"

    def __init__(
        self,
        *,
        threads: int | None = None,
        batch_size: int = 32,
        use_cls: bool = CROP_PARAMS["Global.use_cls"],
        det_limit_side_len: int = CROP_PARAMS["Det.limit_side_len"],
        rec_batch_num: int = CROP_PARAMS["Rec.rec_batch_num"],
        params: dict[str, Any] | None = None,
    ) -> None:
        """Load the models. ``params`` are extra rapidocr settings (e.g. ``{"Global.text_score": 0.4}``)."""
        from rapidocr import RapidOCR

        self.batch_size = batch_size
        self._threads = _threads(threads)
        self._engine_params = {
            "EngineConfig.onnxruntime.intra_op_num_threads": self._threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        crop_params = {
            **CROP_PARAMS,
            **self._engine_params,
            "Global.use_cls": use_cls,
            "Det.limit_side_len": det_limit_side_len,
            "Rec.rec_batch_num": rec_batch_num,
            **(params or {}),
        }
        self.settings = crop_params
        self._engine = RapidOCR(params=crop_params)
        self._page_engine = None
        # rapidocr loads its sessions lazily; load them now so model load is not billed to the first batch.
        self._engine._load_det_model()
        self._engine._load_rec_model()
        self._cls = self._engine._load_cls_model() if use_cls else None
        self._text_score = float(self._engine.cfg.Global.text_score)
        self.version = self._version()

    def _version(self) -> str:
        """rapidocr's version and the model files it loaded: another wheel or model reads differently."""
        cfg = self._engine.cfg
        models = []
        for engine in (self._engine.text_det, self._engine.text_rec, self._cls):
            session = getattr(getattr(engine, "session", None), "session", None)
            path = getattr(session, "_model_path", None)  # onnxruntime keeps the file it loaded here
            models.append(os.path.basename(str(path)) if path else "")
        return (f"rapidocr {importlib.metadata.version('rapidocr')}; {cfg.Det.ocr_version} {cfg.Det.model_type}"
                f"; models {','.join(models)}")

    def _read(self, engine, image: np.ndarray) -> list[list[str]]:
        """Rows of line texts found in one image."""
        result = engine(image)
        texts = getattr(result, "txts", None)
        boxes = getattr(result, "boxes", None)
        if not texts or boxes is None:
            return []
        return reading_order_lines(boxes, texts)

    def _detect(self, crop: Crop) -> tuple[list[np.ndarray], np.ndarray]:
        """Line images and their boxes (N, 4, 2) in one crop."""
        image = decode_page(crop.image)
        det = self._engine(image, use_det=True, use_cls=False, use_rec=False)
        boxes = getattr(det, "boxes", None)
        if boxes is None or len(boxes) == 0:
            return [], np.zeros((0, 4, 2), np.float32)
        boxes = np.asarray(boxes, dtype=np.float32)
        return [get_rotate_crop_image(image, box.copy()) for box in boxes], boxes

    def recognize(self, crops: Sequence[Crop]) -> list[Recognized]:
        """One result per crop, in order; a crop that fails gets status error.

        Lines are detected crop by crop, then the lines of all crops are read in one call, so
        the recogniser's width-sorted batches mix lines of similar width across crops.
        """
        results: list[Recognized | None] = [None] * len(crops)
        lines: list[np.ndarray] = []
        found: list[tuple[int, int, np.ndarray]] = []  # (crop index, first line, boxes)
        for k, crop in enumerate(crops):
            try:
                crop_lines, boxes = self._detect(crop)
            except Exception as exc:  # one bad crop must not stop the batch
                results[k] = Recognized(text="", status="error", error=f"local recognizer failed: {exc}")
                continue
            found.append((k, len(lines), boxes))
            lines.extend(crop_lines)
        texts: Sequence[str] = ()
        scores: Sequence[float] = ()
        if lines:  # a failure here is the whole batch's: raised, so the caller reads it in halves
            if self._cls is not None:
                lines = self._cls(lines).img_list
            out = self._engine.text_rec(TextRecInput(img=lines))
            texts, scores = out.txts, out.scores
        for k, start, boxes in found:
            if results[k] is not None:
                continue
            read = [j for j in range(len(boxes)) if texts[start + j].strip()]
            keep = [j for j in read if scores[start + j] >= self._text_score]
            rows = reading_order_lines(boxes[keep], [texts[start + j] for j in keep])
            text = _join(crops[k].task, rows)
            confidence = weighted_confidence((float(scores[start + j]), text_weight(texts[start + j])) for j in read)
            results[k] = Recognized(text=text, cacheable=True, confidence=confidence if text.strip() else None)
        return results  # type: ignore[return-value]

    def recognize_stream(self, items: Iterable[tuple[int, Crop]]) -> Iterator[tuple[int, Recognized]]:
        """(key, result) per (key, crop), read in batches of ``batch_size``."""
        return recognize_in_batches(self, items)

    def cache_key(self, crop: Crop) -> str:
        """Same image bytes and task, same version and reading settings (thread counts do not change it)."""
        settings = {k: v for k, v in self.settings.items() if not k.startswith("EngineConfig.onnxruntime.")}
        return content_key(crop.image, self.name, self.version, crop.task,
                           json.dumps(settings, sort_keys=True, default=str))

    def run_metadata(self) -> dict[str, int | float]:
        return {}  # in process: nothing beyond the stage's own timings

    def recognize_page(self, image: np.ndarray) -> str:
        """Whole-page OCR with rapidocr's default settings: the baseline the benchmark compares to."""
        if self._page_engine is None:
            from rapidocr import RapidOCR

            self._page_engine = RapidOCR(params={"Global.log_level": "error", **self._engine_params})
        return _join("text", self._read(self._page_engine, image))
