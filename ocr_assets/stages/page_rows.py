"""Layout or recognition rows, taken page by page in the pages table's order, a batch at a time.

The documents stage assembles one page at a time; the stages upstream write their rows in the
pages' order, so each page's rows are one run and only one page's rows are held at once. A
partition out of that order, or with rows of a page the pages table does not hold (made from
another pages output), is an error naming what to materialize again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

Rows = pa.Table | Iterable[pa.RecordBatch]


def _select(data: pa.Table | pa.RecordBatch, columns: list[str]) -> pa.Table | pa.RecordBatch:
    """``columns`` of ``data`` in that order, a column ``data`` lacks as nulls."""
    arrays = [data.column(name) if name in data.schema.names else pa.nulls(data.num_rows) for name in columns]
    if isinstance(data, pa.Table):
        return pa.Table.from_arrays(arrays, names=columns)
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def _in_page_order(data: Rows, position: dict[str, int], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` only; a table out of the pages' order is put in it first (its
    rows are in memory already); RuntimeError for rows of a page the pages table does not hold."""
    if isinstance(data, pa.Table):
        table = _select(data, columns)
        if table.num_rows:
            ids = table.column("page_id").to_pylist()
            positions = pa.array([position.get(page_id) for page_id in ids], pa.int64())
            known = pc.is_valid(positions)
            kept = pc.drop_null(positions)
            ordered = pc.all(pc.greater_equal(kept[1:], kept[:-1])).as_py() is not False  # None: under two rows
            if len(kept) < table.num_rows:
                foreign = table.filter(pc.invert(known)).column("page_id")[0].as_py()
                raise foreign_page(foreign)
            if not ordered:
                table = table.take(pc.sort_indices(kept))
        yield from table.to_batches()
        return
    for batch in data:
        yield _select(batch, columns)


def _runs(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, list[tuple]]]:
    """(page_id, rows) for each run of consecutive rows of one page, across batch boundaries."""
    current: str | None = None
    rows: list[tuple] = []
    for batch in batches:
        for row in zip(*(column.to_pylist() for column in batch.columns)):
            if rows and row[0] != current:
                yield current, rows
                rows = []
            current = row[0]
            rows.append(row)
    if rows:
        yield current, rows


def foreign_page(page_id: str, name: str = "layout or recognition") -> RuntimeError:
    return RuntimeError(
        f"{name} has rows of page {page_id!r}, which the pages table does not hold: it was made from "
        f"another pages output (a changed OCR_ASSETS_ID_COLUMN or dataset); materialize layout, crops "
        f"and recognition again"
    )


class PageRows:
    """The rows of one asset (layout or recognition) for each page, taken in the pages' order."""

    def __init__(self, name: str, data: Rows, position: dict[str, int], columns: list[str]) -> None:
        self.name, self.position = name, position
        self._runs = _runs(_in_page_order(data, position, columns))
        self._head: tuple[str, list[tuple]] | None = None

    def take(self, page_id: str, index: int) -> list[tuple]:
        """Every row of the page at ``index`` of the pages' order (pages are taken in order)."""
        rows: list[tuple] = []
        while True:
            if self._head is None:
                self._head = next(self._runs, None)
                if self._head is None:
                    return rows
            run_id, run = self._head
            at = self.position.get(run_id)
            if at is not None and at > index:  # a later page's rows: kept for it
                return rows
            self._head = None
            if at is None:  # not a page of this shard's pages: made from another pages output
                raise foreign_page(run_id, self.name)
            if at < index:
                raise self._out_of_order(run_id, page_id)
            rows.extend(run)

    def drain(self, last_page_id: str) -> None:
        """Read to the end, so rows of an already assembled page are reported, never lost."""
        for run_id, _ in itertools.chain([self._head] if self._head else [], self._runs):
            if run_id not in self.position:
                raise foreign_page(run_id, self.name)
            raise self._out_of_order(run_id, last_page_id)
        self._head = None

    def _out_of_order(self, run_id: str, later: str) -> RuntimeError:
        return RuntimeError(
            f"{self.name} rows of page {run_id!r} come after those of a later page, {later!r}: the "
            f"{self.name} partition is not in the pages' order; materialize {self.name} again"
        )
