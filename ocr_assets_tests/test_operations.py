"""Operating the pipeline from Dagster: checks, previews, the catch-up schedule, the sensor switch,
backfill policy and the instance settings, on a real instance in a temporary folder."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from ocr_assets import checks, config
from ocr_assets.assets import ASSETS
from ocr_assets.definitions import defs
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.schedules import catch_up_schedule, stale_partitions
from ocr_assets.sensors import shard_sensor

ROOT = Path(__file__).resolve().parents[1]
TICK = datetime(2026, 11, 25, 2, 0, tzinfo=timezone.utc)


def _resources(dataset: str, storage: str) -> dict:
    return {"dataset": DatasetResource(path=dataset), "storage": StorageResource(root=storage),
            "layout_model": LayoutResource(), "recognizer": RecognizerResource()}


@pytest.fixture(scope="module")
def instance_with_runs(small_dataset, tmp_path_factory):
    """Shard 0 materialized (everything), shard 1 only `pages`; checks and previews recorded."""
    storage = str(tmp_path_factory.mktemp("ops_out"))
    home = tmp_path_factory.mktemp("ops_home")
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        keys = [ref.key for ref in DatasetResource(path=small_dataset).shards()]
        instance.add_dynamic_partitions(SHARDS, keys)
        full = dg.materialize(ASSETS, partition_key=keys[0], instance=instance,
                              resources=_resources(small_dataset, storage))
        assert full.success
        part = dg.materialize(ASSETS[:1], partition_key=keys[1], instance=instance,
                              resources=_resources(small_dataset, storage))
        assert part.success
        yield instance, keys, storage, full, small_dataset


def test_checks_pass_and_are_recorded(instance_with_runs):
    _, _, _, full, _ = instance_with_runs
    evaluations = {(e.asset_key.to_user_string(), e.check_name): e for e in full.get_asset_check_evaluations()}
    assert set(evaluations) == {("pages", "every_source_row"), ("recognition", "error_rate"),
                                ("recognition", "empty_text_rate"), ("documents", "every_source_row")}
    assert all(e.passed for e in evaluations.values())
    assert evaluations[("pages", "every_source_row")].metadata["missing_rows"].value == 0


def test_check_functions_fail_where_they_should(monkeypatch):
    rows = pa.table({"row": [0, 1, 1]})
    assert checks.every_source_row(rows, 3)[0] is False  # row 2 missing, row 1 twice
    assert checks.every_source_row(pa.table({"row": [0, 1, 2]}), 3)[0] is True
    rec = pa.table({"region": [0, 1, 2, -1], "status": ["ok", "error", "ok", "error"]})
    passed, meta = checks.error_rate(rec)  # the failed page's -1 row is not a region
    assert not passed and meta["error_rate"] == pytest.approx(1 / 3, abs=1e-4)
    monkeypatch.setenv(config.ENV_MAX_ERROR_RATE, "0.5")
    assert checks.error_rate(rec)[0]
    assert not checks.empty_text_rate(10, 2)[0] and checks.empty_text_rate(10, 1)[0]
    monkeypatch.setenv(config.ENV_MAX_EMPTY_RATE, "two")
    with pytest.raises(ValueError, match=config.ENV_MAX_EMPTY_RATE):
        checks.empty_text_rate(10, 1)


def test_a_failed_blocking_check_stops_the_gpu_stages(small_dataset, tmp_path, monkeypatch):
    from ocr_assets import assets as assets_module

    monkeypatch.setattr(assets_module.checks, "every_source_row", lambda table, rows: (False, {"forced": True}))
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        key = DatasetResource(path=small_dataset).shards()[0].key
        instance.add_dynamic_partitions(SHARDS, [key])
        result = dg.materialize(ASSETS, partition_key=key, instance=instance, raise_on_error=False,
                                resources=_resources(small_dataset, str(tmp_path / "out")))
    assert not result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == {"pages"} and not (tmp_path / "out" / "layout").exists()


def test_previews_in_the_metadata(instance_with_runs):
    _, keys, storage, full, _ = instance_with_runs
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in full.get_asset_materialization_events()}
    layout_md = meta["layout"]["preview"].value
    assert layout_md.startswith("**") and "data:image/jpeg;base64," in layout_md
    picture = Path(storage) / "_layout_previews" / f"{keys[0]}.jpg"
    assert picture.read_bytes()[:3] == b"\xff\xd8\xff"
    assert meta["layout"]["preview_uri"].value.endswith(picture.name)
    assert len(meta["documents"]["preview"].value) > 100
    assert meta["recognition"]["preview"].value.startswith("- ")


def test_assets_carry_what_the_ui_shows():
    graph = defs.resolve_asset_graph()
    for asset in ASSETS:
        spec = next(iter(asset.specs))
        assert spec.description and spec.group_name == "ocr" and spec.owners == ["team:ocr"]
        assert spec.code_version == "1" and "parquet" in spec.kinds
        assert asset.backfill_policy == dg.BackfillPolicy.multi_run(1)
    layout = graph.get(dg.AssetKey("layout"))
    assert layout.pools == {"gpu"} and graph.get(dg.AssetKey("recognition")).pools == {"vlm"}
    tags = next(iter(ASSETS[1].node_def.tags.items()))
    assert tags[0] == "dagster-k8s/config" and "nvidia.com/gpu" in str(tags[1])


def test_schedule_runs_only_missing_or_stale_partitions(instance_with_runs):
    instance, keys, storage, _, dataset = instance_with_runs
    assert stale_partitions(instance, keys) == {keys[1]: "layout never materialized"}
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    requests = catch_up_schedule(context)
    assert [r.partition_key for r in requests] == [keys[1]]
    # re-materialize pages of the complete shard: everything after it is now out of date
    assert dg.materialize(ASSETS[:1], partition_key=keys[0], instance=instance,
                          resources=_resources(dataset, storage)).success
    assert stale_partitions(instance, keys)[keys[0]] == "layout is older than its input"
    # an asset whose code changed is out of date too
    from types import SimpleNamespace

    changed = [SimpleNamespace(key=a.key, asset_deps=a.asset_deps,
                               code_versions_by_key={a.key: "2" if a.key.to_user_string() == "pages" else "1"})
               for a in ASSETS]
    assert "code version 1, now 2" in stale_partitions(instance, keys, assets=changed)[keys[1]]


def test_schedule_skips_when_everything_is_up_to_date(small_dataset, tmp_path):
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        result = catch_up_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK))
        assert isinstance(result, dg.SkipReason)


def test_sensor_can_register_without_running(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_SENSOR_RUNS, "0")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        context = dg.build_sensor_context(instance=instance, resources={"dataset": DatasetResource(path=small_dataset)})
        result = shard_sensor(context)
        assert len(result.dynamic_partitions_requests[0].partition_keys) == 2 and not result.run_requests


def test_instance_settings(tmp_path, monkeypatch):
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert instance.run_monitoring_enabled
        settings = instance.get_concurrency_config()
        assert settings.run_queue_config.max_concurrent_runs == 4
        assert settings.pool_config.default_pool_limit == 1
