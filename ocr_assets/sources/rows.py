"""The ``Shard`` every layout shares: pages streamed window by window, PDF pages rendered in a pool.

A layout says how its rows come in windows (a run of consecutive source rows held at once: a
slice of a record batch, a Parquet batch, a run of tar samples) and what each row stores
(``RowContent``); this class does the rest of the ``Shard`` interface (``base.Shard``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ocr_assets.config import ENV_ID_COLUMN
from ocr_assets.sources.base import DatasetError, PageInfo, Pixels
from ocr_assets.sources.content import Page, PageReader, PageReadError, RowContent, decode_frame
from ocr_assets.sources.pdf import PdfRenderer

WINDOW_ROWS = 64  # source rows held at once: a window of large PDFs stays a few hundred MB at most


@dataclass
class Window:
    """Source rows ``start`` .. ``start + len(contents)``; ``span``: the mapped file bytes they point into."""

    start: int
    contents: list[RowContent]
    span: tuple[int, int] | None = None

    @property
    def stop(self) -> int:
        return self.start + len(self.contents)


class RowShard:
    """One shard opened for reading (``base.Shard``), over a layout's windows of rows."""

    _default_ids = "<shard>/<row>"  # what ids are without an id column, for messages

    def __init__(self, key: str, num_rows: int, content: str, id_column: str | None, reader: PageReader) -> None:
        self.key = key
        self.num_rows = num_rows
        self.content = content
        self.id_column = id_column
        self._reader = reader
        self._renderer = None  # the PDF rendering pool, started on the first PDF page read
        self._window: Window | None = None  # the window read_pages works in, with its rows' pages
        self._window_pages: dict[int, list[Page]] = {}

    # What a layout provides.
    def _windows(self) -> Iterator[Window]:
        """Every window, in order."""
        raise NotImplementedError

    def _window_at(self, row: int) -> Window:
        """The window holding ``row``."""
        raise NotImplementedError

    def _release(self, window: Window) -> None:
        """Done with ``window``: let go of what reading it brought into memory."""

    def _ids(self) -> list[str | None] | None:
        """The id column's values (None where null), or None without an id column."""
        return None

    def _default_id(self, row: int) -> str:
        return f"{self.key}/{row}"

    def _close(self) -> None:
        """Release the layout's files and mappings."""

    # The Shard interface.
    def row_ids(self) -> list[str]:
        """Id of every source row (see ``base.Shard.row_ids``); DatasetError on a repeated id."""
        ids = self._ids()
        if ids is None:
            return [self._default_id(row) for row in range(self.num_rows)]
        ids = [self._default_id(row) if v is None else v for row, v in enumerate(ids)]
        first_row: dict[str, int] = {}
        for row, row_id in enumerate(ids):
            if row_id in first_row:
                raise DatasetError(
                    f"{ENV_ID_COLUMN}={self.id_column!r}: the id {row_id!r} is in rows {first_row[row_id]} "
                    f"and {row} of shard {self.key!r}; ids must be unique. Set {ENV_ID_COLUMN} to a "
                    f"column with one value per row, or unset it (ids are then {self._default_ids})"
                )
            first_row[row_id] = row
        return ids

    def page_infos(self) -> Iterator[list[PageInfo]]:
        """The pages of every source row, in order (see ``base.Shard.page_infos``)."""
        for window in self._windows():
            try:
                for offset, content in enumerate(window.contents):
                    yield [page.info for page in self._expand(window.start + offset, content)]
            finally:
                self._release(window)

    def read_pages(self, pages: Sequence[tuple[int, int]]) -> list[Pixels | Exception]:
        """Pixels of each (row, page), in order (see ``base.Shard.read_pages``). The rows' windows
        are visited in turn; a PDF page is rendered once however often the batch names it."""
        results: list[Pixels | Exception | None] = [None] * len(pages)
        first: dict[tuple[int, int], int] = {}
        pdf_jobs, pdf_positions = [], []
        for position, (row, page) in enumerate(pages):
            if (row, page) in first:
                continue
            first[(row, page)] = position
            if not 0 <= row < self.num_rows:
                raise IndexError(f"row {row} out of range for shard {self.key!r} with {self.num_rows} rows")
            row_pages = self._pages_of(row)
            if not 0 <= page < len(row_pages):
                results[position] = PageReadError(f"row {row} of shard {self.key!r} has {len(row_pages)} pages, "
                                                  f"not a page {page}")
                continue
            found = row_pages[page]
            if found.kind == "error":
                results[position] = PageReadError(found.info.error)
            elif found.kind == "bytes":
                results[position] = found.data
            elif found.kind == "frame":
                try:
                    results[position] = decode_frame(found.data, found.index)
                except Exception as exc:  # one frame's fault
                    results[position] = PageReadError(f"frame {found.index} of the TIFF could not be decoded: {exc}")
            else:
                pdf_jobs.append(((row, found.item), found.data, found.index))
                pdf_positions.append(position)
        for position, pixels in zip(pdf_positions, self._render(pdf_jobs)):
            results[position] = pixels
        return [results[first[(row, page)]] for row, page in pages]

    def close(self) -> None:
        """Stop the rendering pool and release files and mappings."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._window is not None:
            self._release(self._window)
        self._window, self._window_pages = None, {}
        self._close()

    def __enter__(self) -> "RowShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _expand(self, row: int, content: RowContent) -> list[Page]:
        try:
            return self._reader.expand(row, content)
        except Exception as exc:  # never let one row stop the shard
            return [Page(PageInfo(row, 0, error=f"could not read the row: {type(exc).__name__}: {exc}"), "error")]

    def _pages_of(self, row: int) -> list[Page]:
        window = self._window
        if window is None or not window.start <= row < window.stop:
            if window is not None:
                self._release(window)
            window = self._window = self._window_at(row)
            self._window_pages = {}
        if row not in self._window_pages:
            self._window_pages[row] = self._expand(row, window.contents[row - window.start])
        return self._window_pages[row]

    def _render(self, jobs: list) -> list[Pixels | Exception]:
        if not jobs:
            return []
        try:
            if self._renderer is None:
                self._renderer = PdfRenderer(dpi=self._reader.dpi)
            return self._renderer.render(jobs)  # one page's or one document's fault comes back as a value
        except Exception as exc:  # the pool itself cannot run: every PDF page would fail the same way
            if self._renderer is not None:
                try:
                    self._renderer.close()
                finally:
                    self._renderer = None
            raise RuntimeError(
                f"the PDF renderer of shard {self.key!r} could not run ({type(exc).__name__}: {exc}); it needs "
                f"/dev/shm or TMPDIR writable and room to start one process per core"
            ) from exc
