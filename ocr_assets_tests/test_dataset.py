"""The dataset source on real `datasets` folders: three layouts, zero-copy reads, fsspec, errors."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ocr_assets.config import ENV_DATASET, ENV_ID_COLUMN, ENV_IMAGE_COLUMN
from ocr_assets.dataset import DatasetError, list_shards, open_shard, shard_key

ROWS = 12


def _png(index: int, size: int = 48) -> bytes:
    # Noise does not compress: the images are big enough for the allocation check to mean something.
    pixels = np.random.default_rng(index).integers(0, 255, (size, size + index, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, list[bytes]]:
    """One dataset written in the three layouts: save_to_disk, cache-style .arrow, hub-style .parquet."""
    root = tmp_path_factory.mktemp("layouts")
    images = [_png(i) for i in range(ROWS)]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {"id": [f"page-{i}" for i in range(ROWS)], "image": [{"bytes": b, "path": None} for b in images]},
        features=features,
    )
    ds.save_to_disk(str(root / "saved"), num_shards=2)
    cache = root / "cache" / "parquet" / "default-0" / "0.0.0" / "abc"
    cache.mkdir(parents=True)
    for i in range(2):
        # save_to_disk writes the same IPC stream files as the datasets cache; only the names differ.
        shutil.copy(root / "saved" / f"data-0000{i}-of-00002.arrow", cache / f"parquet-train-0000{i}-of-00002.arrow")
        (root / "hub" / "data").mkdir(parents=True, exist_ok=True)
        ds.shard(2, i, contiguous=True).to_parquet(str(root / "hub" / "data" / f"train-0000{i}-of-00002.parquet"))
    (cache / "dataset_info.json").write_text("{}")
    (cache / "cache-0123abcd.arrow").write_bytes(b"derived by Dataset.map, not a shard")
    return root, images


def _read_all(dataset: str, **columns) -> list[list[bytes]]:
    out = []
    for ref in list_shards(dataset):
        shard = open_shard(dataset, ref.key, **columns)
        out.append([bytes(shard.image_at(row)) for row in range(shard.num_rows)])
    return out


def test_three_layouts_give_the_same_shards_rows_and_bytes(source):
    root, images = source
    keys = {name: [r.key for r in list_shards(str(root / name))] for name in ("saved", "cache", "hub")}
    assert keys == {
        "saved": ["data-00000-of-00002", "data-00001-of-00002"],
        "cache": ["parquet__default-0__0.0.0__abc__parquet-train-00000-of-00002",
                  "parquet__default-0__0.0.0__abc__parquet-train-00001-of-00002"],
        "hub": ["train-00000-of-00002", "train-00001-of-00002"],
    }
    kinds = {r.kind for r in list_shards(str(root / "hub"))} | {r.kind for r in list_shards(str(root / "saved"))}
    assert kinds == {"arrow", "parquet"}
    expected = [images[: ROWS // 2], images[ROWS // 2:]]
    for name in ("saved", "cache", "hub"):
        assert _read_all(str(root / name)) == expected, name


def test_arrow_shard_is_memory_mapped_and_image_at_is_a_slice_of_the_buffer(source):
    root, images = source
    before = pa.total_allocated_bytes()
    shard = open_shard(str(root / "saved"), "data-00000-of-00002")
    views = [shard.image_at(row) for row in range(shard.num_rows)]
    # The image bytes stay in the file mapping: Arrow's allocator holds far less than them.
    assert pa.total_allocated_bytes() - before < sum(len(b) for b in images[: ROWS // 2]) // 4
    data = shard.images.chunk(0).buffers()[2]
    for row, view in enumerate(views):
        assert isinstance(view, memoryview) and view == images[row]
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        assert data.address <= address < data.address + data.size
    assert shard.image_column == "image" and pa.types.is_binary(shard.images.type)


def test_ipc_file_format_and_single_shard_file(tmp_path, source):
    root, images = source
    table = pa.ipc.open_stream(pa.memory_map(str(root / "saved" / "data-00001-of-00002.arrow"))).read_all()
    with pa.ipc.new_file(str(tmp_path / "pages.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # several record batches: rows span chunks
    assert _read_all(str(tmp_path)) == [images[ROWS // 2:]]
    assert _read_all(str(tmp_path / "pages.arrow")) == [images[ROWS // 2:]]


def test_real_datasets_cache_folder(tmp_path, source, monkeypatch):
    root, images = source
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.load_dataset("parquet", data_dir=str(root / "hub"), cache_dir=str(tmp_path / "cache"))
    refs = list_shards(str(tmp_path / "cache"))
    assert len(refs) == 1 and refs[0].key.endswith("__parquet-train") and refs[0].kind == "arrow"
    assert _read_all(str(tmp_path / "cache")) == [images]


def test_fsspec_memory_url(source):
    root, images = source
    fs = fsspec.filesystem("memory")
    for name in ("saved", "hub"):
        for path in (root / name).rglob("*"):
            if path.is_file():
                fs.pipe(f"/test-dataset-{name}/{path.relative_to(root / name)}", path.read_bytes())
        url = f"memory://test-dataset-{name}"
        refs = list_shards(url)
        assert all(r.path.startswith("memory://") for r in refs)
        assert _read_all(url, id_column="id") == [images[: ROWS // 2], images[ROWS // 2:]]
    shard = open_shard("memory://test-dataset-hub", "train-00001-of-00002", id_column="id")
    assert shard.ids == [f"page-{i}" for i in range(ROWS // 2, ROWS)]


def test_keys_come_from_the_relative_path_and_are_sanitised(tmp_path):
    table = pa.table({"image": pa.array([{"bytes": _png(0), "path": None}])})
    for folder in ("a", "b", ".hidden"):
        (tmp_path / folder).mkdir()
        pq.write_table(table, tmp_path / folder / "train-0.parquet")
    pq.write_table(table, tmp_path / "b" / "odd name,v1.parquet")
    # Hidden folders are skipped; a sanitised name carries a hash of its path.
    assert [r.key for r in list_shards(str(tmp_path))] == ["a__train-0", "b__odd_name_v1-411cc379", "b__train-0"]
    assert shard_key("x/.we ird,name.parquet").startswith("x__.we_ird_name-")
    assert shard_key("x/y/data-0.arrow") == "x__y__data-0"
    assert shard_key("data/train-00000-of-00002.parquet") == "train-00000-of-00002"  # the hub's layout
    assert shard_key("../../etc/passwd") == "etc__passwd"
    assert shard_key("a__b.arrow") != shard_key("a/b.arrow")
    for key in (r.key for r in list_shards(str(tmp_path))):
        assert "," not in key and "/" not in key and not key.startswith(".")


def test_keys_never_change_when_files_appear(tmp_path):
    """A shard's key depends on its own path only: a new file elsewhere renames nothing."""
    table = pa.table({"image": pa.array([{"bytes": _png(0), "path": None}])})
    (tmp_path / "2024").mkdir()
    pq.write_table(table, tmp_path / "2024" / "train-0.parquet")
    pq.write_table(table, tmp_path / "other.parquet")
    before = {r.path: r.key for r in list_shards(str(tmp_path))}
    (tmp_path / "2025").mkdir()
    pq.write_table(table, tmp_path / "2025" / "train-0.parquet")  # the same stem, another folder
    after = {r.path: r.key for r in list_shards(str(tmp_path))}
    assert {path: after[path] for path in before} == before
    assert len(set(after.values())) == 3


