"""The dataset source: find a dataset's shards and read each page's encoded bytes as stored.

Three layouts are read (local paths or fsspec URLs):

- a ``datasets`` ``save_to_disk`` folder (``data-00000-of-00002.arrow``, ``state.json``, ...);
- a folder of ``.arrow`` files as the ``datasets`` cache writes them, possibly nested;
- a folder of ``.parquet`` shards as on the hub (``data/train-00000-of-00002.parquet``).

Local ``.arrow`` files (IPC stream or file format) are memory-mapped, and ``Shard.image_at``
returns a ``memoryview`` slice of the Arrow data buffer: no copy and no decode per page.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from typing import Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ocr_assets.config import ENV_DATASET, ENV_ID_COLUMN, ENV_IMAGE_COLUMN

ShardKind = Literal["arrow", "parquet"]

_SUFFIXES: dict[str, ShardKind] = {".arrow": "arrow", ".parquet": "parquet"}
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_ARROW_FILE_MAGIC = b"ARROW1"


class DatasetError(ValueError):
    """The dataset, a shard or a configured column cannot be used; the message names the setting."""


@dataclass(frozen=True)
class ShardRef:
    """One shard file: its partition ``key``, its full ``path`` (URL for remote data) and its ``kind``."""

    key: str
    path: str
    kind: ShardKind


def shard_key(relative_path: str) -> str:
    """Partition key of a shard file, from its path relative to the dataset folder alone.

    The path without its extension, folders joined by ``__``; a leading ``data/`` folder (the
    hub's layout) is left out, so ``data-00000-of-00002.arrow`` and
    ``data/train-00000-of-00002.parquet`` keep their stems as keys. Only ``[A-Za-z0-9._-]`` remain
    (never a comma or a path separator) and the key never starts with a dot; where sanitising
    changed a character, a short hash of the path is appended so that two paths never share a
    key. No other file of the dataset takes part: a key never changes when files are added.
    """
    parts = [p for p in relative_path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        return "shard"
    stem = parts[-1]
    for suffix in _SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    words = [*parts[:-1], stem]
    if len(words) > 1 and words[0] == "data":
        words = words[1:]
    raw = "__".join(words)
    key = "__".join(_UNSAFE_KEY_CHARS.sub("_", w) for w in words)
    key = "_" + key[1:] if key.startswith(".") else key
    if key != raw or any("__" in w for w in words):  # keep keys of different paths apart
        key = f"{key}-{hashlib.sha1('/'.join(parts).encode()).hexdigest()[:8]}"
    return key or "shard"


def _filesystem(dataset: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(dataset)
    return fs, root.rstrip("/") or "/"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _full_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_data_file(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    if any(part.startswith((".", "_")) for part in relative.split("/")):
        return False  # hidden files, _SUCCESS markers, .cache folders
    # ``cache-<fingerprint>.arrow`` are results of ``Dataset.map``: derived data, not shards.
    return posixpath.splitext(name)[1] in _SUFFIXES and not name.startswith("cache-")


def list_shards(dataset: str) -> list[ShardRef]:
    """Every ``.arrow`` / ``.parquet`` shard under ``dataset`` (a path or fsspec URL), sorted by path.

    Keys come from each file's path relative to ``dataset`` alone (``shard_key``). A path to a
    single shard file gives that one shard.
    """
    fs, root = _filesystem(dataset)
    if fs.isfile(root):
        kind = _SUFFIXES.get(posixpath.splitext(root)[1])
        if kind is None:
            raise DatasetError(f"{ENV_DATASET}={dataset!r} is a file but not a .arrow or .parquet shard")
        return [ShardRef(shard_key(posixpath.basename(root)), _full_path(fs, root), kind)]
    if not fs.isdir(root):
        raise DatasetError(f"{ENV_DATASET}={dataset!r}: no such folder; set {ENV_DATASET} to a dataset folder")
    files = sorted(fs.find(root))
    relatives = [posixpath.relpath(f, root) for f in files]
    data = [(rel, f) for rel, f in zip(relatives, files) if _is_data_file(rel)]
    if not data:
        seen = ", ".join(relatives[:10]) or "nothing"
        raise DatasetError(
            f"{ENV_DATASET}={dataset!r} holds no .arrow or .parquet shards (found: {seen}); "
            f"set {ENV_DATASET} to a save_to_disk folder or a folder of .arrow/.parquet shards"
        )
    refs = [ShardRef(shard_key(rel), _full_path(fs, path), _SUFFIXES[posixpath.splitext(rel)[1]])
            for rel, path in data]
    seen: dict[str, str] = {}
    for ref, (rel, _) in zip(refs, data):
        if ref.key in seen:  # "a/b.arrow" and "a__b.arrow": refuse rather than mix two shards
            raise DatasetError(
                f"{ENV_DATASET}={dataset!r}: the shards {seen[ref.key]!r} and {rel!r} both have the "
                f"partition key {ref.key!r}; rename one of them"
            )
        seen[ref.key] = rel
    return refs


def _is_image_struct(type_: pa.DataType) -> bool:
    if not pa.types.is_struct(type_):
        return False
    index = type_.get_field_index("bytes")
    return index >= 0 and _is_binary(type_.field(index).type)


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_binary_view(type_)


def _columns_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _pick_columns(
    schema: pa.Schema, key: str, image_column: str | None, id_column: str | None
) -> tuple[str, str | None]:
    if image_column:
        if image_column not in schema.names:
            raise DatasetError(
                f"shard {key!r} has no column {image_column!r} ({ENV_IMAGE_COLUMN}); "
                f"its columns: {_columns_text(schema)}"
            )
        type_ = schema.field(image_column).type
        if not (_is_image_struct(type_) or _is_binary(type_)):
            raise DatasetError(
                f"column {image_column!r} ({ENV_IMAGE_COLUMN}) of shard {key!r} is {type_}, not image bytes; "
                f"its columns: {_columns_text(schema)}"
            )
    else:
        found = [f.name for f in schema if _is_image_struct(f.type)]
        if not found:
            raise DatasetError(
                f"shard {key!r} has no image column (a struct with a binary 'bytes' field); "
                f"set {ENV_IMAGE_COLUMN} to the column that holds the images; its columns: {_columns_text(schema)}"
            )
        image_column = found[0]
    if id_column and id_column not in schema.names:
        raise DatasetError(
            f"shard {key!r} has no column {id_column!r} ({ENV_ID_COLUMN}); its columns: {_columns_text(schema)}"
        )
    return image_column, id_column or None


def _read_arrow_table(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    if _is_local(fs):
        source = pa.memory_map(path, "r")  # buffers read below point into this mapping
    else:
        source = pa.BufferReader(pa.py_buffer(fs.cat_file(path)))  # one download, then zero copy
    magic = source.read(len(_ARROW_FILE_MAGIC))
    source.seek(0)
    if magic == _ARROW_FILE_MAGIC:
        return pa.ipc.open_file(source).read_all()
    return pa.ipc.open_stream(source).read_all()


def _read_schema(fs: fsspec.AbstractFileSystem, ref: ShardRef) -> pa.Schema | None:
    if ref.kind != "parquet":
        return None  # reading an IPC table is a zero-copy map anyway
    if _is_local(fs):
        return pq.read_schema(ref.path)
    with fs.open(ref.path, "rb") as f:
        return pq.read_schema(f)


class Shard:
    """One shard opened for reading: row count, ids, and each row's encoded image bytes as stored.

    ``images`` is a ``pa.ChunkedArray`` of (large) binary: the ``bytes`` child of the image column,
    one chunk per record batch, with the image struct's nulls merged in (no data copied).
    """

    def __init__(
        self,
        key: str,
        table: pa.Table,
        image_column: str,
        id_column: str | None = None,
        fs: fsspec.AbstractFileSystem | None = None,
        root: str | None = None,
    ) -> None:
        self.key = key
        self.table = table
        self.image_column = image_column
        self.id_column = id_column
        self.num_rows = table.num_rows
        self._fs, self._root = fs, root
        chunks, paths = [], []
        for chunk in table.column(image_column).chunks:
            if pa.types.is_struct(chunk.type):
                fields = chunk.flatten()  # children with the struct's nulls merged; data buffers shared
                chunks.append(fields[chunk.type.get_field_index("bytes")])
                index = chunk.type.get_field_index("path")
                paths.append(fields[index] if index >= 0 else None)
            else:
                chunks.append(chunk)
                paths.append(None)
        if chunks and pa.types.is_binary_view(chunks[0].type):
            chunks = [c.cast(pa.large_binary()) for c in chunks]  # views have no offsets buffer
        type_ = chunks[0].type if chunks else pa.binary()
        self.images = pa.chunked_array(chunks, type_)
        self._paths = paths
        self._starts = np.cumsum([0] + [len(c) for c in chunks])
        self._views = [_chunk_view(c) for c in chunks]
        self.ids: list[str] | None = None
        if id_column is not None:
            ids = pc.cast(table.column(id_column), pa.string()).to_pylist()
            self.ids = [f"{key}/{row}" if v is None else v for row, v in enumerate(ids)]

    def page_ids(self) -> list[str]:
        """Page id of every row: the id column where configured (null ids fall back), else ``<shard>/<row>``.

        Raises DatasetError naming OCR_ASSETS_ID_COLUMN and the first repeated value when two rows
        share an id: every later stage finds a page by its id, so a shared one would mix pages.
        """
        if self.ids is None:
            return [f"{self.key}/{row}" for row in range(self.num_rows)]
        first_row: dict[str, int] = {}
        for row, page_id in enumerate(self.ids):
            if page_id in first_row:
                raise DatasetError(
                    f"{ENV_ID_COLUMN}={self.id_column!r}: the id {page_id!r} is in rows {first_row[page_id]} "
                    f"and {row} of shard {self.key!r}; page ids must be unique. Set {ENV_ID_COLUMN} to a "
                    f"column with one value per page, or unset it (ids are then <shard>/<row>)"
                )
            first_row[page_id] = row
        return list(self.ids)

    def image_at(self, row: int) -> memoryview | None:
        """Encoded bytes of ``row`` as stored, a zero-copy slice of the Arrow buffer; None when null.

        A row stored only by path (bytes null) is read from that path, taken relative to the dataset
        folder unless absolute; None when that file does not exist.
        """
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} out of range for shard {self.key!r} with {self.num_rows} rows")
        chunk = 0 if len(self._views) == 1 else int(np.searchsorted(self._starts, row, side="right")) - 1
        valid, offsets, data = self._views[chunk]
        local = row - int(self._starts[chunk])
        if valid is not None and not valid[local]:
            return self._read_path(chunk, local)
        return data[offsets[local]:offsets[local + 1]]

    def _read_path(self, chunk: int, local: int) -> memoryview | None:
        paths = self._paths[chunk]
        path = paths[local].as_py() if paths is not None else None
        if not path or self._fs is None:
            return None
        fs = self._fs
        candidates = [path] if posixpath.isabs(path) else []
        if self._root is not None:
            candidates.append(posixpath.join(self._root, path))
        for candidate in candidates:
            try:
                if fs.isfile(candidate):
                    return memoryview(fs.cat_file(candidate))
            except (OSError, ValueError):
                continue
        return None


def _chunk_view(array: pa.Array) -> tuple[list[bool] | None, list[int], memoryview]:
    """Validity, offsets (as lists: fastest to index per row) and a view of the data buffer of a binary array."""
    if len(array) == 0:
        return None, [0], memoryview(b"")
    _, offsets_buf, data_buf = array.buffers()
    dtype = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=dtype, count=len(array) + 1, offset=array.offset * dtype().itemsize)
    valid = array.is_valid().to_pylist() if array.null_count else None
    data = memoryview(data_buf).cast("B") if data_buf is not None else memoryview(b"")
    return valid, offsets.tolist(), data


def _find_ref(dataset: str, key: str) -> ShardRef:
    refs = list_shards(dataset)
    ref = next((r for r in refs if r.key == key), None)
    if ref is None:
        known = ", ".join(r.key for r in refs[:10]) + (", ..." if len(refs) > 10 else "")
        raise DatasetError(f"no shard {key!r} in {ENV_DATASET}={dataset!r}; its shards: {known}")
    return ref


def source_row_count(dataset: str, key: str) -> int:
    """Rows of shard ``key`` as its file declares them, read apart from ``open_shard``: what the
    ``every_source_row`` checks compare the stage tables with."""
    ref = _find_ref(dataset, key)
    fs, _ = _filesystem(dataset)
    path = ref.path if _is_local(fs) else fs._strip_protocol(ref.path)
    if ref.kind == "parquet":
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    # memory-mapped where local: the batches' bodies (the images) are mapped, never read
    with (pa.memory_map(path, "r") if _is_local(fs) else pa.PythonFile(fs.open(path, "rb"), mode="r")) as source:
        magic = source.read(len(_ARROW_FILE_MAGIC))
        source.seek(0)
        if magic == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            return sum(reader.get_record_batch(i).num_rows for i in range(reader.num_record_batches))
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def open_shard(
    dataset: str, key: str, image_column: str | None = None, id_column: str | None = None
) -> Shard:
    """Open the shard ``key`` of ``dataset`` reading only its image (and id) columns.

    ``image_column`` / ``id_column`` come from ``OCR_ASSETS_IMAGE_COLUMN`` / ``OCR_ASSETS_ID_COLUMN``;
    without an image column the first ``datasets`` ``Image`` column (a struct with ``bytes``) is used.
    """
    ref = _find_ref(dataset, key)
    fs, root = _filesystem(dataset)
    if fs.isfile(root):
        root = posixpath.dirname(root)
    schema = _read_schema(fs, ref)
    if ref.kind == "arrow":
        table = _read_arrow_table(fs, ref.path)
        schema = table.schema
    image_column, id_column = _pick_columns(schema, key, image_column, id_column)
    columns = [image_column] + ([id_column] if id_column and id_column != image_column else [])
    if ref.kind == "parquet":
        if _is_local(fs):
            table = pq.read_table(ref.path, columns=columns, memory_map=True)
        else:
            table = pq.read_table(fs._strip_protocol(ref.path), columns=columns, filesystem=fs)
    else:
        table = table.select(columns)
    return Shard(key, table, image_column, id_column, fs=fs, root=root)
