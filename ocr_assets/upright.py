"""Upright pages: each page's quarter turn (0/90/180/270) and small skew, measured and undone.

The layout backends decide a ``Turn`` for each decoded page (``PageTurner.decide``, on small
downscales: one batched orientation model run, then a projection-profile skew estimate) and turn
the page with ``turn_page`` (or ``turn_page_tensor`` on a GPU) before layout. The crops stage
turns its own decode of the page with the same ``turn_page``, so boxes and crops agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from ocr_assets import config

QUARTER_TURNS = (0, 90, 180, 270)
SMALL_SIDE = 800  # the long side of the downscale the decisions are made on is this to twice this
MAX_SKEW = 5.0  # degrees: a larger angle is not a scanner's skew; the page is left as it is
MIN_SKEW = 0.2  # degrees: below this the page counts as straight and is not resampled
STRIPS = 4  # vertical strips whose row profiles are scored apart
MIN_INK = 500  # ink pixels of the downscale below which there is nothing to measure
MAX_INK = 8_000  # ink pixels measured at most (an even subsample beyond), so a dark page stays cheap
_CV2_TURNS = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


@dataclass(frozen=True)
class Turn:
    """How a stored page is made upright: first ``rotation`` degrees clockwise (0/90/180/270), then
    ``skew`` degrees counter-clockwise about the centre (0.0: not resampled)."""

    rotation: int = 0
    skew: float = 0.0

    def __post_init__(self) -> None:
        if self.rotation not in QUARTER_TURNS:
            raise ValueError(f"a page's rotation must be one of {QUARTER_TURNS}, not {self.rotation!r}")

    @classmethod
    def recorded(cls, rotation, skew) -> "Turn":
        """The turn a layout row records (its ``rotation`` and ``skew``; null, or a column a file from
        before them lacks, is none); ValueError for a rotation that is not a quarter turn."""
        return cls(int(rotation or 0), float(skew or 0.0))

    @property
    def identity(self) -> bool:
        return self.rotation == 0 and self.skew == 0.0


NO_TURN = Turn()


def turned_size(height: int, width: int, turn: Turn) -> tuple[int, int]:
    """(height, width) of a height×width page once turned."""
    return (width, height) if turn.rotation in (90, 270) else (height, width)


def paper_colour(image: np.ndarray) -> tuple[int, ...]:
    """The page's background colour: the per-channel median of an even subsample of its pixels."""
    sample = image[::16, ::16].reshape(-1, 1 if image.ndim == 2 else image.shape[2])
    return tuple(int(v) for v in np.median(sample, axis=0))


def column_shifts(width: int, skew: float) -> np.ndarray:
    """Rows each column of a ``width``-wide page moves by to straighten lines leaning ``skew`` degrees
    (counter-clockwise positive): whole rows, about the page's middle column."""
    x = np.arange(width, dtype=np.float64) - (width - 1) / 2
    return np.rint(-x * np.tan(np.radians(skew))).astype(np.int64)


def _shear(image: np.ndarray, skew: float) -> np.ndarray:
    """Each column moved up or down by whole rows (``column_shifts``), the uncovered ends filled with
    the paper's colour: text lines come out level. A scanner's skew is a few degrees, so the shear
    slants upright strokes by as little; unlike a rotation it blurs nothing, and as a nearest-pixel
    warp it costs half of a bilinear rotation."""
    h, w = image.shape[:2]
    t = float(np.tan(np.radians(skew)))
    # output (x, y) takes the input pixel (x, y + (x - cx)·t): the inverse of column_shifts
    inverse = np.array([[1.0, 0.0, 0.0], [t, 1.0, -t * (w - 1) / 2]], dtype=np.float64)
    fill = paper_colour(image)
    return cv2.warpAffine(image, inverse, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill if len(fill) > 1 else fill[0])


def turn_page(image: np.ndarray, turn: Turn) -> np.ndarray:
    """``image`` (BGR or gray uint8) turned upright: the quarter turn, then the skew straightened by a
    column shear (same size, ends filled with the paper's colour). The same object when nothing turns."""
    if turn.rotation:
        image = cv2.rotate(image, _CV2_TURNS[turn.rotation])
    if turn.skew:
        image = _shear(image, turn.skew)
    return image


