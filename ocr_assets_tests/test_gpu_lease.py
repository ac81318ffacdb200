"""GPU leases: two processes never hold the same GPU, a killed holder frees it, cuda:N pins one.

The lease is a lock file per GPU on the host; it needs no GPU to test: the GPU count is given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ocr_assets import gpu_lease
from ocr_assets.gpu_lease import lease_gpu, physical_ids, wanted_indices

HOLD = """
import sys, time
from ocr_assets.gpu_lease import lease_gpu
lease = lease_gpu(sys.argv[1], int(sys.argv[2]))
print(lease.index, lease.slot, flush=True)
time.sleep(600)
"""


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OCR_ASSETS_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def _holder(setting: str, count: int, env: dict | None = None) -> tuple[subprocess.Popen, int, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, setting, str(count)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    index, slot = proc.stdout.readline().split()
    return proc, int(index), slot


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def test_two_processes_never_share_a_gpu_and_a_third_waits(run_dir):
    first, a, _ = _holder("auto", 2)
    second, b, _ = _holder("auto", 2)
    try:
        assert {a, b} == {0, 1}
        with pytest.raises(TimeoutError, match=f"pid {first.pid}"):
            lease_gpu("auto", 2, timeout=0.5, poll=0.05)
    finally:
        _stop(first, second)


def test_a_killed_holder_frees_its_gpu(run_dir):
    holder, index, _ = _holder("cuda:1", 2)
    with pytest.raises(TimeoutError):
        lease_gpu("cuda:1", 2, timeout=0.3, poll=0.05)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
    holder.wait()
    with lease_gpu("cuda:1", 2, timeout=5, poll=0.05) as lease:
        assert lease.index == index == 1 and lease.device == "cuda:1"


def test_cuda_n_waits_for_its_gpu_while_another_is_free(run_dir):
    holder, _, _ = _holder("cuda:0", 2)
    try:
        with pytest.raises(TimeoutError):
            lease_gpu("cuda:0", 2, timeout=0.3, poll=0.05)
        with lease_gpu("auto", 2, timeout=1) as lease:
            assert lease.index == 1
    finally:
        _stop(holder)


def test_a_released_lease_is_free_again_and_not_kept_by_a_child(run_dir):
    lease = lease_gpu("auto", 1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # inherits no lock
    try:
        lease.release()
        with lease_gpu("auto", 1, timeout=1) as again:
            assert again.index == 0
    finally:
        _stop(child)


def test_gpus_are_named_by_physical_id(run_dir):
    """Two processes seeing the same GPUs in another order still never share one."""
    holder, index, slot = _holder("cuda:0", 2, env={"CUDA_VISIBLE_DEVICES": "5,3"})
    try:
        assert (index, slot) == (0, "gpu-5")
        os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"
        try:
            assert physical_ids(2) == ["3", "5"]
            with lease_gpu("auto", 2, timeout=1) as lease:
                assert lease.slot == "gpu-3"
            with pytest.raises(TimeoutError, match="GPU 5"):
                lease_gpu("cuda:1", 2, timeout=0.3, poll=0.05)
        finally:
            del os.environ["CUDA_VISIBLE_DEVICES"]
    finally:
        _stop(holder)


def test_a_waiting_step_says_what_it_waits_for(run_dir, monkeypatch, caplog):
    holder, _, _ = _holder("auto", 1)
    monkeypatch.setattr(gpu_lease, "WAIT_LOG_SECONDS", 0.0)
    try:
        with caplog.at_level("INFO", logger="ocr_assets.progress"), pytest.raises(TimeoutError):
            lease_gpu("auto", 1, timeout=0.3, poll=0.05)
        assert f"GPU 0: pid {holder.pid}" in caplog.text
    finally:
        _stop(holder)


@pytest.mark.parametrize("setting, count, message", [
    ("auto", 0, "CUDA is not available"),
    ("cuda:3", 2, "has 2 GPU"),
    ("gpu", 2, "not a GPU"),
])
def test_bad_device_settings_name_the_variable(setting, count, message):
    with pytest.raises(ValueError, match=f"OCR_ASSETS_DEVICE.*{message}"):
        wanted_indices(setting, count)


def test_a_lease_file_names_its_holder(run_dir):
    with lease_gpu("auto", 1) as lease:
        text = lease.path.read_text()
        assert f"pid {os.getpid()}" in text


def test_a_layout_step_opens_the_gpu_pool_to_the_gpus_it_sees(monkeypatch):
    """On a node with N GPUs the `gpu` pool's limit becomes N; a higher limit set by hand stays."""
    import logging
    from types import SimpleNamespace

    import dagster as dg

    from ocr_assets import assets

    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        context = SimpleNamespace(instance=instance, log=logging.getLogger("test"))
        storage = instance.event_log_storage
        monkeypatch.setattr(assets, "gpu_count", lambda: 1)
        assets.raise_gpu_pool_limit(context)
        assert "gpu" not in storage.get_concurrency_keys() or storage.get_concurrency_info("gpu").slot_count <= 1
        monkeypatch.setattr(assets, "gpu_count", lambda: 4)
        assets.raise_gpu_pool_limit(context)
        assert storage.get_concurrency_info("gpu").slot_count == 4
        storage.set_concurrency_slots("gpu", 8)
        assets.raise_gpu_pool_limit(context)
        assert storage.get_concurrency_info("gpu").slot_count == 8
