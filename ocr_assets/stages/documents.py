"""The documents stage: one Markdown document per source row, from its pages' regions in reading order.

Markdown rules (kept simple on purpose):

- ``doc_title`` regions, and a ``title`` region that is the page's first region, are ``# `` headings;
  every other label in ``config.TITLE_LABELS`` is a ``## `` heading.
- text regions are paragraphs; tables are what the recognizer returned (HTML from a VLM,
  ``cell | cell`` rows from the local recognizer); formulas are wrapped in ``$$ … $$``.
- ``skip`` regions (figures, charts) become a placeholder naming their page and box:
  ``![figure](page_id#x0,y0,x1,y1)``.
- blocks are separated by blank lines; regions without text add nothing.
- the pages of a row follow each other in ``page`` order, each after a ``<!-- page N -->`` line
  (N its ``page`` index; none before the first page); ``page_markdown`` keeps each page's own.

Page status: ``error`` when the page failed as a whole (pages status error, or a page-error row
at layout/crops/recognition) or when every region with a task to read failed; ``empty`` when no
region has text; ``partial`` when some regions failed; else ``ok``. An ``ok`` page whose
confidence is below ``OCR_ASSETS_MIN_PAGE_CONFIDENCE`` is ``suspect`` instead (its text may be
mostly wrong); a ``partial`` one stays ``partial`` (work left undone says more); both get the
``low_confidence`` flag and the reason in the row's ``error``.

Page confidence: the mean of its read regions' confidences, weighted by their characters (regions
without a confidence left out); null when nothing was read or no region has one (a recognizer
that gives none: such a page is never suspect). A row's confidence weighs its pages the same way.
Page flags (sorted): ``rotated`` (layout ``rotation`` != 0), ``skewed`` (``skew`` != 0),
``figure_text`` (a region with ``source`` "figure"), ``low_confidence`` (below the threshold);
absent or null layout columns count as 0. A row's ``flags`` are the union of its pages'.

Row status, over its pages: ``ok`` when some page has text and none failed (empty pages among
them are fine); ``empty`` when no page has text and none failed; ``partial`` when some page
failed (or had regions fail, suspect or not) but text was read; ``error`` when failures left
nothing read; else ``suspect`` when some read page is suspect. So error and partial are
stronger than suspect (work was left undone: run again), and suspect is stronger than ok.
``error`` joins the distinct reasons with "; ", each prefixed with its pages (``page 3: …``)
in a multi-page row.

Layout and recognition are read once, as record batches, in the pages' order (the order the
stages upstream write them); only one page's rows are held at a time, and documents are handed
out in row order as they are made (`page_rows.PageRows`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets import config
from ocr_assets.backends.recognition.base import text_weight, weighted_confidence
from ocr_assets.config import TITLE_LABELS
from ocr_assets.schemas import DOCUMENTS, PAGE_ERROR_REGION
from ocr_assets.stages.output import Sink, StageOutput
from ocr_assets.stages.page_rows import PageRows, Rows
from ocr_assets.timing import StageReport, timed_stage


# Documents per table handed to the sink (a few MB of Markdown).
DOCUMENT_ROWS = 256

# columns read; those after the first ones may be absent from older partitions (read as null)
LAYOUT_COLUMNS = ["page_id", "region", "label", "task", "x0", "y0", "x1", "y1", "source", "status", "error",
                  "rotation", "skew"]
RECOGNITION_COLUMNS = ["page_id", "region", "text", "status", "error", "confidence"]
STATUSES = ("ok", "partial", "empty", "suspect", "error")
FLAGS = (config.FLAG_ROTATED, config.FLAG_SKEWED, config.FLAG_FIGURE_TEXT, config.FLAG_LOW_CONFIDENCE)


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


@dataclass
class _Page:
    """What one page contributes to its row's document."""

    status: str
    markdown: str
    regions: list[dict]
    reasons: list[str]
    confidence: float | None = None
    weight: int = 0  # characters read with a confidence: the page's weight in its row's confidence
    flags: list[str] = field(default_factory=list)
    region_failed: bool = False


