"""Previews shown in the Dagster UI: a page with its layout boxes drawn, and the first Markdown."""

from __future__ import annotations

import base64

import cv2
import numpy as np

from ocr_assets.imaging import encode_image

TASK_COLOURS = {  # BGR
    "text": (200, 120, 0), "table": (0, 150, 0), "formula": (160, 0, 160), "skip": (120, 120, 120),
}
PREVIEW_WIDTH = 640


def layout_picture(page: np.ndarray, boxes: list[tuple[int, int, int, int]], tasks: list[str],
                   sources: list[str]) -> bytes:
    """JPEG of the page scaled to PREVIEW_WIDTH with each region's box (colour by task; recovered
    regions dashed-thin) and reading-order number."""
    scale = PREVIEW_WIDTH / page.shape[1]
    image = cv2.resize(page, (PREVIEW_WIDTH, max(1, round(page.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for n, ((x0, y0, x1, y1), task, source) in enumerate(zip(boxes, tasks, sources)):
        p0 = (round(x0 * scale), round(y0 * scale))
        p1 = (round(x1 * scale), round(y1 * scale))
        colour = TASK_COLOURS.get(task, (0, 0, 200))
        cv2.rectangle(image, p0, p1, colour, 1 if source == "recovered" else 2)
        cv2.putText(image, str(n), (p0[0] + 2, p0[1] + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1)
    return encode_image(image, "jpeg", 80)


def markdown_image(jpeg: bytes, alt: str) -> str:
    """Markdown that shows the JPEG inline (the UI renders data URLs in Markdown metadata)."""
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(jpeg).decode('ascii')})"


def markdown_excerpt(markdown: str, limit: int = 3000) -> str:
    """The start of a page's Markdown, cut at a line end near ``limit`` characters."""
    if len(markdown) <= limit:
        return markdown
    cut = markdown.rfind("\n", 0, limit)
    return markdown[: cut if cut > 0 else limit] + "\n\n…"
