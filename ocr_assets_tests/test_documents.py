"""The documents stage: every page present, statuses, Markdown blocks, regions JSON."""

from __future__ import annotations

import json

import pyarrow as pa

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
    assert parsed[6] == {"region": 6, "label": "figure", "task": "skip", "box": [10, 20, 30, 40],
                         "source": "model", "text": "", "status": "ok", "error": None}
    failed = json.loads(docs["partial"]["regions"])[1]
    assert (failed["status"], failed["error"]) == ("error", "server timeout")
    assert json.loads(docs["no_regions"]["regions"]) == []
    assert report.pages == 6 and report.counts["regions"] == 11


def test_title_at_the_top_is_a_level_one_heading():
    regions = [("p", 0, "title", "text", BOX, "Top\nTitle", "ok", "ok", None),
               ("p", 1, "text", "text", BOX, "Body", "ok", "ok", None)]
    table, _ = assemble_documents(*_tables(regions, [("p", "ok", None)]))
    assert table.column("markdown").to_pylist() == ["# Top Title\n\nBody"]
