"""Dataset sources on real files: every layout `datasets` and the hub write, every kind of row, errors.

Datasets come from ``layouts`` (written with `datasets`, `tarfile`, matplotlib's PDF backend) or,
for rows `datasets` refuses to write, with pyarrow in the same storage layout.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2
import pytest
from PIL import Image

from ocr_assets.config import ENV_DATASET, ENV_ID_COLUMN, ENV_IMAGE_COLUMN
from ocr_assets.sources import DatasetError, PageReadError, list_shards, open_shard, shard_key, source_row_count
from ocr_assets.sources.columns import choose_content
from ocr_assets_tests import layouts
from ocr_assets_tests.layouts import page_lines, text_pdf, text_png, text_tiff

ROWS = 12
IMAGE_SIZE = (400, 300)  # layouts' raster pages
PDF_SIZE = (600, 450)  # layouts' 4 x 3 inch PDF pages at the default 150 dpi, within a pixel


def _png(index: int, size: int = 48) -> bytes:
    # Noise does not compress: the images are big enough for the allocation check to mean something.
    pixels = np.random.default_rng(index).integers(0, 255, (size, size + index, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _pages(dataset: str, key: str, **columns) -> tuple[list[list], list]:
    """(page infos per row, pixels of every page in order) of one shard."""
    with open_shard(dataset, key, **columns) as shard:
        infos = list(shard.page_infos())
        pixels = shard.read_pages([(p.row, p.page) for row in infos for p in row])
    return infos, pixels


def _read_all(dataset: str, **columns) -> list[list[bytes]]:
    """Bytes of every single-page row of every shard."""
    out = []
    for ref in list_shards(dataset):
        infos, pixels = _pages(dataset, ref.key, **columns)
        assert all(len(row) == 1 for row in infos)
        out.append([bytes(p) for p in pixels])
    return out


def _errors(infos: list[list]) -> dict[tuple[int, int], str]:
    return {(p.row, p.page): p.error for row in infos for p in row if p.error}


def _size(info) -> tuple[int, int] | None:
    """A page's size; a PDF page's rounded to the layouts' PDF_SIZE when within a pixel of it."""
    if info.width is None:
        return None
    if info.format == "pdf" and abs(info.width - PDF_SIZE[0]) <= 1 and abs(info.height - PDF_SIZE[1]) <= 1:
        return PDF_SIZE
    return info.width, info.height


