"""Per-partition start-up through the layout worker: what a layout step pays when the host's worker
for its GPU is warm, against the step that had to start it. Used by bench/gpu_check.py (section d).

The partition is a real one: the pages as a Parquet shard (an image struct column, as datasets
writes), its `pages` table written by the pages stage, and the layout file written by the worker.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ocr_assets.backends.layout import SETTINGS
from ocr_assets.schemas import PAGES
from ocr_assets.sources import list_shards, open_shard
from ocr_assets.stages.pages import extract_pages
from ocr_assets.storage import ParquetStore
from ocr_assets.timing import StageReport

SHARDS = 3  # the first starts the worker; the later ones find it warm


def worker_startup(blobs: list[bytes], device: str, checkpoint: str) -> list[dict]:
    """Layout of ``SHARDS`` partitions of ``blobs`` through the layout worker; per partition the
    metadata the layout asset would publish (``layout_worker``, ``startup_seconds``, ...)."""
    from ocr_assets import layout_worker
    from ocr_assets.layout_runner import LayoutJob, run_partition

    work = Path(tempfile.mkdtemp(prefix="gpu-worker-"))
    dataset, storage = work / "dataset", str(work / "out")
    dataset.mkdir()
    images = pa.array([{"bytes": b, "path": None} for b in blobs],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    for n in range(SHARDS):
        pq.write_table(pa.table({"image": images}), dataset / f"train-{n:05d}-of-{SHARDS:05d}.parquet")
    store = ParquetStore(storage)
    settings = {name: None for name in SETTINGS} | {
        "backend": "pp-doclayout-v3", "model": checkpoint, "device": device, "recover_text": True}
    saved = {k: os.environ.get(k) for k in ("OCR_ASSETS_RUN_DIR", "OCR_ASSETS_LAYOUT_WORKER")}
    os.environ["OCR_ASSETS_RUN_DIR"] = str(work / "run")
    os.environ["OCR_ASSETS_LAYOUT_WORKER"] = "on"  # on the CPU too, so the check runs here
    rows = []
    try:
        for ref in list_shards(str(dataset)):
            shard = open_shard(str(dataset), ref.key)
            try:
                with store.writer("pages", ref.key, PAGES) as written:
                    extract_pages(shard, sink=written.write)
            finally:
                shard.close()
            job = LayoutJob.for_step(dataset=str(dataset), storage=storage, partition=ref.key, settings=settings)
            outcome = run_partition(job, StageReport())
            rows.append({**outcome.report.info, "stage_seconds": outcome.report.stage_seconds,
                         "pages": outcome.report.pages})
    finally:
        for info in layout_worker.workers():
            layout_worker.stop_worker(info["slot"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return rows
