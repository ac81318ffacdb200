"""The sample dataset: deterministic bytes, shard files, PNG and JPEG pages, ground truth that matches the ink."""

from __future__ import annotations

import io
import json
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2
import pytest
from PIL import Image

from ocr_assets.evaluation import word_scores, words
from ocr_assets.sample import (
    BODY_TOP,
    FOOTER_TEXT,
    HEADER_TEXT,
    MULTIPAGE_SHARDS,
    PAGE_HEIGHT,
    PAGE_WIDTH,
    SCAN_ROTATIONS,
    SCAN_START,
    SCANS_SHARD,
    TABLE_HEADERS,
    VOCABULARY,
    render_page,
    write_sample,
    write_scans,
)
from ocr_assets.scanner import ROTATIONS, scan_page, stored_as
from ocr_assets.upright import Turn, turn_page

PAGES = 4


def _read_rows(folder):
    """All rows of the arrow shards in file order, with the image column as raw {bytes, path}."""
    ds = datasets.load_from_disk(str(folder)).cast_column("image", datasets.Image(decode=False))
    return list(ds)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("sample") / "ds", pages=PAGES, shards=2)


@pytest.fixture(scope="module")
def with_documents(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("documents") / "ds", pages=2, shards=1, documents=True)


def _documents(folder, name: str) -> tuple[dict, list[dict]]:
    """The features and rows of a documents shard, as stored (no decoding)."""
    table = pq.read_table(folder / name)
    return json.loads(table.schema.metadata[b"huggingface"])["info"]["features"], table.to_pylist()


def test_two_writes_give_identical_files(sample, tmp_path):
    again = write_sample(tmp_path / "again", pages=PAGES, shards=2)
    for name in ("data-00000-of-00002.arrow", "data-00001-of-00002.arrow"):
        assert (sample / name).read_bytes() == (again / name).read_bytes()
    other_seed = write_sample(tmp_path / "seed1", pages=PAGES, shards=2, seed=1)
    assert [r["image"]["bytes"] for r in _read_rows(other_seed)] != [r["image"]["bytes"] for r in _read_rows(sample)]


def test_shard_files_are_named_like_save_to_disk(sample, tmp_path):
    assert sorted(p.name for p in sample.glob("*.arrow")) == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    three = write_sample(tmp_path / "three", pages=3, shards=3)
    assert sorted(p.name for p in three.glob("*.arrow")) == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    with pa.memory_map(str(three / "data-00001-of-00003.arrow")) as source:
        assert pa.ipc.open_stream(source).read_all().num_rows == 1


def test_rows_hold_png_and_jpeg_letter_pages(sample):
    rows = _read_rows(sample)
    assert [r["id"] for r in rows] == [f"sample-{i:04d}" for i in range(PAGES)]
    features = datasets.load_from_disk(str(sample)).features
    assert isinstance(features["image"], datasets.Image)
    for i, row in enumerate(rows):
        data = row["image"]["bytes"]
        assert data.startswith(b"\x89PNG") if i % 2 == 0 else data.startswith(b"\xff\xd8\xff")
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == ("PNG" if i % 2 == 0 else "JPEG")
            assert img.size == (PAGE_WIDTH, PAGE_HEIGHT)
            assert img.mode == "RGB"


def test_ground_truth_is_body_text_only(sample):
    banned = set(words(HEADER_TEXT + " " + FOOTER_TEXT)) - {"of"}
    known = set(VOCABULARY) | {w.lower() for w in TABLE_HEADERS} | {"figure", "table"}
    for row in _read_rows(sample):
        truth = row["ground_truth"]
        tokens = words(truth)
        assert len(tokens) > 150
        assert not banned & set(tokens)
        # Only vocabulary words and numbers: no formula LaTeX, no chart labels.
        assert "\\" not in truth and "$" not in truth
        assert {t for t in tokens if not t.isdigit()} <= known


