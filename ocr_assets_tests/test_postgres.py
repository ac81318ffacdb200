"""The pipeline with a real PostgreSQL server as the Dagster instance storage (dagster-postgres).

The server is a throwaway cluster in a temporary folder, started with the machine's PostgreSQL
binaries (`.ci/run` installs Debian's `postgresql` where they are missing); the test skips,
saying why, only where no server can start.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from ocr_assets.assets import ASSETS
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource

ROOT = Path(__file__).resolve().parents[1]


def _pg_bin() -> str | None:
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(versions[-1]) if versions else None


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user where we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="module")
def postgres_url():  # noqa: C901 - start-up steps, each with its own reason to skip
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) here: install Debian's postgresql")
    # outside pytest's private temp tree, which the postgres user cannot enter
    root = Path(tempfile.mkdtemp(prefix="ocr-assets-pg-"))
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run(_as_server_user(list(cmd)), capture_output=True, text=True, timeout=120)
    init = run(f"{bin_dir}/initdb", "-D", str(data), "-U", "dagster", "--auth=trust", "-E", "UTF8")
    if init.returncode != 0:
        pytest.skip(f"initdb failed, no PostgreSQL server can start here: {init.stderr.strip()[-300:]}")
    start = run(f"{bin_dir}/pg_ctl", "-D", str(data), "-w", "-l", str(data / "log"), "-o",
                f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    if start.returncode != 0:
        pytest.skip(f"the PostgreSQL server did not start: {start.stderr.strip()[-300:]}")
    try:
        # psycopg2 explicitly: SQLAlchemy 2.1 would take psycopg 3 for postgresql://, which
        # dagster-postgres's NOTIFY statements do not work with
        yield f"postgresql+psycopg2://dagster@127.0.0.1:{port}/postgres"
    finally:
        run(f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_pipeline_with_postgres_instance_storage(postgres_url, small_dataset, tmp_path):
    import psycopg2

    overrides = {"storage": {"postgres": {"postgres_url": postgres_url}}}
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home"), overrides=overrides) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        key = DatasetResource(path=small_dataset).shards()[0].key
        instance.add_dynamic_partitions(SHARDS, [key])
        resources = {"dataset": DatasetResource(path=small_dataset), "storage": StorageResource(root=str(tmp_path / "out")),
                     "layout_model": LayoutResource(), "recognizer": RecognizerResource()}
        result = dg.materialize(ASSETS, partition_key=key, instance=instance, resources=resources)
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("documents"))
        assert event.asset_materialization.partition == key
        assert event.asset_materialization.metadata["stage_seconds"].value > 0
    with psycopg2.connect(postgres_url.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert cur.fetchone()[0] == 5


def test_deploy_postgres_config_runs_against_the_server(postgres_url, small_dataset, tmp_path, monkeypatch):
    """deploy/postgres/dagster.yaml as shipped, with the DAGSTER_PG_* variables pointing at the server."""
    from urllib.parse import urlparse

    url = urlparse(postgres_url)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    for name, value in {"HOME": str(home), "PG_HOST": url.hostname, "PG_PORT": str(url.port), "PG_USER": "dagster",
                        "PG_PASSWORD": "", "PG_DB": "postgres"}.items():
        monkeypatch.setenv(f"DAGSTER_{name}" if name != "HOME" else "DAGSTER_HOME", value)
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage" and instance.run_monitoring_enabled
        key = DatasetResource(path=small_dataset).shards()[1].key
        instance.add_dynamic_partitions(SHARDS, [key])
        result = dg.materialize(ASSETS[:1], partition_key=key, instance=instance,
                                resources={"dataset": DatasetResource(path=small_dataset),
                                           "storage": StorageResource(root=str(tmp_path / "out")),
                                           "layout_model": LayoutResource(), "recognizer": RecognizerResource()})
        assert result.success
