"""Arrow IPC and Parquet shards: the ``datasets`` save_to_disk folders and cache, the hub's Parquet.

Local ``.arrow`` files (IPC stream or file format) are memory-mapped: a page's bytes are a
zero-copy slice of the mapping, and the pages a window touched are dropped from memory once it is
passed. Remote ``.arrow`` files are copied to a local temporary file first (an IPC stream has no
index to seek by). Parquet is read a batch of rows at a time, within its row groups, with ranged
reads where remote.
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ocr_assets.sources.base import DatasetError
from ocr_assets.sources.columns import ContentColumn, check_id_column, choose_content, id_strings
from ocr_assets.sources.content import Item, PageReader, RowContent
from ocr_assets.sources.files import MappedFile, is_local
from ocr_assets.sources.rows import WINDOW_ROWS, RowShard, Window

_ARROW_FILE_MAGIC = b"ARROW1"


def row_contents(array: pa.Array, column: ContentColumn, mapped: MappedFile | None = None
                 ) -> tuple[list[RowContent], tuple[int, int] | None]:
    """What each row of a content column's array stores, and the span of ``mapped`` it points into.

    Bytes are zero-copy views of the Arrow buffers (of the mapping, for a mapped IPC file).
    """
    name = column.name
    lengths = None
    values = array
    if column.is_list:
        lengths = pc.list_value_length(array).to_pylist()  # None for a null list
        values = array.flatten()  # honours the slice, skips what null lists point at
    items, span = _items(values, column.claim, mapped)
    if lengths is None:
        null = f"no image or PDF (null in column {name!r})"
        return [null if item is None else (item,) for item in items], span
    contents: list[RowContent] = []
    at = 0
    for length in lengths:
        if length is None:
            contents.append(f"no pages (the list in column {name!r} is null)")
        elif length == 0:
            contents.append(f"the list in column {name!r} is empty: the row holds no pages")
        else:
            contents.append(tuple(f"element {k} of the list in column {name!r} is null" if item is None else item
                                  for k, item in enumerate(items[at:at + length])))
        at += length or 0
    return contents, span


def _items(values: pa.Array, claim: str | None, mapped: MappedFile | None
           ) -> tuple[list[Item | None], tuple[int, int] | None]:
    paths = None
    if pa.types.is_struct(values.type):
        fields = values.flatten()  # children with the struct's nulls merged in; data buffers shared
        binary = fields[values.type.get_field_index("bytes")]
        index = values.type.get_field_index("path")
        paths = fields[index].to_pylist() if index >= 0 else None
    else:
        binary = values
    if pa.types.is_binary_view(binary.type):
        binary = binary.cast(pa.large_binary())  # views have no offsets buffer
    valid, offsets, data, address = _binary_views(binary)
    items: list[Item | None] = []
    for i in range(len(binary)):
        if valid is None or valid[i]:
            items.append(Item(data[offsets[i]:offsets[i + 1]], None, claim))
        elif paths is not None and paths[i]:
            items.append(Item(None, paths[i], claim))
        else:
            items.append(None)
    span = None
    if mapped is not None and address is not None and len(binary):
        start = mapped.offset_of(address + offsets[0])
        stop = mapped.offset_of(address + offsets[-1])
        span = (start, stop) if start is not None and stop is not None else None
    return items, span


def _binary_views(array: pa.Array) -> tuple[list[bool] | None, list[int], memoryview, int | None]:
    """Validity, offsets (lists: fastest to index per row), a view of the data buffer and its address."""
    if len(array) == 0:
        return None, [0], memoryview(b""), None
    _, offsets_buf, data_buf = array.buffers()
    dtype = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=dtype, count=len(array) + 1, offset=array.offset * dtype().itemsize)
    valid = array.is_valid().to_pylist() if array.null_count else None
    if data_buf is None:
        return valid, offsets.tolist(), memoryview(b""), None
    return valid, offsets.tolist(), memoryview(data_buf).cast("B"), data_buf.address


def _first_rows(batches: list[pa.RecordBatch], name: str) -> pa.Array | None:
    for batch in batches:
        if batch.num_rows:
            return batch.column(name).slice(0, WINDOW_ROWS)
    return None


class ArrowShard(RowShard):
    """A local Arrow IPC shard (stream or file format), memory-mapped; see ``base.Shard``."""

    def __init__(self, key: str, path: str, image_column: str | None, id_column: str | None,
                 reader: PageReader, temporary: str | None = None) -> None:
        self._temporary = temporary
        try:
            self._mapped = MappedFile(path)
        except (OSError, ValueError) as exc:
            self._remove_temporary()
            raise DatasetError(f"shard {key!r} ({path}) cannot be read: {exc}") from exc
        try:
            schema, batches = _read_batches(self._mapped)
            self.column = choose_content(schema, key, image_column, lambda name: _first_rows(batches, name))
            id_column = check_id_column(schema, key, id_column)
        except pa.ArrowException as exc:
            self._close()
            raise DatasetError(f"shard {key!r} ({path}) is not a readable Arrow IPC file: {exc}") from exc
        except DatasetError:
            self._close()
            raise
        names = [self.column.name] + ([id_column] if id_column and id_column != self.column.name else [])
        self._batches = [b.select(names) for b in batches]
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches]).tolist()
        super().__init__(key, self._starts[-1], self.column.name, id_column, reader)

    def _window_in(self, batch: int, first: int) -> Window:
        array = self._batches[batch].column(0).slice(first, WINDOW_ROWS)
        contents, span = row_contents(array, self.column, self._mapped)
        return Window(self._starts[batch] + first, contents, span)

    def _windows(self) -> Iterator[Window]:
        for batch, record_batch in enumerate(self._batches):
            for first in range(0, record_batch.num_rows, WINDOW_ROWS):
                yield self._window_in(batch, first)

    def _window_at(self, row: int) -> Window:
        batch = bisect.bisect_right(self._starts, row) - 1  # the last batch starting at or before row: never empty
        local = row - self._starts[batch]
        return self._window_in(batch, local - local % WINDOW_ROWS)

    def _release(self, window: Window) -> None:
        if window.span is not None:
            self._mapped.release(*window.span)

    def _ids(self) -> list[str | None] | None:
        if self.id_column is None:
            return None
        chunks = [b.column(self.id_column) for b in self._batches]
        return id_strings(pa.chunked_array(chunks, self._batches[0].schema.field(self.id_column).type)
                          if chunks else pa.array([], pa.string()), self.id_column, self.key)

    def _close(self) -> None:
        self._batches = []
        if getattr(self, "_mapped", None) is not None:
            self._mapped.close()
            self._mapped = None
        self._remove_temporary()

    def _remove_temporary(self) -> None:
        if self._temporary is not None:
            try:
                os.unlink(self._temporary)
            except OSError:
                pass
            self._temporary = None


def _read_batches(mapped: MappedFile) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """The schema and every record batch of a mapped IPC file: their bodies stay in the mapping."""
    source = pa.BufferReader(mapped.buffer)
    if bytes(mapped.view[:len(_ARROW_FILE_MAGIC)]) == _ARROW_FILE_MAGIC:
        reader = pa.ipc.open_file(source)
        return reader.schema, [reader.get_batch(i) for i in range(reader.num_record_batches)]
    reader = pa.ipc.open_stream(source)
    return reader.schema, list(reader)


def open_arrow(fs: fsspec.AbstractFileSystem, path: str, key: str, image_column: str | None,
               id_column: str | None, reader: PageReader) -> ArrowShard:
    """Open an ``.arrow`` shard; a remote one is first copied to a local temporary file."""
    if is_local(fs):
        return ArrowShard(key, path, image_column, id_column, reader)
    handle, temporary = tempfile.mkstemp(prefix=f"ocr-assets-{key[:40]}-", suffix=".arrow")
    try:
        with os.fdopen(handle, "wb") as out, fs.open(path, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 22)
    except Exception:
        os.unlink(temporary)
        raise
    return ArrowShard(key, temporary, image_column, id_column, reader, temporary=temporary)


def arrow_row_count(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Rows of an ``.arrow`` file as its batches declare them (memory-mapped where local)."""
    with (pa.memory_map(path, "r") if is_local(fs) else pa.PythonFile(fs.open(path, "rb"), mode="r")) as source:
        magic = source.read(len(_ARROW_FILE_MAGIC))
        source.seek(0)
        if magic == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            return sum(reader.get_record_batch(i).num_rows for i in range(reader.num_record_batches))
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


