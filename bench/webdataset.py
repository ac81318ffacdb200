"""Reading WebDataset shards: ours against ``datasets``' own webdataset loader, on the same samples.

    python bench/webdataset.py [--samples 2000] [--repeat 3] [--out bench/out/webdataset]

One plain ``.tar`` shard as on the hub (pixparse/idl-wds style: ``<key>.tif`` + ``<key>.json``;
or ``--member png``) of ``--samples`` samples. Both sides read every sample's page bytes and its
JSON fields, with nothing decoded:

- ours: ``open_shard`` (the tar indexed once, members as slices of the memory-mapped file),
  then ``page_infos`` (what the pages stage reads: each page's format and size from its header)
  and ``read_pages`` over all pages in batches of 64 (what the layout and crops stages read);
- datasets: ``load_dataset("webdataset", data_files=..., split="train")`` with the image column
  cast to ``Image(decode=False)``, iterated row by row (its cache is deleted before every run, so
  each run reads the tar). Streaming mode is timed too.

Both sides read from the page cache (the tar is read once before timing). Best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from ocr_assets.sample import render_page
from tables import print_table

DISTINCT_PAGES = 8


def write_tar(path: Path, samples: int, member: str) -> None:
    """``samples`` samples of ``<key>.<member>`` + ``<key>.json`` in a plain tar."""
    blobs = []
    for index in range(DISTINCT_PAGES):
        image, _ = render_page(index)
        buf = io.BytesIO()
        if member == "tif":
            image.convert("L").save(buf, format="TIFF", compression="tiff_lzw")
        else:
            image.save(buf, format="PNG", compress_level=6)
        blobs.append(buf.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            key = f"doc{i:07d}"
            for name, data in ((f"{key}.{member}", blobs[i % DISTINCT_PAGES]),
                               (f"{key}.json", json.dumps({"id": key, "pages": 1, "source": "bench"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def run_ours(folder: Path) -> tuple[float, int, int]:
    from ocr_assets.sources import list_shards, open_shard

    start = time.perf_counter()
    pages = nbytes = 0
    for ref in list_shards(str(folder)):
        shard = open_shard(str(folder), ref.key, id_column="id")
        try:
            wanted = []
            for infos in shard.page_infos():
                for info in infos:
                    if info.error is None:
                        wanted.append((info.row, info.page))
            shard.row_ids()
            for i in range(0, len(wanted), 64):
                for pixels in shard.read_pages(wanted[i:i + 64]):
                    if isinstance(pixels, Exception):
                        raise pixels
                    nbytes += len(pixels)
                    pages += 1
        finally:
            shard.close()
    return time.perf_counter() - start, pages, nbytes


def run_datasets(folder: Path, member: str, streaming: bool) -> tuple[float, int, int]:
    import datasets

    cache = Path(tempfile.mkdtemp(prefix="hf-cache-"))
    try:
        start = time.perf_counter()
        ds = datasets.load_dataset("webdataset", data_files={"train": sorted(str(p) for p in folder.glob("*.tar"))},
                                   split="train", streaming=streaming, cache_dir=str(cache))
        ds = ds.cast_column(member, datasets.Image(decode=False))
        pages = nbytes = 0
        for row in ds:
            nbytes += len(row[member]["bytes"])
            row["json"]
            pages += 1
        return time.perf_counter() - start, pages, nbytes
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--member", choices=("tif", "png"), default="tif")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="bench/out/webdataset")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    folder = Path(args.out).absolute() / f"{args.member}-{args.samples}"
    tar = folder / "shard-000000.tar"
    if not tar.exists():
        write_tar(tar, args.samples, args.member)
    tar.read_bytes()  # into the page cache for both sides
    sides = [("ocr_assets (mmap + index)", lambda: run_ours(folder)),
             ("datasets webdataset", lambda: run_datasets(folder, args.member, False)),
             ("datasets webdataset, streaming", lambda: run_datasets(folder, args.member, True))]
    results = {}
    for name, run in sides:
        best = None
        for _ in range(args.repeat):
            seconds, pages, nbytes = run()
            best = seconds if best is None else min(best, seconds)
        results[name] = (best, pages, nbytes)
    base = results["datasets webdataset, streaming"][0]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(f"\n{args.samples} samples (.{args.member} + .json), {tar.stat().st_size / 1e6:.0f} MB tar; "
          f"{cpu}, {len(os.sched_getaffinity(0))} cores, datasets {datasets.__version__}, {platform.python_version()}\n")
    header = ("reader", "seconds", "samples/s", "MB read", "vs datasets streaming")
    rows = [(name, f"{s:.3f}", f"{p / s:.0f}", f"{b / 1e6:.0f}", f"{base / s:.1f}x") for name, (s, p, b) in results.items()]
    print_table(header, rows)


if __name__ == "__main__":
    main()
