"""The one interface every dataset layout is read through: a ``Shard`` of source rows, each holding pages.

A source row (a dataset row, or a WebDataset sample) holds one page or several (DESIGN.md,
"The page model"). The stages see pages only: ``page_infos`` says which pages each row holds
(with their size, read without decoding or rendering), ``read_pages`` gives their pixels. No
stage knows which layout a page came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, Union

import numpy as np

ShardKind = Literal["arrow", "parquet", "webdataset"]

# A page's pixels as a stage receives them: the encoded image bytes as stored (a zero-copy view
# where the layout allows), or a decoded BGR uint8 array (H, W, 3) where the page has no bytes of
# its own (a rendered PDF page, a frame of a multi-frame TIFF). ``imaging.decode_page`` takes both.
Pixels = Union[memoryview, bytes, np.ndarray]


class DatasetError(ValueError):
    """The dataset, a shard or a configured column cannot be used; the message names the setting."""


@dataclass(frozen=True)
class ShardRef:
    """One shard file: its partition ``key``, its full ``path`` (URL for remote data) and its ``kind``."""

    key: str
    path: str
    kind: ShardKind


@dataclass(frozen=True)
class PageInfo:
    """One page of a source row, as read without decoding: what the ``pages`` stage records.

    ``page`` is the index within its row (0-based). ``format`` is the stored format (``png``,
    ``jpeg``, ``tiff``, ``pdf``, ...), ``width``/``height`` the upright size in pixels the page
    will have when read (a PDF page: its page box at OCR_ASSETS_PDF_DPI, capped), ``nbytes`` the
    size of the stored object the page comes from. ``error`` says why the page (or its whole row:
    then it is the row's only PageInfo, ``page`` 0) cannot be read; the other fields are kept
    where known.
    """

    row: int
    page: int
    format: str | None = None
    width: int | None = None
    height: int | None = None
    nbytes: int | None = None
    error: str | None = None


class Shard(Protocol):
    """One shard opened for reading, whatever its layout."""

    key: str
    num_rows: int  # source rows
    content: str  # what holds the pages, for messages: a column name, or "members .pdf/.png/..."
    id_column: str | None

    def row_ids(self) -> list[str]:
        """Id of every source row: the id column where configured (a null falls back), else the
        layout's default (``<shard>/<row>``; a WebDataset sample's key). Raises DatasetError naming
        OCR_ASSETS_ID_COLUMN and the first repeated value when two rows share an id."""
        ...

    def page_infos(self) -> Iterator[list[PageInfo]]:
        """The pages of every source row, row by row in order (row 0, 1, ...), never an empty list.

        Streams: reads the shard in record batches, never the whole shard at once. A row that
        cannot be read at all gives one PageInfo with its error; it never stops the shard.
        """
        ...

    def read_pages(self, pages: Sequence[tuple[int, int]]) -> list[Pixels | Exception]:
        """Pixels of each (row, page), in the order given; an exception (with a reason a user can
        act on) for a page that cannot be read. PDF pages of the batch are rendered in parallel,
        each once. Never raises for one page's fault."""
        ...

    def close(self) -> None:
        """Release worker processes, mappings and open files."""
        ...
