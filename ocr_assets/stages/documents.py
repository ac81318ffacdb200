"""The documents stage: one Markdown page per source row, from its regions in reading order.

Markdown rules (kept simple on purpose):

- ``doc_title`` regions, and a ``title`` region that is the page's first region, are ``# `` headings;
  every other label in ``config.TITLE_LABELS`` is a ``## `` heading.
- text regions are paragraphs; tables are what the recognizer returned (HTML from a VLM,
  ``cell | cell`` rows from the local recognizer); formulas are wrapped in ``$$ … $$``.
- ``skip`` regions (figures, charts) become a placeholder naming their box:
  ``![figure](page_id#x0,y0,x1,y1)``.
- blocks are separated by blank lines; regions without text add nothing.

Page status: ``error`` when the page failed as a whole (pages status error, or a page-error row
at layout/crops/recognition) or when every region with a task to read failed; ``empty`` when no
region has text; ``partial`` when some regions failed; else ``ok``. ``error`` joins the distinct
reasons with "; ".
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets.config import TITLE_LABELS
from ocr_assets.schemas import DOCUMENTS, PAGE_ERROR_REGION
from ocr_assets.timing import StageReport, timed_stage


def _regions_joined(layout: pa.Table, recognition: pa.Table) -> pa.Table:
    """Layout rows joined with their recognition rows on (page_id, region), sorted by page then region."""
    left = layout.select(
        ["page_id", "region", "label", "task", "x0", "y0", "x1", "y1", "source", "status", "error"]
    ).rename_columns(
        ["page_id", "region", "label", "task", "x0", "y0", "x1", "y1", "source", "l_status", "l_error"]
    )
    right = recognition.select(["page_id", "region", "text", "status", "error"]).rename_columns(
        ["page_id", "region", "text", "r_status", "r_error"]
    )
    joined = left.join(right, keys=["page_id", "region"], join_type="full outer")
    return joined.sort_by([("page_id", "ascending"), ("region", "ascending")])


def _block(label: str, task: str, text: str, box: list, page_id: str, first: bool) -> str | None:
    """The Markdown block of one region, or None when it adds nothing."""
    if task == "skip":
        return f"![{label or 'figure'}]({page_id}#{','.join(str(v) for v in box)})"
    text = (text or "").strip()
    if not text:
        return None
    if label in TITLE_LABELS:
        level = "#" if label == "doc_title" or (label == "title" and first) else "##"
        return f"{level} {' '.join(text.split())}"
    if task == "formula":
        return f"$$\n{text}\n$$"
    return text


def _page(page_id: str, cols: dict[str, list], lo: int, hi: int) -> tuple[str, str, str, list[str]]:
    """(status, markdown, regions JSON, error reasons) of one page from its joined rows lo:hi."""
    blocks, regions, reasons = [], [], []
    page_failed = has_text = region_failed = False
    any_ok = False
    first = True
    for i in range(lo, hi):
        region = cols["region"][i]
        l_status, r_status = cols["l_status"][i], cols["r_status"][i]
        reason = cols["r_error"][i] or cols["l_error"][i]
        if region == PAGE_ERROR_REGION:
            page_failed = True
            reasons.append(reason or "page failed before documents")
            continue
        task, label, text = cols["task"][i], cols["label"][i], cols["text"][i]
        box = [cols["x0"][i], cols["y0"][i], cols["x1"][i], cols["y1"][i]]
        if l_status == "error" or r_status == "error":
            status = "error"
        elif r_status is None:
            status, reason = "error", "no recognition result for this region"
        elif task is None:
            status, reason = "error", "no layout row for this recognition result"
        else:
            status, reason = "ok", None
        if status == "error":
            region_failed = True
            reasons.append(reason or "region failed")
            text = text or ""
        else:
            if task != "skip":
                any_ok = True
            block = _block(label, task, text, box, page_id, first)
            if block is not None:
                blocks.append(block)
                has_text = has_text or task != "skip"
            first = False
        regions.append({
            "region": region, "label": label, "task": task, "box": box, "source": cols["source"][i],
            "text": text or "", "status": status, "error": reason,
        })
    if page_failed or (region_failed and not any_ok and not has_text):
        status = "error"
    elif not has_text:
        status = "empty"
    elif region_failed:
        status = "partial"
    else:
        status = "ok"
    return status, "\n\n".join(blocks), json.dumps(regions, ensure_ascii=False), reasons


def assemble_documents(
    pages: pa.Table,
    layout: pa.Table,
    recognition: pa.Table,
    *,
    report: StageReport | None = None,
) -> tuple[pa.Table, StageReport]:
    """One DOCUMENTS row per PAGES row, in the pages' order, whatever happened to the page upstream.

    Regions are joined and sorted by (page_id, region) in Arrow, then cut into pages by their
    sorted page_id; see the module docstring for the Markdown and status rules.
    """
    report = report or StageReport()
    with timed_stage(report):
        with report.part("join"):
            joined = _regions_joined(layout, recognition)
            cols = {name: joined.column(name).to_pylist() for name in joined.column_names}
            sorted_ids = np.asarray(joined.column("page_id").to_numpy(zero_copy_only=False), dtype=object)
        with report.part("assemble"):
            # Rows are sorted by page_id: each page is one contiguous run.
            n = len(sorted_ids)
            starts = [0, *(np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1).tolist()] if n else []
            ends = [*starts[1:], n]
            bounds = {sorted_ids[lo]: (lo, hi) for lo, hi in zip(starts, ends)}
            out_status, markdowns, region_json, out_error = [], [], [], []
            page_status = pages.column("status").to_pylist()
            page_error = pages.column("error").to_pylist()
            for page_id, p_status, p_error in zip(pages.column("page_id").to_pylist(), page_status, page_error):
                lo, hi = bounds.get(page_id, (0, 0))
                status, markdown, regions, reasons = _page(page_id, cols, lo, hi)
                if p_status == "error":
                    status = "error"
                    reasons.insert(0, p_error or "page failed at extraction")
                out_status.append(status)
                markdowns.append(markdown)
                region_json.append(regions)
                out_error.append("; ".join(dict.fromkeys(reasons)) or None)
                report.count(status)
        table = pa.table(
            {
                "page_id": pages.column("page_id"),
                "shard": pages.column("shard"),
                "row": pages.column("row"),
                "status": pa.array(out_status, pa.string()),
                "markdown": pa.array(markdowns, pa.string()),
                "regions": pa.array(region_json, pa.string()),
                "error": pa.array(out_error, pa.string()),
            },
            schema=DOCUMENTS,
        )
        report.pages = pages.num_rows
        report.count("regions", int(pc.sum(pc.greater_equal(joined.column("region"), 0)).as_py() or 0))
    return table, report
