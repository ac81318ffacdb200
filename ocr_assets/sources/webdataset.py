"""WebDataset ``.tar`` shards as on the hub (pixparse/pdfa-eng-wds, pixparse/idl-wds).

One source row per sample: the members sharing a key (the member's path up to the first dot of
its name, as webdataset groups them). The tar is indexed once, from its headers (each member's
offset and size), never extracted; a local tar is memory-mapped and a member's bytes are a slice
of the mapping, a remote one is read member by member with ranged reads.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from ocr_assets.config import ENV_ID_COLUMN, ENV_IMAGE_COLUMN
from ocr_assets.sources.base import DatasetError
from ocr_assets.sources.content import Item, PageReader, RowContent, sniff
from ocr_assets.sources.files import MappedFile, is_local
from ocr_assets.sources.rows import WINDOW_ROWS, RowShard, Window

PDF_EXTENSIONS = frozenset({"pdf"})
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "tif", "tiff", "webp", "gif", "bmp", "jp2", "j2k", "jpx"})
FIELDS_EXTENSION = "json"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")


@dataclass
class Sample:
    """One sample: its key and its members as (extension, data offset, size), in the tar's order."""

    key: str
    members: list[tuple[str, int, int]] = field(default_factory=list)

    def content_members(self, extension: str | None = None) -> list[tuple[str, int, int]]:
        """The members with ``extension`` where given; else the PDF members where there are any (the
        document itself), else the image members."""
        if extension is not None:
            return [m for m in self.members if m[0].lower() == extension]
        pdfs = [m for m in self.members if _kind(m[0]) == "pdf"]
        return pdfs or [m for m in self.members if _kind(m[0]) == "image"]


def _kind(extension: str) -> str | None:
    last = extension.rsplit(".", 1)[-1].lower()  # "0.png" and "png" are both images
    return "pdf" if last in PDF_EXTENSIONS else "image" if last in IMAGE_EXTENSIONS else None


