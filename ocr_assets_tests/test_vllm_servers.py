"""Managed vLLM servers shared by the steps, against a stand-in `vllm` that runs `ocr-assets serve`.

The stand-in is a real executable on PATH that serves the local recognizer over real HTTP, and
records each start (its pid, port and CUDA_VISIBLE_DEVICES), so the tests count the servers
started. Other steps are real processes holding the servers through the same functions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from ocr_assets import config, vllm_server
from ocr_assets.backends.recognition.base import Crop
from ocr_assets.cli import main
from ocr_assets.imaging import vlm_crop
from ocr_assets.vllm_server import ServerUse, VllmSettings, ensure_servers, list_servers, stop_servers
from ocr_assets_tests.test_recognition import LINE, _f1, _render

FAKE_VLLM = """#!{python}
# Stands in for `vllm serve MODEL --served-model-name NAME --host H --port P ...`: the local server.
import json, os, subprocess, sys, time
args = sys.argv[1:]
assert args[0] == "serve", args
opts = dict(zip(args[2::2], args[3::2]))
assert "--gpu-memory-utilization" in opts and "--max-num-seqs" in opts, args
if os.environ.get("FAKE_VLLM_FAIL"):
    print("RuntimeError: CUDA out of memory (stand-in)", flush=True)
    sys.exit(3)
