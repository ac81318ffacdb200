"""Every dataset layout through every asset: one dataset folder holding a small dataset of each
layout ``layouts`` writes, every shard materialized through Dagster with the CPU backends and the
settings read from the environment. Pages, documents and their text are checked against each
builder's ground truth; every bad row ends as an error row, beside the good rows of its shard,
and reaches `documents`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pypdfium2
import pytest

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.evaluation import corpus_word_scores, words
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import resources_from_env
from ocr_assets.sources import list_shards
from ocr_assets_tests import layouts

# Few rows each (the CPU OCR takes a second or two a page): a multi-page and a single-page row
# where the layout has several pages to a row, and each bad case once, beside good rows. Each
# layout with the format of its readable pages.
LAYOUTS = {
    "save_to_disk_images": ("png", partial(layouts.save_to_disk_images, rows=2, shards=1)),
    "save_to_disk_pdfs": ("pdf", partial(layouts.save_to_disk_pdfs, pages_per_row=(2, 1))),
    "save_to_disk_image_lists": ("png", partial(layouts.save_to_disk_image_lists, pages_per_row=(2, 1))),
    "hub_parquet_pdfs": ("pdf", partial(layouts.hub_parquet_pdfs, pages_per_row=(2, 1))),
    "hub_parquet_pdf_bytes": ("pdf", partial(layouts.hub_parquet_pdf_bytes, pages_per_row=(2, 1), shards=1)),
    "hub_parquet_image_bytes": ("png", partial(layouts.hub_parquet_image_bytes, rows=2)),
    "hub_parquet_image_lists": ("png", partial(layouts.hub_parquet_image_lists, pages_per_row=(2, 2),
                                               null_element=True, empty_list=True)),
    "hub_parquet_pdf_lists": ("pdf", partial(layouts.hub_parquet_pdf_lists, pages_per_pdf=((1, 1), (1,)))),
    "imagefolder_cache": ("png", partial(layouts.imagefolder_cache, rows=3, missing=True)),
    "webdataset_pdfs": ("pdf", partial(layouts.webdataset_pdfs, pages_per_sample=(2, 1), bad_samples=True)),
    "webdataset_tiffs": ("tiff", partial(layouts.webdataset_tiffs, frames_per_sample=(2, 1))),
}
# (width, height) of a readable page: 4 x 3 inch pages, PDFs rendered at the default 150 dpi
SIZES = {"pdf": (600, 450), "png": (400, 300), "tiff": (400, 300)}
# the bad rows, by document id: (status, words its error holds); every other row of their shard is ok
BAD_ROWS = {
    "webdataset_pdfs": {"bad-0": ("error", "the sample 'docs/nocontent' has no image or PDF member"),
                        "bad-1": ("error", "the PDF is truncated or broken"),
                        "bad-2": ("error", "the PDF has no pages"),
                        "bad-3": ("error", "the PDF is password-protected")},
    "hub_parquet_image_lists": {"list-1": ("partial", "page 1: element 1 of the list in column 'images' is null"),
                                "list-2": ("error", "the list in column 'images' is empty")},
    "imagefolder_cache": {"file-2": ("error", "page2.png' could not be read")},
}
ASSET_NAMES = {asset.key.to_user_string() for asset in ASSETS}


@dataclass
class LayoutRun:
    """One layout's shards, materialized: the builder's ``Built``, and per partition key its
    shard key in the builder's own folder and the result of its run."""

    built: layouts.Built
    storage: Path
    shards: dict[str, str] = field(default_factory=dict)
    results: dict[str, dg.ExecuteInProcessResult] = field(default_factory=dict)

    def rows(self, asset: str, key: str, columns: list[str] | None = None) -> list[dict]:
        return pq.read_table(self.storage / asset / f"{key}.parquet", columns=columns).to_pylist()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, LayoutRun]:
    """Every layout built in its own folder of one dataset folder, and every shard materialized in
    one real instance, with the id column of the shard's layout."""
    root = tmp_path_factory.mktemp("layouts_e2e")
    dataset, storage = root / "dataset", root / "out"
    built = {name: build(dataset / name) for name, (_, build) in LAYOUTS.items()}
    home = tmp_path_factory.mktemp("dagster_home")
    with pytest.MonkeyPatch.context() as env, dg.instance_for_test(temp_dir=str(home)) as instance:
        for name in [name for name in os.environ if name.startswith("OCR_ASSETS_")]:
            env.delenv(name)  # the default backends: PicoDet layout and the local recognizer, on the CPU
        env.setenv(config.ENV_DATASET, str(dataset))
        env.setenv(config.ENV_STORAGE, str(storage))
        env.setenv(config.ENV_MAX_PAGE_ERROR_RATE, "1")  # bad rows on purpose: layout's blocking check lets them by
        keys = {ref.path: ref.key for ref in list_shards(str(dataset))}
        instance.add_dynamic_partitions(SHARDS, list(keys.values()))
        out = {}
        for name, layout in built.items():
            env.setenv(config.ENV_ID_COLUMN, layout.id_column)
            run = out[name] = LayoutRun(layout, storage)
            for ref in list_shards(str(layout.path)):
                key = keys[ref.path]
                run.shards[key] = ref.key
                run.results[key] = dg.materialize(ASSETS, partition_key=key, instance=instance,
                                                  resources=resources_from_env(), raise_on_error=False)
    return out


