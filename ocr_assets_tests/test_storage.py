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


def test_writer_writes_row_groups_as_they_come_and_renames_at_the_end(tmp_path):
    store = ParquetStore(str(tmp_path))
    schema = pa.schema([("page_id", pa.string()), ("n", pa.int64())])
    with store.writer("layout", "p", schema, row_group_rows=3) as out:
        for start in range(0, 8, 2):
            out.write(pa.table({"page_id": [f"x/{start}", f"x/{start + 1}"], "n": [start, start + 1]}))
            assert not (tmp_path / "layout" / "p.parquet").exists()  # readers see nothing half-written
        out.write(pa.RecordBatch.from_pydict({"page_id": ["y"], "n": [8]}, schema=schema))
        out.write(schema.empty_table())
    assert out.rows == 9 and out.uri == store.uri("layout", "p")
    file = pq.ParquetFile(tmp_path / "layout" / "p.parquet")
    assert file.num_row_groups == 3 and file.schema_arrow == schema
    assert store.read("layout", "p").column("n").to_pylist() == list(range(9))
    assert os.listdir(tmp_path / "layout") == ["p.parquet"]
    assert store.num_rows("layout", "p") == 9
    batches = list(store.batches("layout", "p", columns=["n"], batch_rows=4))
    assert [b.num_rows for b in batches] <= [4] * len(batches) and sum(b.num_rows for b in batches) == 9
    assert all(b.schema.names == ["n"] for b in batches)


def test_writer_leaves_nothing_behind_on_an_exception_and_keeps_the_old_file(tmp_path):
    store = ParquetStore(str(tmp_path))
    schema = pa.schema([("x", pa.int64())])
    store.write("crops", "p", pa.table({"x": [1]}))
    with pytest.raises(RuntimeError, match="the stage broke"):
        with store.writer("crops", "p", schema, row_group_rows=1) as out:
            out.write(pa.table({"x": [7, 8]}))
            raise RuntimeError("the stage broke")
    assert os.listdir(tmp_path / "crops") == ["p.parquet"]
    assert store.read("crops", "p").column("x").to_pylist() == [1]
    with pytest.raises(ValueError, match="names"):  # a table of other columns is refused before it is written
        with store.writer("crops", "q", schema) as out:
            out.write(pa.table({"y": ["a"]}))
    assert os.listdir(tmp_path / "crops") == ["p.parquet"]


def test_writer_and_batches_on_an_fsspec_url():
    store = ParquetStore("memory://ocr-test-writer")
    schema = pa.schema([("x", pa.int64())])
    with store.writer("recognition", "k", schema, row_group_rows=2) as out:
        out.write(pa.table({"x": [1, 2, 3]}))
    assert [b.to_pydict() for b in store.batches("recognition", "k", batch_rows=2)] == [{"x": [1, 2]}, {"x": [3]}]
    fs = fsspec.filesystem("memory")
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/ocr-test-writer/recognition", detail=False)] == ["k.parquet"]


def test_batches_of_a_missing_partition_name_the_asset_at_once(tmp_path):
    store = ParquetStore(str(tmp_path))
    with pytest.raises(StorageError, match="materialize crops.*OCR_ASSETS_STORAGE"):
        store.batches("crops", "nope")


def test_unwritable_storage_names_the_setting_for_the_writer(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="OCR_ASSETS_STORAGE"):
        with ParquetStore(str(blocker)).writer("pages", "p", pa.schema([("x", pa.int64())])):
            pass