def _same_pixels(got, encoded: bytes) -> bool:
    image = got if isinstance(got, np.ndarray) else cv2.imdecode(np.frombuffer(got, np.uint8), cv2.IMREAD_COLOR)
    return np.array_equal(image, cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, list[bytes]]:
    """One dataset written in the three table layouts: save_to_disk, cache-style .arrow, hub-style .parquet."""
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
    infos, _ = _pages(str(root / "hub"), "train-00000-of-00002")
    assert [(p.row, p.page, p.format, p.width, p.height, p.nbytes) for row in infos for p in row] == [
        (r, 0, "png", 48 + r, 48, len(images[r])) for r in range(ROWS // 2)]


def _mapped_file_of(address: int) -> str | None:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, stop = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < stop:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings")
def test_arrow_shard_is_memory_mapped_and_pages_are_slices_of_the_mapping(source):
    root, images = source
    before = pa.total_allocated_bytes()
    path = root / "saved" / "data-00000-of-00002.arrow"
    with open_shard(str(root / "saved"), "data-00000-of-00002") as shard:
        views = shard.read_pages([(row, 0) for row in range(shard.num_rows)])
        # The image bytes stay in the file mapping: Arrow's allocator holds far less than them.
        assert pa.total_allocated_bytes() - before < sum(len(b) for b in images[: ROWS // 2]) // 4
        for row, view in enumerate(views):
            assert isinstance(view, memoryview) and view == images[row] and view.readonly
            assert _mapped_file_of(np.frombuffer(view, dtype=np.uint8).ctypes.data) == str(path)
        assert shard.content == "image"


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
        assert [source_row_count(url, r.key) for r in refs] == [ROWS // 2, ROWS // 2]
    with open_shard("memory://test-dataset-hub", "train-00001-of-00002", id_column="id") as shard:
        assert shard.row_ids() == [f"page-{i}" for i in range(ROWS // 2, ROWS)]


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
    assert shard_key("pdfa-eng-train-000001.tar") == "pdfa-eng-train-000001"
    assert shard_key("wds/idl-train-00000.tar.gz") == "wds__idl-train-00000"
    assert shard_key("x.tgz") == "x"
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
    with open_shard(str(tmp_path), "train-0", id_column="doc") as shard:
        with pytest.raises(DatasetError, match=r"OCR_ASSETS_ID_COLUMN='doc'.*'a' is in rows 0 and 2"):
            shard.row_ids()
    with open_shard(str(tmp_path), "train-0") as shard:
        assert shard.row_ids() == [f"train-0/{r}" for r in range(3)]


def test_plain_binary_image_column_found_by_magic_and_integer_ids(tmp_path):
    images = [_png(i, 16) for i in range(3)]
    table = pa.table({"num": [7, 8, None], "digest": pa.array([b"\x01\x02" * 8] * 3),
                      "scan": pa.array(images, pa.large_binary())})
    pq.write_table(table, tmp_path / "s.parquet")
    with open_shard(str(tmp_path), "s", id_column="num") as shard:  # "digest" is binary too, but no image
        assert shard.content == "scan" and shard.row_ids() == ["7", "8", "s/2"]
        assert [bytes(p) for p in shard.read_pages([(r, 0) for r in range(3)])] == images
    with open_shard(str(tmp_path), "s", image_column="scan") as shard:
        assert [len(row) for row in shard.page_infos()] == [1, 1, 1]


def test_null_images_and_images_stored_by_path(tmp_path):
    (tmp_path / "files").mkdir()
    on_disk = _png(5, 16)
    (tmp_path / "files" / "p.png").write_bytes(on_disk)
    rows = [{"bytes": _png(1, 16), "path": None}, None, {"bytes": None, "path": "files/p.png"},
            {"bytes": None, "path": "files/missing.png"}, {"bytes": None, "path": str(tmp_path / "files" / "p.png")},
            {"bytes": None, "path": (tmp_path / "files" / "p.png").as_uri()}, {"bytes": None, "path": None}]
    pq.write_table(pa.table({"image": pa.array(rows)}), tmp_path / "s.parquet")
    infos, pixels = _pages(str(tmp_path), "s")
    assert [len(row) for row in infos] == [1] * 7
    assert pixels[0] == _png(1, 16) and pixels[2] == on_disk and pixels[4] == on_disk and pixels[5] == on_disk
    errors = _errors(infos)
    assert set(errors) == {(1, 0), (3, 0), (6, 0)}
    assert "null in column 'image'" in errors[(1, 0)] and "null" in errors[(6, 0)]
    assert "'files/missing.png' could not be read" in errors[(3, 0)]
    assert isinstance(pixels[3], PageReadError) and "files/missing.png" in str(pixels[3])
    with open_shard(str(tmp_path), "s") as shard, pytest.raises(IndexError):
        shard.read_pages([(7, 0)])


def test_errors_name_the_setting_and_what_was_found(tmp_path, source):
    root, _ = source
    with pytest.raises(DatasetError, match=f"{ENV_DATASET}.*no such folder"):
        list_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match=f"{ENV_DATASET}.*no .arrow, .parquet or .tar shards.*readme.txt"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=f"no shard 'nope' in {ENV_DATASET}.*data-00000-of-00002"):
        open_shard(str(root / "saved"), "nope")
    with pytest.raises(DatasetError, match=f"{ENV_IMAGE_COLUMN}.*columns: id \\(string\\)"):
        open_shard(str(root / "saved"), "data-00000-of-00002", image_column="picture")
    with pytest.raises(DatasetError, match=f"{ENV_ID_COLUMN}.*columns: id"):
        open_shard(str(root / "hub"), "train-00000-of-00002", id_column="page_number")
    with pytest.raises(DatasetError, match=f"'id' \\({ENV_IMAGE_COLUMN}\\).*string.*neither images nor PDFs"):
        open_shard(str(root / "hub"), "train-00000-of-00002", image_column="id")
    (tmp_path / "text").mkdir()
    pq.write_table(pa.table({"text": ["a", "b"], "blob": [b"not a page", b"x"]}), tmp_path / "text" / "t.parquet")
    with pytest.raises(DatasetError, match=f"no column holding images or PDFs.*{ENV_IMAGE_COLUMN}.*text \\(string\\)"):
        open_shard(str(tmp_path / "text"), "t")
    with pytest.raises(DatasetError, match=f"'blob' \\({ENV_IMAGE_COLUMN}\\).*neither images nor PDFs.*b'not a pa'"):
        open_shard(str(tmp_path / "text"), "t", image_column="blob")


# The content column: features first, then the Arrow type, then magic numbers.

_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _schema(fields: dict, features: dict | None) -> pa.Schema:
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()} if features is not None else None
    return pa.schema(list(fields.items()), metadata=metadata)


def _no_head(name):
    raise AssertionError(f"the bytes of {name!r} were looked at, though the schema says enough")


@pytest.mark.parametrize("feature, claim, is_list", [
    ({"_type": "Image"}, "image", False),
    ({"_type": "Pdf"}, "pdf", False),
    ({"_type": "List", "feature": {"_type": "Image"}}, "image", True),
    ({"_type": "List", "feature": {"_type": "Pdf"}}, "pdf", True),
    ({"_type": "LargeList", "feature": {"_type": "Image"}}, "image", True),
    ({"_type": "Sequence", "feature": {"_type": "Image"}}, "image", True),  # older datasets
    ([{"_type": "Pdf"}], "pdf", True),  # older datasets' plain-list form
])
def test_content_column_from_the_features(feature, claim, is_list):
    stored = pa.list_(_IMAGE_STRUCT) if is_list else _IMAGE_STRUCT
    # "audio" comes first and is stored the same way, but its feature says it is no page
    schema = _schema({"audio": _IMAGE_STRUCT, "id": pa.string(), "page": stored},
                     {"audio": {"_type": "Audio"}, "id": {"_type": "Value", "dtype": "string"}, "page": feature})
    column = choose_content(schema, "k", None, _no_head)
    assert (column.name, column.claim, column.is_list, column.found_by) == ("page", claim, is_list, "features")


def test_content_column_from_the_arrow_type_then_magic_numbers():
    schema = _schema({"id": pa.string(), "pages": pa.large_list(_IMAGE_STRUCT)}, None)
    column = choose_content(schema, "k", None, _no_head)
    assert (column.name, column.is_list, column.found_by) == ("pages", True, "arrow type")
    heads = {"hash": pa.array([b"\x00" * 20, None]), "pdf": pa.array([None, b"%PDF-1.7\n..."], pa.binary_view()),
             "scans": pa.array([None, [None, _png(1)]], pa.list_(pa.binary()))}
    schema = _schema({"hash": pa.binary(), "pdf": pa.binary_view(), "scans": pa.list_(pa.binary())}, {})
    assert choose_content(schema, "k", None, heads.get).name == "pdf"
    schema = _schema({"hash": pa.binary(), "scans": pa.list_(pa.binary())}, None)
    column = choose_content(schema, "k", None, heads.get)
    assert (column.name, column.claim, column.is_list, column.found_by) == ("scans", None, True, "magic numbers")
    with pytest.raises(DatasetError, match=r"no column holding images or PDFs.*hash \(binary\)"):
        choose_content(_schema({"hash": pa.binary()}, None), "k", None, heads.get)


def test_table_rows_of_every_kind(tmp_path):
    """Lists, PDFs and TIFFs in plain binary columns (no features): pages from the bytes alone."""
    tiff = text_tiff([page_lines(1), page_lines(2), page_lines(3)])
    pdf = text_pdf([page_lines(4), page_lines(5)])
    png, single_tiff = text_png(page_lines(6)), text_tiff([page_lines(7)])
    rows = [[png, None, pdf], [], None, [tiff], [single_tiff, b"%PDF-1.4 but not really"]]
    pq.write_table(pa.table({"content": pa.array(rows, pa.list_(pa.binary()))}), tmp_path / "t.parquet")
    infos, pixels = _pages(str(tmp_path), "t")
    got = [[(p.page, p.format, _size(p), p.error is None) for p in row] for row in infos]
    assert got == [
        [(0, "png", IMAGE_SIZE, True), (1, None, None, False), (2, "pdf", PDF_SIZE, True),
         (3, "pdf", PDF_SIZE, True)],
        [(0, None, None, False)],
        [(0, None, None, False)],
        [(0, "tiff", IMAGE_SIZE, True), (1, "tiff", IMAGE_SIZE, True), (2, "tiff", IMAGE_SIZE, True)],
        [(0, "tiff", IMAGE_SIZE, True), (1, "pdf", None, False)],
    ]
    errors = _errors(infos)
    assert errors[(0, 1)] == "element 1 of the list in column 'content' is null"
    assert "empty" in errors[(1, 0)] and "null" in errors[(2, 0)]
    flat = [p for row in infos for p in row]
    by_page = dict(zip([(p.row, p.page) for p in flat], pixels))
    assert _same_pixels(by_page[(0, 0)], png) and isinstance(by_page[(0, 0)], memoryview)
    assert isinstance(by_page[(0, 1)], PageReadError)
    for page, k in ((2, 0), (3, 1)):
        rendered = by_page[(0, page)]
        info = infos[0][page]
        assert isinstance(rendered, np.ndarray) and rendered.shape == (info.height, info.width, 3)
        reference = pypdfium2.PdfDocument(pdf)[k].render(scale=150 / 72).to_numpy()
        assert np.abs(np.subtract(reference.shape[:2], rendered.shape[:2])).max() <= 1
    for frame, lines in enumerate((page_lines(1), page_lines(2), page_lines(3))):
        got = by_page[(3, frame)]  # a frame of a multi-frame TIFF is decoded alone
        assert isinstance(got, np.ndarray) and _same_pixels(got, text_png(lines))
    assert isinstance(by_page[(4, 0)], memoryview) and _same_pixels(by_page[(4, 0)], text_png(page_lines(7)))


def _pdf_reason(data: bytes) -> str:
    from ocr_assets.sources.pdf import PdfError, pdf_page_sizes

    try:
        sizes = pdf_page_sizes(data, 150)
    except PdfError as exc:
        return str(exc)
    assert sizes == [], "a PDF that cannot be read"
    return "the PDF has no pages"


def test_pdf_column_holding_no_pdf_and_broken_pdfs(tmp_path):
    lines = page_lines(8)
    pdfs = [b"hello", text_pdf([lines])[:300], layouts.zero_page_pdf(), layouts.encrypted_pdf(lines), b"",
            text_png(lines)]
    ds = datasets.Dataset.from_dict({"pdf": [{"bytes": b, "path": None} for b in pdfs]},
                                    features=datasets.Features({"pdf": datasets.Pdf()}))
    ds.save_to_disk(str(tmp_path))
    infos, pixels = _pages(str(tmp_path), "data-00000-of-00001")
    assert [len(row) for row in infos] == [1] * 6
    errors = _errors(infos)
    assert errors[(0, 0)] == "not a PDF (starts with b'hello')"  # the feature's claim words the error
    assert set(errors) == {(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)}
    for row in (1, 2, 3):  # truncated, no pages, password: the reason is the PDF reader's own
        assert infos[row][0].format == "pdf" and infos[row][0].nbytes == len(pdfs[row])
        assert errors[(row, 0)] == _pdf_reason(pdfs[row])
    assert "empty" in errors[(4, 0)]
    assert (infos[5][0].format, infos[5][0].width) == ("png", IMAGE_SIZE[0])  # magic, not the feature, decides
    assert all(isinstance(p, PageReadError) for p in pixels[:5]) and _same_pixels(pixels[5], text_png(lines))


def test_read_pages_in_any_order_across_windows_renders_each_pdf_page_once(tmp_path, monkeypatch):
    from ocr_assets.sources import pdf as pdf_module
    from ocr_assets.sources.rows import WINDOW_ROWS

    rows = 2 * WINDOW_ROWS + 5
    pdf = text_pdf([page_lines(1), page_lines(2)])
    images = [_png(i, 8) for i in range(rows)]
    content = [[images[r], pdf] if r % 40 == 0 else [images[r]] for r in range(rows)]
    table = pa.table({"pages": pa.array(content, pa.list_(pa.binary()))})
    pq.write_table(table, tmp_path / "many.parquet", row_group_size=50)  # windows cross row groups
    with pa.ipc.new_stream(str(tmp_path / "many.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=70)
    jobs = []
    render = pdf_module.PdfRenderer.render
    monkeypatch.setattr(pdf_module.PdfRenderer, "render", lambda self, batch: jobs.append(list(batch)) or render(self, batch))
    for path in (tmp_path / "many.parquet", tmp_path / "many.arrow"):
        with open_shard(str(path), "many") as shard:
            infos = list(shard.page_infos())
            assert [len(row) for row in infos] == [len(c) + (1 if len(c) == 2 else 0) for c in content]
            wanted = [(rows - 1, 0), (0, 2), (3, 0), (80, 1), (0, 2), (80, 1), (130, 0), (1, 0), (80, 2), (0, 5)]
            jobs.clear()
            got = shard.read_pages(wanted)
            assert [len(batch) for batch in jobs] == [3]  # (0, 2), (80, 1), (80, 2): once each, in one batch
            for (row, page), pixels in zip(wanted, got):
                if page == 0:
                    assert bytes(pixels) == images[row]
                elif (row, page) == (0, 5):
                    assert isinstance(pixels, PageReadError) and "has 3 pages" in str(pixels)
                else:
                    assert isinstance(pixels, np.ndarray)
            assert got[1] is got[4]
        assert shard._renderer is None  # closed with the shard


def test_pdf_pages_are_sized_and_rendered_at_the_configured_dpi(tmp_path, monkeypatch):
    monkeypatch.setenv("OCR_ASSETS_PDF_DPI", "72")  # a point is a pixel: the 4 x 3 inch page is 288 x 216
    pq.write_table(pa.table({"doc": [text_pdf([page_lines(1)])]}), tmp_path / "d.parquet")
    infos, pixels = _pages(str(tmp_path), "d")
    assert [(p.format, p.width, p.height) for p in infos[0]] == [("pdf", 288, 216)]
    assert pixels[0].shape == (216, 288, 3)


def test_a_pdf_column_is_the_content_beside_an_image_column():
    """Datasets of PDFs often carry a thumbnail Image column: the pages are the PDF's."""
    schema = _schema({"thumbnail": _IMAGE_STRUCT, "pdf": _IMAGE_STRUCT},
                     {"thumbnail": {"_type": "Image"}, "pdf": {"_type": "Pdf"}})
    column = choose_content(schema, "k", None, _no_head)
    assert (column.name, column.claim) == ("pdf", "pdf")


def test_a_pdf_renderer_that_cannot_run_fails_the_read_not_the_pages(tmp_path, monkeypatch):
    """A pool that cannot start would fail every PDF page the same way: a broken setup, not bad rows."""
    from ocr_assets.sources import pdf as pdf_module

    def no_room(self, batch):
        raise OSError("neither /dev/shm nor TMPDIR is writable")

    monkeypatch.setattr(pdf_module.PdfRenderer, "render", no_room)
    pq.write_table(pa.table({"doc": [text_pdf([page_lines(1)])]}), tmp_path / "d.parquet")
    with open_shard(str(tmp_path / "d.parquet"), "d") as shard:
        with pytest.raises(RuntimeError, match="PDF renderer of shard 'd' could not run.*TMPDIR"):
            shard.read_pages([(0, 0)])
