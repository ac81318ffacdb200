"""Each recognition step's share of every VLM server's bound, kept right while the step reads.

``OCR_ASSETS_VLM_CONCURRENCY`` bounds the requests in flight to one server over every
recognition step; a step keeps ``bound // limit`` of them, the limit of the `vlm` pool (at most
that many steps hold a slot at once). The limit can change while steps run (an operator opens
the pool during a backfill): ``ShareWatch`` reads it again every ``WATCH_SECONDS`` and hands the
new share to the recognizer, so steps started under the old limit follow within that time (and
the requests they have in flight) instead of keeping their larger share to the end of their
shard. Until then the steps together may hold more than the bound: change the limit between
backfills, or leave the servers headroom. A lowered limit does not stop the steps already
running, so the pool counts as its limit or its claimed slots, whichever is more; a limit removed
while steps run keeps their share.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ocr_assets import config

WATCH_SECONDS = 15.0


class ShareWatch:
    """While open, re-reads the pool's limit (``read_limit``: the steps that may hold the pool, or None
    when it has no limit, which keeps the share) and sets ``recognizer.set_concurrency`` to the
    step's new share when it changes; on entry, sets the share it starts with. ``limit`` is the last read."""

    def __init__(self, read_limit: Callable[[], int | None], recognizer, bound: int, limit: int,
                 log: logging.Logger | logging.LoggerAdapter, interval: float = WATCH_SECONDS) -> None:
        self.read_limit, self.recognizer, self.bound = read_limit, recognizer, int(bound)
        self.limit, self.log, self.interval = int(limit), log, float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-pool-watch", daemon=True)
        self._warned: set[str] = set()  # each reason once per step, not every interval

    def __enter__(self) -> "ShareWatch":
        # the recognizer is cached per process: an earlier step's watch may have changed its share
        self.recognizer.set_concurrency(config.vlm_share(self.bound, self.limit))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self) -> None:
        """Read the limit once and apply it; a failed read or a limit above the bound keeps the share."""
        try:
            limit = self.read_limit()
            share = config.vlm_share(self.bound, limit or self.limit)
        except Exception as exc:  # the instance did not answer, or a limit the bound cannot split
            reason = f"{type(exc).__name__}: {exc}"
            if reason not in self._warned and not self._stop.is_set():
                self._warned.add(reason)
                self.log.warning(f"concurrency pool {config.VLM_POOL!r}: keeping "
                                 f"{config.vlm_share(self.bound, self.limit)} in flight per server ({reason})")
            return
        if self._stop.is_set():  # the step ended during the read: its recognizer may be the next step's
            return
        if limit is not None and limit != self.limit:
            self.recognizer.set_concurrency(share)
            self.log.info(f"concurrency pool {config.VLM_POOL!r}: limit {self.limit} → {limit}, "
                          f"now {share} in flight per server")
            self.limit = limit

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
