"""The layout worker: a real worker process on 127.0.0.1 keeps the model warm across shards, gives
the same rows as layout in the step, and a step or a worker that dies never goes unnoticed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from ocr_assets import layout_worker
from ocr_assets.backends.layout import SETTINGS
from ocr_assets.backends.layout.pp_doclayout_v3 import write_random_checkpoint
from ocr_assets.gpu_lease import lease_slot
from ocr_assets.layout_runner import CPU_SLOT, LayoutJob, run_partition
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.sample import write_sample
from ocr_assets.sources import list_shards, open_shard
from ocr_assets.schemas import PAGES
from ocr_assets.stages.pages import extract_pages
from ocr_assets.storage import ParquetStore
from ocr_assets.timing import StageReport

CDLA = {name: None for name in SETTINGS} | {"recover_text": True}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OCR_ASSETS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("OCR_ASSETS_LAYOUT_WORKER", "on")
    yield tmp_path / "run"
    for info in layout_worker.workers():
        layout_worker.stop_worker(info["slot"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_random_checkpoint(tmp_path_factory.mktemp("ppdl3")))


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory) -> str:
    """One shard of 6 pages: a few seconds of PP-DocLayoutV3 on the CPU, long enough to kill a party mid-job."""
    return str(write_sample(tmp_path_factory.mktemp("slow") / "dataset", pages=6, shards=1, documents=False,
                            scans=False))


def _pages(dataset: str, storage: str) -> list[str]:
    keys = [ref.key for ref in list_shards(dataset)]
    store = ParquetStore(storage)
    for key in keys:
        shard = open_shard(dataset, key)
        try:
            with store.writer("pages", key, PAGES) as written:
                extract_pages(shard, sink=written.write)
        finally:
            shard.close()
    return keys


def _pp(checkpoint: str) -> dict:
    return CDLA | {"backend": "pp-doclayout-v3", "model": checkpoint, "device": "cpu", "dtype": "float32"}


def test_the_worker_keeps_the_model_warm_and_gives_the_steps_rows(small_dataset, tmp_path, run_dir, monkeypatch):
    """Through Dagster: the first shard starts the worker, the second finds it warm; rows are the
    ones layout in the step writes."""
    resources = {"dataset": DatasetResource(path=small_dataset), "storage": StorageResource(root=str(tmp_path / "w")),
                 "layout_model": LayoutResource(), "recognizer": RecognizerResource()}
    keys = [ref.key for ref in list_shards(small_dataset)]
    metas = []
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(SHARDS, keys)
        from ocr_assets.assets import layout, pages

        for key in keys:
            result = dg.materialize([pages, layout], partition_key=key, instance=instance, resources=resources)
            assert result.success
            metas.append(result.asset_materializations_for_node("layout")[0].metadata)
        monkeypatch.setenv("OCR_ASSETS_LAYOUT_WORKER", "off")
        resources["storage"] = StorageResource(root=str(tmp_path / "here"))
        alone = dg.materialize([pages, layout], partition_key=keys[1], instance=instance, resources=resources)
        assert alone.success
    first, second = ({k: v.value for k, v in m.items()} for m in metas)
    assert first["layout_worker"] == "started" and second["layout_worker"] == "warm"
    assert second["model_load_seconds"] == 0.0 and first["model_load_seconds"] > 0
    assert second["gpu"] == "cpu" and second["gpu_memory_peak_mb"] == 0.0
    assert {"startup_seconds", "lease_wait_seconds"} <= set(second)
    (worker,) = layout_worker.workers()
    assert worker["health"]["jobs"] == 2 and worker["pid"] != os.getpid()
    via_worker = pq.read_table(tmp_path / "w" / "layout" / f"{keys[1]}.parquet")
    in_step = pq.read_table(tmp_path / "here" / "layout" / f"{keys[1]}.parquet")
    assert via_worker.num_rows > 0 and via_worker.equals(in_step)


def _job(dataset: str, storage: str, key: str, settings: dict = CDLA) -> LayoutJob:
    return LayoutJob.for_step(dataset=dataset, storage=storage, partition=key, settings=settings)


STEP = (
    "import json, sys\n"
    "from ocr_assets.layout_runner import LayoutJob, run_partition\n"
    "from ocr_assets.timing import StageReport\n"
    "job = LayoutJob.for_step(dataset=sys.argv[1], storage=sys.argv[2], partition=sys.argv[3],"
    " settings=json.loads(sys.argv[4]))\n"
    "info = run_partition(job, StageReport()).report.info\n"
    "print(info['layout_worker'], info['gpu'], 'torch' in sys.modules)\n"
)


def _step(dataset: str, storage: str, key: str, settings: dict, env: dict | None = None) -> list[str]:
    """A layout step in a fresh process (as Dagster runs one); its (layout_worker, gpu, torch imported)."""
    import json

    done = subprocess.run([sys.executable, "-c", STEP, dataset, storage, key, json.dumps(settings)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_worker_running_other_code_is_replaced(small_dataset, tmp_path, run_dir):
    """An upgrade changes the package's files: a new step process finds the worker's code older."""
    storage = str(tmp_path / "out")
    key = _pages(small_dataset, storage)[0]
    assert _step(small_dataset, storage, key, CDLA)[0] == "started"
    assert _step(small_dataset, storage, key, CDLA)[0] == "warm"
    old = layout_worker.workers()[0]["pid"]
    source = Path(layout_worker.__file__).with_name("timing.py")
    before = source.stat()
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    try:
        assert _step(small_dataset, storage, key, CDLA)[0] == "started"
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert layout_worker.workers()[0]["pid"] != old


def test_a_step_with_other_settings_gets_a_worker_of_its_own(small_dataset, tmp_path, run_dir):
    storage = str(tmp_path / "out")
    key = _pages(small_dataset, storage)[0]
    assert _step(small_dataset, storage, key, CDLA)[0] == "started"
    assert _step(small_dataset, storage, key, CDLA, env={"OCR_ASSETS_DESKEW": "off"})[0] == "started"
    assert _step(small_dataset, storage, key, CDLA | {"conf_threshold": 0.9},
                 env={"OCR_ASSETS_DESKEW": "off"})[0] == "started"
    assert _step(small_dataset, storage, key, CDLA | {"conf_threshold": 0.9},
                 env={"OCR_ASSETS_DESKEW": "off"})[0] == "warm"
    assert len(layout_worker.workers()) == 1


def test_a_job_names_absolute_paths(small_dataset, tmp_path, monkeypatch):
    """A worker has its own working folder: a step's relative paths must not reach it as they are."""
    monkeypatch.chdir(tmp_path)
    job = LayoutJob.for_step(dataset="./data", storage="out", partition="k", settings=CDLA | {"model": "./ck"})
    assert (job.dataset, job.storage, job.settings["model"]) == (
        str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "ck"))
    remote = LayoutJob.for_step(dataset="s3://b/d", storage="gs://b/o", partition="k",
                                settings=CDLA | {"model": "PaddlePaddle/PP-DocLayoutV3_safetensors"})
    assert (remote.dataset, remote.storage, remote.settings["model"]) == (
        "s3://b/d", "gs://b/o", "PaddlePaddle/PP-DocLayoutV3_safetensors")


