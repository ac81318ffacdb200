"""Which column of a table holds the pages, and which holds the ids.

In order: OCR_ASSETS_IMAGE_COLUMN; the dataset's own features (the ``huggingface`` metadata that
``datasets`` writes into the Arrow schema: ``Image`` / ``Pdf``, or a ``List`` / ``Sequence`` /
``LargeList`` of them); the Arrow type (a struct with a binary ``bytes`` field, or a list of
them); the magic numbers of the first values of a binary column.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets.config import ENV_ID_COLUMN, ENV_IMAGE_COLUMN
from ocr_assets.sources.base import DatasetError
from ocr_assets.sources.content import sniff

SAMPLE_VALUES = 16  # first non-null values whose magic numbers are looked at
_LIST_TYPES = ("List", "Sequence", "LargeList")

# The first rows of a column (any length), for the magic numbers; None when the shard is empty.
ColumnHead = Callable[[str], "pa.Array | None"]


@dataclass(frozen=True)
class ContentColumn:
    """The column holding the pages: its ``name``, what its feature says it holds (``claim``:
    ``image``, ``pdf``, or None where only the bytes tell), whether each row holds a list, and
    how it was found (for messages)."""

    name: str
    claim: str | None
    is_list: bool
    found_by: str


def columns_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def features(schema: pa.Schema) -> dict:
    """The ``datasets`` features stored in the schema's metadata; {} where there are none."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        found = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return found if isinstance(found, dict) else {}


def feature_claim(feature) -> tuple[str, bool] | None:
    """(``image`` / ``pdf``, is a list) for an Image / Pdf feature or a list of one, else None.

    Lists come as ``{"_type": "List" | "LargeList" | "Sequence", "feature": {...}}`` or, as older
    ``datasets`` wrote them, a plain one-element list ``[{"_type": "Image"}]``.
    """
    inner, is_list = feature, False
    if isinstance(feature, list):
        inner, is_list = (feature[0] if len(feature) == 1 else None), True
    elif isinstance(feature, dict) and feature.get("_type") in _LIST_TYPES:
        inner, is_list = feature.get("feature"), True
    if isinstance(inner, dict) and inner.get("_type") in ("Image", "Pdf"):
        return inner["_type"].lower(), is_list
    return None


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_binary_view(type_)


def is_bytes_struct(type_: pa.DataType) -> bool:
    """A ``datasets`` Image / Pdf storage type: a struct with a binary ``bytes`` field."""
    if not pa.types.is_struct(type_):
        return False
    index = type_.get_field_index("bytes")
    return index >= 0 and _is_binary(type_.field(index).type)


def is_list_type(type_: pa.DataType) -> bool:
    return (pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)
            or pa.types.is_list_view(type_) or pa.types.is_large_list_view(type_))


def content_shape(type_: pa.DataType) -> tuple[str, bool] | None:
    """(``struct`` or ``binary``, is a list) for a type that can hold stored pages, else None."""
    is_list = is_list_type(type_)
    inner = type_.value_type if is_list else type_
    if is_bytes_struct(inner):
        return "struct", is_list
    if _is_binary(inner):
        return "binary", is_list
    return None


def stored_values(array: pa.Array, limit: int = SAMPLE_VALUES) -> list[bytes]:
    """The first ``limit`` non-null stored byte strings of a content column (list elements flattened)."""
    if is_list_type(array.type):
        array = array.flatten()
    if pa.types.is_struct(array.type):
        array = array.flatten()[array.type.get_field_index("bytes")]  # the struct's nulls merged in
    if pa.types.is_binary_view(array.type):
        array = array.cast(pa.large_binary())  # few compute kernels take views
    array = array.drop_null().slice(0, limit)
    return pc.binary_slice(array, 0, _HEAD_BYTES).to_pylist()  # heads only: a PDF may be large


_HEAD_BYTES = 1024  # enough for every magic number, %PDF- included


def _recognised(values: list[bytes]) -> bool:
    return any(sniff(v) is not None for v in values)


