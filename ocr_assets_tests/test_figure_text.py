"""Text hidden in picture boxes: a paragraph boxed as a figure is read, a real picture stays a picture,
a picture box over the whole page is dropped and its text recovered."""

from __future__ import annotations

import random

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ocr_assets import config
from ocr_assets.backends.layout.base import Detection, PreparedPage
from ocr_assets.sample import _draw_chart
from ocr_assets.stages.layout import _page_regions
from ocr_assets.stages.recovery import WHOLE_PAGE_PICTURE, covers_page, find_page_text
from ocr_assets.timing import StageReport
from ocr_assets_tests.test_recovery import H, W, _contains, _font, paragraphs_page

TASKS = config.CDLA_LABEL_TASKS


def _regions(page: np.ndarray, dets: list[Detection]) -> tuple[list, StageReport]:
    report = StageReport()
    prepared = PreparedPage(page.shape[0], page.shape[1], None, host=page)
    return _page_regions(prepared, dets, TASKS, True, report), report


def _box(d: Detection) -> np.ndarray:
    return np.array([d.x0, d.y0, d.x1, d.y1])


def _det(label: str, box, margin: int = 10) -> Detection:
    x0, y0, x1, y1 = (int(v) for v in box)
    return Detection(label, 0.9, x0 - margin, y0 - margin, x1 + margin, y1 + margin)


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like BGR picture: smooth shapes of light and shade, with grain."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.random((height // 40, width // 40)).astype(np.float32), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    field = (field - field.min()) / (field.max() - field.min()) * 230
    field += rng.normal(0, 12, field.shape)
    return cv2.cvtColor(np.clip(field, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def test_paragraph_boxed_as_figure_is_read_as_figure_text():
    page, paras = paragraphs_page()
    dets = [_det("text", paras[0]), _det("figure", paras[1], margin=30), _det("text", paras[2])]
    regions, report = _regions(page, dets)
    figure = [d for d, task, source in regions if source == config.SOURCE_FIGURE]
    assert figure and all(d.label == config.RECOVERED_LABEL for d in figure)
    assert all(task == "text" for _, task, source in regions if source == config.SOURCE_FIGURE)
    # the text fills the box: it is text, not a picture, and the figure box is gone
    assert not [d for d, task, _ in regions if task == "skip"]
    assert any(_contains(_box(d), paras[1]) for d in figure)
    assert report.counts["figure_regions"] == len(figure) and report.counts["pictures_read_as_text"] == 1
    # in reading order, between the two text paragraphs
    sources = [source for _, _, source in regions]
    assert sources == ["model", "figure", "model"]


def _picture_page(caption: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A page with text above, a photo and a chart below it; the boxes of the text, photo, chart and caption."""
    page, paras = paragraphs_page(tops=(150,))
    page[600:1000, 150:650] = _photo(500, 400)
    img = Image.fromarray(page[:, :, ::-1])
    draw = ImageDraw.Draw(img)
    _draw_chart(draw, random.Random(3), 700, 600, 450, 400)
    caption_box = np.array([0, 0, 0, 0])
    if caption:
        font = _font(22)
        draw.text((150, 1020), caption, font=font, fill="black")
        caption_box = np.array(draw.textbbox((150, 1020), caption, font=font))
    page = np.asarray(img)[:, :, ::-1].copy()
    return page, paras[0], np.array([150, 600, 650, 1000]), np.array([700, 600, 1150, 1000]), caption_box


def test_photo_and_chart_stay_pictures():
    page, text, photo, chart, _ = _picture_page()
    dets = [_det("text", text), _det("figure", photo), _det("figure", chart)]
    regions, report = _regions(page, dets)
    assert [source for _, _, source in regions].count(config.SOURCE_FIGURE) == 0
    assert sorted(tuple(_box(d)) for d, task, _ in regions if task == "skip") == sorted(
        tuple(_box(d)) for d in dets[1:])
    assert report.counts["figure_regions"] == 0 and report.counts["pictures_read_as_text"] == 0
    # searched directly, the pictures hold no text line at all
    found = find_page_text(page, np.array([_box(dets[0])]), np.array([_box(d) for d in dets[1:]]))
    assert [len(b) for b in found.in_pictures] == [0, 0] and len(found.recovered) == 0


def test_caption_inside_a_picture_box_is_read_and_the_picture_kept():
    caption = "Figure 3: the photo above and its caption share one box"
    page, text, photo, _, caption_box = _picture_page(caption)
    picture = [photo[0], photo[1], max(photo[2], caption_box[2]), caption_box[3]]
    regions, _ = _regions(page, [_det("text", text), _det("figure", picture)])
    figure = [d for d, _, source in regions if source == config.SOURCE_FIGURE]
    assert len(figure) == 1 and _contains(_box(figure[0]), caption_box)
    assert figure[0].y0 >= photo[3] - 10  # the caption, not the photo
    assert [task for _, task, _ in regions].count("skip") == 1


def test_whole_page_figure_is_dropped_and_its_text_recovered():
    page, paras = paragraphs_page()
    whole = Detection("figure", 0.8, 20, 20, W - 20, H - 20)
    assert covers_page((whole.x0, whole.y0, whole.x1, whole.y1), H, W)
    regions, report = _regions(page, [whole, _det("text", paras[0])])
    assert report.counts["whole_page_pictures"] == 1
    assert not [d for d, task, _ in regions if task == "skip"]
    recovered = [_box(d) for d, _, source in regions if source == config.SOURCE_RECOVERED]
    assert len(recovered) == 2 and all(any(_contains(r, p) for r in recovered) for p in paras[1:])
    # a large figure below the whole-page share is searched as a picture instead: its text is read
    big = Detection("figure", 0.8, 100, 100, W - 100, H - 100)
    assert not covers_page((big.x0, big.y0, big.x1, big.y1), H, W)
    regions, report = _regions(page, [big])
    assert report.counts["whole_page_pictures"] == 0
    figure = [_box(d) for d, _, source in regions if source == config.SOURCE_FIGURE]
    assert all(any(_contains(f, p) for f in figure) for p in paras)


def test_whole_page_rule_is_the_pp_doclayout_v3_backends():
    from ocr_assets.backends.layout.pp_postprocess import WHOLE_PAGE_IMAGE, page_image_too_large

    assert WHOLE_PAGE_PICTURE == WHOLE_PAGE_IMAGE
    boxes = np.array([[0, 0, 1000, 1300], [0, 0, 1000, 1100], [0, 0, 1275, 100]], dtype=np.float64)
    dropped = page_image_too_large(np.array([0, 0, 1]), boxes, 0, 1400, 1000)
    assert dropped.tolist() == [covers_page(b, 1400, 1000) for b in boxes[:2]] + [False]


def test_figure_search_without_recovery_keeps_the_model_boxes():
    page, paras = paragraphs_page()
    dets = [Detection("figure", 0.8, 20, 20, W - 20, H - 20), _det("figure", paras[1])]
    regions = _page_regions(PreparedPage(H, W, None, host=page), dets, TASKS, False, StageReport())
    # nothing dropped, nothing searched (the smaller box lies inside the larger and merges into it)
    assert [(tuple(_box(d)), task, source) for d, task, source in regions] == [
        (tuple(_box(dets[0])), "skip", "model")]
