"""What turning pages upright and searching pictures for text cost, against the layout stage.

    python bench/upright.py [--pages N] [--repeat N]

The `layout` stage on the CPU default (picodet-cdla), as a user runs it, on N clean, N scanned
and N scanned-and-turned sample pages (the pages of bench/confidence.py). Per kind of page:

- the stage's seconds per page with the settings as they are (orientation and deskew on) and,
  in the same run on the same pages, with OCR_ASSETS_ORIENTATION=off and OCR_ASSETS_DESKEW=off
  (the baseline; runs alternate, the fastest of --repeat counts): what a user waits;
- the work itself, timed alone on the decoded pages (inside the stage it runs on the decode
  thread beside the model, where two cores make every part look slower): orientation (the
  small copy and the batched orientation model), deskew (the skew estimate and the turning of
  the page) and the figure search (the text search with the page's picture boxes searched, less
  the same search with them only covered), as a share of the baseline stage. The goal:
  together under 10%.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa

from ocr_assets.backends.layout import create_layout_backend
from ocr_assets.backends.layout.picodet_cdla import INPUT_HEIGHT, INPUT_WIDTH
from ocr_assets.config import ENV_DESKEW, ENV_ORIENTATION
from ocr_assets.stages.layout import run_layout
from ocr_assets.stages.recovery import find_page_text
from ocr_assets.imaging import decode_page
from ocr_assets.timing import StageReport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from confidence import group_pages, setting  # noqa: E402  (bench/ is a folder of scripts, not a package)
from tables import print_table  # noqa: E402

KINDS = ("clean", "scanned", "turned")
PARTS = ("orientation", "deskew", "figure search")
GOAL = 0.10


class BlobShard:
    """Pages held in memory as a shard of one-page rows (the part of ``sources.base.Shard`` layout reads)."""

    def __init__(self, key: str, blobs: list[bytes]) -> None:
        self.key, self.blobs = key, blobs

    def read_pages(self, pages):
        return [self.blobs[row] for row, _ in pages]


def pages_table(n: int) -> pa.Table:
    return pa.table({"page_id": [f"p{i}" for i in range(n)], "row": list(range(n)), "page": [0] * n,
                     "status": ["ok"] * n})


def runs(backends: dict, shard: BlobShard, repeat: int) -> dict[str, StageReport]:
    """The fastest report of each backend over the whole shard, their runs alternating (drift hits both)."""
    table = pages_table(len(shard.blobs))
    best: dict[str, StageReport] = {}
    for _ in range(repeat):
        for name, (backend, env) in backends.items():
            with ExitStack() as stack:
                for variable, value in env.items():
                    stack.enter_context(setting(variable, value))
                report = run_layout(table, shard, backend)[1]
            if name not in best or report.stage_seconds < best[name].stage_seconds:
                best[name] = report
    return best


def figure_search_seconds(backend, shard: BlobShard, repeat: int) -> float:
    """Seconds the picture boxes' text search adds over the shard's pages (best of ``repeat`` per page)."""
    total = 0.0
    for blob in shard.blobs:
        (page,) = backend.prepare([blob])
        dets = backend.detect([page])[0]
        skip = [d for d in dets if backend.label_tasks.get(d.label) == "skip"]
        if not skip:
            continue
        covered = np.array([[d.x0, d.y0, d.x1, d.y1] for d in dets], dtype=np.int64).reshape(-1, 4)
        others = np.array([[d.x0, d.y0, d.x1, d.y1] for d in dets if d not in skip], dtype=np.int64).reshape(-1, 4)
        pictures = np.array([[d.x0, d.y0, d.x1, d.y1] for d in skip], dtype=np.int64)
        with_search, without = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            find_page_text(page.image, others, pictures, scale=page.host_scale)
            with_search.append(time.perf_counter() - start)
            start = time.perf_counter()
            find_page_text(page.image, covered, None, scale=page.host_scale)
            without.append(time.perf_counter() - start)
        total += max(0.0, min(with_search) - min(without))
    return total


def upright_seconds(backend, shard: BlobShard, repeat: int) -> tuple[float, float]:
    """(orientation, deskew) seconds of turning the shard's decoded pages upright, batch by batch as
    the stage does (``PageTurner.upright``'s own accounting), timed alone (best of ``repeat``)."""
    pages = [decode_page(blob) for blob in shard.blobs]
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        orient = deskew = 0.0
        for i in range(0, len(pages), backend.batch_size):
            _, _, _, o, d = backend.turner.upright(pages[i:i + backend.batch_size], (INPUT_HEIGHT, INPUT_WIDTH))
            orient, deskew = orient + o, deskew + d
        best = min(best, (orient, deskew), key=sum)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8, help="pages of each kind (clean, scanned, turned)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measure; the fastest counts")
    args = parser.parse_args()

    shards = {kind: BlobShard(kind, [data for data, _ in group_pages(kind, args.pages)]) for kind in KINDS}
    off = {ENV_ORIENTATION: "off", ENV_DESKEW: "off"}
    backend = create_layout_backend("picodet-cdla")  # the settings as they are: on by default
    with ExitStack() as stack:
        for variable, value in off.items():
            stack.enter_context(setting(variable, value))
        plain = create_layout_backend("picodet-cdla")
    backends = {"on": (backend, {}), "off": (plain, off)}
    runs(backends, BlobShard("warm", shards["clean"].blobs[:1]), 1)  # load the models before any clock starts

    rows, totals = [], {"stage": 0.0, "plain": 0.0, "pages": 0, **{p: 0.0 for p in PARTS}}
    for kind, shard in shards.items():
        best = runs(backends, shard, args.repeat)
        n = len(shard.blobs)
        parts = dict(zip(("orientation", "deskew"), upright_seconds(backend, shard, args.repeat)))
        parts["figure search"] = figure_search_seconds(backend, shard, args.repeat)
        totals["stage"] += best["on"].stage_seconds
        totals["plain"] += best["off"].stage_seconds
        totals["pages"] += n
        for p in PARTS:
            totals[p] += parts[p]
        rows.append(_row(kind, n, best["on"].stage_seconds, best["off"].stage_seconds, parts))
    rows.append(_row("all", totals["pages"], totals["stage"], totals["plain"], {p: totals[p] for p in PARTS}))

    print(f"\nlayout stage, picodet-cdla on the CPU: {args.pages} pages of each kind, fastest of {args.repeat}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print_table(("pages", "n", "layout s/page", "baseline (both off) s/page", "stage vs baseline",
                 *(f"{p} ms/page" for p in PARTS), "share of the stage", "goal"), rows)


def _row(kind: str, n: int, stage: float, plain: float, parts: dict[str, float]) -> tuple:
    share = sum(parts.values()) / plain if plain else 0.0
    return (kind, n, f"{stage / n:.3f}", f"{plain / n:.3f}", f"{(stage - plain) / plain:+.1%}" if plain else "-",
            *(f"{1000 * parts[p] / n:.1f}" for p in PARTS), f"{share:.1%}", f"< {GOAL:.0%}")


if __name__ == "__main__":
    main()
