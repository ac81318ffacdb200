"""Every layout as `datasets` and the hub write it (``layouts``): shards, pages, sizes, pixels, ids, errors.

WebDataset tars (PDF and multi-frame TIFF samples, bad samples, compressed shards), hub Parquet
(binary PDFs, binary images, lists of images and of PDFs), save_to_disk folders, an imagefolder
cache of path-only rows, and the same files read remotely through fsspec.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest

from ocr_assets.config import ENV_ID_COLUMN, ENV_IMAGE_COLUMN
from ocr_assets.sources import DatasetError, PageReadError, list_shards, open_shard, source_row_count
from ocr_assets_tests import layouts
from ocr_assets_tests.layouts import page_lines, text_pdf, text_png
from ocr_assets_tests.test_sources import (
    IMAGE_SIZE, PDF_SIZE, _errors, _mapped_file_of, _pages, _same_pixels, _size,
)


def _check_built(built: layouts.Built, **columns) -> dict[str, tuple[list, list]]:
    """Every shard of a built dataset read whole: page counts and errors as built, every readable
    page's pixels there, of the size ``pages`` gives; returns (infos, pixels) per key."""
    dataset = str(built.path)
    assert sorted(r.key for r in list_shards(dataset)) == sorted(built.truth)
    out = {}
    for key, truth in built.truth.items():
        infos, pixels = _pages(dataset, key, **columns)
        assert [len(row) for row in infos] == [len(pages) for pages in truth], key
        assert source_row_count(dataset, key) == len(truth)
        flat = [p for row in infos for p in row]
        assert [(p.row, p.page) for p in flat] == [(r, k) for r, pages in enumerate(truth) for k in range(len(pages))]
        expected = [text for pages in truth for text in pages]
        for info, got, text in zip(flat, pixels, expected):
            if text is None:
                assert info.error and isinstance(got, PageReadError), (key, info)
                assert built.errors[key][(info.row, info.page)] in info.error, (key, info.error)
                continue
            assert info.error is None and not isinstance(got, Exception), (key, info, got)
            image = got if isinstance(got, np.ndarray) else cv2.imdecode(np.frombuffer(got, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (info.height, info.width, 3)
            assert _size(info) == (PDF_SIZE if info.format == "pdf" else IMAGE_SIZE)
        with open_shard(dataset, key, **columns) as shard:
            if built.id_column and columns.get("id_column"):
                assert shard.row_ids() == built.ids[key]
        out[key] = infos, pixels
    return out


def test_save_to_disk_images_and_pdfs(tmp_path):
    built = layouts.save_to_disk_images(tmp_path / "images")
    shards = _check_built(built, id_column="id")
    infos, pixels = shards["data-00000-of-00002"]
    assert all(isinstance(p, memoryview) for p in pixels)
    assert _same_pixels(pixels[0], layouts.text_png(page_lines(0)))
    built = layouts.save_to_disk_pdfs(tmp_path / "pdfs")
    with open_shard(str(built.path), "data-00000-of-00001") as shard:
        assert shard.content == "pdf" and shard.row_ids() == [f"data-00000-of-00001/{r}" for r in range(3)]
    (infos, pixels), = _check_built(built, id_column="id").values()
    assert {p.format for row in infos for p in row} == {"pdf"}
    assert all(isinstance(p, np.ndarray) for p in pixels)


def test_hub_parquet_binary_pdfs_images_and_lists(tmp_path):
    shards = _check_built(layouts.hub_parquet_pdf_bytes(tmp_path / "pdf"), id_column="id")
    assert sorted(shards) == ["train-00000-of-00002", "train-00001-of-00002"]
    _check_built(layouts.hub_parquet_image_bytes(tmp_path / "png"), id_column="page_number")
    built = layouts.hub_parquet_image_lists(tmp_path / "lists", null_element=True, empty_list=True)
    (infos, pixels), = _check_built(built, id_column="id").values()
    assert _same_pixels(pixels[0], layouts.text_png(page_lines(300)))
    assert _same_pixels(pixels[1], layouts.text_png(page_lines(301)))
    (infos, pixels), = _check_built(layouts.hub_parquet_pdf_lists(tmp_path / "pdf-lists"), id_column="id").values()
    assert [len(row) for row in infos] == [3, 2]


def test_imagefolder_cache_reads_path_only_rows(tmp_path):
    built = layouts.imagefolder_cache(tmp_path, missing=True)
    (key, (infos, pixels)), = _check_built(built, id_column="id").items()
    assert "__imagefolder-train" in key
    assert _same_pixels(pixels[0], layouts.text_png(page_lines(500)))
    error = infos[2][0].error
    assert str(tmp_path / "images" / "page2.png") in error and "could not be read" in error


def test_webdataset_pdf_tars_with_bad_samples(tmp_path):
    built = layouts.webdataset_pdfs(tmp_path, shards=2, bad_samples=True)
    shards = _check_built(built, id_column="id")
    assert sorted(shards) == ["pdfa-eng-train-00000", "pdfa-eng-train-00001"]
    infos, _ = shards["pdfa-eng-train-00000"]
    errors = _errors(infos)
    assert errors[(2, 0)] == "the sample 'docs/nocontent' has no image or PDF member (its members: .json)"
    with open_shard(str(tmp_path), "pdfa-eng-train-00000") as shard:
        # without an id column the sample keys are the ids
        assert shard.row_ids() == ["docs/000000", "docs/000001", "docs/nocontent", "docs/truncated",
                                   "docs/nopages", "docs/locked"]
        assert shard.content == "members .pdf" and shard.num_rows == 6
    with pytest.raises(DatasetError, match=f"no sample .* field 'doc_id' \\({ENV_ID_COLUMN}\\).*fields found: id, pages"):
        open_shard(str(tmp_path), "pdfa-eng-train-00001", id_column="doc_id")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings")
def test_webdataset_tiff_tars_frames_and_members_in_place(tmp_path):
    built = layouts.webdataset_tiffs(tmp_path, frames_per_sample=(2, 1))
    (infos, pixels), = _check_built(built, id_column="id").values()
    assert [[p.format for p in row] for row in infos] == [["tiff", "tiff"], ["tiff"]]
    assert isinstance(pixels[0], np.ndarray) and _same_pixels(pixels[1], layouts.text_png(page_lines(701)))
    single = pixels[2]  # a one-frame TIFF is its member's bytes, a slice of the mapped tar
    assert isinstance(single, memoryview) and _same_pixels(single, layouts.text_png(page_lines(710)))
    assert _mapped_file_of(np.frombuffer(single, np.uint8).ctypes.data) == str(tmp_path / "idl-train-00000.tar")
    with tarfile.open(tmp_path / "idl-train-00000.tar") as tar:
        assert bytes(single) == tar.extractfile("00000001.tif").read()


def test_webdataset_members_named_by_extension_and_samples_grouped_by_key(tmp_path):
    png, pdf = text_png(page_lines(1)), text_pdf([page_lines(2)])
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in [("a/x.page.png", png), ("a/x.pdf", pdf), ("a/x.json", b"[1, 2]"), ("y.png", png),
                           ("y.json", b'{"id": 7}'), ("README", b"no extension: no sample"), ("z.txt", b"hi")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open_shard(str(tmp_path), "s") as shard:
        assert shard.row_ids() == ["a/x", "y", "z"] and shard.content == "members .pdf/.png"
        assert [[p.format for p in row] for row in shard.page_infos()] == [["pdf"], ["png"], [None]]
    with open_shard(str(tmp_path), "s", image_column="page.png", id_column="id") as shard:
        assert shard.row_ids() == ["a/x", "7", "z"]  # a .json that is no object gives no fields
        infos = list(shard.page_infos())
        assert [[p.format for p in row] for row in infos] == [["png"], [None], [None]]
        assert "no member .page.png" in infos[1][0].error
    with pytest.raises(DatasetError, match=f"{ENV_IMAGE_COLUMN}='txt'.*neither images nor PDFs.*\\.json, \\.page\\.png"):
        open_shard(str(tmp_path), "s", image_column="txt")
    with pytest.raises(DatasetError, match=f"{ENV_IMAGE_COLUMN}='tif': no sample has a member .tif"):
        open_shard(str(tmp_path), "s", image_column="tif")


def test_compressed_tars_are_listed_and_refused_with_what_to_do(tmp_path):
    layouts.webdataset_pdfs(tmp_path, pages_per_sample=(1,), compress=True)
    (ref,) = list_shards(str(tmp_path))
    assert (ref.key, ref.kind) == ("pdfa-eng-train-00000", "webdataset") and ref.path.endswith(".tar.gz")
    for call in (open_shard, source_row_count):
        with pytest.raises(DatasetError, match=r"pdfa-eng-train-00000.tar.gz.*compressed.*gunzip"):
            call(str(tmp_path), ref.key)


def test_remote_tar_and_parquet_through_fsspec(tmp_path):
    layouts.webdataset_pdfs(tmp_path / "wds", pages_per_sample=(2, 1))
    built = layouts.hub_parquet_image_lists(tmp_path / "hub", pages_per_row=(2, 1))
    fs = fsspec.filesystem("memory")
    for name in ("wds", "hub"):
        for path in (tmp_path / name).rglob("*"):
            if path.is_file():
                fs.pipe(f"/remote-{name}/{path.relative_to(tmp_path / name)}", path.read_bytes())
    for name, key in (("wds", "pdfa-eng-train-00000"), ("hub", "train-00000-of-00001")):
        local, remote = _pages(str(tmp_path / name), key), _pages(f"memory://remote-{name}", key)
        assert remote[0] == local[0]
        for got, want in zip(remote[1], local[1]):
            assert np.array_equal(got, want) if isinstance(want, np.ndarray) else bytes(got) == bytes(want)
        assert source_row_count(f"memory://remote-{name}", key) == 2
    with open_shard("memory://remote-wds", "pdfa-eng-train-00000", id_column="id") as shard:
        assert shard.row_ids() == ["pdfa-0", "pdfa-1"]
    with open_shard(f"file://{tmp_path}/hub", "train-00000-of-00001", id_column="id") as shard:
        assert shard.row_ids() == built.ids["train-00000-of-00001"]