gate = os.environ.get("FAKE_VLLM_GATE")  # a slow start: an engine process, then loading until the gate file exists
engine = gate and subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "fake-vllm-engine"]).pid
with open(os.environ["FAKE_VLLM_RECORD"], "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "engine": engine, "port": int(opts["--port"]), "model": args[1],
                        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")
while gate and not os.path.exists(gate):
    time.sleep(0.05)
if gate and open(gate).read() == "fail":
    print("RuntimeError: CUDA out of memory while loading (stand-in)", flush=True)
    sys.exit(3)
from ocr_assets.cli import main
sys.exit(main(["serve", "--port", opts["--port"], "--model", opts["--served-model-name"]]))
"""

# Another recognition step: takes the servers and holds them until its stdin closes (or it is killed).
OTHER_STEP = """
import sys
from ocr_assets.vllm_server import ServerUse, VllmSettings, ensure_servers
use = ServerUse()
urls = ensure_servers(VllmSettings(sys.argv[1], port=int(sys.argv[2])), gpus=int(sys.argv[3]), use=use)
print(",".join(urls), flush=True)
sys.stdin.read()
"""

MODEL = "zai-org/GLM-OCR"
_steps: list[subprocess.Popen] = []  # the other steps a test started: killed after it


@pytest.fixture()
def fake_vllm(tmp_path, monkeypatch):
    """The stand-in `vllm` on PATH, a run folder of the test's own, no GPU; every server stopped after."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(0o755)
    record = tmp_path / "starts.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(config.ENV_RUN_DIR, str(tmp_path / "run"))
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(vllm_server, "gpu_count", lambda: 0)  # tests that want GPUs say how many
    yield record
    while _steps:
        step = _steps.pop()
        step.kill()
        step.wait()
    stop_servers(force=True, wait=10)
    for start in _starts(record):  # a server (or its engine) left behind by a failing test
        for pid, mark in ((start["pid"], "vllm"), (start.get("engine"), "fake-vllm-engine")):
            try:
                if pid and mark in Path(f"/proc/{pid}/cmdline").read_text():
                    (os.killpg if mark == "vllm" else os.kill)(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _starts(record) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _free_ports(n: int) -> int:
    """A port P with P .. P + n - 1 free."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n <= 65535 and all(_bindable(port + i) for i in range(n)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _other_step(port: int, gpus: int) -> subprocess.Popen:
    step = subprocess.Popen([sys.executable, "-c", OTHER_STEP, MODEL, str(port), str(gpus)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _steps.append(step)
    return step


def _wait_for(condition, what: str, limit: float = 60.0):
    """``condition()``'s first true value, polled; fails the test after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not (value := condition()):
        assert time.monotonic() < deadline, f"still not {what} after {limit:g} s"
        time.sleep(0.05)
    return value


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie does not: it holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _loading_step(record, port: int) -> tuple[subprocess.Popen, dict]:
    """Another step, caught while the server it started loads (the gate file is absent)."""
    step = _other_step(port, gpus=0)
    (start,) = _wait_for(lambda: _starts(record), "started")
    _wait_for(vllm_server.registration("0").exists, "registered")
    return step, start


def test_steps_at_once_start_one_server_per_gpu(fake_vllm):
    port = _free_ports(2)
    settings = VllmSettings(MODEL, port=port)
    other = _other_step(port, gpus=2)
    results: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ensure_servers(settings, gpus=2)))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    theirs = other.stdout.readline().strip().split(",")
    expected = [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"]
    assert results[0] == results[1] == theirs == expected
    starts = _starts(fake_vllm)
    # one server per GPU however many steps asked, each on its port and its GPU alone
    assert sorted((s["port"], s["cuda"]) for s in starts) == [(port, "0"), (port + 1, "1")]
    assert all(s["model"] == MODEL for s in starts)
    assert ensure_servers(settings, gpus=2) == expected and len(_starts(fake_vllm)) == 2  # reused
    listed = list_servers()
    assert [(i["slot"], i["port"], i["healthy"], i["in_use"]) for i in listed] == [
        ("0", port, True, True), ("1", port + 1, True, True)]  # the other step holds both
    other.stdin.close()
    assert other.wait() == 0
    assert [i["in_use"] for i in list_servers()] == [False, False]


def test_a_step_leaves_the_servers_running_for_the_next(fake_vllm, monkeypatch):
    from ocr_assets.resources import RecognizerResource

    monkeypatch.setattr(vllm_server, "gpu_count", lambda: 2)
    port = _free_ports(2)
    resource = RecognizerResource(vlm_serve_model=MODEL, vlm_serve_port=port)
    assert resource.kind_name() == "openai" and resource.stored_crop_format() == "vlm-jpeg"
    recognizer, load_seconds = resource.load(2)
    data, w, h = vlm_crop(_render([LINE]))
    results = recognizer.recognize([Crop("text", data, w, h) for _ in range(4)])  # over both servers
    assert all(r.status == "ok" and _f1(r.text, LINE) >= 0.9 for r in results) and load_seconds > 0
    listed = list_servers()
    assert [(i["port"], i["in_use"], i["healthy"]) for i in listed] == [(port, True, True), (port + 1, True, True)]
    resource.teardown_after_execution(None)
    after = list_servers()
    assert [(i["pid"], i["healthy"], i["in_use"]) for i in after] == [(i["pid"], True, False) for i in listed]
    assert _answers(f"http://127.0.0.1:{port}/v1") and _answers(f"http://127.0.0.1:{port + 1}/v1")
    resource.load()  # the next step
    assert len(_starts(fake_vllm)) == 2 and all(i["in_use"] for i in list_servers())
    resource.teardown_after_execution(None)


def test_stop_leaves_a_used_server_until_its_step_dies(fake_vllm):
    port = _free_ports(1)
    (url,) = ensure_servers(VllmSettings(MODEL, port=port))
    other = _other_step(port, gpus=0)
    assert other.stdout.readline().strip() == url
    stopped, busy = stop_servers()
    assert stopped == [] and [b["slot"] for b in busy] == ["0"] and _answers(url)
    (info,) = list_servers()
    assert info["in_use"] and info["healthy"]
    other.kill()  # SIGKILL: no clean-up runs; the kernel drops its lock
    other.wait()
    stopped, busy = stop_servers()
    assert [s["pid"] for s in stopped] == [info["pid"]] and busy == []
    assert not _answers(url) and list_servers() == [] and not vllm_server._running(info)
    assert not vllm_server.registration("0").exists()


def test_other_settings_are_refused_not_replaced(fake_vllm):
    port = _free_ports(1)
    settings = VllmSettings(MODEL, port=port)
    (url,) = ensure_servers(settings)
    with pytest.raises(ValueError, match=r"OCR_ASSETS_VLM_SERVE_GPU_MEMORY \(0.7 running, 0.5 asked\).*"
                                         r"ocr-assets vllm-servers --stop"):
        ensure_servers(replace(settings, gpu_memory_utilization=0.5))
    with pytest.raises(ValueError, match=r"OCR_ASSETS_VLM_SERVE_MODEL.*ocr-assets vllm-servers --stop"):
        ensure_servers(replace(settings, model="other/model"))
    with pytest.raises(ValueError, match="vlm_serve_flags"):
        ensure_servers(replace(settings, flags=("--max-num-seqs", "8")))
    other = _free_ports(1)
    with pytest.raises(ValueError, match=rf"OCR_ASSETS_VLM_SERVE_PORT \({port} running, {other} asked\).*"
                                         r"ocr-assets vllm-servers --stop"):
        ensure_servers(replace(settings, port=other))  # never the old server at its old port
    assert _answers(url) and len(_starts(fake_vllm)) == 1  # still serving whoever uses it


def test_a_taken_port_or_a_failed_start_says_why(fake_vllm, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} .*{config.ENV_VLM_SERVE_PORT}"):
            ensure_servers(VllmSettings(MODEL, port=port))
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    with pytest.raises(RuntimeError, match=r"exited with code 3 while starting(.|\n)*CUDA out of memory"):
        ensure_servers(VllmSettings(MODEL, port=_free_ports(1)))
    assert _starts(fake_vllm) == [] and list_servers() == []


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch):
    from ocr_assets.resources import RecognizerResource

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(config.ENV_RUN_DIR, str(tmp_path / "run"))
    monkeypatch.setattr(vllm_server, "gpu_count", lambda: 0)
    resource = RecognizerResource(vlm_serve_model=MODEL, vlm_serve_port=_free_ports(1))
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        resource.preflight()
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        resource.load()
    resource.teardown_after_execution(None)


