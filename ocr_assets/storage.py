"""Parquet outputs at ``<storage>/<asset>/<partition>.parquet``, written atomically.

A reader never sees a half-written file: each table is written to a temporary name
beside its final path, flushed to disk, then renamed over it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ocr_assets.config import ENV_STORAGE


class StorageError(RuntimeError):
    """The storage location cannot be used."""


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
        fs, _ = self._fs_root
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(tmp, "wb") as handle:
                if isinstance(content, pa.Table):
                    pq.write_table(content, handle, compression="zstd")
                else:
                    handle.write(content)
                if isinstance(fs, LocalFileSystem):
                    handle.flush()
                    os.fsync(handle.fileno())
            if isinstance(fs, LocalFileSystem):
                os.replace(tmp, final)
            else:
                fs.mv(tmp, final)
        except OSError as exc:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise StorageError(
                f"cannot write {final}: {exc}. Set {ENV_STORAGE} to a writable folder or URL."
            ) from exc

    def read(self, asset: str, partition: str, columns: list[str] | None = None) -> pa.Table:
        """Read one asset partition; a clear error if the upstream partition was never written."""
        fs, _ = self._fs_root
        path = self.path(asset, partition)
        if not fs.exists(path):
            raise StorageError(
                f"{asset} has no output for partition {partition!r} at {path}: materialize "
                f"{asset} for this partition first (or check {ENV_STORAGE})."
            )
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)
