"""Managed vLLM servers: one ``vllm serve MODEL`` per GPU of this host, shared by every recognition step.

For a one-machine setup where the pipeline brings its own servers: a GPU's server runs with
``CUDA_VISIBLE_DEVICES`` set to it (one server, slot ``0``, where there is none), the throughput
flags and a GPU memory share that leaves room for the layout model. GPU ``N`` (its physical id, as
in ``gpu_lease``) has its server on ``port + N`` whatever ``CUDA_VISIBLE_DEVICES`` a process has; a
GPU named by UUID or MIG id gets ``port +`` its place in this process's order, and a port another
GPU's server has is refused.

A server is registered in the host's run folder (``config.run_dir()``, ``vllm-<slot>.json``) and
started once: the step that finds none live starts it under an exclusive lock (``vllm-<slot>.lock``),
registers it at once as ``starting`` and waits for /health holding the lock; the others wait for
the lock, then reuse it. Interrupted, that step stops the server's process group and drops its
registration; killed outright, it leaves the server registered, and the next step waits for it
and takes it over (or ``stop_servers`` stops it). A step holds a shared lock on ``vllm-<slot>.use``
while its recognizer runs (the kernel drops it if the step dies); ``stop_servers`` stops only the
servers no step holds. Servers outlive the steps, keeping their GPU memory until ``ocr-assets
vllm-servers --stop``; one started with another model, flags, memory share or port is never
replaced by a step (another step may be using it): stop it first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ocr_assets import config
from ocr_assets.gpu_lease import _try_lock, hold_lock, physical_ids, visible_devices, write_registration

log = logging.getLogger("ocr_assets.progress")
DEFAULT_FLAGS = ("--max-num-batched-tokens", "131072", "--max-num-seqs", "512", "--no-enable-chunked-prefill")
STOP_COMMAND = "ocr-assets vllm-servers --stop"
# what a server is started with, and the setting that changes each (named when a server differs)
IDENTITY = {"model": config.ENV_VLM_SERVE_MODEL, "served_name": config.ENV_VLM_MODEL, "port": config.ENV_VLM_SERVE_PORT,
            "gpu_memory_utilization": config.ENV_VLM_SERVE_GPU_MEMORY, "flags": "the recognizer's vlm_serve_flags"}
_children: dict[int, subprocess.Popen] = {}  # servers this process started: polled, so none stays a zombie


@dataclass
class VllmSettings:
    """What to serve and how; ``port`` is GPU 0's server's (GPU N's: port + N), ``flags`` replace the
    defaults when given; ``health_patience``: seconds a live server may take to answer before it is
    called broken (one busy with long requests answers /health late)."""

    model: str
    served_name: str = "glm-ocr"
    host: str = "127.0.0.1"
    port: int = 8000
    gpu_memory_utilization: float = 0.7
    flags: tuple[str, ...] = field(default=DEFAULT_FLAGS)
    executable: str = "vllm"
    startup_timeout: float = 1200.0
    health_patience: float = 60.0

    def described(self) -> dict:
        """The settings that make two servers interchangeable (IDENTITY's keys)."""
        return {"model": self.model, "served_name": self.served_name, "port": int(self.port),
                "gpu_memory_utilization": float(self.gpu_memory_utilization), "flags": list(self.flags)}

    def identity(self) -> str:
        return hashlib.sha256(json.dumps(self.described(), sort_keys=True).encode()).hexdigest()[:16]


def settings_from_env() -> VllmSettings:
    """The servers' settings from OCR_ASSETS_VLM_SERVE_MODEL, _PORT (8000), _GPU_MEMORY (0.7) and
    OCR_ASSETS_VLM_MODEL (the served name), as the recognition steps read them."""
    model = config.env(config.ENV_VLM_SERVE_MODEL)
    if not model:
        raise ValueError(f"set {config.ENV_VLM_SERVE_MODEL} to the model the vLLM servers serve, e.g. zai-org/GLM-OCR")
    return VllmSettings(
        model, served_name=config.env(config.ENV_VLM_MODEL) or "glm-ocr",
        port=config.env_number(config.ENV_VLM_SERVE_PORT, 8000, int, low=1, high=65535),
        gpu_memory_utilization=config.env_number(config.ENV_VLM_SERVE_GPU_MEMORY, 0.7, float, low=0.01, high=1.0),
    )


def require_vllm(executable: str = "vllm") -> str:
    """The path of ``vllm``, or a RuntimeError saying what to do."""
    found = shutil.which(executable)
    if found is None:
        raise RuntimeError(
            f"vLLM is not installed here ({executable!r} is not on PATH): install it (`pip install vllm`) "
            f"or unset the recognizer's vlm_serve_model ({config.ENV_VLM_SERVE_MODEL}) and point "
            f"{config.ENV_VLM_BASE_URL} at running servers"
        )
    return found


def registration(slot: str) -> Path:
    return config.run_dir() / f"vllm-{slot}.json"


def log_path(slot: str) -> Path:
    return config.run_dir() / f"vllm-{slot}.log"


def _lock(slot: str, kind: str) -> Path:
    """``start``: held while a server is started or checked; ``use``: shared by the steps using it."""
    return config.run_dir() / f"vllm-{slot}.{'lock' if kind == 'start' else kind}"


def gpu_count() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        from ocr_assets.gpu_lease import cuda_count

        return cuda_count()
    except ImportError:
        return 0


def server_port(port: int, slot: str, index: int) -> int:
    """The port of ``slot``'s server: ``port`` + its physical id where that is a number (every process
    agrees on it), else + ``index``, its place in this process's order."""
    chosen = port + (int(slot) if slot.isdigit() else index)
    if chosen > 65535:
        raise ValueError(f"GPU {slot}'s vLLM server would listen on port {chosen}: lower {config.ENV_VLM_SERVE_PORT}")
    return chosen


def devices(count: int) -> list[tuple[str, str | None]]:
    """(slot, CUDA_VISIBLE_DEVICES value) per server: one per GPU, in this process's order; ("0", None)
    without one (the server's environment is left as it is)."""
    if count < 1:
        return [("0", None)]
    return list(zip(physical_ids(count), visible_devices(count)))


class ServerUse:
    """A step's shared holds on the servers' use locks: while held, ``stop_servers`` leaves them running."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())  # closing the descriptor drops the shared flock


def ensure_servers(settings: VllmSettings, gpus: int | None = None, use: ServerUse | None = None) -> list[str]:
    """The base URLs of this host's servers, one per GPU in this process's order: each a live registered
    one with these settings, one being started (waited for) or one started now.

    ``gpus``: the GPU count (None = the CUDA devices this process sees). ``use``: takes each server's
    shared use lock (held until ``use.release()``). Raises ValueError where a server runs with other
    settings (port included) or a port passes 65535; RuntimeError where a port is taken, a server exits
    while starting or a live one does not answer within ``health_patience``; TimeoutError where one does
    not answer within ``startup_timeout`` (it is stopped, as it is when this wait is interrupted)."""
    count = gpu_count() if gpus is None else gpus
    taken: list[int] = []
    urls = []
    try:
        for index, (slot, visible) in enumerate(devices(count)):
            fd = _hold_start(slot)
            try:
                info = _ready_server(settings, slot, visible, server_port(settings.port, slot, index))
                if use is not None:
                    taken.append(_share(_lock(slot, "use")))  # under the start lock: no stop can come between
            finally:
                os.close(fd)
            urls.append(f"http://{info['host']}:{info['port']}/v1")
    except BaseException:
        for fd in taken:
            os.close(fd)
        raise
    if use is not None:
        use._fds.extend(taken)
    return urls


def _ready_server(settings: VllmSettings, slot: str, visible: str | None, port: int) -> dict:
    """The live server of ``slot`` (checked against ``settings``), else one started now; under its start lock."""
    info = _registered(slot)
    if info is not None and _running(info):
        _check_identity(info, settings, slot)
        if info.get("state") == "starting":  # its starter died (it held this lock): take it over
            log.info("waiting for the vLLM server for GPU %s (pid %d), started by a step that ended", slot, info["pid"])
            return _await(info, settings)
        deadline = time.monotonic() + settings.health_patience
        while not _serves(info):  # a busy server may answer late
            if time.monotonic() >= deadline or not _running(info):
                raise RuntimeError(f"the vLLM server for GPU {slot} (pid {info['pid']}, port {info['port']}) runs but "
                                   f"does not answer /health or serve {info['served_name']!r} (tried for "
                                   f"{settings.health_patience:g} s): {_tail(slot)}; `{STOP_COMMAND} --force` stops it")
            time.sleep(1.0)
        return info
    if info is not None:  # it exited: its engine processes may still hold the GPU
        _terminate(info)
        registration(slot).unlink(missing_ok=True)
    clash = [other["slot"] for other in _live_registrations() if other["slot"] != slot and other["port"] == port]
    if clash:
        raise RuntimeError(
            f"port {port} is GPU {clash[0]}'s vLLM server's, not free for GPU {slot}: a GPU without a number in "
            f"CUDA_VISIBLE_DEVICES ({os.environ.get('CUDA_VISIBLE_DEVICES')}) gets port + its place there; "
            f"give every step and `ocr-assets vllm-servers` the same CUDA_VISIBLE_DEVICES")
    if _listening(settings.host, port):
        raise RuntimeError(f"port {port} on {settings.host} is taken by a process that is not this host's registered "
                           f"vLLM server for GPU {slot}: set {config.ENV_VLM_SERVE_PORT} (GPU N's server listens on "
                           f"it + N) to free ports, or stop what listens there")
    return _start(settings, slot, visible, port)


def _check_identity(info: dict, settings: VllmSettings, slot: str) -> None:
    if info.get("identity") == settings.identity():
        return
    wanted, running = settings.described(), info.get("settings", {})
    differ = [f"{IDENTITY[k]} ({running.get(k)!r} running, {wanted[k]!r} asked)" for k in IDENTITY
              if running.get(k) != wanted[k]] or ["its settings"]
    raise ValueError(
        f"the vLLM server for GPU {slot} (pid {info['pid']}, port {info['port']}) runs with other settings: "
        f"{'; '.join(differ)}. Set them as it runs, or stop it with `{STOP_COMMAND}` once no step uses it")


def _start(settings: VllmSettings, slot: str, visible: str | None, port: int) -> dict:
    """Start the server of ``slot`` in its own session (it outlives this step) and wait for it (``_await``)."""
    s = settings
    command = [require_vllm(s.executable), "serve", s.model, "--served-model-name", s.served_name,
               "--host", s.host, "--port", str(port), "--gpu-memory-utilization", str(s.gpu_memory_utilization),
               *s.flags]
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    config.run_dir().mkdir(parents=True, exist_ok=True)
    info = {"state": "starting", "slot": slot, "host": s.host, "port": port, "model": s.model,
            "served_name": s.served_name, "identity": s.identity(), "settings": s.described(), "visible": visible,
            "log": str(log_path(slot)), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "since": time.time()}
    with open(log_path(slot), "ab") as out:
        out.write(f"\n== {info['started']} {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    _children[proc.pid] = proc
    info.update(pid=proc.pid, start=_proc_start(proc.pid))
    log.info("starting vLLM (%s) for GPU %s on port %d, pid %d; its log: %s", s.model, slot, port, proc.pid,
             log_path(slot))
    return _await(info, s)


def _await(info: dict, settings: VllmSettings) -> dict:
    """Register a starting server, wait for it to answer and register it as running. Where it exits, does not
    answer within ``startup_timeout`` or the wait is interrupted, stop its process group and drop its registration."""
    slot, pid = info["slot"], int(info["pid"])
    deadline = info.get("since", time.time()) + settings.startup_timeout
    try:
        write_registration(registration(slot), info)  # before the wait: a step killed meanwhile leaves it findable
        while True:
            if not _running(info):
                code = f" with code {_children[pid].returncode}" if pid in _children else ""
                raise RuntimeError(f"vllm serve for GPU {slot} (pid {pid}) exited{code} while starting: {_tail(slot)}")
            if _serves(info):
                break
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve for GPU {slot} did not answer /health within "
                                   f"{settings.startup_timeout:g} s (stopped): {_tail(slot)}")
            time.sleep(0.5)
    except BaseException:
        _terminate(info, 10.0)
        registration(slot).unlink(missing_ok=True)
        raise
    info = {**info, "state": "running"}
    write_registration(registration(slot), info)
    return info


def list_servers() -> list[dict]:
    """This host's running registered servers: each registration (``state``: starting or running) with
    ``healthy`` (answers /health and serves its model) and ``in_use`` (a step holds it)."""
    found = []
    for info in _live_registrations():
        fd = _try_lock(_lock(info["slot"], "use"))
        if fd is not None:
            os.close(fd)
        found.append({**info, "healthy": _serves(info), "in_use": fd is None})
    return found


def stop_servers(force: bool = False, wait: float = 60.0, lock_wait: float = 10.0) -> tuple[list[dict], list[dict]]:
    """Stop this host's servers that no step uses (every one with ``force``), and those left starting
    by a step that ended: SIGTERM to the server's process group, SIGKILL after ``wait`` s. Returns
    (stopped, left running): a server a step uses, or one a live step is starting or checking (its
    start lock held past ``lock_wait`` s; ``starting`` says which), is left running."""
    stopped, busy = [], []
    for path in sorted(config.run_dir().glob("vllm-*.json")):
        slot = path.stem.removeprefix("vllm-")
        fd = _hold_start(slot, timeout=lock_wait)
        if fd is None:  # a live step is starting or checking it: stop it once it runs
            info = _registered(slot) or {}
            busy.append({**info, "slot": slot, "starting": not info or info.get("state") == "starting", "checking": True})
            continue
        try:
            info = _registered(slot)
            alive = info is not None and _running(info)
            use = _try_lock(_lock(slot, "use")) if alive else None
            if use is not None:
                os.close(use)  # free; steps take it only under the start lock, held here
            elif alive and not force:
                busy.append(info)
                continue
            if info is not None:
                _terminate(info, wait)  # a live one, or what is left of an exited one's process group
            path.unlink(missing_ok=True)
            stopped += [info] if alive else []
        finally:
            os.close(fd)
    return stopped, busy


# -- helpers --

def _hold_start(slot: str, timeout: float | None = None) -> int | None:
    """The start lock of ``slot``'s server (see ``hold_lock``)."""
    return hold_lock(_lock(slot, "start"), f"the vLLM server for GPU {slot}, being started or checked by another "
                                           f"process", timeout=timeout)


def _share(path: Path) -> int:
    """An fd holding a shared flock on ``path`` (waits only while a stop holds it exclusively)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        raise
    return fd


def _live_registrations() -> list[dict]:
    found = (_registered(p.stem.removeprefix("vllm-")) for p in sorted(config.run_dir().glob("vllm-*.json")))
    return [info for info in found if info is not None and _running(info)]


def _registered(slot: str) -> dict | None:
    try:
        info = json.loads(registration(slot).read_text())
        return info if isinstance(info, dict) and "pid" in info else None
    except (OSError, ValueError):
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), None without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(info: dict) -> bool:
    """Whether the registered process still runs (not a zombie, not another process with its pid)."""
    pid = int(info["pid"])
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: the signal check stands
    return state != "Z" and (info.get("start") is None or _proc_start(pid) == info["start"])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def _serves(info: dict) -> bool:
    """Whether the server answers /health and lists its served model at /v1/models."""
    base = f"http://{info['host']}:{info['port']}"
    if _get(f"{base}/health")[0] != 200:
        return False
    status, body = _get(f"{base}/v1/models")
    try:
        return status == 200 and any(m.get("id") == info["served_name"] for m in json.loads(body)["data"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def _terminate(info: dict, wait: float = 60.0) -> None:
    """SIGTERM the server's process group (vLLM's engine processes with it), SIGKILL after ``wait`` s,
    then SIGKILL what is left of the group once the server is gone (engine processes keep GPU memory)."""
    pid = int(info["pid"])
    for sig, patience in ((signal.SIGTERM, wait), (signal.SIGKILL, 10.0)):
        if _running(info):
            _signal_group(pid, sig)
        deadline = time.monotonic() + patience
        while _running(info) and time.monotonic() < deadline:
            time.sleep(0.1)
    if _running(info):
        raise RuntimeError(f"the vLLM server for GPU {info.get('slot')} (pid {pid}) did not stop after SIGKILL")
    _children.pop(pid, None)
    if _proc_start(pid) in (None, info.get("start")):  # not another process's pid (a group's id is never reused)
        _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the server's process group: it was started in a session of its own, its engine processes in it."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(slot: str, lines: int = 20) -> str:
    try:
        text = log_path(slot).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return f"its log {log_path(slot)} ends:\n" + "\n".join(text)
