"""Parquet outputs at ``<storage>/<asset>/<partition>.parquet``, written atomically.

A reader never sees a half-written file: each file is written to a temporary name beside
its final path, flushed to disk, then renamed over it. A stage's output is written in row
groups as it comes (``ParquetStore.writer``) and read back in record batches
(``ParquetStore.batches``), so neither side holds a whole partition.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ocr_assets.config import ENV_STORAGE


# A row group is written once this many rows or bytes are waiting: small stage batches are
# gathered into row groups a reader can use, and what waits stays bounded.
ROW_GROUP_ROWS = 65_536
ROW_GROUP_BYTES = 64 * 2**20
BATCH_ROWS = 1024  # rows per record batch read back by ``batches``


class StorageError(RuntimeError):
    """The storage location cannot be used."""


def _unwritable(path: str, exc: BaseException) -> StorageError:
    return StorageError(f"cannot write {path}: {exc}. Set {ENV_STORAGE} to a writable folder or URL.")


class PartitionWriter:
    """Writes one partition's rows as Parquet row groups as they come; made by ``ParquetStore.writer``.

    ``write`` takes a table or record batch of the partition's schema (cast to it where the types
    differ only in form, refused where they differ); ``rows`` counts the rows written so far;
    ``uri`` is where the file will be once the writer's block ends without an exception.
    """

    def __init__(self, handle, schema: pa.Schema, path: str, uri: str, row_group_rows: int,
                 row_group_bytes: int) -> None:
        self.schema = schema
        self.uri = uri
        self.rows = 0
        self.row_groups = 0
        self._path = path
        self._row_group_rows = max(1, int(row_group_rows))
        self._row_group_bytes = max(1, int(row_group_bytes))
        self._waiting: list[pa.Table] = []
        self._waiting_rows = self._waiting_bytes = 0
        self._writer = pq.ParquetWriter(handle, schema, compression="zstd")

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        """Add rows; a row group is written once enough rows or bytes wait."""
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        if not table.schema.equals(self.schema, check_metadata=False):
            table = table.cast(self.schema)  # a table of other columns raises here, before anything is written
        if not table.num_rows:
            return
        self._waiting.append(table)
        self._waiting_rows += table.num_rows
        self._waiting_bytes += table.nbytes
        self.rows += table.num_rows
        if self._waiting_rows >= self._row_group_rows or self._waiting_bytes >= self._row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._waiting:
            return
        table = pa.concat_tables(self._waiting)
        self._waiting, self._waiting_rows, self._waiting_bytes = [], 0, 0
        try:
            self._writer.write_table(table, row_group_size=max(self._row_group_rows, table.num_rows))
        except OSError as exc:
            raise _unwritable(self._path, exc) from exc
        self.row_groups += 1

    def abort(self) -> None:
        """Drop what waits and close the Parquet writer (its file is about to be removed)."""
        self._waiting = []
        with contextlib.suppress(Exception):
            self._writer.close()

    def close(self) -> None:
        """Write what waits and the file's footer."""
        self._flush()
        try:
            self._writer.close()
        except OSError as exc:
            raise _unwritable(self._path, exc) from exc


