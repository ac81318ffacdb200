"""The `pages` stage: one row per page of every source row, with its format and size, nothing decoded.

The shard says which pages each source row holds and their sizes, read from image headers and
PDF page boxes (``Shard.page_infos``), so a shard of tens of thousands of pages takes seconds.
Rows are streamed: the table is written in batches as the shard is read.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from ocr_assets.config import ENV_ID_COLUMN, max_pixels
from ocr_assets.imaging import ImageDecodeError, check_pixels
from ocr_assets.schemas import PAGES
from ocr_assets.sources.base import DatasetError, PageInfo, Shard
from ocr_assets.stages.output import Sink, StageOutput
from ocr_assets.timing import StageReport, timed_stage

BATCH_PAGES = 8192  # pages per table handed to the sink


def page_id(row_id: str, page: int, pages_in_row: int) -> str:
    """A page's id: its row's id for a row of one page, ``<row id>/<page>`` for a page of a longer row."""
    return row_id if pages_in_row == 1 else f"{row_id}/{page}"


def _duplicate(page: str, first: tuple[int, int], then: tuple[int, int], id_column: str | None,
               shard: str) -> DatasetError:
    where = f"row {first[0]} page {first[1]} and row {then[0]} page {then[1]}"
    fix = (f"Set {ENV_ID_COLUMN} to a column whose values cannot be taken for another row's "
           f"<id>/<page> (or unset it: ids are then <shard>/<row>)" if id_column else
           f"Set {ENV_ID_COLUMN} to a column with one value per source row")
    return DatasetError(f"the page id {page!r} is given to {where} of shard {shard!r} "
                        f"({ENV_ID_COLUMN}={id_column!r}); page ids must be unique. {fix}")


def _batch_table(shard: Shard, cols: dict[str, list]) -> pa.Table:
    return pa.table({
        "page_id": pa.array(cols["page_id"], pa.string()),
        "shard": pa.array([shard.key] * len(cols["page_id"]), pa.string()),
        "row": pa.array(cols["row"], pa.int64()),
        "page": pa.array(cols["page"], pa.int32()),
        "format": pa.array(cols["format"], pa.string()),
        "width": pa.array(cols["width"], pa.int32()),
        "height": pa.array(cols["height"], pa.int32()),
        "nbytes": pa.array(cols["nbytes"], pa.int64()),
        "status": pa.array(cols["status"], pa.string()),
        "error": pa.array(cols["error"], pa.string()),
    }, schema=PAGES)


def extract_pages(
    shard: Shard, *, sink: Sink | None = None, report: StageReport | None = None, batch_pages: int = BATCH_PAGES,
) -> tuple[pa.Table | None, StageReport]:
    """The `pages` rows of one shard (schema ``PAGES``): one per page of every source row, in order.

    ``page_id`` is the row's id (``Shard.row_ids``) for a row of one page and ``<row id>/<page>``
    for each page of a row of several; a page id given twice (an id column value ``a/0`` beside a
    two-page row ``a``) raises DatasetError naming OCR_ASSETS_ID_COLUMN. A page the shard could not
    read (``PageInfo.error``), or of more pixels than OCR_ASSETS_MAX_PIXELS, is a ``status="error"``
    row with the reason, its format and size kept where known; it never stops the shard.

    With a ``sink``, tables of at most ``batch_pages`` rows go to it in order and the table
    returned is None; without one, the whole table is returned.
    """
    report = report if report is not None else StageReport()
    out = StageOutput(sink, PAGES)
    names = ("page_id", "row", "page", "format", "width", "height", "nbytes", "status", "error")
    cols: dict[str, list] = {name: [] for name in names}
    formats: Counter[str] = Counter()
    seen: dict[str, tuple[int, int]] = {}
    cap = max_pixels()
    pages = ok = rows = multi = 0

    def flush() -> None:
        if cols["page_id"]:
            with report.part("table"):
                out.write(_batch_table(shard, cols))
            for values in cols.values():
                values.clear()

    with timed_stage(report):
        row_ids = shard.row_ids()
        infos_of_rows = iter(shard.page_infos())
        while True:
            with report.part("header"):  # the shard reads headers and page boxes as it is iterated
                infos: list[PageInfo] | None = next(infos_of_rows, None)
            if infos is None:
                break
            if not infos:
                raise RuntimeError(f"shard {shard.key!r} gave no page for source row {rows}: a bug in the source")
            row = infos[0].row
            if row != rows or any(info.row != row for info in infos):
                raise RuntimeError(f"shard {shard.key!r} gave the pages of row {row} where row {rows} was due: "
                                   f"a bug in the source")
            rows += 1
            multi += len(infos) > 1
            for info in infos:
                pid = page_id(row_ids[row], info.page, len(infos))
                if pid in seen:
                    raise _duplicate(pid, seen[pid], (row, info.page), shard.id_column, shard.key)
                seen[pid] = (row, info.page)
                error = info.error
                if error is None:
                    if info.width is None or info.height is None:
                        error = "the page's size could not be read"
                    else:
                        try:
                            check_pixels(info.width, info.height, cap)
                        except ImageDecodeError as exc:
                            error = str(exc)
                for name, value in (("page_id", pid), ("row", row), ("page", info.page),
                                    ("format", info.format), ("width", info.width), ("height", info.height),
                                    ("nbytes", info.nbytes), ("error", error)):
                    cols[name].append(value)
                cols["status"].append("ok" if error is None else "error")
                pages += 1
                if error is None:
                    ok += 1
                    formats[info.format or "unknown"] += 1
                if len(cols["page_id"]) >= batch_pages:
                    flush()
        if rows != shard.num_rows:
            raise RuntimeError(f"shard {shard.key!r} has {shard.num_rows} source rows but gave the pages of "
                               f"{rows}: a bug in the source")
        flush()
    report.pages = pages
    report.count("source_rows", rows)
    report.count("multi_page_rows", multi)
    report.count("pages", pages)
    report.count("ok", ok)
    report.count("errors", pages - ok)
    for fmt, count in sorted(formats.items()):
        report.count(f"format_{fmt}", count)
    return out.result(), report

