"""Answers already paid for: recognition results by cache key, stored next to the outputs.

The key covers everything that decides an answer (crop bytes, model, prompt, sampling), so a
re-run after a crash, or a backfill over the same data, reads each region once. Results are
written as small segment files while the stage runs (every ``flush_every`` results or
``flush_seconds``), each one atomically: a crash loses at most the last unwritten segment.
Failures that another attempt could fix (a server error, a timeout) are never cached.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa

from ocr_assets.backends.recognition.base import Recognized
from ocr_assets.storage import ParquetStore

CACHE_KIND = "recognition_cache"
CACHE_SCHEMA = pa.schema([("key", pa.string()), ("text", pa.string()), ("status", pa.string()),
                          ("error", pa.string())])


class RecognitionCache:
    """Cached results of one partition, loaded at start, added to as results arrive."""

    def __init__(self, store: ParquetStore, partition: str, *, flush_every: int = 256,
                 flush_seconds: float = 10.0) -> None:
        self.store, self.partition = store, partition
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._known: dict[str, Recognized] = {}
        table = store.read_segments(CACHE_KIND, partition)
        if table is not None:
            for key, text, status, error in zip(*(table.column(c).to_pylist() for c in CACHE_SCHEMA.names)):
                self._known[key] = Recognized(text or "", status or "ok", error)
        self._pending: list[tuple[str, Recognized]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._known)

    def get(self, key: str) -> Recognized | None:
        return self._known.get(key)

    def put(self, key: str, result: Recognized) -> None:
        """Remember a final answer (ok, or a deterministic failure such as a cut-off answer)."""
        with self._lock:
            self._known[key] = result
            self._pending.append((key, result))
            due = len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._last_flush = time.monotonic()
        if not pending:
            return
        self.store.append_segment(CACHE_KIND, self.partition, pa.table(
            {"key": [k for k, _ in pending], "text": [r.text for _, r in pending],
             "status": [r.status for _, r in pending], "error": [r.error for _, r in pending]},
            schema=CACHE_SCHEMA,
        ))
