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
from ocr_assets.versions import code_version

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
    assert set(evaluations) == {("pages", "every_source_row"), ("layout", "page_error_rate"),
                                ("recognition", "error_rate"), ("recognition", "empty_text_rate"),
                                ("documents", "every_source_row"), ("documents", "page_error_rate"),
                                ("documents", "suspect_page_rate")}
    assert all(e.passed for e in evaluations.values())
    assert evaluations[("pages", "every_source_row")].metadata["missing_rows"].value == 0


def test_check_functions_fail_where_they_should(monkeypatch):
    rows = pa.table({"row": [0, 1, 1]})
    assert checks.one_row_per_source_row(rows, 3)[0] is False  # row 2 missing, row 1 twice
    assert checks.one_row_per_source_row(pa.table({"row": [0, 1, 2]}), 3)[0] is True
    assert checks.one_row_per_source_row(pa.table({"row": [0, 1, 2]}), 4)[0] is False  # the file has 4 rows
    assert checks.one_row_per_source_row(pa.table({"row": [0, 1, 5]}), 3)[0] is False  # a row that is not there
    # pages: a row may hold several pages, but every row has one at least, each (row, page) once
    pages = pa.table({"row": [0, 1, 1, 1, 2], "page": [0, 0, 1, 2, 0]})
    assert checks.every_source_row_has_pages(pages, 3) == (True, {
        "source_rows": 3, "pages": 5, "missing_rows": 0, "rows_outside_the_shard": 0, "repeated_pages": 0,
        "rows_missing_a_page": 0})
    passed, meta = checks.every_source_row_has_pages(pages, 4)  # the file has 4 rows: row 3 has no page
    assert not passed and meta["missing_rows"] == 1
    passed, meta = checks.every_source_row_has_pages(pa.table({"row": [0, 1, 7], "page": [0, 0, 0]}), 3)
    assert not passed and meta["missing_rows"] == 1 and meta["rows_outside_the_shard"] == 1
    passed, meta = checks.every_source_row_has_pages(pa.table({"row": [0, 0, 1], "page": [0, 2, 0]}), 2)
    assert not passed and meta["rows_missing_a_page"] == 1  # row 0 lost its page 1
    passed, meta = checks.every_source_row_has_pages(pa.table({"row": [0, 0, 1], "page": [0, 0, 0]}), 2)
    assert not passed and meta["repeated_pages"] == 1
    pages = pa.table({"page_id": ["a", "b", "c", "d"], "status": ["ok", "error", "ok", "ok"]})
    layout = pa.table({"page_id": ["a", "c", "d"], "region": [0, -1, 0], "status": ["ok", "error", "ok"]})
    passed, meta = checks.layout_page_error_rate(pages, layout)  # b failed in pages, c at layout
    assert not passed and meta["failed_pages"] == 2 and meta["page_error_rate"] == 0.5
    assert checks.layout_page_error_rate(pages.slice(0, 1), layout.slice(0, 1))[0]
    docs = pa.table({"page_status": [["ok"]] * 99 + [["error"]]})
    assert checks.documents_page_error_rate(docs)[0]  # 1 in 100: at the default 0.01
    assert not checks.documents_page_error_rate(pa.table({"page_status": [["ok"]] * 98 + [["error"], ["ok"]]
                                                          + [["error"]]}))[0]
    # pages, not documents: one 100-page PDF with 99 failed pages is one partial document
    passed, meta = checks.documents_page_error_rate(pa.table({"page_status": [["ok"] + ["error"] * 99]}))
    assert not passed and meta["failed_pages"] == 99 and meta["pages"] == 100
    monkeypatch.setenv(config.ENV_MAX_PAGE_ERROR_RATE, "0.5")
    assert checks.layout_page_error_rate(pages, layout)[0]
    rec = pa.table({"region": [0, 1, 2, -1], "status": ["ok", "error", "ok", "error"]})
    passed, meta = checks.error_rate(rec)  # the failed page's -1 row is not a region
    assert not passed and meta["error_rate"] == pytest.approx(1 / 3, abs=1e-4)
    monkeypatch.setenv(config.ENV_MAX_ERROR_RATE, "0.5")
    assert checks.error_rate(rec)[0]
    assert not checks.empty_text_rate(10, 2)[0] and checks.empty_text_rate(10, 1)[0]
    monkeypatch.setenv(config.ENV_MAX_EMPTY_RATE, "two")
    with pytest.raises(ValueError, match=config.ENV_MAX_EMPTY_RATE):
        checks.empty_text_rate(10, 1)


def _materialize(dataset: str, tmp_path, **patches):
    """Every asset of the first shard in a fresh instance, nothing raised; the result."""
    (tmp_path / "home").mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        key = DatasetResource(path=dataset).shards()[0].key
        instance.add_dynamic_partitions(SHARDS, [key])
        return dg.materialize(ASSETS, partition_key=key, instance=instance, raise_on_error=False,
                              resources=_resources(dataset, str(tmp_path / "out")))