def turn_page_tensor(image, turn: Turn):
    """A (C, H, W) uint8 torch page turned as ``turn_page`` turns a host array, on its own device:
    the same whole-row column shifts, so both paths give the same pixels."""
    import torch

    if turn.rotation:
        image = torch.rot90(image, -turn.rotation // 90, dims=(-2, -1))  # rot90 turns counter-clockwise
    if not turn.skew:
        return image
    c, h, w = image.shape
    fill = image[:, ::16, ::16].reshape(c, -1).float().quantile(0.5, dim=1, interpolation="lower")
    shifts = torch.as_tensor(column_shifts(w, turn.skew), device=image.device)
    source = torch.arange(h, device=image.device)[:, None] - shifts[None, :]  # (H, W): the row each pixel comes from
    inside = (source >= 0) & (source < h)
    moved = torch.gather(image, 1, source.clamp(0, h - 1)[None].expand(c, h, w))
    paper = fill.round().to(torch.uint8)[:, None, None].expand(c, h, w)
    return torch.where(inside[None], moved, paper)


def small_factor(height: int, width: int, side: int = SMALL_SIDE) -> int:
    """The power-of-two downscale factor that keeps the long side at ``side`` or more (at least 1)."""
    factor = 1
    while max(height, width) >= 2 * factor * side:
        factor *= 2
    return factor


def small_copy(image: np.ndarray, side: int = SMALL_SIDE) -> np.ndarray:
    """An area downscale of ``image`` by ``small_factor`` (the page cropped to a multiple of it: cv2's
    fast whole-factor path, ~1 ms for a letter page at 150 dpi)."""
    h, w = image.shape[:2]
    factor = small_factor(h, w, side)
    if factor == 1:
        return image
    h, w = h // factor, w // factor
    return cv2.resize(image[:h * factor, :w * factor], (w, h), interpolation=cv2.INTER_AREA)


def _profile_scores(ys: np.ndarray, xs: np.ndarray, strips: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """How sharply the ink falls into rows when sheared by each angle: the sum of squared row counts,
    row by row within vertical strips (two columns whose lines do not line up never alias)."""
    tans = np.tan(np.radians(angles)).astype(np.float32)
    rows = np.rint(ys[None, :] + xs[None, :] * tans[:, None]).astype(np.int32)
    rows -= rows.min()
    span = int(rows.max()) + 1
    n_strips = int(strips.max()) + 1
    rows += (np.arange(len(angles), dtype=np.int32)[:, None] * n_strips + strips[None, :]) * span
    counts = np.bincount(rows.ravel(), minlength=len(angles) * n_strips * span)
    return (counts.astype(np.float64) ** 2).reshape(len(angles), -1).sum(axis=1)


def _best(ys, xs, strips, centre: float, half: float, step: float) -> float:
    angles = np.arange(centre - half, centre + half + step / 2, step)
    scores = _profile_scores(ys, xs, strips, angles)
    # angles too close to move any ink by a row score the same: take the middle of the best ones
    return float(angles[scores >= scores.max() * (1 - 1e-9)].mean())


def measure_skew(image: np.ndarray) -> float:
    """Degrees (counter-clockwise positive) that straighten the text lines of ``image`` (BGR or gray,
    best a downscale such as ``small_copy``'s), up to ``MAX_SKEW``; exactly 0.0 for a straight page
    (below ``MIN_SKEW``), one with too little ink, or one whose lines lean more than ``MAX_SKEW``."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    _, ink = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    points = cv2.findNonZero(ink)
    if points is None:
        return 0.0
    points = points.reshape(-1, 2)
    xs, ys = points[:, 0], points[:, 1]
    if len(ys) < MIN_INK or len(ys) > ink.size // 2:  # no text, or Otsu split a photo, not ink from paper
        return 0.0
    if len(ys) > MAX_INK:
        step = -(-len(ys) // MAX_INK)
        ys, xs = ys[::step], xs[::step]
    width = gray.shape[1]
    strips = (xs * STRIPS // width).astype(np.int32)
    # x from the centre of its strip: the shear turns each strip about its own middle
    xs = xs.astype(np.float32) - (strips.astype(np.float32) + 0.5) * (width / STRIPS)
    ys = ys.astype(np.float32)
    # a line leaning up to the right by a degrees lies along y + x·tan(a) = const
    lean = _best(ys, xs, strips, 0.0, MAX_SKEW + 1.0, 1.0)
    lean = _best(ys, xs, strips, lean, 1.0, 0.25)
    lean = _best(ys, xs, strips, lean, 0.25, 0.05)
    # ink leaning up to the right (counter-clockwise) is straightened by a clockwise turn
    # as float32, the layout table's type: the crops stage then turns by the very same angle
    skew = float(np.float32(round(-lean, 2)))
    if abs(skew) < MIN_SKEW or abs(skew) > MAX_SKEW + 0.5:
        return 0.0
    return skew


class PageTurner:
    """Decides each page's ``Turn`` (OCR_ASSETS_ORIENTATION, OCR_ASSETS_DESKEW) and turns pages."""

    def __init__(self, orientation: bool = True, deskew: bool = True, threads: int | None = None) -> None:
        self.orientation = bool(orientation)
        self.deskew = bool(deskew)
        self.classifier = None
        if self.orientation:
            from ocr_assets.backends.orientation import OrientationClassifier

            self.classifier = OrientationClassifier(threads=threads)

    @classmethod
    def from_config(cls, threads: int | None = None) -> "PageTurner":
        """The turner the settings ask for; a bad value is an error naming its variable."""
        return cls(config.orientation_enabled(), config.deskew_enabled(), threads=threads)

    @property
    def enabled(self) -> bool:
        return self.orientation or self.deskew

    @property
    def info(self) -> dict[str, str]:
        return {"orientation": "on" if self.orientation else "off", "deskew": "on" if self.deskew else "off"}

    def decide(self, smalls: Sequence[np.ndarray]) -> tuple[list[Turn], float, float]:
        """(turn of each page, orientation seconds, deskew seconds) from small copies of the pages
        as stored (``small_copy``: BGR or gray)."""
        turns, _, orient_s, deskew_s = self._decide(smalls)
        return turns, orient_s, deskew_s

    def _decide(self, smalls: Sequence[np.ndarray]) -> tuple[list[Turn], list[np.ndarray], float, float]:
        """``decide``, plus the small copies given their quarter turn (the skew is measured on them)."""
        start = time.perf_counter()
        rotations = self.classifier.rotations(smalls) if self.classifier is not None and smalls else [0] * len(smalls)
        quartered = [turn_page(small, Turn(rotation)) for small, rotation in zip(smalls, rotations)]
        oriented = time.perf_counter()
        turns = [Turn(rotation, measure_skew(small) if self.deskew else 0.0)
                 for small, rotation in zip(quartered, rotations)]
        return turns, quartered, oriented - start, time.perf_counter() - oriented

    def upright(
        self, pages: Sequence[np.ndarray], model_size: tuple[int, int] | None = None
    ) -> tuple[list[np.ndarray], list[Turn], list[int], float, float]:
        """(pages turned upright, their turns, their scales, orientation seconds, deskew seconds) for
        host pages. With ``model_size`` (the layout model's input, height and width), each page comes
        back as its ``small_copy``, turned (scale: the copy's downscale factor), where the turned copy
        is still at least that size, so no model input is upsampled: turning a quarter of the pixels
        keeps turning cheap, and an upright page is laid out from the same copy as a turned one.
        Coordinates stay the full page's (the caller multiplies sizes by the scale)."""
        if not self.enabled:
            return list(pages), [NO_TURN] * len(pages), [1] * len(pages), 0.0, 0.0
        start = time.perf_counter()
        smalls = [small_copy(page) for page in pages]
        shrunk = time.perf_counter() - start
        turns, quartered, orient_s, deskew_s = self._decide(smalls)
        # the downscale serves both decisions; a page's turning is the straightening's where it has a skew
        if self.orientation:
            orient_s += shrunk
        else:
            deskew_s += shrunk
        turned, scales = [], []
        for page, small, quarter, turn in zip(pages, smalls, quartered, turns):
            start = time.perf_counter()
            factor = page.shape[0] // small.shape[0]
            height, width = quarter.shape[:2]
            if factor > 1 and model_size is not None and height >= model_size[0] and width >= model_size[1]:
                turned.append(turn_page(quarter, Turn(0, turn.skew)))  # already given its quarter turn
            else:
                factor = 1
                turned.append(turn_page(page, turn))
            scales.append(factor)
            if turn.skew:
                deskew_s += time.perf_counter() - start
            else:
                orient_s += time.perf_counter() - start
        del smalls, quartered
        return turned, turns, scales, orient_s, deskew_s
