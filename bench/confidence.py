"""Calibration of OCR_ASSETS_MIN_PAGE_CONFIDENCE on pages whose text is known.

    python bench/confidence.py [--pages N] [--out bench/out]

Four groups of N sample pages each, read by the pipeline as a user runs it (layout → crops →
recognition → documents, with the recognizer the settings name: the local one unless
OCR_ASSETS_VLM_BASE_URL is set): clean renders; scanned (`scanner.scan_page`:
tinted paper, 1-2 degree skew, blur, speckle, JPEG 60); scanned and turned 90/180/270 degrees
and read with OCR_ASSETS_ORIENTATION=off, so that some pages are read wrongly; and heavily
degraded scans (more skew, blur and noise, JPEG 30). Per page: word F1 against the ground truth,
the page confidence `documents` reports (`page_confidence`) and the status. Then, for candidate
thresholds, the pages read mostly wrong (F1 < 0.5) that would still be `ok` (must be 0) and the
pages read well (F1 >= 0.9) that would be `suspect` (as few as possible).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import datasets

from ocr_assets.backends.layout import create_layout_backend
from ocr_assets.backends.recognition import create_recognizer, resolve_recognizer
from ocr_assets.config import (
    ENV_ORIENTATION, ENV_RECOGNIZER, ENV_VLM_API_KEY, ENV_VLM_BASE_URL, ENV_VLM_MODEL, env, min_page_confidence,
)
from ocr_assets.evaluation import word_scores
from ocr_assets.sample import encode_page, render_page
from ocr_assets.scanner import scan_page, stored_as
from ocr_assets.sources import open_shard
from ocr_assets.stages.pages import extract_pages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import read_shard  # noqa: E402  (bench/ is a folder of scripts, not a package)
from tables import print_table  # noqa: E402

WRONG_F1, GOOD_F1 = 0.5, 0.9
GROUPS = ("clean", "scanned", "turned", "heavy")
START = 3000  # sample page indices apart from the sample dataset's own pages


def group_pages(group: str, n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """(encoded page, ground truth) for the n pages of a group; the same arguments give the same bytes."""
    out = []
    for k in range(n):
        index = START + GROUPS.index(group) * 100 + k
        page, truth = render_page(index, seed)
        rng = random.Random(f"bench.confidence:{group}:{seed}:{index}")
        if group == "clean":
            data = encode_page(page, index)
        elif group == "scanned":
            data = scan_page(page, rng)
        elif group == "turned":
            data = scan_page(stored_as(page, (90, 180, 270)[k % 3]), rng)
        else:
            data = scan_page(page, rng, severity=2.5, quality=30)
        out.append((data, truth))
    return out


def write_group(folder: Path, group: str, pages: list[tuple[bytes, str]]) -> None:
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "ground_truth": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"id": [f"{group}-{k:04d}" for k in range(len(pages))],
         "image": [{"bytes": data, "path": None} for data, _ in pages],
         "ground_truth": [truth for _, truth in pages]}, features=features,
    ).to_parquet(str(folder / f"{group}.parquet"))


@contextmanager
def setting(name: str, value: str | None):
    """An environment setting for the duration of a block, restored afterwards."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def read_group(folder: Path, group: str, truths: list[str], recognizer) -> list[dict]:
    """Each page of a group read by the pipeline: its F1, page confidence and status."""
    # turned pages are read with the orientation step off, so that some pages are read wrongly
    with setting(ENV_ORIENTATION, "off" if group == "turned" else None):
        backend = create_layout_backend("picodet-cdla")  # made here: it may read the setting when made
        shard = open_shard(str(folder), group, id_column="id")
        try:
            pages_table, _ = extract_pages(shard)
            docs, _ = read_shard(shard, pages_table, backend, recognizer)
        finally:
            shard.close()
    if "page_confidence" not in docs.column_names:
        raise SystemExit("documents has no page_confidence column: this bench needs the page confidence "
                         "that the documents stage reports")
    rows = []
    for page_id, markdown, statuses, confidences, truth in zip(
            docs.column("page_id").to_pylist(), docs.column("markdown").to_pylist(),
            docs.column("page_status").to_pylist(), docs.column("page_confidence").to_pylist(), truths):
        confidence = confidences[0] if confidences else None
        rows.append({"group": group, "id": page_id, "f1": word_scores(markdown or "", truth)[2],
                     "confidence": confidence, "status": statuses[0] if statuses else "error"})
    return rows


