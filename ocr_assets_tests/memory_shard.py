"""A Shard (``ocr_assets.sources.base``) over pages held in memory, for the stages' tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ocr_assets.image_header import ImageHeaderError, read_header
from ocr_assets.sources.base import DatasetError, PageInfo, Pixels


class MemoryShard:
    """Source rows of pages given in memory: a row is a list of pages, or one page alone.

    A page is encoded bytes (its size read from the header), a BGR uint8 array (a rendered page),
    None (no bytes) or an Exception (a page the source cannot read). Every ``read_pages`` call is
    recorded in ``reads``.
    """

    def __init__(self, rows: Sequence, key: str = "mem", ids: Sequence[str | None] | None = None,
                 id_column: str | None = None) -> None:
        self.key = key
        self.rows = [list(row) if isinstance(row, list) else [row] for row in rows]
        self.num_rows = len(self.rows)
        self.content = "memory"
        self.ids = ids
        self.id_column = id_column or ("id" if ids is not None else None)
        self.reads: list[list[tuple[int, int]]] = []
        self.closed = False

    def row_ids(self) -> list[str]:
        if self.ids is None:
            return [f"{self.key}/{row}" for row in range(self.num_rows)]
        ids = [f"{self.key}/{row}" if v is None else v for row, v in enumerate(self.ids)]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"OCR_ASSETS_ID_COLUMN={self.id_column!r}: a repeated id")
        return ids

    def page_infos(self) -> Iterator[list[PageInfo]]:
        for row, pages in enumerate(self.rows):
            if not pages:
                yield [PageInfo(row, 0, error="the row holds no page")]
                continue
            yield [self._info(row, page, data) for page, data in enumerate(pages)]

    @staticmethod
    def _info(row: int, page: int, data) -> PageInfo:
        if data is None:
            return PageInfo(row, page, error="no image bytes (null)")
        if isinstance(data, Exception):
            return PageInfo(row, page, error=str(data))
        if isinstance(data, np.ndarray):
            return PageInfo(row, page, "pdf", data.shape[1], data.shape[0], data.nbytes)
        try:
            fmt, width, height = read_header(data)
        except ImageHeaderError as exc:
            return PageInfo(row, page, exc.format, nbytes=len(data), error=str(exc))
        return PageInfo(row, page, fmt, width, height, len(data))

    def read_pages(self, pages: Sequence[tuple[int, int]]) -> list[Pixels | Exception]:
        self.reads.append(list(pages))
        out: list[Pixels | Exception] = []
        for row, page in pages:
            try:
                data = self.rows[row][page]
            except IndexError:
                out.append(IndexError(f"no page {page} in row {row}"))
                continue
            out.append(ValueError("no image bytes") if data is None else data)
        return out

    def close(self) -> None:
        self.closed = True
