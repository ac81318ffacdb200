"""Dataset sources: find a dataset's shards and open one as a ``Shard`` of source rows and their pages.

Layouts read (local paths or fsspec URLs; one folder may mix them):

- a ``datasets`` ``save_to_disk`` folder (``data-00000-of-00002.arrow``, ``state.json``, ...);
- a folder of ``.arrow`` files as the ``datasets`` cache writes them, possibly nested;
- a folder of ``.parquet`` shards as on the hub (``data/train-00000-of-00002.parquet``);
- a folder of WebDataset ``.tar`` shards as on the hub (a compressed ``.tar.gz`` is listed, and
  refused when opened with a message saying to decompress it).

Which column holds the pages: ``columns``; how a row's content becomes pages: ``content``; the
``Shard`` every layout shares: ``rows`` (interface in ``base``).
"""

from __future__ import annotations

import hashlib
import posixpath
import re

from ocr_assets import config
from ocr_assets.config import ENV_DATASET
from ocr_assets.sources.arrow import ParquetShard, arrow_row_count, open_arrow, parquet_row_count
from ocr_assets.sources.base import DatasetError, PageInfo, Pixels, Shard, ShardKind, ShardRef
from ocr_assets.sources.content import PageReader, PageReadError
from ocr_assets.sources.files import PathReader, filesystem, full_path, is_local
from ocr_assets.sources.webdataset import COMPRESSED_SUFFIXES, TarShard, refuse_compressed, tar_row_count

__all__ = [
    "DatasetError", "PageInfo", "PageReadError", "Pixels", "Shard", "ShardKind", "ShardRef", "list_shards",
    "open_shard", "shard_key", "source_row_count",
]

# Longest first: "x.tar.gz" is a (compressed) tar, not a ".gz" file.
_SUFFIXES: dict[str, ShardKind] = {
    ".tar.gz": "webdataset", ".tgz": "webdataset", ".arrow": "arrow", ".parquet": "parquet", ".tar": "webdataset",
}
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def _suffix(name: str) -> str | None:
    return next((s for s in _SUFFIXES if name.endswith(s)), None)


