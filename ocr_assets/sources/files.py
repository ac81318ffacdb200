"""Files under a dataset folder: fsspec access, memory maps that give back what was read, paths of rows."""

from __future__ import annotations

import mmap
import os
import posixpath

import fsspec
import pyarrow as pa

_FOLIO_MARGIN = 4 << 20


def filesystem(dataset: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of a dataset path or fsspec URL, and the path on it without a trailing slash."""
    fs, root = fsspec.core.url_to_fs(dataset)
    return fs, root.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def full_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as ``ShardRef.path`` holds it: plain where local, a URL elsewhere."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


class MappedFile:
    """A local file mapped read-only, whose touched pages can be dropped from this process's memory.

    Reading mapped bytes brings their pages into the process's resident set, where they stay until
    unmapped: ``release`` drops a byte range (``MADV_DONTNEED``: a file-backed page is read again
    from the page cache if it is touched later), so a walk over a large shard keeps only what it
    is working on resident.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            self._file.close()
            raise ValueError(f"{path!r} is empty")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.view = memoryview(self._map)
        self.buffer = pa.py_buffer(self._map)  # Arrow readers slice it without copying
        self.address = self.buffer.address

    def offset_of(self, address: int) -> int | None:
        """The file offset of a memory address inside the mapping, else None."""
        offset = address - self.address
        return offset if 0 <= offset <= self.size else None

    def release(self, start: int, stop: int) -> None:
        """Drop the resident pages of bytes [start, stop), and of the few MiB before ``start``."""
        if not hasattr(self._map, "madvise") or self._map.closed:
            return
        # a fault maps the whole page-cache folio around it (up to 2 MiB): reading the start of
        # this range may have mapped again the end of a range released before
        first = max(start - _FOLIO_MARGIN, 0) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(stop, self.size) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Unmap, unless bytes handed out are still referenced (then the mapping lives as long as they do)."""
        self.view.release()
        self.buffer = None
        try:
            self._map.close()
        except BufferError:
            pass  # a view given to a caller still points into the map; it is unmapped with the last one
        self._file.close()


class PathReader:
    """Reads the file a path-only row names: relative to the dataset folder, absolute, or an fsspec URL."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self._fs = fs
        self._root = root

    def read(self, path: str) -> bytes:
        """The file's bytes; OSError naming the path and where it was looked for when it cannot be read."""
        if "://" in path:
            places = [(None, path)]
        elif posixpath.isabs(path) or os.path.isabs(path):
            places = [(fsspec.filesystem("file"), path)] + ([] if is_local(self._fs) else [(self._fs, path)])
        else:
            places = [(self._fs, posixpath.join(self._root, path))]
        reasons = []
        for fs, where in places:
            try:
                if fs is None:
                    with fsspec.open(where, "rb") as f:
                        return f.read()
                return fs.cat_file(where)
            except Exception as exc:  # any filesystem's failure is this row's, not the shard's
                shown = where if fs is None or is_local(fs) else fs.unstrip_protocol(where)
                reasons.append(f"{shown}: {type(exc).__name__}" + (f": {exc}" if str(exc) else ""))
        raise OSError(f"the row holds no bytes and its path {path!r} could not be read ({'; '.join(reasons)})")
