"""The documents stage: every page present, statuses, Markdown blocks, regions JSON."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from ocr_assets.schemas import DOCUMENTS, LAYOUT, PAGE_ERROR_REGION, PAGES, RECOGNITION
from ocr_assets.stages.documents import assemble_documents


def _tables(regions: list[tuple], pages: list[tuple]):
    """regions: (page_id, region, label, task, box, text, layout_status, rec_status, error)."""
    page_table = pa.Table.from_pylist(
        [dict(page_id=p, shard="s0", row=i, format="png", width=100, height=100, nbytes=1, status=s,
              error=e) for i, (p, s, e) in enumerate(pages)],
        schema=PAGES,
    )
    layout = pa.Table.from_pylist(
        [dict(page_id=p, region=r, label=label, task=task, score=0.9, x0=b[0], y0=b[1], x1=b[2], y1=b[3],
              source="model", status=ls, error=e if ls == "error" else None)
         for p, r, label, task, b, _, ls, _, e in regions],
        schema=LAYOUT,
    )
    recognition = pa.Table.from_pylist(
        [dict(page_id=p, region=r, task=task, text=text, status=rs, error=e if rs == "error" else None)
         for p, r, _, task, _, text, _, rs, e in regions],
        schema=RECOGNITION,
    )
    return page_table, layout, recognition


BOX = (1, 2, 3, 4)


def test_documents_statuses_markdown_and_regions():
    regions = [
        # "ok": every kind of block
        ("ok", 1, "title", "text", BOX, "Main Title", "ok", "ok", None),
        ("ok", 0, "doc_title", "text", BOX, "A Paper", "ok", "ok", None),
        ("ok", 2, "text", "text", BOX, "First paragraph.", "ok", "ok", None),
        ("ok", 3, "paragraph_title", "text", BOX, "Methods", "ok", "ok", None),
        ("ok", 4, "equation", "formula", BOX, "E = mc^2", "ok", "ok", None),
        ("ok", 5, "table", "table", BOX, "a | b\n1 | 2", "ok", "ok", None),
        ("ok", 6, "figure", "skip", (10, 20, 30, 40), "", "ok", "ok", None),
        # "partial": one region failed at recognition
        ("partial", 0, "text", "text", BOX, "kept", "ok", "ok", None),
        ("partial", 1, "text", "text", BOX, "", "ok", "error", "server timeout"),
        # "empty": only a figure and a blank text region
        ("empty", 0, "figure", "skip", BOX, "", "ok", "ok", None),
        ("empty", 1, "text", "text", BOX, "  ", "ok", "ok", None),
        # "error": the page failed at layout
        ("layout_failed", PAGE_ERROR_REGION, "", "skip", (0, 0, 0, 0), "", "error", "error", "model crashed"),
    ]
    pages = [("ok", "ok", None), ("partial", "ok", None), ("empty", "ok", None),
             ("layout_failed", "ok", None), ("bad_bytes", "error", "cannot decode the page"),
             ("no_regions", "ok", None)]
    table, report = assemble_documents(*_tables(regions, pages))

    assert table.schema == DOCUMENTS
    docs = {r["page_id"]: r for r in table.to_pylist()}
    assert table.column("page_id").to_pylist() == [p for p, _, _ in pages]
    assert {p: d["status"] for p, d in docs.items()} == {
        "ok": "ok", "partial": "partial", "empty": "empty", "layout_failed": "error",
        "bad_bytes": "error", "no_regions": "empty",
    }
    assert docs["ok"]["markdown"] == (
        "# A Paper\n\n## Main Title\n\nFirst paragraph.\n\n## Methods\n\n$$\nE = mc^2\n$$\n\n"
        "a | b\n1 | 2\n\n![figure](ok#10,20,30,40)"
    )
    assert docs["ok"]["error"] is None
    assert docs["partial"]["markdown"] == "kept" and docs["partial"]["error"] == "server timeout"
    assert docs["layout_failed"]["error"] == "model crashed" and docs["layout_failed"]["markdown"] == ""
    assert docs["bad_bytes"]["error"] == "cannot decode the page"

    parsed = json.loads(docs["ok"]["regions"])
    assert [r["region"] for r in parsed] == list(range(7))
    assert parsed[6] == {"page": 0, "region": 6, "label": "figure", "task": "skip", "box": [10, 20, 30, 40],
                         "source": "model", "text": "", "confidence": None, "status": "ok", "error": None}
    failed = json.loads(docs["partial"]["regions"])[1]
    assert (failed["status"], failed["error"]) == ("error", "server timeout")
    assert json.loads(docs["no_regions"]["regions"]) == []
    assert table.column("pages").to_pylist() == [1] * 6
    assert table.column("page_markdown").to_pylist() == [[d] for d in table.column("markdown").to_pylist()]
    assert report.pages == 6 and report.counts["regions"] == 11 and report.counts["documents"] == 6


def test_title_at_the_top_is_a_level_one_heading():
    regions = [("p", 0, "title", "text", BOX, "Top\nTitle", "ok", "ok", None),
               ("p", 1, "text", "text", BOX, "Body", "ok", "ok", None)]
    table, _ = assemble_documents(*_tables(regions, [("p", "ok", None)]))
    assert table.column("markdown").to_pylist() == ["# Top Title\n\nBody"]


def _pages(rows: list[tuple]) -> pa.Table:
    """rows: (page_id, row, page, status, error)."""
    return pa.Table.from_pylist(
        [dict(page_id=p, shard="s0", row=r, page=n, format="pdf", width=100, height=100, nbytes=1, status=s,
              error=e) for p, r, n, s, e in rows],
        schema=PAGES,
    )


# (page_id, row, page, pages status, pages error) in the order the pages stage writes them
MULTI_PAGES = [
    ("doc/0", 0, 0, "ok", None), ("doc/1", 0, 1, "ok", None), ("doc/2", 0, 2, "ok", None),
    ("single", 1, 0, "ok", None),
    ("blank/0", 2, 0, "ok", None), ("blank/1", 2, 1, "ok", None),
    ("lost/0", 3, 0, "error", "cannot decode the page"), ("lost/1", 3, 1, "ok", None),
    ("mixed/0", 4, 0, "ok", None), ("mixed/1", 4, 1, "ok", None),
    ("allbad/0", 5, 0, "ok", None), ("allbad/1", 5, 1, "ok", None), ("allbad/2", 5, 2, "ok", None),
    ("torn/0", 6, 0, "ok", None), ("torn/1", 6, 1, "ok", None),
]
MULTI_REGIONS = [
    ("doc/0", 0, "text", "text", BOX, "Alpha", "ok", "ok", None),
    ("doc/1", PAGE_ERROR_REGION, "page", "skip", BOX, "", "error", "error", "model crashed"),
    ("doc/2", 0, "doc_title", "text", BOX, "Gamma", "ok", "ok", None),
    ("doc/2", 1, "text", "text", BOX, "Delta", "ok", "ok", None),
    ("single", 0, "text", "text", BOX, "Solo", "ok", "ok", None),
    ("blank/0", 0, "figure", "skip", BOX, "", "ok", "ok", None),
    ("blank/1", 0, "text", "text", BOX, " ", "ok", "ok", None),
    ("lost/1", 0, "text", "text", BOX, "", "ok", "ok", None),
    ("mixed/0", 0, "text", "text", BOX, "Read", "ok", "ok", None),
    ("mixed/1", 0, "text", "text", BOX, "", "ok", "ok", None),
    ("allbad/0", 0, "text", "text", BOX, "", "ok", "error", "server timeout"),
    ("allbad/1", 0, "text", "text", BOX, "", "ok", "error", "server timeout"),
    ("allbad/2", 0, "text", "text", BOX, "", "ok", "error", "server timeout"),
    ("torn/0", 0, "text", "text", BOX, "Kept", "ok", "ok", None),
    ("torn/0", 1, "text", "text", BOX, "", "ok", "error", "answer cut at max_tokens"),
    ("torn/1", 0, "text", "text", BOX, "More", "ok", "ok", None),
]


def _multi_tables():
    _, layout, recognition = _tables(MULTI_REGIONS, [])
    return _pages(MULTI_PAGES), layout, recognition


def test_multi_page_rows_markers_page_markdown_and_status():
    pages, layout, recognition = _multi_tables()
    table, report = assemble_documents(pages, layout, recognition)
    assert table.schema == DOCUMENTS
    docs = {d["page_id"]: d for d in table.to_pylist()}
    assert table.column("page_id").to_pylist() == ["doc", "single", "blank", "lost", "mixed", "allbad", "torn"]
    assert table.column("row").to_pylist() == list(range(7))
    assert table.column("pages").to_pylist() == [3, 1, 2, 2, 2, 3, 2]
    assert {p: d["status"] for p, d in docs.items()} == {
        "doc": "partial", "single": "ok", "blank": "empty", "lost": "error", "mixed": "ok", "allbad": "error",
        "torn": "partial",
    }
    doc = docs["doc"]
    assert doc["markdown"] == "Alpha\n\n<!-- page 1 -->\n\n<!-- page 2 -->\n\n# Gamma\n\nDelta"
    assert doc["page_markdown"] == ["Alpha", "", "# Gamma\n\nDelta"]
    assert doc["error"] == "page 1: model crashed"
    assert [(r["page"], r["region"], r["text"]) for r in json.loads(doc["regions"])] == [
        (0, 0, "Alpha"), (2, 0, "Gamma"), (2, 1, "Delta")]
    assert docs["single"]["markdown"] == "Solo" and docs["single"]["error"] is None
    assert docs["blank"]["markdown"] == "![figure](blank/0#1,2,3,4)\n\n<!-- page 1 -->"
    assert docs["lost"]["error"] == "page 0: cannot decode the page"
    assert docs["mixed"]["markdown"] == "Read\n\n<!-- page 1 -->" and docs["mixed"]["error"] is None
    assert docs["allbad"]["error"] == "pages 0-2: server timeout"
    assert docs["torn"]["markdown"] == "Kept\n\n<!-- page 1 -->\n\nMore"
    assert docs["torn"]["error"] == "page 0: answer cut at max_tokens"
    assert report.pages == 15 and report.counts["documents"] == 7 and report.counts["regions"] == 15
    assert (report.counts["ok"], report.counts["partial"], report.counts["empty"], report.counts["error"]) == (
        2, 2, 1, 2)


def test_pages_out_of_row_order_still_make_whole_rows():
    """A pages table in another order: each row's pages are gathered and put in page order."""
    pages, layout, recognition = _multi_tables()
    shuffled = pages.take([14, 2, 3, 0, 5, 1, 4, 13, 6, 7, 8, 9, 10, 11, 12])
    expected, _ = assemble_documents(pages, layout, recognition)
    table, _ = assemble_documents(shuffled, layout.take(list(range(layout.num_rows))[::-1]), recognition)
    assert table.equals(expected)


