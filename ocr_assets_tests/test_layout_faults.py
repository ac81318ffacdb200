"""The layout stage when the backend fails: halving on out-of-memory, device faults, short answers.

A small backend stands in for the model, so each failure is made on purpose: every page of an
``ok`` pages table must end with regions, none, or an error row, and a fault of the device must
fail the step instead of becoming error rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from ocr_assets import config, schemas
from ocr_assets.backends.layout.base import DeviceFault, Detection, PreparedPage
from ocr_assets.stages import layout as layout_stage
from ocr_assets.stages.layout import run_layout
from ocr_assets_tests.memory_shard import MemoryShard


class FakeBackend:
    """Each page's blob is its name; ``detect`` gives one text box per page, unless ``fail`` says otherwise."""

    name = "fake"
    label_tasks = {"text": "text"}
    keep_polygons = False
    info: dict = {}

    def __init__(self, batch_size: int, fail=None, prepare_fail=None):
        self.batch_size = batch_size
        self.fail = fail or (lambda names: None)
        self.prepare_fail = prepare_fail or (lambda names: None)
        self.calls: list[list[str]] = []

    def prepare(self, blobs):
        names = [b.decode() for b in blobs]
        self.prepare_fail(names)
        return [PreparedPage(100, 100, name, host=np.zeros((100, 100), np.uint8)) for name in names]

    def detect(self, pages, report=None):
        names = [p.inputs for p in pages]
        self.calls.append(names)
        result = self.fail(names)
        if result is not None:
            return result
        return [[] if name == "blank" else [Detection("text", 0.9, 10, 10, 90, 90)] for name in names]


def _pages(names: list[str]) -> pa.Table:
    n = len(names)
    return pa.table({
        "page_id": names, "shard": ["s"] * n, "row": list(range(n)), "page": [0] * n, "format": ["png"] * n,
        "width": [100] * n, "height": [100] * n, "nbytes": [1] * n, "status": ["ok"] * n, "error": [None] * n,
    }, schema=schemas.PAGES)


def _run(backend, names):
    return run_layout(_pages(names), MemoryShard([name.encode() for name in names]), backend, recover_text=False)


def _status(table: pa.Table) -> dict[str, str]:
    return {r["page_id"]: r["status"] for r in table.to_pylist()}


def _oom(names):
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB for {len(names)} pages")


def test_out_of_memory_halves_the_batch_until_it_fits():
    def too_big(names):
        if len(names) > 2:
            raise _oom(names)

    names = [f"p{i}" for i in range(8)]
    backend = FakeBackend(8, too_big)
    table, report = _run(backend, names)
    assert _status(table) == {name: "ok" for name in names}
    assert [len(c) for c in backend.calls] == [8, 4, 2, 2, 4, 2, 2]
    assert [name for c in backend.calls if len(c) == 2 for name in c] == names  # each page once, in order
    assert report.counts["errors"] == 0 and report.counts["regions"] == 8


def test_out_of_memory_with_one_page_alone_fails_the_step():
    def p5_too_big(names):
        if "p5" in names:
            raise _oom(names)

    backend = FakeBackend(8, p5_too_big)
    with pytest.raises(DeviceFault, match=rf"'p5'.*{config.ENV_LAYOUT_BATCH_SIZE}.*{config.ENV_DEVICE}"):
        _run(backend, [f"p{i}" for i in range(8)])
    assert backend.calls[-1] == ["p5"]  # it was tried alone before the step failed


def test_a_cuda_error_fails_the_step_at_once():
    def broken(names):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    backend = FakeBackend(4, broken)
    with pytest.raises(DeviceFault, match=config.ENV_DEVICE):
        _run(backend, ["a", "b", "c", "d"])
    assert len(backend.calls) == 1  # a broken device is not retried page by page


def test_a_page_that_fails_alone_is_the_only_error_row():
    def bad_input(names):
        if "bad" in names:
            raise ValueError("boxes out of range")

    backend = FakeBackend(4, bad_input)
    table, report = _run(backend, ["a", "bad", "c", "d", "e"])
    rows = {r["page_id"]: r for r in table.to_pylist()}
    assert _status(table) == {"a": "ok", "bad": "error", "c": "ok", "d": "ok", "e": "ok"}
    assert rows["bad"]["region"] == schemas.PAGE_ERROR_REGION and "ValueError: boxes out of range" in rows["bad"]["error"]
    assert report.counts["errors"] == 1
    # halving, not page by page: the half without the bad page runs as one batch
    assert backend.calls == [["a", "bad", "c", "d"], ["a", "bad"], ["a"], ["bad"], ["c", "d"], ["e"]]


def test_a_short_answer_gives_the_missing_page_an_error_row():
    def drops_c(names):
        if "c" in names:
            return [[Detection("text", 0.9, 10, 10, 90, 90)] for name in names if name != "c"]

    table, report = _run(FakeBackend(4, drops_c), ["a", "b", "c", "blank", "e"])
    rows = {r["page_id"]: r for r in table.to_pylist()}
    # "blank" has no regions: no row, but counted; "c" got no answer: an error row that says so
    assert _status(table) == {"a": "ok", "b": "ok", "c": "error", "e": "ok"}
    assert "0 results for 1 page" in rows["c"]["error"]
    assert report.counts["pages_without_regions"] == 1 and report.counts["errors"] == 1


def test_a_failing_prepare_fails_only_the_bad_page():
    def bad_blob(names):
        if "bad" in names:
            raise ValueError("not an image")

    table, _ = _run(FakeBackend(4, prepare_fail=bad_blob), ["a", "bad", "c"])
    rows = {r["page_id"]: r for r in table.to_pylist()}
    assert _status(table) == {"a": "ok", "bad": "error", "c": "ok"}
    assert "prepared" in rows["bad"]["error"] and "not an image" in rows["bad"]["error"]


def test_an_unanswered_page_fails_the_step(monkeypatch):
    # a stage bug (here: _detect losing a page) must not leave the page silently without rows
    monkeypatch.setattr(layout_stage, "_detect", lambda backend, images, page_ids, report: [])
    with pytest.raises(RuntimeError, match="unanswered"):
        _run(FakeBackend(4), ["a", "b"])


def test_a_shard_that_cannot_read_at_all_fails_the_step_and_an_unreadable_page_fails_alone():
    class BrokenShard(MemoryShard):
        def read_pages(self, pages):
            raise OSError("the shard file went away")

    with pytest.raises(OSError, match="went away"):  # not a page's fault: no error rows for every page
        run_layout(_pages(["a", "b"]), BrokenShard([b"a", b"b"]), FakeBackend(4), recover_text=False)
    shard = MemoryShard([b"a", ValueError("page 3 of the PDF is damaged"), b"c"])
    table, _ = run_layout(_pages(["a", "b", "c"]), shard, FakeBackend(2), recover_text=False)
    rows = {r["page_id"]: r for r in table.to_pylist()}
    assert _status(table) == {"a": "ok", "b": "error", "c": "ok"}
    assert "could not be read from the dataset" in rows["b"]["error"] and "damaged" in rows["b"]["error"]
    assert shard.reads == [[(0, 0), (1, 0)], [(2, 0)]]