class ParquetShard(RowShard):
    """A Parquet shard, read a batch of rows at a time within its row groups; see ``base.Shard``."""

    def __init__(self, key: str, fs: fsspec.AbstractFileSystem, path: str, image_column: str | None,
                 id_column: str | None, reader: PageReader) -> None:
        self._file = pa.OSFile(path, "rb") if is_local(fs) else fs.open(path, "rb")
        try:
            self._parquet = pq.ParquetFile(self._file)
            schema = self._parquet.schema_arrow
            self.column = choose_content(schema, key, image_column, self._first_rows)
            id_column = check_id_column(schema, key, id_column)
        except pa.ArrowException as exc:
            self._file.close()
            raise DatasetError(f"shard {key!r} ({path}) is not a readable Parquet file: {exc}") from exc
        except DatasetError:
            self._file.close()
            raise
        metadata = self._parquet.metadata
        self._starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
                                 ).tolist()
        self._cursor: tuple[int, Iterator[pa.RecordBatch], Window | None] | None = None
        super().__init__(key, metadata.num_rows, self.column.name, id_column, reader)

    def _first_rows(self, name: str) -> pa.Array | None:
        for batch in self._parquet.iter_batches(batch_size=WINDOW_ROWS, columns=[name], use_threads=False):
            if batch.num_rows:
                return batch.column(0)
        return None

    def _group_windows(self, group: int) -> Iterator[Window]:
        start = self._starts[group]
        for batch in self._parquet.iter_batches(batch_size=WINDOW_ROWS, row_groups=[group],
                                                columns=[self.column.name], use_threads=False):
            contents, _ = row_contents(batch.column(0), self.column)
            yield Window(start, contents)
            start += batch.num_rows

    def _windows(self) -> Iterator[Window]:
        for group in range(len(self._starts) - 1):
            yield from self._group_windows(group)

    def _window_at(self, row: int) -> Window:
        group = bisect.bisect_right(self._starts, row) - 1
        cursor = self._cursor
        if cursor is None or cursor[0] != group or cursor[2] is None or row < cursor[2].start:
            cursor = (group, self._group_windows(group), None)  # a new row group, or backwards: start over
        number, windows, window = cursor
        while window is None or row >= window.stop:
            window = next(windows)
        self._cursor = (number, windows, window)
        return window

    def _ids(self) -> list[str | None] | None:
        if self.id_column is None:
            return None
        return id_strings(self._parquet.read(columns=[self.id_column]).column(0), self.id_column, self.key)

    def _close(self) -> None:
        self._cursor = None
        self._file.close()


def parquet_row_count(fs: fsspec.AbstractFileSystem, path: str) -> int:
    with (pa.OSFile(path, "rb") if is_local(fs) else fs.open(path, "rb")) as f:
        return pq.ParquetFile(f).metadata.num_rows