def _batches(table: pa.Table, rows: int = 2):
    return iter(table.to_batches(max_chunksize=rows))


def test_streamed_inputs_and_a_sink_give_the_same_documents_in_row_order(monkeypatch):
    from ocr_assets.stages import documents

    pages, layout, recognition = _multi_tables()
    expected, _ = assemble_documents(pages, layout, recognition)
    monkeypatch.setattr(documents, "DOCUMENT_ROWS", 3)
    written: list[pa.Table] = []
    result, report = assemble_documents(pages, _batches(layout), _batches(recognition, 3), sink=written.append)
    assert result is None and [t.num_rows for t in written] == [3, 3, 1]
    assert pa.concat_tables(written).equals(expected)
    assert report.counts["documents"] == 7


def test_streamed_rows_out_of_the_pages_order_are_refused_not_lost():
    pages, layout, recognition = _multi_tables()
    late = pa.concat_tables([layout.slice(1), layout.slice(0, 1)])  # doc/0's region after every other page's
    with pytest.raises(RuntimeError, match=r"layout rows of page 'doc/0' come after .* not in the pages' order"):
        assemble_documents(pages, _batches(late), _batches(recognition))


@pytest.mark.parametrize("streamed", [False, True])
def test_rows_of_a_page_the_pages_table_does_not_hold_are_refused(streamed):
    """Layout made from another pages output (ids changed) would otherwise vanish into an empty document."""
    pages, layout, recognition = _multi_tables()
    stale = pa.concat_tables([layout, layout.slice(0, 1).set_column(0, "page_id", pa.array(["old-id"]))])
    with pytest.raises(RuntimeError, match=r"page 'old-id', which the pages table does not hold.*materialize"):
        assemble_documents(pages, _batches(stale) if streamed else stale, recognition)


def test_page_status_lists_every_page_for_the_page_error_rate():
    pages, layout, recognition = _multi_tables()
    table, _ = assemble_documents(pages, layout, recognition)
    docs = {d["page_id"]: d["page_status"] for d in table.to_pylist()}
    assert docs["doc"] == ["ok", "error", "ok"] and docs["lost"] == ["error", "empty"]
    assert docs["allbad"] == ["error"] * 3 and docs["single"] == ["ok"]