def test_a_worker_that_stops_as_a_step_arrives_is_replaced(small_dataset, tmp_path, run_dir, monkeypatch):
    storage = str(tmp_path / "out")
    key = _pages(small_dataset, storage)[0]
    job = _job(small_dataset, storage, key)
    run_partition(job, StageReport())
    old = layout_worker.workers()[0]
    real = layout_worker.find_worker

    def found_then_stopped(slot):  # the worker goes idle between the step's look and its shard
        info = real(slot)
        if info is not None and info["pid"] == old["pid"]:
            layout_worker._request(info["port"], "POST", "/stop")
        return info

    monkeypatch.setattr(layout_worker, "find_worker", found_then_stopped)
    outcome = run_partition(job, StageReport())
    monkeypatch.setattr(layout_worker, "find_worker", real)
    assert outcome.report.info["layout_worker"] == "started" and outcome.report.pages == 2
    assert layout_worker.workers()[0]["pid"] != old["pid"]


def test_bad_settings_fail_the_step_as_they_would_in_it(small_dataset, tmp_path, run_dir):
    storage = str(tmp_path / "out")
    key = _pages(small_dataset, storage)[0]
    run_partition(_job(small_dataset, storage, key), StageReport())
    pid = layout_worker.workers()[0]["pid"]
    bad = CDLA | {"label_tasks": '{"text": "sing"}'}
    with pytest.raises(ValueError, match="label_tasks maps to unknown tasks"):
        run_partition(_job(small_dataset, storage, key, bad), StageReport())
    assert layout_worker.workers()[0]["pid"] == pid  # the good worker was not replaced for it


