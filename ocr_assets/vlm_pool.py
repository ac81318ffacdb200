"""Each recognition step's share of every VLM server's bound, kept right while the step reads.

``OCR_ASSETS_VLM_CONCURRENCY`` bounds the requests in flight to one server over every
recognition step; a step keeps ``bound // limit`` of them, the limit of the `vlm` pool (at most
that many steps hold a slot at once). The limit can change while steps run (an operator opens
the pool during a backfill): ``ShareWatch`` reads it again every ``WATCH_SECONDS`` and hands the
new share to the recognizer, so steps started under the old limit follow within that time
instead of keeping their larger share to the end of their shard.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ocr_assets import config

WATCH_SECONDS = 15.0


class ShareWatch:
    """While open, re-reads the pool's limit (``read_limit``: an int, or None for no limit) and sets
    ``recognizer.set_concurrency`` to the step's new share when it changes. ``limit`` is the last read."""

    def __init__(self, read_limit: Callable[[], int | None], recognizer, bound: int, limit: int,
                 log: logging.Logger | logging.LoggerAdapter, interval: float = WATCH_SECONDS) -> None:
        self.read_limit, self.recognizer, self.bound = read_limit, recognizer, int(bound)
        self.limit, self.log, self.interval = int(limit), log, float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-pool-watch", daemon=True)

    def __enter__(self) -> "ShareWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self) -> None:
        """Read the limit once and apply it; a failed read or a limit above the bound keeps the share."""
        try:
            limit = self.read_limit() or 1
            share = config.vlm_share(self.bound, limit)
        except Exception as exc:  # the instance did not answer, or a limit the bound cannot split
            self.log.warning(f"concurrency pool {config.VLM_POOL!r}: keeping {config.vlm_share(self.bound, self.limit)}"
                             f" in flight per server ({type(exc).__name__}: {exc})")
            return
        if limit != self.limit:
            self.recognizer.set_concurrency(share)
            self.log.info(f"concurrency pool {config.VLM_POOL!r}: limit {self.limit} → {limit}, "
                          f"now {share} in flight per server")
            self.limit = limit

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
