"""The code location loads, the graph is the one DESIGN.md promises, and every asset materializes."""

from __future__ import annotations

import dagster as dg
import pyarrow.parquet as pq
import pytest

from ocr_assets.assets import ASSETS
from ocr_assets.definitions import defs
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.sensors import shard_sensor

REQUIRED_COLUMNS = {
    "pages": {"page_id", "shard", "row", "page", "format", "width", "height", "nbytes", "status", "error"},
    "layout": {"page_id", "region", "label", "task", "score", "x0", "y0", "x1", "y1"},
    "crops": {"page_id", "region", "task", "image", "width", "height"},
    "recognition": {"page_id", "region", "task", "text", "confidence", "status", "error"},
    "documents": {"page_id", "shard", "row", "pages", "status", "markdown", "page_markdown", "confidence", "flags",
                  "error"},
}
TIMING_PARTS = {
    "layout": {"decode_seconds", "preprocess_seconds", "inference_seconds", "postprocess_seconds"},
    # plotted per partition: present in every one
    "recognition": {"mean_confidence", "confident_regions"},
    "documents": {"mean_confidence", "confident_pages", "suspect_pages", "pages_rotated", "pages_skewed",
                  "pages_figure_text", "pages_low_confidence"},
}


def test_definitions_load_with_the_promised_graph():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(REQUIRED_COLUMNS)
    upstream = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert upstream["layout"] == {"pages"}
    assert upstream["crops"] == {"layout"}
    assert upstream["recognition"] == {"crops"}
    assert "recognition" in upstream["documents"]
    for asset in ASSETS:
        assert asset.partitions_def.name == SHARDS
    assert graph.get(dg.AssetKey("layout")).pools == {"gpu"}


def _resources(dataset: str, storage: str) -> dict:
    return {
        "dataset": DatasetResource(path=dataset),
        "storage": StorageResource(root=storage),
        "layout_model": LayoutResource(),
        "recognizer": RecognizerResource(),
    }


@pytest.fixture(scope="module")
def materialized(small_dataset, tmp_path_factory):
    """Every asset of one partition, materialized in a real instance in a temporary folder."""
    storage = str(tmp_path_factory.mktemp("storage"))
    home = tmp_path_factory.mktemp("dagster_home")
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        key = DatasetResource(path=small_dataset).shards()[0].key
        instance.add_dynamic_partitions(SHARDS, [key])
        result = dg.materialize(
            ASSETS, partition_key=key, instance=instance, resources=_resources(small_dataset, storage)
        )
        assert result.success
        events = {
            e.asset_key.to_user_string(): e.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        yield key, storage, events


def test_every_asset_writes_its_parquet_contract(materialized):
    key, storage, _ = materialized
    tables = {name: pq.read_table(f"{storage}/{name}/{key}.parquet") for name in REQUIRED_COLUMNS}
    for name, columns in REQUIRED_COLUMNS.items():
        assert columns <= set(tables[name].column_names), name
    pages, layout, documents = tables["pages"], tables["layout"], tables["documents"]
    assert documents.num_rows == pages.num_rows == 2
    assert documents.column("page_id").to_pylist() == pages.column("page_id").to_pylist()
    assert set(layout.column("task").to_pylist()) <= {"text", "table", "formula", "skip"}
    assert set(documents.column("status").to_pylist()) == {"ok"}
    assert all(len(md) > 200 for md in documents.column("markdown").to_pylist())
    crops = tables["crops"]
    assert crops.num_rows == layout.num_rows
    assert tables["recognition"].num_rows == layout.num_rows


def test_every_asset_reports_timings(materialized):
    _, _, events = materialized
    assert set(events) == set(REQUIRED_COLUMNS)
    key, storage, _ = materialized
    for name, metadata in events.items():
        # the row count and schema are those of the file written in row groups
        file = pq.ParquetFile(f"{storage}/{name}/{key}.parquet")
        assert metadata["dagster/row_count"].value == file.metadata.num_rows, name
        assert [c.name for c in metadata["dagster/column_schema"].schema.columns] == file.schema_arrow.names, name
        for required in ("stage_seconds", "pages_per_second", "dagster/row_count", "dagster/column_schema", "uri"):
            assert required in metadata, (name, required)
        assert metadata["stage_seconds"].value > 0
        assert TIMING_PARTS.get(name, set()) <= set(metadata), name
    assert "model_load_seconds" in events["layout"] and "model_load_seconds" in events["recognition"]
    # clean sample pages read by the local models: a confidence on every one, none suspect
    assert 0.9 < events["documents"]["mean_confidence"].value <= 1.0
    assert events["documents"]["confident_pages"].value == events["documents"]["pages"].value
    assert events["documents"]["suspect_pages"].value == 0
    assert 0.9 < events["recognition"]["mean_confidence"].value <= 1.0


def test_sensor_registers_new_shards_once(small_dataset, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        resources = {"dataset": DatasetResource(path=small_dataset)}
        context = dg.build_sensor_context(instance=instance, resources=resources)
        result = shard_sensor(context)
        added = result.dynamic_partitions_requests[0].partition_keys
        assert sorted(added) == ["data-00000-of-00002", "data-00001-of-00002"]
        assert sorted(r.partition_key for r in result.run_requests) == sorted(added)
        instance.add_dynamic_partitions(SHARDS, added)
        again = shard_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert not again.run_requests and not again.dynamic_partitions_requests