def test_cli_starts_lists_and_stops(fake_vllm, monkeypatch, capsys):
    port = _free_ports(1)
    assert main(["vllm-servers", "--start"]) == 1
    assert config.ENV_VLM_SERVE_MODEL in capsys.readouterr().err
    monkeypatch.setenv(config.ENV_VLM_SERVE_MODEL, MODEL)
    monkeypatch.setenv(config.ENV_VLM_SERVE_PORT, str(port))
    assert main(["vllm-servers", "--start"]) == 0
    out = capsys.readouterr().out
    assert f"{config.ENV_VLM_BASE_URL}=http://127.0.0.1:{port}/v1" in out
    assert f"GPU 0: pid {_starts(fake_vllm)[0]['pid']}, port {port}" in out and "healthy, idle" in out
    use = ServerUse()
    ensure_servers(vllm_server.settings_from_env(), use=use)  # a step running
    assert main(["vllm-servers"]) == 0 and "healthy, in use" in capsys.readouterr().out
    assert main(["vllm-servers", "--stop"]) == 1
    assert "used by a running step: not stopped (--force" in capsys.readouterr().err
    assert main(["vllm-servers", "--stop", "--force"]) == 0
    assert "stopped the vLLM server for GPU 0" in capsys.readouterr().out
    use.release()
    assert main(["vllm-servers"]) == 0 and "no managed vLLM servers run" in capsys.readouterr().out
    assert len(_starts(fake_vllm)) == 1


def test_a_step_interrupted_while_its_server_starts_stops_it(fake_vllm, tmp_path, monkeypatch):
    gate = tmp_path / "loaded"
    monkeypatch.setenv("FAKE_VLLM_GATE", str(gate))
    port = _free_ports(1)
    step = _other_step(port, gpus=0)
    (start,) = _wait_for(lambda: _starts(fake_vllm), "started")
    step.send_signal(signal.SIGINT)  # a run terminated from the UI: KeyboardInterrupt in the step
    assert step.wait() != 0 and "KeyboardInterrupt" in step.stderr.read()
    # the server and its engine process end with the step: no GPU memory or port is left behind
    _wait_for(lambda: not _alive(start["pid"]) and not _alive(start["engine"]), "stopped", limit=30)
    assert not vllm_server.registration("0").exists() and list_servers() == []
    gate.write_text("ok")
    (url,) = ensure_servers(VllmSettings(MODEL, port=port))  # the next step starts one on the same port
    assert _answers(url) and len(_starts(fake_vllm)) == 2


def test_a_server_whose_starting_step_was_killed_is_taken_over(fake_vllm, tmp_path, monkeypatch):
    gate = tmp_path / "loaded"
    monkeypatch.setenv("FAKE_VLLM_GATE", str(gate))
    port = _free_ports(1)
    step, start = _loading_step(fake_vllm, port)
    stopped, busy = stop_servers(lock_wait=0.5)  # a live step is starting it: left alone
    assert stopped == [] and [(b["slot"], b["pid"], b["starting"]) for b in busy] == [("0", start["pid"], True)]
    step.kill()  # SIGKILL: nothing of the step runs; the server goes on loading
    step.wait()
    (orphan,) = list_servers()
    assert (orphan["pid"], orphan["state"], orphan["healthy"]) == (start["pid"], "starting", False)
    got: dict = {}

    def next_step():
        try:
            got["urls"] = ensure_servers(VllmSettings(MODEL, port=port))
        except BaseException as exc:
            got["error"] = exc

    taker = threading.Thread(target=next_step)
    taker.start()
    taker.join(timeout=1.0)
    assert taker.is_alive() and not got  # waits for it: it cannot answer before the gate opens
    gate.write_text("ok")
    taker.join()
    assert got == {"urls": [f"http://127.0.0.1:{port}/v1"]} and len(_starts(fake_vllm)) == 1  # no second
    (info,) = list_servers()
    assert (info["pid"], info["state"], info["healthy"]) == (start["pid"], "running", True)