def test_existing_folder_is_replaced_without_leftovers(tmp_path):
    dest = tmp_path / "ds"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    assert write_sample(dest, pages=2, shards=1) == dest.absolute()
    assert sorted(p.name for p in dest.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_bad_shard_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shards"):
        write_sample(tmp_path / "ds", pages=2, shards=3)
    assert not (tmp_path / "ds").exists()


def test_pages_carry_header_footer_title_and_varied_layouts():
    first, truth = render_page(0)
    arr = np.asarray(first)
    ink = arr.min(axis=2) < 128
    assert ink[40:80].any() and ink[PAGE_HEIGHT - 80 : PAGE_HEIGHT - 40].any()  # header and footer
    assert not ink[:, :90].any() and not ink[:, PAGE_WIDTH - 90 :].any()  # side margins stay clear
    assert (arr[..., 0].astype(int) - arr[..., 2]).__abs__().max() > 60  # a coloured chart
    title = truth.split("\n")[0]
    assert title.istitle() and not re.match(r"\d", title)
    second_truth = render_page(1)[1]
    assert re.match(r"\d+\.\d+ ", second_truth)  # later pages open with a numbered heading
    assert render_page(0)[1] == truth and render_page(0)[0].tobytes() == first.tobytes()
    assert truth != render_page(0, seed=1)[1]
    captions = [t for t in (render_page(i)[1] for i in range(PAGES)) if "Table " in t and "Figure " in t]
    assert captions  # tables and figures appear on at least one page with their captions


def test_title_ink_reads_as_its_ground_truth():
    from rapidocr import RapidOCR

    page, truth = render_page(0)
    title = words(truth.split("\n")[0])
    # Only the recognizer on the title's first line: whole-page OCR is too slow for a test.
    line = np.ascontiguousarray(np.asarray(page)[BODY_TOP - 10 : BODY_TOP + 55, 90:-90, ::-1])
    result = RapidOCR(params={"Global.log_level": "error"})(line, use_det=False, use_cls=False)
    read = words(" ".join(result.txts or ()))
    assert len(read) >= 3
    assert read == title[: len(read)]


def test_documents_shards_are_written_identically_beside_the_image_shards(with_documents, tmp_path):
    assert sorted(p.name for p in with_documents.iterdir()) == sorted(
        ["data-00000-of-00001.arrow", "dataset_info.json", "state.json", *MULTIPAGE_SHARDS])
    again = write_sample(tmp_path / "again", pages=2, shards=1, documents=True)
    for name in MULTIPAGE_SHARDS:
        assert (with_documents / name).read_bytes() == (again / name).read_bytes(), name


def test_pdf_text_layer_is_the_ground_truth(with_documents):
    features, rows = _documents(with_documents, "documents-pdf.parquet")
    assert features["pdf"] == {"_type": "Pdf"}
    assert [row["id"] for row in rows] == ["pdf-0000", "pdf-0001"]
    pages_per_row = []
    for row in rows:
        document = pypdfium2.PdfDocument(row["pdf"]["bytes"])
        try:
            texts = [document[k].get_textpage().get_text_range() for k in range(len(document))]
        finally:
            document.close()
        pages_per_row.append(len(texts))
        truths = row["ground_truth"].split("\n\n")  # pages are joined by a blank line
        assert [words(text) for text in texts] == [words(truth) for truth in truths]
        assert all(len(words(truth)) > 50 for truth in truths)
    assert pages_per_row == [2, 1]


def test_multipage_rows_hold_two_pages_then_one(with_documents):
    features, rows = _documents(with_documents, "documents-multipage.parquet")
    assert features["pages"] == {"_type": "List", "feature": {"_type": "Image"}}
    assert [row["id"] for row in rows] == ["multipage-0000", "multipage-0001"]
    assert [len(row["pages"]) for row in rows] == [2, 1]
    for row in rows:
        assert len(row["ground_truth"].split("\n\n")) == len(row["pages"])  # a truth per page
        for page in row["pages"]:
            with Image.open(io.BytesIO(page["bytes"])) as img:
                assert img.size == (PAGE_WIDTH, PAGE_HEIGHT)


@pytest.fixture(scope="module")
def with_scans(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("scans") / "ds", pages=1, shards=1, scans=True)


def _ink(page: Image.Image) -> np.ndarray:
    """A small grey thumbnail of a page, centred, for comparing layouts whatever the tint and noise."""
    grey = np.asarray(page.convert("L").resize((page.width // 15, page.height // 15), Image.Resampling.BOX), float)
    return grey - grey.mean()


def test_scans_shard_is_written_identically_beside_the_image_shards(with_scans, tmp_path):
    assert sorted(p.name for p in with_scans.iterdir()) == sorted(
        ["data-00000-of-00001.arrow", "dataset_info.json", "state.json", SCANS_SHARD])
    again = write_scans(tmp_path / SCANS_SHARD)
    assert (with_scans / SCANS_SHARD).read_bytes() == again.read_bytes()
    features, rows = _documents(with_scans, SCANS_SHARD)
    assert features["image"] == {"_type": "Image"}
    assert [row["id"] for row in rows] == [f"scan-{k:04d}" for k in range(len(SCAN_ROTATIONS))]
    assert [row["rotation"] for row in rows] == list(SCAN_ROTATIONS)
    assert {0, 90, 180, 270} <= set(SCAN_ROTATIONS) and SCAN_ROTATIONS.count(0) >= 2


def test_scans_carry_the_upright_pages_ground_truth(with_scans):
    _, rows = _documents(with_scans, SCANS_SHARD)
    for k, row in enumerate(rows):
        assert row["ground_truth"] == render_page(SCAN_START + k)[1]
        assert len(words(row["ground_truth"])) > 150


def test_scanned_pages_are_turned_by_their_rotation(with_scans):
    """Each stored page lies the way its rotation says: sizes swap at 90/270, and only the
    recorded turn brings the ink back onto the clean page's layout."""
    _, rows = _documents(with_scans, SCANS_SHARD)
    for k, row in enumerate(rows):
        clean = _ink(render_page(SCAN_START + k)[0])
        with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            stored = img.convert("RGB")
        sideways = row["rotation"] in (90, 270)
        assert stored.size == ((PAGE_HEIGHT, PAGE_WIDTH) if sideways else (PAGE_WIDTH, PAGE_HEIGHT))
        fits = {}
        for turn in ROTATIONS:
            candidate = Image.fromarray(turn_page(np.asarray(stored), Turn(turn)))
            if candidate.size == (PAGE_WIDTH, PAGE_HEIGHT):
                ink = _ink(candidate)
                fits[turn] = float((ink * clean).sum() / np.sqrt((ink * ink).sum() * (clean * clean).sum()))
        right = fits.pop(row["rotation"])
        assert right > 0.2 and all(other < right / 2 for other in fits.values()), (row["rotation"], right, fits)


def test_scan_looks_like_a_scanner_and_is_deterministic():
    import random

    page = render_page(0)[0]
    data = scan_page(page, random.Random("a"))
    assert data == scan_page(page, random.Random("a")) and data != scan_page(page, random.Random("b"))
    with Image.open(io.BytesIO(data)) as img:
        scanned = np.asarray(img.convert("RGB"), dtype=float)
    assert scanned.shape == (PAGE_HEIGHT, PAGE_WIDTH, 3)
    clean = np.asarray(page, dtype=float)
    paper = np.median(scanned[BODY_TOP:-BODY_TOP, :80].reshape(-1, 3), axis=0)  # margin, inside any border
    assert paper.max() < 245 and paper[2] <= paper[0]  # grey or yellowish, never white or blue
    assert np.abs(scanned.mean(axis=2) - clean.mean(axis=2)).mean() > 10
    assert (np.asarray(stored_as(page, 90)).shape[:2]) == (PAGE_WIDTH, PAGE_HEIGHT)
    assert turn_page(np.asarray(stored_as(page, 270)), Turn(270)).tobytes() == np.asarray(page).tobytes()
    with pytest.raises(ValueError, match="rotation"):
        stored_as(page, 45)