def _page(page_id: str, page: int, layout: list[tuple], recognition: list[tuple], threshold: float) -> _Page:
    """One page from its layout and recognition rows; ``threshold``: OCR_ASSETS_MIN_PAGE_CONFIDENCE."""
    by_layout = {row[1]: row for row in layout}
    by_recognition = {row[1]: row for row in recognition}
    blocks, regions, reasons, scored = [], [], [], []
    page_failed = has_text = region_failed = any_ok = False
    first = True
    for region in sorted(by_layout.keys() | by_recognition.keys()):
        lay = by_layout.get(region)
        rec = by_recognition.get(region)
        l_status, l_error = (lay[9], lay[10]) if lay else (None, None)
        text, r_status, r_error, confidence = (rec[2], rec[3], rec[4], rec[5]) if rec else (None, None, None, None)
        reason = r_error or l_error
        if region == PAGE_ERROR_REGION:
            page_failed = True
            reasons.append(reason or "page failed before documents")
            continue
        label, task, box, source = (lay[2], lay[3], list(lay[4:8]), lay[8]) if lay else (None, None, [None] * 4, None)
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
            confidence = None
        else:
            if task != "skip":
                any_ok = True
                scored.append((confidence, text_weight(text)))
            block = _block(label, task, text, box, page_id, first)
            if block is not None:
                blocks.append(block)
                has_text = has_text or task != "skip"
            first = False
        regions.append({
            "page": page, "region": region, "label": label, "task": task, "box": box, "source": source,
            "text": text or "", "confidence": None if confidence is None else round(float(confidence), 4),
            "status": status, "error": reason,
        })
    if page_failed or (region_failed and not any_ok and not has_text):
        status = "error"
    elif not has_text:
        status = "empty"
    elif region_failed:
        status = "partial"
    else:
        status = "ok"
    confidence = weighted_confidence(scored) if has_text else None
    flags = _layout_flags(layout)
    if confidence is not None and confidence < threshold:
        flags.add(config.FLAG_LOW_CONFIDENCE)
        reasons.append(_suspect_reason(confidence, threshold))
        if status == "ok":  # a partial page stays partial: work left undone says more than doubt
            status = "suspect"
    return _Page(status, "\n\n".join(blocks), regions, reasons, confidence,
                 sum(w for c, w in scored if c is not None) if confidence is not None else 0, sorted(flags),
                 region_failed)


def _layout_flags(layout: list[tuple]) -> set[str]:
    """rotated, skewed, figure_text as the page's layout rows say (absent or null: 0)."""
    flags = set()
    for row in layout:
        if row[11]:
            flags.add(config.FLAG_ROTATED)
        if row[12]:
            flags.add(config.FLAG_SKEWED)
        if row[8] == config.SOURCE_FIGURE:
            flags.add(config.FLAG_FIGURE_TEXT)
    return flags


def _suspect_reason(confidence: float, threshold: float) -> str:
    return (f"confidence {confidence:.2f} is below {config.ENV_MIN_PAGE_CONFIDENCE}={threshold:g}: the text may be "
            f"mostly wrong (a page upside down, blurred or noisy?); check the page's image, or lower "
            f"{config.ENV_MIN_PAGE_CONFIDENCE} if such pages read well")


def _row_status(pages: list[_Page]) -> str:
    """A source row's status over its pages (see the module docstring)."""
    failed = any(p.status in ("error", "partial") or p.region_failed for p in pages)
    read = any(p.status in ("ok", "partial", "suspect") for p in pages)
    if read:
        if failed:
            return "partial"
        return "suspect" if any(p.status == "suspect" for p in pages) else "ok"
    return "error" if failed else "empty"


def _page_list(pages: list[int]) -> str:
    """``page 3``, or ``pages 0-2, 5`` (runs of consecutive pages as ranges)."""
    spans: list[list[int]] = []
    for page in pages:
        if spans and page == spans[-1][1] + 1:
            spans[-1][1] = page
        else:
            spans.append([page, page])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"page {text}" if len(pages) == 1 else f"pages {text}"


def _row_error(reasons: list[tuple[int, list[str]]], multi_page: bool) -> str | None:
    """The distinct reasons of a row, each prefixed with the pages it happened on in a multi-page row."""
    if not multi_page:
        return "; ".join(dict.fromkeys(r for _, page_reasons in reasons for r in page_reasons)) or None
    pages_of: dict[str, list[int]] = {}
    for page, page_reasons in reasons:
        for reason in dict.fromkeys(page_reasons):
            pages_of.setdefault(reason, []).append(page)
    return "; ".join(f"{_page_list(pages)}: {reason}" for reason, pages in pages_of.items()) or None


def _row_id(page_ids: list[str], pages: list[int]) -> str:
    """The source row's id: its page's id, or the first page's id less its ``/<page>``."""
    if len(page_ids) == 1:
        return page_ids[0]
    suffix = f"/{pages[0]}"
    return page_ids[0][: -len(suffix)] if page_ids[0].endswith(suffix) else page_ids[0]


def _sorted_pages(pages: pa.Table) -> dict[str, list]:
    """The pages table's columns as lists, in (row, page) order."""
    page = pages.column("page").fill_null(0) if "page" in pages.column_names else pa.array([0] * pages.num_rows,
                                                                                                pa.int32())
    keys = pa.table({"row": pages.column("row"), "page": page})
    order = pc.sort_indices(keys, sort_keys=[("row", "ascending"), ("page", "ascending")])
    cols = {name: pages.column(name).take(order).to_pylist() for name in ("page_id", "shard", "row", "status",
                                                                         "error")}
    cols["page"] = page.take(order).to_pylist()
    return cols