def test_stop_stops_a_starting_server_whose_step_died(fake_vllm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_GATE", str(tmp_path / "loaded"))
    step, start = _loading_step(fake_vllm, _free_ports(1))
    step.kill()
    step.wait()
    assert main(["vllm-servers"]) == 0 and f"pid {start['pid']}," in (out := capsys.readouterr().out)
    assert "starting, idle" in out
    assert main(["vllm-servers", "--stop"]) == 0
    assert f"stopped the vLLM server for GPU 0 (pid {start['pid']}," in capsys.readouterr().out
    _wait_for(lambda: not _alive(start["pid"]) and not _alive(start["engine"]), "stopped", limit=30)
    assert list_servers() == [] and not vllm_server.registration("0").exists()


@pytest.mark.parametrize("waiter", ["starter", "taker"])
def test_a_server_that_dies_starting_takes_its_engine_along(fake_vllm, tmp_path, monkeypatch, waiter):
    gate = tmp_path / "loaded"
    monkeypatch.setenv("FAKE_VLLM_GATE", str(gate))
    port = _free_ports(1)
    if waiter == "starter":
        gate.write_text("fail")
        exited = "exited with code 3 while starting"
    else:  # the step that started it was killed; this one waits for it
        step, _ = _loading_step(fake_vllm, port)
        step.kill()
        step.wait()
        real = vllm_server._serves

        def serves(server: dict) -> bool:
            gate.write_text("fail")  # it fails while this step waits for it
            return real(server)

        monkeypatch.setattr(vllm_server, "_serves", serves)
        exited = "exited while starting"
    with pytest.raises(RuntimeError, match=rf"{exited}(.|\n)*out of memory while loading"):
        ensure_servers(VllmSettings(MODEL, port=port))
    (start,) = _starts(fake_vllm)
    # vLLM's engine processes hold the GPU's memory: they go with the server
    _wait_for(lambda: not _alive(start["engine"]), "stopped", limit=30)
    assert list_servers() == [] and not vllm_server.registration("0").exists()


def test_a_gpu_keeps_its_port_whatever_cuda_visible_devices_says(fake_vllm, monkeypatch):
    port = _free_ports(2)
    settings = VllmSettings(MODEL, port=port)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # e.g. `vllm-servers --start` for GPU 1 alone
    assert ensure_servers(settings, gpus=1) == [f"http://127.0.0.1:{port + 1}/v1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the steps see both
    assert ensure_servers(settings, gpus=2) == [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"]
    assert sorted((s["port"], s["cuda"]) for s in _starts(fake_vllm)) == [(port, "0"), (port + 1, "1")]
    # a GPU named by UUID has no number: its port is its index here, refused where another GPU's server has it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5ab1")
    with pytest.raises(RuntimeError, match=rf"port {port} is GPU 0.s(.|\n)*CUDA_VISIBLE_DEVICES"):
        ensure_servers(settings, gpus=1)
    assert len(_starts(fake_vllm)) == 2
    assert vllm_server.server_port(8000, "3", 0) == 8003 and vllm_server.server_port(8000, "GPU-5ab1", 1) == 8001


def test_a_busy_server_is_given_time_to_answer(fake_vllm, monkeypatch):
    port = _free_ports(1)
    settings = VllmSettings(MODEL, port=port)
    (url,) = ensure_servers(settings)
    (info,) = list_servers()
    answered: list[bool] = []
    real = vllm_server._serves

    def serves(server: dict) -> bool:
        answered.append(real(server))
        os.killpg(info["pid"], signal.SIGCONT)  # busy for one check only
        return answered[-1]

    monkeypatch.setattr(vllm_server, "_serves", serves)
    os.killpg(info["pid"], signal.SIGSTOP)  # it accepts connections and answers none: busy
    try:
        assert ensure_servers(settings) == [url]
        assert answered == [False, True]
        monkeypatch.setattr(vllm_server, "_serves", real)
        os.killpg(info["pid"], signal.SIGSTOP)  # one that never answers fails once the patience is spent
        with pytest.raises(RuntimeError, match=r"does not answer /health(.|\n)*--force"):
            ensure_servers(replace(settings, health_patience=0))
    finally:
        os.killpg(info["pid"], signal.SIGCONT)
    assert [i["pid"] for i in list_servers()] == [info["pid"]] and len(_starts(fake_vllm)) == 1