def _shards(run: LayoutRun):
    """(partition key, ground truth per row, row ids, error words by (row, page)) of each shard."""
    assert sorted(run.shards.values()) == sorted(run.built.truth)
    for key, own in run.shards.items():
        yield key, run.built.truth[own], run.built.ids[own], run.built.errors.get(own, {})


def _size(page: dict) -> tuple[int, int]:
    """A page's size; a PDF page's within a pixel of its 600 x 450 rounded to it."""
    width, height = page["width"], page["height"]
    if page["format"] == "pdf" and abs(width - 600) <= 1 and abs(height - 450) <= 1:
        return 600, 450
    return width, height


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_asset_materializes_with_its_checks_passing(runs, name):
    for key, result in runs[name].results.items():
        assert result.success, key
        events = {e.asset_key.to_user_string(): e.materialization.metadata
                  for e in result.get_asset_materialization_events()}
        assert set(events) == ASSET_NAMES, key
        failed = [(e.asset_key.to_user_string(), e.check_name) for e in result.get_asset_check_evaluations()
                  if not e.passed]
        assert not failed, (key, failed)
        # a page of the shard, read again (a PDF page rendered again) and drawn with its boxes
        assert "data:image/jpeg;base64," in events["layout"]["preview"].value, key


@pytest.mark.parametrize("name", LAYOUTS)
def test_pages_hold_one_row_per_page(runs, name):
    run, fmt = runs[name], LAYOUTS[name][0]
    for key, truth, ids, errors in _shards(run):
        pages = run.rows("pages", key)
        # a page of a multi-page row is `<id>/<page>`; a single-page row's page keeps the row's id
        assert [(p["row"], p["page"], p["page_id"]) for p in pages] == [
            (row, page, ids[row] if len(texts) == 1 else f"{ids[row]}/{page}")
            for row, texts in enumerate(truth) for page in range(len(texts))], key
        assert {p["shard"] for p in pages} == {key}
        for page in pages:
            if truth[page["row"]][page["page"]] is None:
                assert page["status"] == "error" and errors[(page["row"], page["page"])] in page["error"], page
            else:
                assert (page["status"], page["error"], page["format"]) == ("ok", None, fmt), page
                assert _size(page) == SIZES[fmt], page
        crops = run.rows("crops", key, columns=["page_id", "status"])
        # every readable page was decoded (a PDF page rendered) and cut into crops
        assert {c["page_id"] for c in crops if c["status"] == "ok"} == {p["page_id"] for p in pages
                                                                        if p["status"] == "ok"}, key


def _joined(page_markdown: list[str]) -> str:
    """The pages' Markdown in order, a `<!-- page N -->` line before every page but the first."""
    blocks = []
    for page, markdown in enumerate(page_markdown):
        blocks += ([f"<!-- page {page} -->"] if page else []) + ([markdown] if markdown else [])
    return "\n\n".join(blocks)


@pytest.mark.parametrize("name", LAYOUTS)
def test_documents_hold_one_row_per_source_row(runs, name):
    run = runs[name]
    for key, truth, ids, errors in _shards(run):
        documents = run.rows("documents", key)
        assert [(d["row"], d["page_id"], d["shard"], d["pages"]) for d in documents] == [
            (row, ids[row], key, len(texts)) for row, texts in enumerate(truth)], key
        for document, texts in zip(documents, truth):
            assert len(document["page_markdown"]) == len(texts), document
            assert document["markdown"] == _joined(document["page_markdown"])
            failed = [page for page, text in enumerate(texts) if text is None]
            if not failed:
                assert (document["status"], document["error"]) == ("ok", None), document
                continue
            assert document["status"] == ("error" if len(failed) == len(texts) else "partial"), document
            for page in failed:  # every page's reason reaches its document
                assert errors[(document["row"], page)] in document["error"], document
                assert document["page_markdown"][page] == ""


@pytest.mark.parametrize("name", LAYOUTS)
def test_text_reads_back_as_the_ground_truth(runs, name):
    run = runs[name]
    pairs = []
    for key, truth, _, _ in _shards(run):
        for document, texts in zip(run.rows("documents", key, columns=["page_markdown"]), truth):
            pairs += [(markdown, text) for markdown, text in zip(document["page_markdown"], texts) if text is not None]
    assert pairs
    assert corpus_word_scores(pairs)[2] >= 0.9, pairs


def test_bad_rows_are_errors_beside_good_rows_of_their_shard(runs):
    """A broken, an encrypted and a zero-page PDF, a sample without a content member, a list with
    a null element (and an empty list), a path-only row whose file is missing."""
    for name, bad in BAD_ROWS.items():
        run = runs[name]
        (key,) = run.shards
        documents = {d["page_id"]: d for d in run.rows("documents", key)}
        assert set(bad) < set(documents)
        for page_id, document in documents.items():
            status, reason = bad.get(page_id, ("ok", None))
            assert document["status"] == status, document
            if reason is None:
                assert document["error"] is None, document
            else:
                assert reason in document["error"], document


def test_pdf_text_layer_is_the_ground_truth():
    """The builders' PDFs hold their lines as text: the ground truth is the PDF's own text layer."""
    pages = [layouts.page_lines(seed) for seed in (0, 1, 17)]
    document = pypdfium2.PdfDocument(layouts.text_pdf(pages))
    try:
        for index, lines in enumerate(pages):
            text = document[index].get_textpage().get_text_range()
            assert words(text) == words(" ".join(lines))
    finally:
        document.close()