def assemble_documents(
    pages: pa.Table,
    layout: Rows,
    recognition: Rows,
    *,
    report: StageReport | None = None,
    sink: Sink | None = None,
) -> tuple[pa.Table | None, StageReport]:
    """One DOCUMENTS row per source row, in row order, whatever happened to its pages upstream.

    ``pages`` is the PAGES table (one row per page); ``layout`` and ``recognition`` are tables or
    iterables of record batches, in the pages' order as their stages write them (only their text
    columns are read). Every page reaches its row's document. With ``sink``, documents are handed
    to it in row order, in tables of ``DOCUMENT_ROWS``, and None is returned in place of the table.
    Raises RuntimeError when layout or recognition rows are out of the pages' order (a stale or
    foreign partition), ValueError when OCR_ASSETS_MIN_PAGE_CONFIDENCE is not a number in [0, 1].
    Counts: one per document status, documents, regions, suspect_pages, confident_pages (pages with
    a confidence), ``pages_<flag>`` for each flag; ``report.pages``; info: ``mean_confidence`` (over
    the partition's pages, weighted by characters; 0.0 when no page has one, so the key is always
    there for Dagster to plot; ``confident_pages`` tells the two apart).
    See the module docstring for the Markdown and status rules.
    """
    report = report or StageReport()
    output = StageOutput(sink, DOCUMENTS)
    with timed_stage(report):
        threshold = config.min_page_confidence()
        # every key in every partition, so Dagster plots them all
        for name in ("documents", "regions", "suspect_pages", "confident_pages", *(f"pages_{f}" for f in FLAGS),
                     *STATUSES):
            report.counts.setdefault(name, 0)
        scored = [0.0, 0]  # sum of page confidence x characters, characters: the partition's mean confidence
        cols = _sorted_pages(pages)
        position = {page_id: i for i, page_id in enumerate(cols["page_id"])}
        regions_of = PageRows("layout", layout, position, LAYOUT_COLUMNS)
        texts_of = PageRows("recognition", recognition, position, RECOGNITION_COLUMNS)
        out: dict[str, list] = {name: [] for name in DOCUMENTS.names}

        def flush() -> None:
            if out["page_id"]:
                output.write(pa.table(out, schema=DOCUMENTS))
                for values in out.values():
                    values.clear()

        n = len(cols["page_id"])
        lo = 0
        while lo < n:
            hi = lo + 1
            while hi < n and cols["row"][hi] == cols["row"][lo]:
                hi += 1
            row_pages: list[_Page] = []
            blocks, regions, reasons = [], [], []
            for i in range(lo, hi):
                page_id, page = cols["page_id"][i], cols["page"][i]
                with report.part("join"):
                    layout_rows, recognition_rows = regions_of.take(page_id, i), texts_of.take(page_id, i)
                with report.part("assemble"):
                    one = _page(page_id, page, layout_rows, recognition_rows, threshold)
                    if cols["status"][i] == "error":
                        one.status = "error"
                        one.reasons.insert(0, cols["error"][i] or "page failed at extraction")
                    report.count("regions", sum(r["region"] >= 0 for r in one.regions))
                    _count_page(report, one, scored)
                    row_pages.append(one)
                    if i > lo:
                        blocks.append(f"<!-- page {page} -->")
                    if one.markdown:
                        blocks.append(one.markdown)
                    regions.extend(one.regions)
                    reasons.append((page, one.reasons))
            with report.part("assemble"):
                status = _row_status(row_pages)
                out["page_id"].append(_row_id(cols["page_id"][lo:hi], cols["page"][lo:hi]))
                out["shard"].append(cols["shard"][lo])
                out["row"].append(cols["row"][lo])
                out["pages"].append(hi - lo)
                out["status"].append(status)
                out["markdown"].append("\n\n".join(blocks))
                out["page_markdown"].append([p.markdown for p in row_pages])
                out["page_status"].append([p.status for p in row_pages])
                out["confidence"].append(weighted_confidence((p.confidence, p.weight) for p in row_pages))
                out["page_confidence"].append([p.confidence for p in row_pages])
                out["flags"].append(sorted({flag for p in row_pages for flag in p.flags}))
                out["page_flags"].append([p.flags for p in row_pages])
                out["regions"].append(json.dumps(regions, ensure_ascii=False))
                out["error"].append(_row_error(reasons, hi - lo > 1))
                report.count(status)
                report.count("documents")
                if len(out["page_id"]) >= DOCUMENT_ROWS:
                    flush()
            lo = hi
        with report.part("join"):
            last = cols["page_id"][-1] if n else ""
            regions_of.drain(last)
            texts_of.drain(last)
        flush()
        report.pages = n
        report.info["mean_confidence"] = round(scored[0] / scored[1], 4) if scored[1] else 0.0
    return output.result(), report


def _count_page(report: StageReport, page: _Page, scored: list) -> None:
    """Count a page's status and flags, and add it to the partition's mean confidence."""
    if page.status == "suspect":
        report.count("suspect_pages")
    for flag in page.flags:
        report.count(f"pages_{flag}")
    if page.confidence is not None and page.weight:
        scored[0] += page.confidence * page.weight
        scored[1] += page.weight
        report.count("confident_pages")
