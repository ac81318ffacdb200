"""Benchmarks of the embedded CPU default, each against a baseline run on the same shard in the same run.

    python bench/run.py [--pages N] [--e2e-pages N] [--scan-pages N] [--out bench/out]

Prints two tables. Speed: Stage 0 (`pages`) against decoding + re-encoding JPEG + writing
files, the `crops` stage in pages/s, and the pipeline end to end (layout → crops → recognition
→ documents, models loaded beforehand on both sides) against rapidocr on whole pages, with
word F1 against the sample's ground truth for both. Accuracy by kind of page: the clean pages
of that run, and scanned-looking pages (`scanner.scan_page`: tinted paper, 1-2 degree skew,
blur, speckle, JPEG 60) upright and turned 90/180/270 degrees, each read by the pipeline as a
user runs it; the baseline is rapidocr on the whole upright page (a turned page is first turned
back by its known rotation). Per kind: word F1 of both, each page status's share, and the pages
read mostly wrong (F1 < 0.5) that still came out `ok` (goal: none).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from datasets import load_from_disk
from PIL import Image

from ocr_assets.backends.layout import create_layout_backend
from ocr_assets.backends.recognition import create_recognizer
from ocr_assets.sources import list_shards, open_shard
from ocr_assets.evaluation import corpus_word_scores, word_scores
from ocr_assets.imaging import decode_page
from ocr_assets.upright import Turn, turn_page
from ocr_assets.sample import write_sample, write_scans
from ocr_assets.scanner import ROTATIONS
from ocr_assets.schemas import PAGES
from ocr_assets.stages.crops import make_crops
from ocr_assets.stages.documents import assemble_documents
from ocr_assets.stages.layout import run_layout
from ocr_assets.stages.pages import extract_pages
from ocr_assets.stages.recognition import run_recognition
from ocr_assets.storage import ParquetStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import print_table  # noqa: E402  (bench/ is a folder of scripts, not a package)

WRONG_F1 = 0.5  # a page read with a word F1 below this is mostly wrong and must not be `ok`
STATUSES = ("ok", "suspect", "partial", "empty", "error")


def bench_stage0(shard, store: ParquetStore, scratch: Path, repeat: int) -> tuple[float, float]:
    """Seconds for the `pages` stage (header read + Parquet write) and for the decode/re-encode/write path."""
    ours = []
    for _ in range(repeat):
        start = time.perf_counter()
        with store.writer("pages", shard.key, PAGES) as written:
            extract_pages(shard, sink=written.write)
        ours.append(time.perf_counter() - start)
    out = scratch / "baseline_pages"
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    for row, data in enumerate(shard.read_pages([(row, 0) for row in range(shard.num_rows)])):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.save(out / f"{row:06d}.jpg", format="JPEG", quality=95)
    baseline = time.perf_counter() - start
    return min(ours), baseline


def read_shard(shard, pages_table, backend, recognizer):
    """The pipeline on ``pages_table`` of ``shard`` (layout → crops → recognition → documents):
    the documents table and each stage's report."""
    lay, lay_r = run_layout(pages_table, shard, backend)
    crops, crop_r = make_crops(lay, shard, pages_table)
    rec, rec_r = run_recognition(crops, recognizer)
    docs, doc_r = assemble_documents(pages_table, lay, rec)
    return docs, {"layout": lay_r, "crops": crop_r, "recognition": rec_r, "documents": doc_r}


def page_results(kinds, docs, truths, baseline_texts) -> list[dict]:
    """One dict per single-page row: its kind, our text and status, the baseline's text, the truth."""
    out = []
    for kind, markdown, statuses, truth, whole in zip(
            kinds, docs.column("markdown").to_pylist(), docs.column("page_status").to_pylist(), truths,
            baseline_texts):
        out.append({"kind": kind, "ours": markdown or "", "status": statuses[0] if statuses else "error",
                    "whole": whole, "truth": truth, "f1": word_scores(markdown or "", truth)[2]})
    return out


def read_scans(folder: Path, backend, recognizer) -> list[dict]:
    """Scanned pages read by the pipeline, and by rapidocr on the page turned back upright."""
    table = pq.read_table(folder / "scans.parquet", columns=["ground_truth", "rotation"])
    rotations = table.column("rotation").to_pylist()
    shard = open_shard(str(folder), "scans", id_column="id")
    try:
        pages_table, _ = extract_pages(shard)
        docs, _ = read_shard(shard, pages_table, backend, recognizer)
        whole = []
        for row, rotation in enumerate(rotations):
            # the baseline reads the page turned back upright by its known rotation
            upright = turn_page(decode_page(shard.read_pages([(row, 0)])[0]), Turn(rotation))
            whole.append(recognizer.recognize_page(upright))
    finally:
        shard.close()
    kinds = ["scanned" if r == 0 else f"rotated {r}" for r in rotations]
    return page_results(kinds, docs, table.column("ground_truth").to_pylist(), whole)


