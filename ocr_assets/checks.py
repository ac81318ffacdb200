"""Per-partition data checks: plain functions over the stage tables, reported as Dagster asset checks.

Each returns (passed, metadata). The thresholds come from the environment so operators can
tighten or loosen them without a code change.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets import config
from ocr_assets.schemas import PAGE_ERROR_REGION

DEFAULT_MAX_ERROR_RATE = 0.05  # regions that failed recognition
DEFAULT_MAX_EMPTY_RATE = 0.10  # non-empty crops read as no text
DEFAULT_MAX_PAGE_ERROR_RATE = 0.01  # pages failed, as olmOCR's page error rate gate


def _rate(name: str, default: float) -> float:
    return config.env_number(name, default, float, low=0, high=1)


def _rows_in_shard(rows: pa.ChunkedArray | pa.Array, source_rows: int) -> tuple[int, int]:
    """(distinct row numbers within 0 .. source_rows - 1, table rows whose row number lies outside)."""
    inside = pc.and_(pc.greater_equal(rows, 0), pc.less(rows, source_rows)).fill_null(False)
    kept = rows.filter(inside)
    return (pc.count_distinct(kept).as_py() if len(kept) else 0), len(rows) - len(kept)


def every_source_row_has_pages(pages: pa.Table, source_rows: int) -> tuple[bool, dict]:
    """Every source row of the shard has at least one page row, no page row points outside the
    shard, and no (row, page) is there twice: for the `pages` asset, where a row may hold many pages.

    ``pages`` needs the ``row`` and ``page`` columns only. ``source_rows`` is the shard's row count
    as its file declares it (``sources.source_row_count``), read apart from the table, so a stage
    that loses or repeats rows fails the check.
    """
    distinct, outside = _rows_in_shard(pages.column("row"), source_rows)
    repeated = pages.num_rows - (pages.group_by(["row", "page"]).aggregate([]).num_rows if pages.num_rows else 0)
    gaps = 0  # rows whose pages are not 0 .. n-1 (a page lost inside a row)
    if pages.num_rows:
        per_row = pages.group_by("row").aggregate([("page", "count"), ("page", "min"), ("page", "max")])
        gaps = per_row.num_rows - (pc.sum(pc.and_(
            pc.equal(per_row.column("page_min"), 0),
            pc.equal(pc.add(per_row.column("page_max"), 1), per_row.column("page_count")))).as_py() or 0)
    return distinct == source_rows and outside == 0 and repeated == 0 and gaps == 0, {
        "source_rows": source_rows, "pages": pages.num_rows, "missing_rows": source_rows - distinct,
        "rows_outside_the_shard": outside, "repeated_pages": repeated, "rows_missing_a_page": gaps,
    }


def one_row_per_source_row(table: pa.Table, source_rows: int) -> tuple[bool, dict]:
    """One row per source row of the shard, each row number exactly once: for `documents`.

    ``table`` needs the ``row`` column only; ``source_rows`` as for ``every_source_row_has_pages``.
    """
    distinct, outside = _rows_in_shard(table.column("row"), source_rows)
    return table.num_rows == source_rows == distinct and outside == 0, {
        "source_rows": source_rows, "rows": table.num_rows, "missing_rows": source_rows - distinct,
    }


def _page_error_rate(failed: int, pages: int) -> tuple[bool, dict]:
    limit = _rate(config.ENV_MAX_PAGE_ERROR_RATE, DEFAULT_MAX_PAGE_ERROR_RATE)
    rate = failed / pages if pages else 0.0
    return rate <= limit, {"page_error_rate": round(rate, 4), "failed_pages": failed, "pages": pages,
                           "max_page_error_rate": limit}


def layout_page_error_rate(pages: pa.Table, layout: pa.Table) -> tuple[bool, dict]:
    """Share of the shard's pages (PAGES rows, however many a source row holds) with no layout:
    failed in `pages`, or a page error at `layout`. Reads page_id and status of ``pages``, and
    page_id, region and status of ``layout``."""
    failed = set(pages.filter(pc.equal(pages.column("status"), "error")).column("page_id").to_pylist())
    page_errors = layout.filter(pc.and_(pc.equal(layout.column("region"), PAGE_ERROR_REGION),
                                        pc.equal(layout.column("status"), "error")))
    failed.update(page_errors.column("page_id").to_pylist())
    return _page_error_rate(len(failed), pages.num_rows)


def documents_page_error_rate(documents: pa.Table) -> tuple[bool, dict]:
    """Share of the shard's pages whose status in `documents` is ``error``, over every page of every
    source row (a 100-page PDF counts 100 pages); reads ``page_status``."""
    statuses = pc.list_flatten(documents.column("page_status"))
    failed = pc.sum(pc.equal(statuses, "error")).as_py() or 0
    return _page_error_rate(failed, len(statuses))


def suspect_page_rate(documents: pa.Table) -> tuple[bool, dict]:
    """Share of the shard's pages read with a confidence below OCR_ASSETS_MIN_PAGE_CONFIDENCE (flag
    ``low_confidence``: status ``suspect``, or ``partial`` where a region also failed), under
    OCR_ASSETS_MAX_SUSPECT_PAGE_RATE; reads ``page_flags``."""
    limit = _rate(config.ENV_MAX_SUSPECT_PAGE_RATE, config.DEFAULT_MAX_SUSPECT_PAGE_RATE)
    flags = documents.column("page_flags").to_pylist()
    pages = sum(len(row) for row in flags)
    suspect = sum(config.FLAG_LOW_CONFIDENCE in (page or []) for row in flags for page in row)
    rate = suspect / pages if pages else 0.0
    return rate <= limit, {"suspect_page_rate": round(rate, 4), "suspect_pages": suspect, "pages": pages,
                           "max_suspect_page_rate": limit}


def error_rate(recognition: pa.Table) -> tuple[bool, dict]:
    """Share of regions (failed pages' rows excluded) whose recognition failed, under the threshold."""
    limit = _rate(config.ENV_MAX_ERROR_RATE, DEFAULT_MAX_ERROR_RATE)
    regions = recognition.filter(pc.greater_equal(recognition.column("region"), 0))
    errors = pc.sum(pc.equal(regions.column("status"), "error")).as_py() or 0
    rate = errors / regions.num_rows if regions.num_rows else 0.0
    return rate <= limit, {"error_rate": round(rate, 4), "errors": errors, "regions": regions.num_rows,
                           "max_error_rate": limit}


def empty_text_rate(recognized: int, empty_text: int) -> tuple[bool, dict]:
    """Share of read crops that came back with no text, under the threshold."""
    limit = _rate(config.ENV_MAX_EMPTY_RATE, DEFAULT_MAX_EMPTY_RATE)
    rate = empty_text / recognized if recognized else 0.0
    return rate <= limit, {"empty_text_rate": round(rate, 4), "empty_text": empty_text, "recognized": recognized,
                           "max_empty_text_rate": limit}
