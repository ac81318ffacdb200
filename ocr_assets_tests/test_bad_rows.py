"""Bad rows never stop a partition, and every source row reaches `documents` with a readable reason."""

from __future__ import annotations

import io

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from ocr_assets.assets import ASSETS
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.sample import render_page


def _png(index: int) -> bytes:
    image, _ = render_page(index)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_rows_reach_documents_with_reasons(tmp_path, monkeypatch):
    good = _png(0)
    rows = [
        good,
        b"",  # empty bytes
        b"this is not an image",
        good[:20],  # PNG cut inside its header
        good[:33] + b"\x00" * 4000,  # a valid header over a broken body: fails only at decode
        None,  # no image at all
    ]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([None if b is None else {"bytes": b, "path": None} for b in rows], type=image_type)
    table = pa.table({"image": images})
    folder = tmp_path / "dataset"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)

    storage = tmp_path / "out"
    resources = {
        "dataset": DatasetResource(path=str(folder)),
        "storage": StorageResource(root=str(storage)),
        "layout_model": LayoutResource(),
        "recognizer": RecognizerResource(),
    }
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.add_dynamic_partitions(SHARDS, ["data-00000-of-00001"])
        result = dg.materialize(ASSETS, partition_key="data-00000-of-00001", instance=instance, resources=resources,
                                raise_on_error=False)
        # five of six pages failed: layout is red and nothing below it runs
        assert not result.success and not (storage / "crops").exists()
        monkeypatch.setenv("OCR_ASSETS_MAX_PAGE_ERROR_RATE", "1")  # let them through, to read the reasons
        result = dg.materialize(ASSETS, partition_key="data-00000-of-00001", instance=instance, resources=resources)
        assert result.success

    documents = pq.read_table(storage / "documents" / "data-00000-of-00001.parquet").to_pylist()
    assert [d["row"] for d in documents] == list(range(len(rows)))
    assert [d["status"] for d in documents] == ["ok"] + ["error"] * 5
    assert len(documents[0]["markdown"]) > 200
    errors = [d["error"] for d in documents[1:]]
    assert "empty" in errors[0]
    assert "not an image" in errors[1]
    assert "truncated" in errors[2]
    assert "decoded" in errors[3]  # the layout stage found it, and documents carries its words
    assert errors[4]
