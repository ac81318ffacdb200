"""Arrow schemas of the five assets: the Parquet contracts that DESIGN.md promises users.

A page that fails as a whole at a region-level stage (layout, crops, recognition) is
carried as one row with ``region = PAGE_ERROR_REGION`` and ``status = "error"``, so the
reason reaches ``documents``.
"""

from __future__ import annotations

import pyarrow as pa

PAGE_ERROR_REGION = -1

PAGES = pa.schema([
    ("page_id", pa.string()),
    ("shard", pa.string()),
    ("row", pa.int64()),  # the source row (dataset row, WebDataset sample) the page is in
    ("page", pa.int32()),  # the page's index within its source row, 0-based
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("nbytes", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
])

LAYOUT = pa.schema([
    ("page_id", pa.string()),
    ("region", pa.int32()),
    ("label", pa.string()),
    ("task", pa.string()),
    ("score", pa.float32()),
    ("x0", pa.int32()),
    ("y0", pa.int32()),
    ("x1", pa.int32()),
    ("y1", pa.int32()),
    ("source", pa.string()),  # "model", or "recovered" for ink outside every model box
    ("status", pa.string()),
    ("error", pa.string()),
])

POLYGON = pa.field("polygon", pa.list_(pa.int32()))  # x, y, x, y, ... in page pixels


def layout_schema(with_polygons: bool = False) -> pa.Schema:
    """The LAYOUT schema, plus the polygon column where the backend keeps polygons."""
    return LAYOUT.append(POLYGON) if with_polygons else LAYOUT


CROPS = pa.schema([
    ("page_id", pa.string()),
    ("region", pa.int32()),
    ("task", pa.string()),
    ("image", pa.binary()),
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
])

RECOGNITION = pa.schema([
    ("page_id", pa.string()),
    ("region", pa.int32()),
    ("task", pa.string()),
    ("text", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
])

DOCUMENTS = pa.schema([
    ("page_id", pa.string()),  # the source row's id
    ("shard", pa.string()),
    ("row", pa.int64()),
    ("pages", pa.int32()),  # the row's page count
    ("status", pa.string()),
    ("markdown", pa.string()),  # every page in order, each after a "<!-- page N -->" line but the first
    ("page_markdown", pa.list_(pa.string())),  # one Markdown per page, in page order
    ("page_status", pa.list_(pa.string())),  # each page's status, in page order
    ("regions", pa.string()),  # JSON list over the row's pages: page, region, label, task, box, text, status
    ("error", pa.string()),
])

SCHEMAS: dict[str, pa.Schema] = {
    "pages": PAGES,
    "layout": LAYOUT,
    "crops": CROPS,
    "recognition": RECOGNITION,
    "documents": DOCUMENTS,
}