def accuracy_rows(results: list[dict]) -> list[tuple]:
    """Per kind of page: pages, word F1 (ours, rapidocr on the upright page), status shares, wrong-but-ok pages."""
    kinds = {"clean": ["clean"], "scanned": ["scanned"]}
    turned = sorted({r["kind"] for r in results if r["kind"].startswith("rotated")}, key=lambda k: int(k.split()[1]))
    kinds.update({k: [k] for k in turned})
    if turned:
        kinds["rotated (all)"] = turned
    rows = []
    for name, members in kinds.items():
        group = [r for r in results if r["kind"] in members]
        if not group:
            continue
        ours = corpus_word_scores((r["ours"], r["truth"]) for r in group)[2]
        base = corpus_word_scores((r["whole"], r["truth"]) for r in group)[2]
        seen = [r["status"] for r in group]
        shares = ", ".join(f"{s} {seen.count(s) / len(seen):.0%}" for s in [*STATUSES, *sorted(set(seen) - set(STATUSES))]
                           if seen.count(s))
        wrong_ok = sum(r["f1"] < WRONG_F1 and r["status"] == "ok" for r in group)
        goal = ">= 0.95, >= baseline - 0.01" if name == "clean" else ">= baseline - 0.05"
        rows.append((name, len(group), f"{ours:.4f}", f"{base:.4f}", f"{ours - base:+.4f}", shares,
                     f"{wrong_ok}", goal))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=32, help="pages in the bench shard")
    parser.add_argument("--e2e-pages", type=int, default=16, help="pages of that shard run end to end")
    parser.add_argument("--scan-pages", type=int, default=4,
                        help="scanned pages per rotation (0, 90, 180, 270) for the accuracy table; 0 leaves them out")
    parser.add_argument("--out", default="bench/out", help="where the bench dataset and results go")
    args = parser.parse_args()

    out = Path(args.out)
    data = out / f"dataset-{args.pages}"
    if not (data / "state.json").exists():
        write_sample(data, pages=args.pages, shards=1)
    ref = list_shards(str(data))[0]
    shard = open_shard(str(data), ref.key, id_column="id")
    scratch = Path(tempfile.mkdtemp(prefix="ocr-bench-"))
    store = ParquetStore(str(scratch / "store"))
    rows = []

    # Stage 0.
    ours, baseline = bench_stage0(shard, store, scratch, repeat=5)
    rows.append(("pages (stage 0)", f"{shard.num_rows / ours:,.0f} pages/s",
                 "decode + JPEG re-encode + write", f"{shard.num_rows / baseline:,.1f} pages/s",
                 f"{baseline / ours:,.0f}x", ">= 100x"))

    # Crops, on layout computed once.
    pages_table, _ = extract_pages(shard)
    backend = create_layout_backend("picodet-cdla")
    layout_table, layout_report = run_layout(pages_table, shard, backend)
    crop_runs = [make_crops(layout_table, shard, pages_table)[1] for _ in range(3)]
    best = min(crop_runs, key=lambda r: r.stage_seconds)
    rows.append(("crops", f"{best.pages_per_second:.1f} pages/s", "-", "-", "-", ">= 20 pages/s"))

    # End to end on the first e2e-pages pages, models loaded on both sides beforehand.
    n = min(args.e2e_pages, shard.num_rows)
    e2e_pages = pages_table.slice(0, n)
    recognizer = create_recognizer("local")
    start = time.perf_counter()
    docs, reports = read_shard(shard, e2e_pages, backend, recognizer)
    ours_seconds = time.perf_counter() - start

    truths = load_from_disk(str(data))["ground_truth"][:n]
    ours_f1 = corpus_word_scores(zip(docs.column("markdown").to_pylist(), truths))

    recognizer.recognize_page(decode_page(shard.read_pages([(0, 0)])[0]))  # load the whole-page models first
    start = time.perf_counter()
    whole = [recognizer.recognize_page(decode_page(data)) for data in shard.read_pages([(row, 0) for row in range(n)])]
    base_seconds = time.perf_counter() - start
    base_f1 = corpus_word_scores(zip(whole, truths))
    rows.append(("end to end", f"{n / ours_seconds:.3f} pages/s", "rapidocr, whole page",
                 f"{n / base_seconds:.3f} pages/s", f"{base_seconds / ours_seconds:.2f}x", ">= 1.0x"))
    rows.append(("word F1", f"{ours_f1[2]:.4f}", "rapidocr, whole page", f"{base_f1[2]:.4f}",
                 f"{ours_f1[2] - base_f1[2]:+.4f}", ">= 0.95, >= baseline - 0.01"))

    parts = {name: report.stage_seconds for name, report in reports.items()}
    lay_r = reports["layout"]

    # Accuracy by kind of page: the clean pages above, then scanned pages upright and turned.
    results = page_results(["clean"] * n, docs, truths, whole)
    if args.scan_pages > 0:
        scans = out / f"scans-{args.scan_pages}"
        if not (scans / "scans.parquet").exists():
            scans.mkdir(parents=True, exist_ok=True)
            write_scans(scans / "scans.parquet", rotations=tuple(ROTATIONS) * args.scan_pages)
        results += read_scans(scans, backend, recognizer)
    accuracy = accuracy_rows(results)
    header = ("measure", "ours", "baseline", "baseline value", "ratio", "goal")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(f"\nocr_assets bench: {shard.num_rows}-page shard ({n} end to end), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("\nend-to-end seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    print("layout parts (s): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(lay_r.parts.items())))
    print(f"precision/recall ours {ours_f1[0]:.4f}/{ours_f1[1]:.4f}, "
          f"whole page {base_f1[0]:.4f}/{base_f1[1]:.4f}")
    print(f"\naccuracy by kind of page (baseline: rapidocr on the whole upright page; "
          f"wrong = word F1 < {WRONG_F1})\n")
    print_table(("pages", "n", "ours F1", "baseline F1", "diff", "status", "wrong but ok (goal 0)", "F1 goal"), accuracy)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "stage_seconds": parts, "accuracy": accuracy,
         "pages": [{k: r[k] for k in ("kind", "status", "f1")} for r in results]}, indent=2))
    shard.close()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
