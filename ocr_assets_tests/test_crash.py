"""`kill -9` in the middle of a partition, then the same command again: it completes, no reader
ever sees a partial Parquet file, and the regions already read are not read again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

KEY = "data-00000-of-00002"


def _command() -> list[str]:
    exe = shutil.which("ocr-assets")
    return [exe] if exe else [sys.executable, "-m", "ocr_assets.cli"]


def _visible_parquet_is_whole(storage: Path) -> int:
    files = list(storage.rglob("*.parquet"))
    for file in files:
        pq.read_table(file)  # raises on a partial file
    return len(files)


def test_kill_9_mid_recognition_then_run_again(sample_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCR_ASSETS_", "DAGSTER_HOME"))}
    env.update(OCR_ASSETS_DATASET=sample_dataset, DAGSTER_HOME=str(tmp_path / "home"))
    storage = tmp_path / "ocr_data"
    cache = storage / "_recognition_cache" / KEY
    proc = subprocess.Popen(_command() + ["run", "--partition", KEY], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.exists() and any(cache.glob("*.parquet")):  # recognition has paid for some regions
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed mid-recognition"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (storage / "recognition" / f"{KEY}.parquet").exists()
    assert _visible_parquet_is_whole(storage) >= 4  # pages, layout, crops and a cache segment

    again = subprocess.run(_command() + ["run", "--partition", KEY], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    # the killed run held the `vlm` pool's only slot: the new run frees it instead of waiting for ever
    assert "marked failed, its concurrency slots freed" in again.stdout
    _visible_parquet_is_whole(storage)
    documents = pq.read_table(storage / "documents" / f"{KEY}.parquet").to_pylist()
    assert len(documents) == 8 and {d["status"] for d in documents} == {"ok"}
    os.environ["DAGSTER_HOME"] = str(tmp_path / "home")
    try:
        with dg.DagsterInstance.get() as instance:
            event = instance.get_latest_materialization_event(dg.AssetKey("recognition"))
            meta = event.asset_materialization.metadata
    finally:
        del os.environ["DAGSTER_HOME"]
    assert meta["cache_hits"].value > 0  # what the killed run had read was not read again
