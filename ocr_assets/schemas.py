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
    ("source", pa.string()),  # "model", "recovered" (ink outside every box), "figure" (text lines in a non-text box)
    # how the stored page was turned before layout (boxes are in the turned page's pixels): the
    # clockwise quarter turn (0/90/180/270) that made it upright, then the small angle (degrees,
    # counter-clockwise positive, 0.0 = not resampled) that straightened it; the same on every row
    # of a page, null on a page's error row
    ("rotation", pa.int16()),
    ("skew", pa.float32()),
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
    ("confidence", pa.float32()),  # 0..1: the recognizer's own certainty; null where nothing was read
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
    ("confidence", pa.float32()),  # 0..1 over the row's pages (weighted by text read); null if nothing was read
    ("page_confidence", pa.list_(pa.float32())),  # each page's confidence, in page order
    ("flags", pa.list_(pa.string())),  # every flag of any page (rotated, skewed, figure_text, low_confidence)
    ("page_flags", pa.list_(pa.list_(pa.string()))),  # each page's flags, in page order
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
