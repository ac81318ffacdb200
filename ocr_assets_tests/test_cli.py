"""The `ocr-assets` command as users run it: a real subprocess, a persistent instance, real Parquet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import dagster as dg
import pyarrow.parquet as pq


def _run(args, tmp_path, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCR_ASSETS_", "DAGSTER_HOME"))}
    env.update(env_extra)
    exe = shutil.which("ocr-assets")
    command = [exe] if exe else [sys.executable, "-m", "ocr_assets.cli"]
    return subprocess.run(command + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_run_one_partition_into_a_persistent_instance(small_dataset, tmp_path):
    home = tmp_path / "home"
    done = _run(["run", "--partition", "data-00001-of-00002"], tmp_path,
                OCR_ASSETS_DATASET=small_dataset, OCR_ASSETS_STORAGE=str(tmp_path / "out"),
                DAGSTER_HOME=str(home))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for stage in ("pages", "layout", "crops", "recognition", "documents"):
        assert f"\n{stage}" in out  # one summary row per stage
    assert "[1/1] shard data-00001-of-00002" in out
    assert "\n2 pages from 2 source rows; 2 documents\n" in out  # a source row may hold many pages
    documents = pq.read_table(tmp_path / "out" / "documents" / "data-00001-of-00002.parquet")
    assert documents.num_rows == 2
    # The runs are in the instance, so `dagster dev` on the same DAGSTER_HOME shows them.
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dg.DagsterInstance.get() as instance:
            assert len(instance.get_runs()) == 1
            assert "data-00001-of-00002" in instance.get_dynamic_partitions("shards")
    finally:
        del os.environ["DAGSTER_HOME"]


def test_select_runs_only_the_named_assets(small_dataset, tmp_path):
    done = _run(["run", "--select", "pages", "--partition", "data-00000-of-00002"], tmp_path,
                OCR_ASSETS_DATASET=small_dataset, DAGSTER_HOME=str(tmp_path / "home"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ocr_data" / "pages" / "data-00000-of-00002.parquet").exists()
    assert not (tmp_path / "ocr_data" / "layout").exists()


def test_unknown_partition_lists_the_shards(small_dataset, tmp_path):
    done = _run(["run", "--partition", "nope"], tmp_path, OCR_ASSETS_DATASET=small_dataset,
                DAGSTER_HOME=str(tmp_path / "home"))
    assert done.returncode == 2
    assert "data-00000-of-00002" in done.stderr


def test_missing_dataset_names_the_setting(tmp_path):
    done = _run(["run"], tmp_path, OCR_ASSETS_DATASET=str(tmp_path / "missing"),
                DAGSTER_HOME=str(tmp_path / "home"))
    assert done.returncode == 2
    assert "OCR_ASSETS_DATASET" in done.stderr


def test_failed_partition_exits_non_zero_with_the_reason(small_dataset, tmp_path):
    done = _run(["run", "--partition", "data-00000-of-00002"], tmp_path,
                OCR_ASSETS_DATASET=small_dataset, OCR_ASSETS_LAYOUT_BACKEND="bogus",
                DAGSTER_HOME=str(tmp_path / "home"))
    assert done.returncode == 1
    assert "OCR_ASSETS_LAYOUT_BACKEND" in done.stderr


def test_a_failed_blocking_check_exits_non_zero(tmp_path):
    """One page of two is not an image: layout's page error rate is red, and so is the command."""
    import io

    import pyarrow as pa

    from ocr_assets.sample import render_page

    buf = io.BytesIO()
    render_page(1)[0].save(buf, format="PNG")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}]
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"image": pa.array(rows, type=image_type)}), tmp_path / "ds" / "train-0.parquet")
    done = _run(["run"], tmp_path, OCR_ASSETS_DATASET=str(tmp_path / "ds"), DAGSTER_HOME=str(tmp_path / "home"))
    assert done.returncode == 1, done.stdout
    assert "blocking check layout/page_error_rate" in done.stderr and "page_error_rate=0.5" in done.stderr
    assert not (tmp_path / "ocr_data" / "documents").exists()


def test_prune_cache_drops_what_the_settings_no_longer_reach(small_dataset, tmp_path):
    import pyarrow as pa

    from ocr_assets.recognition_cache import CACHE_SCHEMA
    from ocr_assets.storage import ParquetStore

    env = dict(OCR_ASSETS_DATASET=small_dataset, DAGSTER_HOME=str(tmp_path / "home"))
    assert _run(["run", "--partition", "data-00000-of-00002"], tmp_path, **env).returncode == 0
    store = ParquetStore(str(tmp_path / "ocr_data"))
    answers = store.read_segments("recognition_cache", "data-00000-of-00002")
    assert answers.num_rows > 0 and len(store.segment_files("recognition_cache", "data-00000-of-00002")) == 1
    # an answer read under other settings (another model, another prompt): no current key reaches it
    store.append_segment("recognition_cache", "data-00000-of-00002", pa.table(
        {"key": ["0" * 64], "text": ["old"], "confidence": [None], "status": ["ok"], "error": [None]}, schema=CACHE_SCHEMA))
    done = _run(["prune-cache"], tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert f"data-00000-of-00002: kept {answers.num_rows}, dropped 1" in done.stdout
    left = store.read_segments("recognition_cache", "data-00000-of-00002")
    assert sorted(left.column("key").to_pylist()) == sorted(answers.column("key").to_pylist())
    # a rerun still reads every answer from the cache
    rerun = _run(["run", "--partition", "data-00000-of-00002", "--select", "recognition"], tmp_path, **env)
    assert rerun.returncode == 0, rerun.stderr


def test_sample_command_writes_shards(tmp_path):
    done = _run(["sample", str(tmp_path / "s"), "--pages", "2", "--shards", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "s").glob("*.arrow")) == [
        "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert sorted(p.name for p in (tmp_path / "s").glob("*.parquet")) == [
        "documents-multipage.parquet", "documents-pdf.parquet", "scans.parquet"]
