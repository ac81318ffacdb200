"""The `pages` stage: one row per source row with the image's format and size, read from its header.

Nothing is decoded here: each row's stored bytes are a zero-copy view (``Shard.image_at``) and
only the header is parsed, so a shard of tens of thousands of pages takes about a second.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from ocr_assets.dataset import Shard
from ocr_assets.config import max_pixels
from ocr_assets.image_header import ImageHeaderError, read_header
from ocr_assets.imaging import ImageDecodeError, check_pixels
from ocr_assets.schemas import PAGES
from ocr_assets.timing import StageReport, timed_stage


def extract_pages(shard: Shard) -> tuple[pa.Table, StageReport]:
    """The `pages` table of one shard (schema ``PAGES``) and its report.

    A row whose bytes are null, empty, not an image, with an unreadable header or declaring more
    pixels than OCR_ASSETS_MAX_PIXELS becomes a ``status="error"`` row with the reason (format
    and size kept where the header gave them); it never stops the shard.
    """
    report = StageReport()
    with timed_stage(report):
        n = shard.num_rows
        formats: list[str | None] = [None] * n
        widths = np.zeros(n, dtype=np.int32)
        heights = np.zeros(n, dtype=np.int32)
        nbytes: list[int | None] = [None] * n
        errors: list[str | None] = [None] * n
        ok = np.zeros(n, dtype=bool)
        column = shard.image_column
        image_at = shard.image_at
        cap = max_pixels()
        with report.part("header"):
            for row in range(n):
                try:
                    data = image_at(row)
                    if data is None:
                        errors[row] = f"no image bytes (null in column {column!r})"
                        continue
                    nbytes[row] = len(data)
                    fmt, width, height = read_header(data)
                    formats[row], widths[row], heights[row] = fmt, width, height
                    check_pixels(width, height, cap)
                except ImageHeaderError as exc:
                    formats[row] = exc.format
                    errors[row] = str(exc)
                    continue
                except ImageDecodeError as exc:  # too many pixels
                    errors[row] = str(exc)
                    continue
                except Exception as exc:  # a row that cannot be read must not stop the shard
                    errors[row] = f"could not read the image: {type(exc).__name__}: {exc}"
                    continue
                ok[row] = True
        with report.part("table"):
            no_size = widths == 0  # no header read; an oversized page keeps the size it declared
            table = pa.table(
                {
                    "page_id": pa.array(shard.page_ids(), pa.string()),
                    "shard": pa.array([shard.key] * n, pa.string()),
                    "row": pa.array(np.arange(n, dtype=np.int64)),
                    "format": pa.array(formats, pa.string()),
                    "width": pa.array(widths, pa.int32(), mask=no_size),
                    "height": pa.array(heights, pa.int32(), mask=no_size),
                    "nbytes": pa.array(nbytes, pa.int64()),
                    "status": pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
                    "error": pa.array(errors, pa.string()),
                },
                schema=PAGES,
            )
        n_ok = int(ok.sum())
        report.pages = n
        report.count("pages", n)
        report.count("ok", n_ok)
        report.count("errors", n - n_ok)
        for fmt, count in sorted(Counter(f for f, good in zip(formats, ok.tolist()) if good).items()):
            report.count(f"format_{fmt}", count)
    return table, report