def test_source_row_count_reads_the_file_not_the_table(source, tmp_path):
    from ocr_assets.dataset import source_row_count

    root, _ = source
    for name in ("saved", "hub", "cache"):
        for ref in list_shards(str(root / name)):
            assert source_row_count(str(root / name), ref.key) == ROWS // 2
    table = pa.ipc.open_stream(pa.memory_map(str(root / "saved" / "data-00001-of-00002.arrow"))).read_all()
    with pa.ipc.new_file(str(tmp_path / "pages.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    assert source_row_count(str(tmp_path), "pages") == ROWS // 2


def test_repeated_ids_are_refused_naming_the_setting(tmp_path):
    table = pa.table({"doc": ["a", "b", "a"], "image": pa.array([{"bytes": _png(i), "path": None} for i in range(3)])})
    pq.write_table(table, tmp_path / "train-0.parquet")
    shard = open_shard(str(tmp_path), "train-0", id_column="doc")
    with pytest.raises(DatasetError, match=r"OCR_ASSETS_ID_COLUMN='doc'.*'a' is in rows 0 and 2"):
        shard.page_ids()
    assert open_shard(str(tmp_path), "train-0").page_ids() == [f"train-0/{r}" for r in range(3)]


def test_explicit_plain_binary_image_column_and_integer_ids(tmp_path):
    images = [_png(i, 16) for i in range(3)]
    pq.write_table(pa.table({"num": [7, 8, 9], "scan": pa.array(images, pa.large_binary())}), tmp_path / "s.parquet")
    with pytest.raises(DatasetError, match=ENV_IMAGE_COLUMN):
        open_shard(str(tmp_path), "s")  # a plain binary column is used only when named
    shard = open_shard(str(tmp_path), "s", image_column="scan", id_column="num")
    assert [bytes(shard.image_at(r)) for r in range(3)] == images
    assert shard.ids == ["7", "8", "9"] and pa.types.is_large_binary(shard.images.type)


def test_null_images_and_images_stored_by_path(tmp_path):
    (tmp_path / "files").mkdir()
    on_disk = _png(5, 16)
    (tmp_path / "files" / "p.png").write_bytes(on_disk)
    rows = [{"bytes": _png(1, 16), "path": None}, None, {"bytes": None, "path": "files/p.png"},
            {"bytes": None, "path": "files/missing.png"}, {"bytes": None, "path": str(tmp_path / "files" / "p.png")}]
    pq.write_table(pa.table({"image": pa.array(rows)}), tmp_path / "s.parquet")
    shard = open_shard(str(tmp_path), "s")
    got = [shard.image_at(r) for r in range(shard.num_rows)]
    assert got[0] == _png(1, 16) and got[1] is None and got[2] == on_disk and got[3] is None and got[4] == on_disk
    with pytest.raises(IndexError):
        shard.image_at(5)


def test_errors_name_the_setting_and_what_was_found(tmp_path, source):
    root, _ = source
    with pytest.raises(DatasetError, match=f"{ENV_DATASET}.*no such folder"):
        list_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match=f"{ENV_DATASET}.*no .arrow or .parquet shards.*readme.txt"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=f"no shard 'nope' in {ENV_DATASET}.*data-00000-of-00002"):
        open_shard(str(root / "saved"), "nope")
    with pytest.raises(DatasetError, match=f"{ENV_IMAGE_COLUMN}.*columns: id \\(string\\)"):
        open_shard(str(root / "saved"), "data-00000-of-00002", image_column="picture")
    with pytest.raises(DatasetError, match=f"{ENV_ID_COLUMN}.*columns: id"):
        open_shard(str(root / "hub"), "train-00000-of-00002", id_column="page_number")
    with pytest.raises(DatasetError, match=f"{ENV_IMAGE_COLUMN}.*not image bytes"):
        open_shard(str(root / "hub"), "train-00000-of-00002", image_column="id")
    (tmp_path / "text").mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "text" / "t.parquet")
    with pytest.raises(DatasetError, match=f"no image column.*{ENV_IMAGE_COLUMN}.*text \\(string\\)"):
        open_shard(str(tmp_path / "text"), "t")