def shard_key(relative_path: str) -> str:
    """Partition key of a shard file, from its path relative to the dataset folder alone.

    The path without its extension (``.arrow``, ``.parquet``, ``.tar``, ``.tar.gz``), folders
    joined by ``__``; a leading ``data/`` folder (the hub's layout) is left out, so
    ``data-00000-of-00002.arrow`` and ``data/train-00000-of-00002.parquet`` keep their stems as keys.
    Only ``[A-Za-z0-9._-]`` remain (never a comma or a path separator) and the key never starts
    with a dot; where sanitising changed a character, a short hash of the path is appended so that
    two paths never share a key. No other file of the dataset takes part: a key never changes when
    files are added.
    """
    parts = [p for p in relative_path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        return "shard"
    stem = parts[-1]
    suffix = _suffix(stem)
    if suffix:
        stem = stem[: -len(suffix)]
    words = [*parts[:-1], stem]
    if len(words) > 1 and words[0] == "data":
        words = words[1:]
    raw = "__".join(words)
    key = "__".join(_UNSAFE_KEY_CHARS.sub("_", w) for w in words)
    key = "_" + key[1:] if key.startswith(".") else key
    if key != raw or any("__" in w for w in words):  # keep keys of different paths apart
        key = f"{key}-{hashlib.sha1('/'.join(parts).encode()).hexdigest()[:8]}"
    return key or "shard"


def _is_data_file(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    if any(part.startswith((".", "_")) for part in relative.split("/")):
        return False  # hidden files, _SUCCESS markers, .cache folders
    # ``cache-<fingerprint>.arrow`` are results of ``Dataset.map``: derived data, not shards.
    return _suffix(name) is not None and not name.startswith("cache-")


def list_shards(dataset: str) -> list[ShardRef]:
    """Every ``.arrow`` / ``.parquet`` / ``.tar`` (and ``.tar.gz``) shard under ``dataset`` (a path
    or fsspec URL), sorted by path. Keys come from each file's path relative to ``dataset`` alone
    (``shard_key``). A path to a single shard file gives that one shard.
    """
    fs, root = filesystem(dataset)
    if fs.isfile(root):
        suffix = _suffix(posixpath.basename(root))
        if suffix is None:
            raise DatasetError(f"{ENV_DATASET}={dataset!r} is a file but not a .arrow, .parquet or .tar shard")
        return [ShardRef(shard_key(posixpath.basename(root)), full_path(fs, root), _SUFFIXES[suffix])]
    if not fs.isdir(root):
        raise DatasetError(f"{ENV_DATASET}={dataset!r}: no such folder; set {ENV_DATASET} to a dataset folder")
    files = sorted(fs.find(root))
    relatives = [posixpath.relpath(f, root) for f in files]
    data = [(rel, f) for rel, f in zip(relatives, files) if _is_data_file(rel)]
    if not data:
        seen = ", ".join(relatives[:10]) or "nothing"
        raise DatasetError(
            f"{ENV_DATASET}={dataset!r} holds no .arrow, .parquet or .tar shards (found: {seen}); set "
            f"{ENV_DATASET} to a save_to_disk folder or a folder of .arrow/.parquet/WebDataset .tar shards"
        )
    refs = [ShardRef(shard_key(rel), full_path(fs, path), _SUFFIXES[_suffix(rel)]) for rel, path in data]
    seen: dict[str, str] = {}
    for ref, (rel, _) in zip(refs, data):
        if ref.key in seen:  # "a/b.arrow" and "a__b.arrow": refuse rather than mix two shards
            raise DatasetError(
                f"{ENV_DATASET}={dataset!r}: the shards {seen[ref.key]!r} and {rel!r} both have the "
                f"partition key {ref.key!r}; rename one of them"
            )
        seen[ref.key] = rel
    return refs


def _find_ref(dataset: str, key: str) -> ShardRef:
    refs = list_shards(dataset)
    ref = next((r for r in refs if r.key == key), None)
    if ref is None:
        known = ", ".join(r.key for r in refs[:10]) + (", ..." if len(refs) > 10 else "")
        raise DatasetError(f"no shard {key!r} in {ENV_DATASET}={dataset!r}; its shards: {known}")
    return ref


def _located(dataset: str, ref: ShardRef):
    fs, root = filesystem(dataset)
    path = ref.path if is_local(fs) else fs._strip_protocol(ref.path)
    return fs, root, path


def source_row_count(dataset: str, key: str) -> int:
    """Source rows of shard ``key`` as its file declares them (a tar: its samples), read apart from
    ``open_shard``: what the ``every_source_row`` checks compare the stage tables with."""
    ref = _find_ref(dataset, key)
    fs, _, path = _located(dataset, ref)
    if ref.kind == "parquet":
        return parquet_row_count(fs, path)
    if ref.kind == "webdataset":
        if path.endswith(COMPRESSED_SUFFIXES):
            refuse_compressed(key, ref.path)
        return tar_row_count(fs, path)
    return arrow_row_count(fs, path)


def open_shard(dataset: str, key: str, image_column: str | None = None, id_column: str | None = None) -> Shard:
    """Open the shard ``key`` of ``dataset`` (see ``base.Shard``); close it when done.

    ``image_column`` / ``id_column`` come from ``OCR_ASSETS_IMAGE_COLUMN`` / ``OCR_ASSETS_ID_COLUMN``;
    without an image column the content column is chosen from the dataset's features, the Arrow
    type, then the bytes' magic numbers (``columns``). A WebDataset sample's content is its image
    or PDF member (``image_column`` may name an extension, as webdataset names a sample's fields),
    and its ``.json`` member's fields are the columns ``id_column`` may name. PDF
    pages are sized and rendered at OCR_ASSETS_PDF_DPI.
    """
    ref = _find_ref(dataset, key)
    fs, root, path = _located(dataset, ref)
    if fs.isfile(root):
        root = posixpath.dirname(root)
    reader = PageReader(PathReader(fs, root).read, config.pdf_dpi())
    if ref.kind == "webdataset":
        if path.endswith(COMPRESSED_SUFFIXES):
            refuse_compressed(key, ref.path)
        return TarShard(key, fs, path, image_column, id_column, reader)
    if ref.kind == "parquet":
        return ParquetShard(key, fs, path, image_column, id_column, reader)
    return open_arrow(fs, path, key, image_column, id_column, reader)