def threshold_rows(pages: list[dict], thresholds: list[float]) -> list[tuple]:
    """Per threshold: wrong pages that would be ok, good pages that would be suspect, all pages suspect."""
    read = [p for p in pages if p["status"] in ("ok", "suspect")]  # empty / error pages are never ok
    rows = []
    for t in thresholds:
        def ok(p):  # a page without a confidence is never suspect, as in documents
            return p["confidence"] is None or p["confidence"] >= t

        wrong_ok = sum(p["f1"] < WRONG_F1 and ok(p) for p in read)
        good_suspect = sum(p["f1"] >= GOOD_F1 and not ok(p) for p in read)
        rows.append((f"{t:.2f}", wrong_ok, good_suspect, sum(not ok(p) for p in read)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=4, help="pages per group (clean, scanned, turned, heavy)")
    parser.add_argument("--out", default="bench/out", help="where the page table goes (confidence.csv)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ocr-confidence-"))
    # the recognizer the settings name: the local one, or a VLM server (OCR_ASSETS_VLM_BASE_URL) to
    # calibrate the threshold for its token probabilities
    name = resolve_recognizer(env(ENV_RECOGNIZER), env(ENV_VLM_BASE_URL))
    options = {} if name == "local" else {"base_url": env(ENV_VLM_BASE_URL), "model": env(ENV_VLM_MODEL, "glm-ocr"),
                                          "api_key": env(ENV_VLM_API_KEY)}
    recognizer = create_recognizer(name, **options)
    pages = []
    try:
        for group in GROUPS:
            made = group_pages(group, args.pages)
            write_group(folder, group, made)
            pages += read_group(folder, group, [truth for _, truth in made], recognizer)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\npages (wrong: word F1 < {WRONG_F1}; good: F1 >= {GOOD_F1})\n")
    print_table(("group", "page", "word F1", "confidence", "status"),
                [(p["group"], p["id"], f"{p['f1']:.3f}",
                  "-" if p["confidence"] is None else f"{p['confidence']:.3f}", p["status"]) for p in pages])
    thresholds = [round(0.30 + 0.05 * i, 2) for i in range(14)]
    rows = threshold_rows(pages, thresholds)
    print(f"\nthresholds (current OCR_ASSETS_MIN_PAGE_CONFIDENCE: {min_page_confidence()})\n")
    print_table(("threshold", "wrong but ok (goal 0)", "good but suspect (min)", "suspect in all"), rows)
    wrong = [p["confidence"] for p in pages if p["f1"] < WRONG_F1 and p["confidence"] is not None
             and p["status"] in ("ok", "suspect")]
    good = [p["confidence"] for p in pages if p["f1"] >= GOOD_F1 and p["confidence"] is not None]
    print(f"\nhighest confidence of a wrong page: {max(wrong):.3f}" if wrong else "\nno read page was wrong")
    print(f"lowest confidence of a good page: {min(good):.3f}" if good else "no page was read well")
    safe = [r for r in rows if r[1] == 0]
    if safe:
        best = min(r[2] for r in safe)
        print("thresholds with no wrong page ok and the fewest good pages suspect: "
              + ", ".join(r[0] for r in safe if r[2] == best))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "confidence.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "page", "f1", "confidence", "status"])
        for p in pages:
            writer.writerow([p["group"], p["id"], f"{p['f1']:.4f}",
                             "" if p["confidence"] is None else f"{p['confidence']:.4f}", p["status"]])

if __name__ == "__main__":
    main()