def split_member(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a member path: the key is the path up to the first dot of the
    file's name; None for a name without one (webdataset skips those too)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension


def index_tar(fileobj, where: str) -> list[Sample]:
    """The samples of a tar in order of first appearance, from its headers alone."""
    samples: dict[str, Sample] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for info in tar:
                split = split_member(info.name) if info.isfile() else None
                if split is not None:
                    samples.setdefault(split[0], Sample(split[0])).members.append((split[1], info.offset_data, info.size))
    except tarfile.TarError as exc:
        raise DatasetError(f"{where} cannot be read as a tar file ({exc}): is it cut short, or not a tar? "
                           f"WebDataset shards are plain .tar files") from exc
    return list(samples.values())


def refuse_compressed(key: str, path: str) -> None:
    """A compressed tar cannot be read in place: DatasetError saying how to make it readable."""
    name = path.rsplit("/", 1)[-1]
    raise DatasetError(
        f"shard {key!r} ({path}) is a compressed tar: its members cannot be read in place. Decompress it "
        f"(gunzip {name!r}, which leaves a .tar beside it) and remove the compressed file from the dataset folder"
    )


class TarShard(RowShard):
    """A WebDataset ``.tar`` shard; see ``base.Shard``. The default row id is the sample key."""

    _default_ids = "the sample keys"

    def __init__(self, key: str, fs: fsspec.AbstractFileSystem, path: str, extension: str | None,
                 id_column: str | None, reader: PageReader) -> None:
        self._extension = extension.lower().lstrip(".") if extension else None
        self._mapped: MappedFile | None = None
        self._remote = None
        if is_local(fs):
            with open(path, "rb") as f:
                self._samples = index_tar(f, f"shard {key!r} ({path})")
            self._mapped = MappedFile(path) if self._samples else None
        else:
            self._remote = fs.open(path, "rb")
            try:
                self._samples = index_tar(self._remote, f"shard {key!r} ({fs.unstrip_protocol(path)})")
            except DatasetError:
                self._remote.close()
                raise
        extensions = sorted({ext.lower() for s in self._samples for ext, _, _ in s.content_members(self._extension)})
        content = "members " + "/".join(f".{e}" for e in extensions) if extensions else "image or PDF members"
        super().__init__(key, len(self._samples), content, id_column or None, reader)
        try:
            if self._extension is not None:
                self._check_extension()
            self._id_values = self._read_ids() if self.id_column else None
        except DatasetError:
            self._close()
            raise

    def _check_extension(self) -> None:
        """The members OCR_ASSETS_IMAGE_COLUMN names (an extension, as webdataset names a sample's
        fields) must exist and hold images or PDFs."""
        found = [m for s in self._samples for m in s.content_members(self._extension)]
        if found and (_kind(found[0][0]) is not None or sniff(self._read(*found[0][1:])) is not None):
            return
        extensions = sorted({ext for s in self._samples for ext, _, _ in s.members})
        what = "no sample has a member" if not found else "its members hold neither images nor PDFs:"
        raise DatasetError(
            f"{ENV_IMAGE_COLUMN}={self._extension!r}: {what} .{self._extension} in WebDataset shard {self.key!r}; "
            f"set {ENV_IMAGE_COLUMN} to the extension of the image or PDF members, or unset it; extensions found: "
            f"{', '.join('.' + e for e in extensions[:20]) or 'none'}"
        )

    def _read(self, offset: int, size: int) -> memoryview | bytes:
        if self._mapped is not None:
            if offset + size > self._mapped.size:
                raise OSError(f"the tar ends inside the member ({size} bytes at offset {offset})")
            return self._mapped.view[offset:offset + size]
        self._remote.seek(offset)
        data = self._remote.read(size)
        if len(data) != size:
            raise OSError(f"the tar ends inside the member ({size} bytes at offset {offset})")
        return data

    def _content(self, sample: Sample) -> RowContent:
        chosen = sample.content_members(self._extension)
        if not chosen:
            found = ", ".join(f".{ext}" for ext, _, _ in sample.members)
            wanted = f"member .{self._extension}" if self._extension else "image or PDF member"
            return f"the sample {sample.key!r} has no {wanted} (its members: {found or 'none'})"
        items: list[Item | str] = []
        for extension, offset, size in chosen:
            try:
                items.append(Item(self._read(offset, size), None, _kind(extension)))
            except OSError as exc:
                items.append(f"member {sample.key}.{extension} cannot be read: {exc}")
        return tuple(items)

    def _window_from(self, start: int) -> Window:
        samples = self._samples[start:start + WINDOW_ROWS]
        members = [m for s in samples for m in s.content_members(self._extension)]
        span = (min(m[1] for m in members), max(m[1] + m[2] for m in members)) if members else None
        return Window(start, [self._content(s) for s in samples], span)

    def _windows(self) -> Iterator[Window]:
        for start in range(0, self.num_rows, WINDOW_ROWS):
            yield self._window_from(start)

    def _window_at(self, row: int) -> Window:
        return self._window_from(row - row % WINDOW_ROWS)

    def _release(self, window: Window) -> None:
        if self._mapped is not None and window.span is not None:
            self._mapped.release(*window.span)

    def _default_id(self, row: int) -> str:
        return self._samples[row].key

    def _ids(self) -> list[str | None] | None:
        return self._id_values

    def _read_ids(self) -> list[str | None]:
        """The id field of each sample's .json member; DatasetError when no sample has it."""
        values: list[str | None] = []
        seen: set[str] = set()
        for row, sample in enumerate(self._samples):
            if self._mapped is not None and row % WINDOW_ROWS == 0 and row:
                self._mapped.release(0, sample.members[0][1])  # the .json members read so far
            fields = self._fields(sample)
            if len(seen) < 50:
                seen.update(fields)
            value = fields.get(self.id_column)
            values.append(None if value is None else value if isinstance(value, str) else json.dumps(value))
        if self._mapped is not None:
            self._mapped.release(0, self._mapped.size)
        if self._samples and all(v is None for v in values):
            raise DatasetError(
                f"no sample of shard {self.key!r} has a field {self.id_column!r} ({ENV_ID_COLUMN}) in its .json "
                f"member; fields found: {', '.join(sorted(seen)[:20]) or 'none'}. Set {ENV_ID_COLUMN} to one of "
                f"them, or unset it (ids are then the sample keys)"
            )
        return values

    def _fields(self, sample: Sample) -> dict:
        """The top-level fields of the sample's .json member; {} where it has none or it is not an object."""
        for extension, offset, size in sample.members:
            if extension.lower() == FIELDS_EXTENSION:
                try:
                    fields = json.loads(bytes(self._read(offset, size)))
                except (OSError, ValueError):
                    return {}
                return fields if isinstance(fields, dict) else {}
        return {}

    def _close(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        if self._remote is not None:
            self._remote.close()
            self._remote = None


def tar_row_count(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Samples of a tar shard, from its headers."""
    with (open(path, "rb") if is_local(fs) else fs.open(path, "rb")) as f:
        return len(index_tar(f, path))
