"""Per-stage timing and counts, reported the same way by every stage.

Every stage returns a ``StageReport``; the Dagster assets turn it into
materialization metadata with the same keys in every partition.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

progress_log = logging.getLogger("ocr_assets.progress")
PROGRESS_EVERY_SECONDS = 10.0


@dataclass
class StageReport:
    """Seconds per part of a stage plus counts (pages, regions, errors, ...)."""

    parts: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    info: dict[str, str | float | int] = field(default_factory=dict)
    pages: int = 0
    stage_seconds: float = 0.0
    label: str = ""  # e.g. "layout data-00000-of-00004", used in progress lines
    _done: int = 0
    _started: float = field(default_factory=time.perf_counter)
    _last_log: float = field(default_factory=time.perf_counter)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time a block and add it to ``<name>_seconds``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def advance(self, n: int, total: int, unit: str = "pages") -> None:
        """Note ``n`` more units done; logs a progress line at most every PROGRESS_EVERY_SECONDS."""
        self._done += n
        now = time.perf_counter()
        if now - self._last_log >= PROGRESS_EVERY_SECONDS and self._done < total:
            self._last_log = now
            rate = self._done / max(now - self._started, 1e-9)
            progress_log.info("%s: %d/%d %s (%.1f %s/s)", self.label or "stage", self._done, total, unit, rate, unit)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.stage_seconds if self.stage_seconds > 0 else 0.0


@contextmanager
def timed_stage(report: StageReport) -> Iterator[StageReport]:
    """Time the whole of a stage's work into ``report.stage_seconds``."""
    start = time.perf_counter()
    try:
        yield report
    finally:
        report.stage_seconds += time.perf_counter() - start
