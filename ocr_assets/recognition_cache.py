"""Answers already paid for: recognition results by cache key, stored next to the outputs.

The key covers everything that decides an answer (crop bytes, model, prompt, sampling), so a
re-run after a crash, or a backfill over the same data, reads each region once. Results are
written as small segment files while the stage runs (every ``flush_every`` results or
``flush_seconds``), each one atomically: a crash loses at most the last unwritten segment.
Only final answers are cached (``Recognized.cacheable``: a text, or a deterministic verdict such
as an answer cut at max_tokens); a refused request (any 4xx), a timeout, a dropped connection
or a crashed batch never is. When a step completes, ``compact`` rewrites the partition's
segments as one file; ``prune`` keeps only the entries the current settings can still reach.

Each entry keeps the answer's confidence. Segments written before confidences were kept (no
``confidence`` column) are stale: never read back (those regions are read again, so no page
mixes answers with and without a confidence) and dropped when the partition is rewritten.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa

from ocr_assets.backends.recognition.base import Recognized
from ocr_assets.storage import ParquetStore

CACHE_KIND = "recognition_cache"
CACHE_SCHEMA = pa.schema([("key", pa.string()), ("text", pa.string()), ("status", pa.string()),
                          ("error", pa.string()), ("confidence", pa.float32())])


def _read(store: ParquetStore, paths: list[str]) -> pa.Table | None:
    """The current-format segments among ``paths`` as one CACHE_SCHEMA table; None when there are none."""
    tables = []
    for path in paths:
        table = store.read_segment_files([path])
        if table is not None and "confidence" in table.column_names:  # older segments: stale
            tables.append(table.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA))
    return pa.concat_tables(tables) if tables else None


class RecognitionCache:
    """Cached results of one partition, loaded at start, added to as results arrive."""

    def __init__(self, store: ParquetStore, partition: str, *, flush_every: int = 256,
                 flush_seconds: float = 10.0) -> None:
        self.store, self.partition = store, partition
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._known: dict[str, Recognized] = {}
        table = _read(store, store.segment_files(CACHE_KIND, partition))
        if table is not None:
            for key, text, status, error, confidence in zip(*(table.column(c).to_pylist()
                                                              for c in CACHE_SCHEMA.names)):
                if status is None:  # not a known answer: ask again rather than read it as a success
                    continue
                self._known[key] = Recognized(text or "", status, error, cacheable=True, confidence=confidence)
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

    def compact(self) -> tuple[int, int]:
        """Rewrite the partition's segments as one file (new file first, then the old ones go).

        Returns (entries kept, duplicate entries dropped). Reads the files again rather than
        trusting memory, so a segment another process added meanwhile is never lost.
        """
        self.flush()
        if len(self.store.segment_files(CACHE_KIND, self.partition)) <= 1:  # already one file: leave it unread
            return len(self._known), 0
        return _rewrite(self.store, self.partition, keep=None)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._last_flush = time.monotonic()
        if not pending:
            return
        self.store.append_segment(CACHE_KIND, self.partition, pa.table(
            {"key": [k for k, _ in pending], "text": [r.text for _, r in pending],
             "status": [r.status for _, r in pending], "error": [r.error for _, r in pending],
             "confidence": [r.confidence for _, r in pending]},
            schema=CACHE_SCHEMA,
        ))


def _rewrite(store: ParquetStore, partition: str, keep: set[str] | None) -> tuple[int, int]:
    """Rewrite a partition's cache as one segment with the last entry of each key (of ``keep``'s
    keys only, when given); returns (kept, dropped). Nothing to gain: nothing is written."""
    old = store.segment_files(CACHE_KIND, partition)
    table = _read(store, old)
    if table is None:
        if old:  # only stale segments: nothing to keep
            store.replace_segments(CACHE_KIND, partition, None, old)
        return 0, 0
    keys = table.column("key").to_pylist()
    last = {key: row for row, key in enumerate(keys) if keep is None or key in keep}
    kept, dropped = len(last), len(keys) - len(last)
    if len(old) == 1 and not dropped:  # already one file with nothing to drop
        return kept, 0
    rows = sorted(last.values())
    store.replace_segments(CACHE_KIND, partition, table.take(rows) if rows else None, old)
    return kept, dropped


def prune(store: ParquetStore, partition: str, keep: set[str]) -> tuple[int, int]:
    """Rewrite a partition's cache with only the entries whose key is in ``keep`` (e.g.
    ``stages.recognition.reachable_keys(crops, recognizer)``); returns (kept, dropped).

    Duplicates of a key count as dropped. Safe to stop at any point: the new file is written
    before the old ones are deleted.
    """
    return _rewrite(store, partition, keep)


def cached_partitions(store: ParquetStore) -> list[str]:
    """Partitions that have a recognition cache folder in ``store``."""
    return store.segment_partitions(CACHE_KIND)