@dataclass(frozen=True)
class ParquetStore:
    """Reads and writes one Parquet file per (asset, partition) under ``root`` (path or fsspec URL)."""

    root: str

    @property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = fsspec.core.url_to_fs(self.root)
        if isinstance(fs, LocalFileSystem):
            path = os.path.abspath(path)
        return fs, path.rstrip("/")

    def path(self, asset: str, partition: str) -> str:
        """The storage path of one asset partition (without the protocol)."""
        _, root = self._fs_root
        return f"{root}/{asset}/{partition}.parquet"

    def uri(self, asset: str, partition: str) -> str:
        """The full URI of one asset partition, as shown in the UI."""
        fs, _ = self._fs_root
        path = self.path(asset, partition)
        return fs.unstrip_protocol(path) if not isinstance(fs, LocalFileSystem) else f"file://{path}"

    def exists(self, asset: str, partition: str) -> bool:
        fs, _ = self._fs_root
        return fs.exists(self.path(asset, partition))

    def write(self, asset: str, partition: str, table: pa.Table) -> str:
        """Write ``table`` atomically; returns the URI."""
        self._write_atomic(self.path(asset, partition), table)
        return self.uri(asset, partition)

    @contextlib.contextmanager
    def writer(
        self, asset: str, partition: str, schema: pa.Schema, *, row_group_rows: int = ROW_GROUP_ROWS,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ) -> Iterator[PartitionWriter]:
        """A ``PartitionWriter`` for one asset partition: row groups go to a temporary file as they
        come; when the block ends, the file is flushed to disk and renamed over the partition's.

        An exception in the block removes the temporary file and leaves the partition's previous
        file as it was. Storage faults raise StorageError naming OCR_ASSETS_STORAGE.
        """
        final = self.path(asset, partition)
        with self._atomic(final) as handle:
            out = PartitionWriter(handle, schema, final, self.uri(asset, partition), row_group_rows,
                                  row_group_bytes)
            try:
                yield out
                out.close()
            except BaseException:
                out.abort()
                raise

    def batches(
        self, asset: str, partition: str, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of one asset partition (``columns`` only, where given), in file order.

        Raises StorageError at once, like ``read``, when the partition was never written.
        """
        fs, _ = self._fs_root
        path = self._existing(asset, partition)

        def iterate() -> Iterator[pa.RecordBatch]:
            with fs.open(path, "rb") as handle:
                # pre_buffer off: a pre-buffered file reads whole row groups of every column ahead
                yield from pq.ParquetFile(handle, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=columns)

        return iterate()

    def num_rows(self, asset: str, partition: str) -> int:
        """Rows of one asset partition, from its file's footer."""
        fs, _ = self._fs_root
        with fs.open(self._existing(asset, partition), "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    def schema(self, asset: str, partition: str) -> pa.Schema:
        """The Arrow schema of one asset partition, from its file's footer."""
        fs, _ = self._fs_root
        with fs.open(self._existing(asset, partition), "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow

    def segment_dir(self, kind: str, partition: str) -> str:
        """Folder of the append-only segments of ``kind`` (e.g. the recognition cache) for a partition."""
        _, root = self._fs_root
        return f"{root}/_{kind}/{partition}"

    def segment_partitions(self, kind: str) -> list[str]:
        """Partitions that have a segment folder of ``kind``, sorted."""
        fs, _ = self._fs_root
        folder = self.segment_dir(kind, "").rstrip("/")
        if not fs.exists(folder):
            return []
        return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(folder, detail=False) if fs.isdir(path))

    def append_segment(self, kind: str, partition: str, table: pa.Table) -> None:
        """Add one segment file atomically: a crash leaves whole segments only, never half of one."""
        self._write_atomic(f"{self.segment_dir(kind, partition)}/{uuid.uuid4().hex}.parquet", table)

    def read_segments(self, kind: str, partition: str) -> pa.Table | None:
        """All segments of ``kind`` for a partition as one table; None when there are none."""
        return self.read_segment_files(self.segment_files(kind, partition))

    def segment_files(self, kind: str, partition: str) -> list[str]:
        """The whole segment files of ``kind`` for a partition (paths without the protocol), sorted."""
        fs, _ = self._fs_root
        folder = self.segment_dir(kind, partition)
        if not fs.exists(folder):
            return []
        return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))

    def read_segment_files(self, paths: list[str]) -> pa.Table | None:
        """The given segment files as one table, in the order given; None when there are none."""
        fs, _ = self._fs_root
        tables = []
        for path in paths:
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle))
        return pa.concat_tables(tables) if tables else None

    def replace_segments(self, kind: str, partition: str, table: pa.Table | None, old: list[str]) -> None:
        """Write ``table`` as one new segment, then delete the ``old`` ones: a crash in between
        leaves both (duplicate rows), never neither. ``table`` None or empty: only delete."""
        if table is not None and table.num_rows:
            self.append_segment(kind, partition, table)
        fs, _ = self._fs_root
        for path in old:
            try:
                fs.rm(path)
            except FileNotFoundError:  # another compaction got there first
                pass

    def write_file(self, kind: str, partition: str, data: bytes, suffix: str) -> str:
        """Write ``<storage>/_<kind>/<partition><suffix>`` atomically (a preview picture); returns the URI."""
        fs, root = self._fs_root
        final = f"{root}/_{kind}/{partition}{suffix}"
        self._write_atomic(final, data)
        return fs.unstrip_protocol(final) if not isinstance(fs, LocalFileSystem) else f"file://{final}"

    def _write_atomic(self, final: str, content: pa.Table | bytes) -> None:
        try:
            with self._atomic(final) as handle:
                if isinstance(content, pa.Table):
                    pq.write_table(content, handle, compression="zstd")
                else:
                    handle.write(content)
        except OSError as exc:
            raise _unwritable(final, exc) from exc

    @contextlib.contextmanager
    def _atomic(self, final: str) -> Iterator:
        """A file handle on a temporary name beside ``final``: when the block ends it is flushed to
        disk (local files) and renamed over ``final``; on an exception it is removed, ``final``
        left as it was. Failing to create, flush or rename raises StorageError."""
        fs, _ = self._fs_root
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        local = isinstance(fs, LocalFileSystem)
        try:
            fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            handle = fs.open(tmp, "wb")
        except OSError as exc:
            raise _unwritable(final, exc) from exc
        try:
            yield handle
            try:
                if local:
                    handle.flush()
                    os.fsync(handle.fileno())
                handle.close()
                if local:
                    os.replace(tmp, final)
                else:
                    fs.mv(tmp, final)
            except OSError as exc:
                raise _unwritable(final, exc) from exc
        except BaseException:
            with contextlib.suppress(Exception):
                handle.close()
            with contextlib.suppress(Exception):
                if fs.exists(tmp):
                    fs.rm(tmp)
            raise

    def _existing(self, asset: str, partition: str) -> str:
        """The path of an asset partition; a clear error if the upstream partition was never written."""
        fs, _ = self._fs_root
        path = self.path(asset, partition)
        if not fs.exists(path):
            raise StorageError(
                f"{asset} has no output for partition {partition!r} at {path}: materialize "
                f"{asset} for this partition first (or check {ENV_STORAGE})."
            )
        return path

    def read(self, asset: str, partition: str, columns: list[str] | None = None) -> pa.Table:
        """Read one asset partition (``columns`` only, where given); StorageError if it was never written."""
        fs, _ = self._fs_root
        with fs.open(self._existing(asset, partition), "rb") as handle:
            return pq.read_table(handle, columns=columns)
