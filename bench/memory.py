"""Peak memory (RSS) of every stage against the size of the shard: memory is bounded by a batch.

    python bench/memory.py [--pages 2000,20000] [--latency 0.02] [--out bench/out/memory]

For each shard size, one Parquet shard laid out as on the hub (a ``datasets`` ``Image`` column,
row groups of 100 rows) holds that many pages: 16 distinct sample pages (JPEG, 1275x1650)
repeated. Each stage then runs alone in a fresh process, reading the previous stage's Parquet
output and writing its own through the partition writer, as the assets do; the child reports its
peak RSS during the stage (``VmHWM``, reset once the imports and models are loaded) and its RSS
at that moment.

What runs: pages, layout, crops and documents as in the pipeline; recognition through the
``openai`` recognizer against an OpenAI-compatible server on localhost that answers every crop
after a fixed latency (the server runs in its own process and is not measured). The layout model
is replaced by a backend that gives four fixed text boxes per page (text recovery off), so that
20,000 pages take minutes, not hours, on two cores: decoding, cropping and encoding are real, the
regions per page are fixed, and the layout model's own memory does not depend on the shard.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("pages", "layout", "crops", "recognition", "documents")
ROW_GROUP_ROWS = 100
DISTINCT_PAGES = 16


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: the peak), in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / 1e6


def reset_peak() -> None:
    """Start the peak (VmHWM) again from the current RSS, so imports do not count (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write_shard(path: Path, pages: int) -> None:
    """A hub-style Parquet shard of ``pages`` single-image rows with the ``datasets`` features metadata."""
    import io

    from ocr_assets.sample import render_page

    blobs = []
    for index in range(DISTINCT_PAGES):
        image, _ = render_page(index)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=75)
        blobs.append(buf.getvalue())
    features = {"id": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}}
    schema = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, pages, ROW_GROUP_ROWS):
            rows = range(start, min(start + ROW_GROUP_ROWS, pages))
            writer.write_table(pa.table({
                "id": [f"page-{i:06d}" for i in rows],
                "image": [{"bytes": blobs[i % DISTINCT_PAGES], "path": None} for i in rows],
            }, schema=schema))


class FixedBoxes:
    """A layout backend giving four fixed text boxes per page (two columns, two bands): real decode."""

    name = "fixed-boxes"
    label_tasks = {"text": "text"}
    batch_size = 4
    keep_polygons = False
    info: dict = {}

    def prepare(self, blobs):
        from ocr_assets.backends.layout.base import prepare_with

        return prepare_with(blobs, lambda page: None)

    def detect(self, pages, report=None):
        from ocr_assets.backends.layout.base import Detection

        out = []
        for page in pages:
            w, h = page.width, page.height
            out.append([Detection("text", 0.9, x0, y0, x0 + w // 2 - 120, y0 + h // 2 - 200)
                        for x0 in (100, w // 2 + 20) for y0 in (130, h // 2)])
        return out


def run_stage(stage: str, dataset: str, storage: str, key: str, base_url: str, queue) -> None:
    """Run one stage in this (fresh) process; put (RSS before the stage, peak RSS, seconds) on ``queue``."""
    from ocr_assets.sources import open_shard
    from ocr_assets.storage import ParquetStore

    store = ParquetStore(storage)
    recognizer = None
    if stage == "recognition":
        from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer

        recognizer = OpenAIRecognizer(base_url, concurrency=64, timeout=60)
    shard = open_shard(dataset, key) if stage in ("pages", "layout", "crops") else None
    reset_peak()
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    if stage == "pages":
        from ocr_assets.schemas import PAGES
        from ocr_assets.stages.pages import extract_pages

        with store.writer("pages", key, PAGES) as out:
            extract_pages(shard, sink=out.write)
    elif stage == "layout":
        from ocr_assets.schemas import layout_schema
        from ocr_assets.stages.layout import run_layout

        with store.writer("layout", key, layout_schema(False)) as out:
            run_layout(store.read("pages", key), shard, FixedBoxes(), recover_text=False, sink=out.write)
    elif stage == "crops":
        from ocr_assets.schemas import CROPS
        from ocr_assets.stages.crops import VLM_FORMAT, make_crops

        with store.writer("crops", key, CROPS) as out:
            make_crops(store.batches("layout", key), shard, store.read("pages", key), fmt=VLM_FORMAT, sink=out.write)
    elif stage == "recognition":
        from ocr_assets.schemas import RECOGNITION
        from ocr_assets.stages.recognition import run_recognition

        with store.writer("recognition", key, RECOGNITION) as out:
            run_recognition(store.batches("crops", key), recognizer, sink=out.write)
    else:
        from ocr_assets.schemas import DOCUMENTS
        from ocr_assets.stages.documents import assemble_documents

        with store.writer("documents", key, DOCUMENTS) as out:
            assemble_documents(store.read("pages", key), store.batches("layout", key),
                               store.batches("recognition", key), sink=out.write)
    seconds = time.perf_counter() - start
    if shard is not None:
        shard.close()
    queue.put((before, _status_mb("VmHWM"), seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", default="2000,20000")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the server takes per crop")
    parser.add_argument("--out", default="bench/out/memory")
    args = parser.parse_args()
    from tables import print_table
    from vlm import start_server

    out = Path(args.out).absolute()
    sizes = [int(n) for n in args.pages.split(",")]
    server, base_url = start_server(args.latency)
    context = multiprocessing.get_context("spawn")
    results: dict[int, dict[str, tuple]] = {}
    try:
        for pages in sizes:
            dataset = out / f"dataset-{pages}"
            storage = out / f"storage-{pages}"
            shutil.rmtree(storage, ignore_errors=True)
            if not (dataset / "data" / "train-00000-of-00001.parquet").exists():
                write_shard(dataset / "data" / "train-00000-of-00001.parquet", pages)
            results[pages] = {}
            for stage in STAGES:
                queue = context.Queue()
                child = context.Process(target=run_stage, args=(stage, str(dataset), str(storage),
                                                                 "train-00000-of-00001", base_url, queue))
                child.start()
                child.join()
                if child.exitcode != 0:
                    raise SystemExit(f"{stage} failed at {pages} pages (exit {child.exitcode})")
                results[pages][stage] = queue.get()
                print(f"{pages} pages {stage}: {results[pages][stage]}", file=sys.stderr)
    finally:
        server.terminate()
    shard_mb = {n: (out / f"dataset-{n}" / "data" / "train-00000-of-00001.parquet").stat().st_size / 1e6 for n in sizes}
    header = ["stage"] + [f"peak RSS MB, {n:,} pages" for n in sizes] + [f"stage growth MB, {n:,}" for n in sizes]
    rows = []
    for stage in STAGES:
        rows.append([stage] + [f"{results[n][stage][1]:.0f}" for n in sizes]
                    + [f"{results[n][stage][1] - results[n][stage][0]:.0f}" for n in sizes])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(f"\nshards: " + ", ".join(f"{n:,} pages = {shard_mb[n]:.0f} MB" for n in sizes)
          + f"; {cpu}, {len(os.sched_getaffinity(0))} cores, {platform.python_version()}")
    print("peak RSS: the stage process's peak while the stage ran (imports and models loaded before);"
          " stage growth: that peak minus the RSS when the stage started\n")
    print_table(header, rows)


if __name__ == "__main__":
    main()
