"""The interface every layout backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ocr_assets.timing import StageReport


@dataclass(frozen=True)
class Detection:
    """One region found on a page, in the page's own pixel coordinates."""

    label: str
    score: float
    x0: int
    y0: int
    x1: int
    y1: int
    order: int | None = None  # the model's reading-order rank, where it has one


class LayoutBackend(Protocol):
    """Finds the regions of decoded pages (BGR uint8 arrays, one per page)."""

    name: str
    label_tasks: dict[str, str]  # every label the model emits → text/table/formula/skip/abandon
    batch_size: int

    def detect(
        self, images: Sequence[np.ndarray], report: StageReport | None = None
    ) -> list[list[Detection]]:
        """Regions of each page, in the order of ``images``.

        Times its work into ``report`` as the parts ``preprocess``, ``inference`` and
        ``postprocess`` (the stage itself times ``decode``).
        """
        ...
