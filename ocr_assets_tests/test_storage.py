import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ocr_assets.storage import ParquetStore, StorageError


def test_write_is_atomic_and_readable(tmp_path):
    store = ParquetStore(str(tmp_path / "out"))
    table = pa.table({"page_id": ["a/0", "a/1"], "n": [1, 2]})
    uri = store.write("pages", "data-00000-of-00001", table)
    assert uri.startswith("file://") and uri.endswith("pages/data-00000-of-00001.parquet")
    assert store.read("pages", "data-00000-of-00001").equals(table)
    # Only the final file is left behind: no temporary files.
    assert os.listdir(tmp_path / "out" / "pages") == ["data-00000-of-00001.parquet"]


def test_rewrite_replaces_whole_file(tmp_path):
    store = ParquetStore(str(tmp_path))
    store.write("layout", "p", pa.table({"x": [1, 2, 3]}))
    store.write("layout", "p", pa.table({"x": [9]}))
    assert store.read("layout", "p").column("x").to_pylist() == [9]


def test_fsspec_memory_url():
    store = ParquetStore("memory://ocr-test-store")
    table = pa.table({"x": [1]})
    uri = store.write("crops", "k", table)
    assert uri.startswith("memory://") and uri.endswith("ocr-test-store/crops/k.parquet")
    with fsspec.open(uri, "rb") as handle:  # the URI shown in the UI opens the file
        assert pq.read_table(handle).equals(table)
    assert store.exists("crops", "k")
    assert store.read("crops", "k").equals(table)


def test_missing_upstream_names_the_asset_and_setting(tmp_path):
    store = ParquetStore(str(tmp_path))
    with pytest.raises(StorageError, match="materialize pages.*OCR_ASSETS_STORAGE"):
        store.read("pages", "nope")


def test_unwritable_storage_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = ParquetStore(str(blocker))
    with pytest.raises(StorageError, match="OCR_ASSETS_STORAGE"):
        store.write("pages", "p", pa.table({"x": [1]}))