def choose_content(schema: pa.Schema, key: str, override: str | None, head: ColumnHead) -> ContentColumn:
    """The column holding the pages of shard ``key``; DatasetError naming OCR_ASSETS_IMAGE_COLUMN
    and listing the columns when the setting names no such column, or one that holds neither
    images nor PDFs, or when no column holds them."""
    feats = features(schema)
    if override:
        return _checked_override(schema, key, override, feats, head)
    shapes = {f.name: content_shape(f.type) for f in schema}
    claimed = [(field, feature_claim(feats.get(field.name))) for field in schema]
    claimed = [(field, claim) for field, claim in claimed if claim is not None and shapes[field.name] is not None]
    # a Pdf column is the document itself; an Image column beside it is most often a thumbnail
    for field, claim in sorted(claimed, key=lambda fc: fc[1][0] != "pdf"):
        return ContentColumn(field.name, claim[0], shapes[field.name][1], "features")
    for field in schema:  # Image-like storage written without features
        shape = shapes[field.name]
        if shape is not None and shape[0] == "struct" and field.name not in feats:
            return ContentColumn(field.name, None, shape[1], "arrow type")
    for field in schema:
        shape = shapes[field.name]
        if shape is not None:
            array = head(field.name)
            if array is not None and _recognised(stored_values(array)):
                return ContentColumn(field.name, None, shape[1], "magic numbers")
    raise DatasetError(
        f"shard {key!r} has no column holding images or PDFs (an Image or Pdf feature, a struct with "
        f"a binary 'bytes' field, or binary values that start like an image or a PDF); set "
        f"{ENV_IMAGE_COLUMN} to the column that holds the pages; its columns: {columns_text(schema)}"
    )


def _checked_override(schema: pa.Schema, key: str, name: str, feats: dict, head: ColumnHead) -> ContentColumn:
    if name not in schema.names:
        raise DatasetError(
            f"shard {key!r} has no column {name!r} ({ENV_IMAGE_COLUMN}); its columns: {columns_text(schema)}"
        )
    type_ = schema.field(name).type
    shape = content_shape(type_)
    if shape is None:
        raise DatasetError(
            f"column {name!r} ({ENV_IMAGE_COLUMN}) of shard {key!r} is {type_}: it holds neither images nor "
            f"PDFs; set {ENV_IMAGE_COLUMN} to the column that holds the pages; its columns: {columns_text(schema)}"
        )
    claim = feature_claim(feats.get(name))
    if claim is None:
        array = head(name)
        values = stored_values(array) if array is not None else []
        if values and not _recognised(values):
            raise DatasetError(
                f"column {name!r} ({ENV_IMAGE_COLUMN}) of shard {key!r} holds neither images nor PDFs (its "
                f"first value starts with {values[0][:8]!r}); set {ENV_IMAGE_COLUMN} to the column that holds "
                f"the pages; its columns: {columns_text(schema)}"
            )
    return ContentColumn(name, claim[0] if claim else None, shape[1], ENV_IMAGE_COLUMN)


def check_id_column(schema: pa.Schema, key: str, id_column: str | None) -> str | None:
    """``id_column`` when the shard has it; DatasetError naming OCR_ASSETS_ID_COLUMN otherwise."""
    if id_column and id_column not in schema.names:
        raise DatasetError(
            f"shard {key!r} has no column {id_column!r} ({ENV_ID_COLUMN}); its columns: {columns_text(schema)}"
        )
    return id_column or None


def id_strings(array: pa.Array | pa.ChunkedArray, id_column: str, key: str) -> list[str | None]:
    """The id column's values as strings (None where null); DatasetError when they cannot be."""
    try:
        return pc.cast(array, pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DatasetError(
            f"column {id_column!r} ({ENV_ID_COLUMN}) of shard {key!r} is {array.type}, which cannot be read as "
            f"text ids ({exc}); set {ENV_ID_COLUMN} to a column of strings or numbers"
        ) from exc