def test_an_error_in_the_worker_fails_the_step_with_its_message(small_dataset, tmp_path, run_dir):
    storage = str(tmp_path / "out")
    keys = _pages(small_dataset, storage)
    run_partition(_job(small_dataset, storage, keys[0]), StageReport())
    with pytest.raises(Exception, match="no-such-shard") as raised:
        run_partition(_job(small_dataset, storage, "no-such-shard"), StageReport())
    assert "layout worker for cpu" in str(raised.value) and "layout-worker-cpu.log" in str(raised.value)
    assert "Traceback" in (run_dir / "layout-worker-cpu.log").read_text()
    assert run_partition(_job(small_dataset, storage, keys[0]), StageReport()).report.info["layout_worker"] == "warm"


def test_a_worker_killed_mid_shard_fails_the_step(slow_dataset, checkpoint, tmp_path, run_dir):
    storage = str(tmp_path / "out")
    key = _pages(slow_dataset, storage)[0]
    job = LayoutJob.for_step(dataset=slow_dataset, storage=storage, partition=key, settings=_pp(checkpoint))
    layout_worker.start_worker(CPU_SLOT, "cpu", job.settings)
    raised: list = []

    def step() -> None:
        try:
            run_partition(job, StageReport())
        except Exception as exc:
            raised.append(exc)

    thread = threading.Thread(target=step)
    thread.start()
    pid = _busy_worker_pid()
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert len(raised) == 1 and isinstance(raised[0], layout_worker.WorkerGone)
    assert "stopped answering" in str(raised[0]) or "without an answer" in str(raised[0])
    assert not (Path(storage) / "layout" / f"{key}.parquet").exists()


def test_a_step_killed_mid_shard_frees_its_lease_and_the_worker(slow_dataset, checkpoint, tmp_path, run_dir):
    storage = str(tmp_path / "out")
    key = _pages(slow_dataset, storage)[0]
    settings = _pp(checkpoint)
    layout_worker.start_worker(CPU_SLOT, "cpu", settings)
    script = (
        "import json, sys\n"
        "from ocr_assets.layout_runner import LayoutJob, run_partition\n"
        "from ocr_assets.timing import StageReport\n"
        "job = LayoutJob.for_step(dataset=sys.argv[1], storage=sys.argv[2], partition=sys.argv[3],"
        " settings=json.loads(sys.argv[4]))\n"
        "run_partition(job, StageReport())\n"
    )
    import json

    step = subprocess.Popen([sys.executable, "-c", script, slow_dataset, storage, key, json.dumps(settings)])
    _busy_worker_pid()
    step.kill()
    step.wait()
    with lease_slot(CPU_SLOT, poll=0.05):  # the dead step's lease is free at once
        pass
    deadline = time.monotonic() + 60
    while layout_worker.workers()[0]["health"]["busy"]:
        assert time.monotonic() < deadline, "the worker stayed busy for a step that died"
        time.sleep(0.2)
    assert not list((Path(storage) / "layout").glob("*.tmp-*"))  # no partial file left behind
    job = LayoutJob.for_step(dataset=slow_dataset, storage=storage, partition=key, settings=settings)
    outcome = run_partition(job, StageReport())
    assert outcome.report.info["layout_worker"] == "warm" and outcome.report.pages == 6


def _busy_worker_pid(timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for info in layout_worker.workers():
            if info["health"]["busy"]:
                return info["pid"]
        time.sleep(0.02)
    raise AssertionError("no worker became busy")


def test_the_cli_starts_lists_and_stops_the_hosts_workers(small_dataset, tmp_path, run_dir, capsys):
    from ocr_assets.cli import main

    assert main(["layout-workers"]) == 0
    assert "no layout workers" in capsys.readouterr().out
    assert main(["layout-workers", "--start"]) == 0
    out = capsys.readouterr().out
    assert "started the layout worker for cpu on cpu" in out and "cpu: pid" in out
    pid = layout_worker.workers()[0]["pid"]
    storage = str(tmp_path / "out")
    key = _pages(small_dataset, storage)[0]  # a step with the same settings finds it warm
    job = _job(small_dataset, storage, key, LayoutResource().settings())
    assert run_partition(job, StageReport()).report.info["layout_worker"] == "warm"
    assert main(["layout-workers", "--stop"]) == 0
    assert f"stopped the layout worker for cpu (pid {pid})" in capsys.readouterr().out
    assert layout_worker.workers() == []


def test_a_step_that_finds_a_warm_worker_does_not_import_torch(small_dataset, checkpoint, tmp_path, run_dir):
    """The GPU count comes from the worker's registration: the step's start-up stays free of torch."""
    storage = str(tmp_path / "out")
    key = _pages(small_dataset, storage)[0]
    settings = _pp(checkpoint) | {"device": "auto"}
    layout_worker.start_worker(CPU_SLOT, "cpu", _job(small_dataset, storage, key, settings).settings)
    assert _step(small_dataset, storage, key, settings) == ["warm", "cpu", "False"]