def _checks(result) -> dict:
    return {f"{e.asset_key.to_user_string()}/{e.check_name}": e.passed for e in result.get_asset_check_evaluations()}


def test_a_stage_that_loses_a_row_fails_every_source_row_and_stops_the_gpu_stages(small_dataset, tmp_path,
                                                                                 monkeypatch):
    from ocr_assets import assets as assets_module

    real = assets_module.extract_pages

    def loses_a_row(shard, *, sink, **kwargs):  # every batch written but its last row
        return real(shard, sink=lambda table: sink(table.slice(0, table.num_rows - 1)), **kwargs)

    monkeypatch.setattr(assets_module, "extract_pages", loses_a_row)
    result = _materialize(small_dataset, tmp_path)
    assert not result.success and _checks(result) == {"pages/every_source_row": False}
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == {"pages"} and not (tmp_path / "out" / "layout").exists()


def test_documents_that_lose_a_row_fail_every_source_row(small_dataset, tmp_path, monkeypatch):
    from ocr_assets import assets as assets_module

    real = assets_module.assemble_documents

    def loses_the_first_row(*args, sink, **kwargs):
        tables = iter(range(1 << 30))
        return real(*args, sink=lambda table: sink(table.slice(0 if next(tables) else 1)), **kwargs)

    monkeypatch.setattr(assets_module, "assemble_documents", loses_the_first_row)
    result = _materialize(small_dataset, tmp_path)
    assert _checks(result)["documents/every_source_row"] is False
    assert _checks(result)["pages/every_source_row"] is True


def test_failed_pages_make_layout_red_and_block_the_rest(tmp_path, monkeypatch):
    """Half the pages are not images: the layout check fails and crops, recognition, documents do not run."""
    from ocr_assets.sample import render_page
    import io

    buf = io.BytesIO()
    render_page(0)[0].save(buf, format="PNG")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"%PDF-1.7 not an image", "path": None}]
    folder = tmp_path / "dataset"
    folder.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array(rows, type=image_type)}), folder / "train-0.parquet")
    result = _materialize(str(folder), tmp_path)
    assert not result.success and _checks(result) == {"pages/every_source_row": True, "layout/page_error_rate": False}
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} == {"pages", "layout"}
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:  # the same instance
        stale = stale_partitions(instance, ["train-0"])["train-0"]
    assert stale.reason == "layout failed a blocking check" and stale.assets[0] == dg.AssetKey("layout")
    monkeypatch.setenv(config.ENV_MAX_PAGE_ERROR_RATE, "0.5")
    shutil.rmtree(tmp_path / "home")
    result = _materialize(str(folder), tmp_path)
    assert result.success and _checks(result)["layout/page_error_rate"] and _checks(result)["documents/page_error_rate"]


def _upside_down_dataset(folder) -> list[str]:
    """Two sample pages stored upside down, as a Parquet shard; their upright text."""
    import io

    import pyarrow.parquet as pq

    from ocr_assets.sample import render_page

    rows, truths = [], []
    for i in range(2):
        page, truth = render_page(i)
        buf = io.BytesIO()
        page.rotate(180).save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue(), "path": None})
        truths.append(truth)
    folder.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(rows, type=image_type)}), folder / "train-0.parquet")
    return truths


def test_pages_read_upside_down_are_suspect_and_turn_the_documents_check_red(tmp_path, monkeypatch):
    """Pages fed upside down with orientation off: read as garbage, with a low confidence at the
    default threshold, never ok."""
    import pyarrow.parquet as pq

    _upside_down_dataset(tmp_path / "dataset")
    monkeypatch.setenv(config.ENV_ORIENTATION, "off")
    result = _materialize(str(tmp_path / "dataset"), tmp_path)
    assert result.success and _checks(result)["documents/suspect_page_rate"] is False
    docs = pq.read_table(tmp_path / "out" / "documents" / "train-0.parquet").to_pylist()
    threshold = config.DEFAULT_MIN_PAGE_CONFIDENCE
    assert [d["status"] for d in docs] == ["suspect", "suspect"]
    assert all(f"below OCR_ASSETS_MIN_PAGE_CONFIDENCE={threshold}" in d["error"] for d in docs)
    assert all(d["confidence"] < threshold and "low_confidence" in d["flags"] for d in docs)
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta["documents"]["suspect_pages"].value == 2 and meta["documents"]["mean_confidence"].value < threshold


