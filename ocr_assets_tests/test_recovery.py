"""Text recovery: ink outside every covered box becomes text boxes; covered ink, blank paper and specks do not."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ocr_assets.stages.recovery import recover_text_boxes

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"
WORDS = "ink that no layout box covers must still reach the page text in the end".split()
W, H = 1275, 1650


def _font(size: int):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default(size=size)


def paragraphs_page(tops=(150, 600, 1100), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A white BGR page with one paragraph at each ``top``; returns the page and each paragraph's ink box."""
    rng = random.Random(seed)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = _font(22)
    boxes = []
    for top in tops:
        y, x1 = top, 0
        for _ in range(6):
            line = " ".join(rng.choice(WORDS) for _ in range(9))
            draw.text((120, y), line, font=font, fill="black")
            x1 = max(x1, draw.textbbox((120, y), line, font=font)[2])
            y += 30
        boxes.append([120, top, x1, y])
    return np.asarray(img)[:, :, ::-1].copy(), np.array(boxes)


def _contains(outer, inner, slack=6) -> bool:
    return (outer[0] <= inner[0] + slack and outer[1] <= inner[1] + slack
            and outer[2] >= inner[2] - slack and outer[3] >= inner[3] - slack)


def test_uncovered_paragraph_is_recovered():
    page, paras = paragraphs_page()
    covered = paras[[0, 2]] + [-5, -5, 5, 5]
    found = recover_text_boxes(page, covered)
    assert len(found) == 1
    assert _contains(found[0], paras[1])
    # snug: at most a few pixels of padding around the paragraph
    assert (np.abs(found[0] - paras[1]) <= 16).all()


def test_covered_blank_and_speck_areas_give_nothing():
    page, paras = paragraphs_page()
    assert len(recover_text_boxes(page, paras + [-5, -5, 5, 5])) == 0
    blank = np.full((H, W, 3), 250, np.uint8)
    assert len(recover_text_boxes(blank, np.empty((0, 4)))) == 0
    noisy = np.clip(np.random.default_rng(0).normal(240, 5, (H, W)), 0, 255).astype(np.uint8)
    assert len(recover_text_boxes(noisy, np.empty((0, 4)))) == 0
    specks = np.full((H, W, 3), 255, np.uint8)
    for x, y in [(300, 300), (900, 200), (640, 1400)]:
        specks[y:y + 3, x:x + 3] = 0
    assert len(recover_text_boxes(specks, np.empty((0, 4)))) == 0


def test_line_sticking_out_of_a_tight_box_is_left_to_the_box():
    page, paras = paragraphs_page(tops=(400,))
    box = paras[0].copy()
    box[2] = box[0] + int(0.8 * (box[2] - box[0]))  # the box cuts every line short
    assert len(recover_text_boxes(page, box[None])) == 0


def test_every_paragraph_found_on_gray_and_dark_pages():
    page, paras = paragraphs_page()
    gray = cv2.cvtColor(page, cv2.COLOR_BGR2GRAY)
    for image in (gray, 255 - page):
        found = recover_text_boxes(image, np.empty((0, 4)))
        assert len(found) == 3
        for para in paras:
            assert any(_contains(f, para) for f in found)


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_boxes_are_in_page_pixels(scale):
    page, paras = paragraphs_page()
    size = (int(W * scale), int(H * scale))
    small = cv2.resize(page, size, interpolation=cv2.INTER_AREA)
    found = recover_text_boxes(small, (paras[[0, 2]] * scale).astype(int) + [-5, -5, 5, 5])
    assert len(found) == 1
    assert _contains(found[0], (paras[1] * scale).astype(int), slack=int(8 * scale) + 2)
    assert (found[:, 2] <= size[0]).all() and (found[:, 3] <= size[1]).all()


def _speckle(page: np.ndarray, seed: int = 0) -> np.ndarray:
    """Dust and salt-and-pepper noise, and a black scanner border along the left edge."""
    rng = np.random.default_rng(seed)
    noisy = page.copy()
    pepper = rng.random(page.shape[:2]) < 0.004
    noisy[pepper] = 0
    for y, x, s in zip(rng.integers(0, H - 3, 600), rng.integers(0, W - 3, 600), rng.integers(1, 4, 600)):
        noisy[y:y + s, x:x + s] = rng.integers(0, 90)
    noisy[:, :36] = 15
    return noisy


def test_speckle_and_scanner_border_give_nothing_but_text_stays():
    page, paras = paragraphs_page()
    noisy = _speckle(page)
    # the covered paragraphs' ink stays theirs; specks and the border must not become text
    found = recover_text_boxes(noisy, paras[[0, 2]] + [-5, -5, 5, 5])
    assert len(found) == 1 and _contains(found[0], paras[1])
    assert (np.abs(found[0] - paras[1]) <= 16).all()
    assert len(recover_text_boxes(_speckle(np.full_like(page, 255), seed=1), np.empty((0, 4)))) == 0
    # every paragraph still found with nothing covered, and nothing else
    found = recover_text_boxes(noisy, np.empty((0, 4)))
    assert len(found) == 3 and all(any(_contains(f, p) for f in found) for p in paras)


def _scanned(page: np.ndarray, quality: int = 60) -> np.ndarray:
    """Grey paper with lifted ink, a slight blur and JPEG compression."""
    grey = 55 + page.astype(np.float32) * (205 - 55) / 255
    blurred = cv2.GaussianBlur(grey, (0, 0), 0.9).astype(np.uint8)
    return cv2.imdecode(cv2.imencode(".jpg", blurred, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


def test_degraded_pages_keep_their_text_lines():
    page, paras = paragraphs_page()
    for degraded in (_scanned(page), _scanned(_speckle(page, seed=2), quality=50)):
        found = recover_text_boxes(degraded, np.empty((0, 4)))
        assert len(found) == 3
        for para in paras:
            assert any(_contains(f, para) and (np.abs(f - para) <= 24).all() for f in found)