def test_pages_stored_upside_down_are_turned_and_read_through_every_asset(tmp_path):
    """The same pages with orientation on (the default): layout and crops both work on the upright
    page, so the text reads as well as the upright page's and the documents say how it was turned."""
    import pyarrow.parquet as pq

    from ocr_assets.evaluation import word_scores

    truths = _upside_down_dataset(tmp_path / "dataset")
    result = _materialize(str(tmp_path / "dataset"), tmp_path)
    assert result.success and all(_checks(result).values())
    layout = pq.read_table(tmp_path / "out" / "layout" / "train-0.parquet", columns=["rotation", "skew"])
    assert set(layout.column("rotation").to_pylist()) == {180} and set(layout.column("skew").to_pylist()) == {0.0}
    docs = pq.read_table(tmp_path / "out" / "documents" / "train-0.parquet").to_pylist()
    assert [d["status"] for d in docs] == ["ok", "ok"]
    assert all(d["flags"] == ["rotated"] and d["confidence"] > config.DEFAULT_MIN_PAGE_CONFIDENCE for d in docs)
    for doc, truth in zip(docs, truths):
        assert word_scores(doc["markdown"], truth)[2] >= 0.9


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
        assert spec.code_version == code_version(asset.key.to_user_string()) and "parquet" in spec.kinds
        assert asset.backfill_policy == dg.BackfillPolicy.multi_run(1)
    layout = graph.get(dg.AssetKey("layout"))
    assert layout.pools == {"gpu"} and graph.get(dg.AssetKey("recognition")).pools == {"vlm"}
    tags = next(iter(ASSETS[1].node_def.tags.items()))
    assert tags[0] == "dagster-k8s/config" and "nvidia.com/gpu" in str(tags[1])


def test_schedule_runs_only_missing_or_stale_partitions(instance_with_runs):
    instance, keys, storage, _, dataset = instance_with_runs
    stale = stale_partitions(instance, keys)
    assert {k: s.reason for k, s in stale.items()} == {keys[1]: "layout never materialized"}
    assert [a.to_user_string() for a in stale[keys[1]].assets] == ["layout", "crops", "recognition", "documents"]
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    requests = catch_up_schedule(context)
    assert [r.partition_key for r in requests] == [keys[1]]
    assert [a.to_user_string() for a in requests[0].asset_selection] == ["layout", "crops", "recognition", "documents"]
    # re-materialize pages of the complete shard: everything after it is now out of date
    assert dg.materialize(ASSETS[:1], partition_key=keys[0], instance=instance,
                          resources=_resources(dataset, storage)).success
    assert stale_partitions(instance, keys)[keys[0]].reason == "layout is older than its input"
    # an asset whose code changed is out of date too, and only it and what is below it run again
    from types import SimpleNamespace

    changed = [SimpleNamespace(key=a.key, asset_deps=a.asset_deps,
                               code_versions_by_key={a.key: "9" if a.key.to_user_string() == "documents"
                                                     else code_version(a.key.to_user_string())})
               for a in ASSETS]
    assert dg.materialize(ASSETS[1:], partition_key=keys[0], instance=instance,
                          resources=_resources(dataset, storage)).success
    redo = stale_partitions(instance, keys, assets=changed)[keys[0]]
    assert f"code version {code_version('documents')}" in redo.reason and redo.reason.endswith("now 9")
    assert [a.to_user_string() for a in redo.assets] == ["documents"]  # not back to the GPU


def test_schedule_leaves_alone_shards_busy_in_any_job_or_backfill(instance_with_runs):
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.storage.dagster_run import DagsterRun

    instance, keys, _, _, _ = instance_with_runs
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    assert keys[1] in {r.partition_key for r in catch_up_schedule(context)}
    # a UI materialization or an asset backfill runs as __ASSET_JOB, not the pipeline job
    run = instance.add_run(DagsterRun(job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED,
                                      tags={"dagster/partition": keys[1]}))
    assert isinstance(catch_up_schedule(context), dg.SkipReason)
    instance.delete_run(run.run_id)
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="bf1", asset_graph=defs.resolve_asset_graph(), partition_names=[keys[1]],
        asset_selection=[a.key for a in ASSETS], backfill_timestamp=0.0, tags={}, dynamic_partitions_store=instance,
        all_partitions=False, title=None, description=None, run_config=None)
    instance.add_backfill(backfill)  # requested, no run launched yet
    assert isinstance(catch_up_schedule(context), dg.SkipReason)


def test_code_versions_follow_the_settings_that_change_an_output(monkeypatch):
    before = {name: code_version(name) for name in ("pages", "layout", "crops", "recognition", "documents")}
    monkeypatch.setenv(config.ENV_LAYOUT_DTYPE, "float32")
    assert code_version("layout") != before["layout"] and code_version("pages") == before["pages"]
    monkeypatch.setenv(config.ENV_VLM_BASE_URL, "http://127.0.0.1:9/v1")  # the openai recognizer
    assert code_version("crops") != before["crops"] and code_version("recognition") != before["recognition"]
    vlm = code_version("recognition")
    monkeypatch.setenv(config.ENV_VLM_MODEL, "other-ocr")
    assert code_version("recognition") != vlm and code_version("documents") == before["documents"]
    monkeypatch.setenv(config.ENV_ID_COLUMN, "doc")
    assert code_version("pages") != before["pages"]


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
