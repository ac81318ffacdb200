"""A layout worker: one long-lived process per GPU (or for the CPU) that keeps the layout model warm.

A step that runs layout on a GPU finds the host's worker for the GPU it leased (a registration
file in ``config.run_dir()``, and a lock the worker holds while it lives), or starts one, and
sends it the partition as a job over HTTP on 127.0.0.1: the worker runs the same layout stage
the step would (``layout_runner.layout_partition``), reading the shard and writing the layout
file itself, and streams progress and then the stage's report back. A worker serves one
identity: the code, layout settings and environment it was started with
(``layout_runner.worker_identity``); a step with another identity replaces it. Jobs run one at
a time. The worker exits after ``OCR_ASSETS_LAYOUT_WORKER_IDLE`` seconds without a job (default
900), freeing its GPU memory, after a device fault (the next step gets a fresh CUDA context),
and on ``ocr-assets layout-workers --stop``.

A step that dies mid-job is noticed at the next progress line the worker cannot send: the
job stops, its partial file is removed, and the worker is free for the next step.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ocr_assets import config
from ocr_assets.backends.layout import load_layout_backend
from ocr_assets.backends.layout.base import DeviceFault, PreparedPage, device_fault_kind
from ocr_assets.gpu_lease import _try_lock, cuda_count, write_registration
from ocr_assets.layout_runner import LayoutJob, LayoutOutcome, layout_partition, worker_identity
from ocr_assets.timing import StageReport

progress = logging.getLogger("ocr_assets.progress")
START_TIMEOUT = 600.0  # seconds a new worker may take to load and warm its model
READ_TIMEOUT = 900.0  # seconds without a line from a busy worker before the step gives up on it
PROGRESS_EVERY = 1.0  # seconds between progress lines (also how soon a dead step is noticed)
# errors a worker sends back that the step raises as the same kind, so it fails as it would alone
RAISED = {"DeviceFault": DeviceFault, "ValueError": ValueError, "TimeoutError": TimeoutError}


def registration(slot: str) -> Path:
    return config.run_dir() / f"layout-worker-{slot}.json"


def alive_lock(slot: str) -> Path:
    return config.run_dir() / f"layout-worker-{slot}.alive"


def log_path(slot: str) -> Path:
    return config.run_dir() / f"layout-worker-{slot}.log"


class WorkerGone(RuntimeError):
    """The worker stopped answering mid-job (it died, or was stopped): the step fails and can be retried."""


# -- the step's side --

def find_worker(slot: str) -> dict | None:
    """The live worker registered for ``slot`` (its registration, with ``health``), or None."""
    try:
        info = json.loads(registration(slot).read_text())
    except (OSError, ValueError):
        return None
    fd = _try_lock(alive_lock(slot))
    if fd is not None:  # nobody holds it: the worker that wrote the registration is gone
        os.close(fd)
        return None
    try:
        info["health"] = _request(info["port"], "GET", "/health", timeout=10)
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return info


def _request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 10) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read() or b"{}")
    finally:
        conn.close()


def start_worker(slot: str, device: str, settings: dict) -> dict:
    """Start the worker for ``slot`` in its own session (it outlives this step) and wait until it
    is warm; raises RuntimeError with its log's last lines if it cannot start."""
    config.run_dir().mkdir(parents=True, exist_ok=True)
    idle = config.env_number(config.ENV_LAYOUT_WORKER_IDLE, config.DEFAULT_LAYOUT_WORKER_IDLE, float, low=1)
    with open(log_path(slot), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ocr_assets.layout_worker", "--slot", slot, "--device", device,
             "--settings", json.dumps(settings), "--idle", str(idle)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            info = find_worker(slot) if proc.returncode == 1 else None
            if info is not None:  # another step started the slot's worker first: use that one
                return info
            raise RuntimeError(f"the layout worker for {slot} exited ({proc.returncode}) before it was ready: "
                               f"{_log_tail(slot)}; set {config.ENV_LAYOUT_WORKER}=off to run layout in the step")
        info = find_worker(slot)
        if info is not None and info.get("pid") == proc.pid:
            return info
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the layout worker for {slot} was not ready after {START_TIMEOUT:.0f} s: {_log_tail(slot)}")


def _log_tail(slot: str, lines: int = 8) -> str:
    try:
        return " | ".join(log_path(slot).read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


def stop_worker(slot: str, wait: float = 60.0) -> bool:
    """Ask the worker for ``slot`` to stop after its job and wait until it has; False if none ran."""
    info = find_worker(slot)
    if info is None:
        return False
    try:
        _request(info["port"], "POST", "/stop")
    except (OSError, http.client.HTTPException):
        pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        fd = _try_lock(alive_lock(slot))
        if fd is not None:
            os.close(fd)
            return True
        time.sleep(0.1)
    raise RuntimeError(f"the layout worker for {slot} (pid {info.get('pid')}) did not stop in {wait:.0f} s")


def workers() -> list[dict]:
    """Every live worker on this host."""
    found = []
    for path in sorted(config.run_dir().glob("layout-worker-*.json")):
        info = find_worker(path.stem.removeprefix("layout-worker-"))
        if info is not None:
            found.append(info)
    return found


def run_in_worker(job: LayoutJob, slot: str, device: str, report: StageReport) -> tuple[LayoutOutcome, str, float, float]:
    """Run ``job`` in the worker for ``slot``: the live one when it has the job's identity (code,
    settings, environment), else a new one started here (replacing one that differs).

    Returns (outcome, ``warm`` or ``started``, model load seconds paid, time.perf_counter() when
    the worker began the job). A worker that stops or refuses before it begins the job (it went
    idle, was stopped, or is another's) is replaced once. Raises what the stage would raise, or
    WorkerGone.
    """
    for attempt in range(2):
        info = find_worker(slot)
        if info is not None and info["health"].get("identity") != job.identity:
            progress.info("layout worker for %s runs other code or settings: replacing it", slot)
            stop_worker(slot)
            info = None
        how, load_seconds = "warm", 0.0
        if info is None:
            info = start_worker(slot, device, job.settings)
            how, load_seconds = "started", float(info.get("load_seconds", 0.0)) + float(info.get("warmup_seconds", 0.0))
        answer = _send(job, info, slot, report)
        if answer is not None:
            outcome, began = answer
            return outcome, how, load_seconds, began
    raise WorkerGone(f"the layout worker for {slot} went away twice before it began shard {job.partition!r}; "
                     f"its log: {log_path(slot)}")


def _send(job: LayoutJob, info: dict, slot: str, report: StageReport) -> tuple[LayoutOutcome, float] | None:
    """(outcome, when the worker began) for ``job``, or None where the worker went away or refused
    before it began (the caller tries another)."""
    began = None
    failure: Exception | None = None
    conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=READ_TIMEOUT)
    try:
        conn.request("POST", "/layout", body=json.dumps(job.__dict__).encode(),
                     headers={"Content-Type": "application/json"})
        for line in conn.getresponse():
            message = json.loads(line)
            event = message.get("event")
            if event in ("stopping", "other"):
                return None
            if event == "started":
                began = time.perf_counter()
            elif event == "progress":
                report.advance(int(message["done"]) - report._done, int(message["total"]))
            elif event == "done":
                _fill(report, message["report"])
                return LayoutOutcome(int(message["rows"]), message["uri"], bool(message["keep_polygons"]), report), began
            elif event == "error":
                failure = RAISED.get(message.get("type"), RuntimeError)(
                    f"{message['message']} (in the layout worker for {slot}; its log: {log_path(slot)})")
                break
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        if began is None:
            return None
        raise WorkerGone(f"the layout worker for {slot} (pid {info.get('pid')}) stopped answering during shard "
                         f"{job.partition!r} ({type(exc).__name__}: {exc}); its log: {log_path(slot)}. Retry the "
                         f"step; {config.ENV_LAYOUT_WORKER}=off runs layout in the step") from exc
    finally:
        conn.close()
    if failure is not None:
        raise failure
    if began is None:
        return None
    raise WorkerGone(f"the layout worker for {slot} (pid {info.get('pid')}) ended shard {job.partition!r} "
                     f"without an answer: it died or was stopped; its log: {log_path(slot)}. Retry the step")


def _fill(report: StageReport, sent: dict) -> None:
    report.parts.update(sent["parts"])
    report.counts.update(sent["counts"])
    report.info.update(sent["info"])
    report.pages, report.stage_seconds = int(sent["pages"]), float(sent["stage_seconds"])


# -- the worker's side --

class _StreamedReport(StageReport):
    """A StageReport that sends a progress line per batch (at most one a second): a step gone
    away makes the send fail, which stops the job."""

    def __init__(self, send, **kwargs) -> None:
        super().__init__(**kwargs)
        self._send, self._sent = send, 0.0

    def advance(self, n: int, total: int, unit: str = "pages") -> None:
        super().advance(n, total, unit)
        now = time.monotonic()
        if now - self._sent >= PROGRESS_EVERY or self._done >= total:
            self._sent = now
            self._send({"event": "progress", "done": self._done, "total": total})


class _Worker:
    def __init__(self, slot: str, device: str, idle: float, identity: str, backend) -> None:
        self.slot, self.device, self.idle, self.identity, self.backend = slot, device, idle, identity, backend
        self.jobs = 0
        self.busy = threading.Lock()
        self.last = time.monotonic()
        self.stopping = False
        self.server = None

    def run_job(self, job: LayoutJob, send) -> None:
        with self.busy:
            self.last = time.monotonic()
            if self.stopping:  # went idle or was stopped while this step was on its way: it starts another
                send({"event": "stopping"})
                return
            if job.identity != self.identity:
                send({"event": "other"})
                return
            try:
                send({"event": "started"})
                report = _StreamedReport(send, label=f"layout {job.partition}")
                outcome = layout_partition(job, self.backend, report)
                send({"event": "done", "rows": outcome.rows, "uri": outcome.uri,
                      "keep_polygons": outcome.keep_polygons,
                      "report": {"parts": report.parts, "counts": report.counts, "info": report.info,
                                 "pages": report.pages, "stage_seconds": report.stage_seconds}})
            except (BrokenPipeError, ConnectionResetError):
                print(f"shard {job.partition}: the step went away; job stopped, partial file removed", flush=True)
            except Exception as exc:
                traceback.print_exc()
                if isinstance(exc, DeviceFault) or device_fault_kind(exc) is not None:
                    # the GPU may be left unusable: the next step gets a fresh worker (a fresh CUDA context)
                    print("a device fault: this worker stops after this shard", flush=True)
                    self.stop()
                try:
                    send({"event": "error", "type": type(exc).__name__, "message": str(exc)})
                except OSError:
                    pass
            finally:
                self.jobs += 1
                self.last = time.monotonic()

    def stop(self) -> None:
        """Stop taking shards, and shut the server down once the current shard is done."""
        self.stopping = True
        threading.Thread(target=self._shutdown_after_job, daemon=True).start()

    def _shutdown_after_job(self) -> None:
        with self.busy:
            self.server.shutdown()


def _handler(worker: _Worker):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # one line per job is printed by the worker itself
            pass

        def _json(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            idle = round(time.monotonic() - worker.last, 1)
            worker.last = time.monotonic()  # a step that looks is about to send a shard: not idle now
            self._json({"pid": os.getpid(), "slot": worker.slot, "device": worker.device,
                        "identity": worker.identity, "busy": worker.busy.locked(), "stopping": worker.stopping,
                        "jobs": worker.jobs, "idle_seconds": idle})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/stop":
                self._json({"stopping": True})
                worker.stop()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()

            def send(message: dict) -> None:
                self.wfile.write(json.dumps(message).encode() + b"\n")
                self.wfile.flush()

            job = LayoutJob(**body)
            print(f"shard {job.partition}: started", flush=True)
            worker.run_job(job, send)
            print(f"shard {job.partition}: ended", flush=True)

    return Handler


def _watch_idle(worker: _Worker) -> None:
    while not worker.stopping:
        time.sleep(1.0)
        if not worker.busy.locked() and time.monotonic() - worker.last > worker.idle:
            print(f"idle for {worker.idle:.0f} s: exiting", flush=True)
            worker.stop()


def warm_up(backend) -> None:
    """One full batch through the model (a JPEG and a PNG page, as the stage decodes them), so the
    first shard meets kernels already chosen and memory already reserved."""
    import cv2
    import numpy as np

    page = np.full((1754, 1240, 3), 255, np.uint8)
    for y in range(150, 1600, 60):
        page[y:y + 14, 120:1100] = 30  # lines of "text"
    blobs = [cv2.imencode(".jpg", page)[1].tobytes(), cv2.imencode(".png", page)[1].tobytes()]
    batch = [blobs[i % 2] for i in range(max(1, int(backend.batch_size)))]
    prepared = [p for p in backend.prepare(batch) if isinstance(p, PreparedPage)]
    if prepared:
        backend.detect(prepared)


def _hold_slot(slot: str, wait: float = 2.0) -> int | None:
    """The worker's alive lock for ``slot``; tried for ``wait`` seconds (a step may be probing it)."""
    deadline = time.monotonic() + wait
    while (fd := _try_lock(alive_lock(slot))) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return fd


def serve(slot: str, device: str, settings: dict, idle: float) -> int:
    """Run the worker for ``slot`` until it is stopped or idle; 1 if another worker holds the slot."""
    config.run_dir().mkdir(parents=True, exist_ok=True)
    fd = _hold_slot(slot)
    if fd is None:
        print(f"a layout worker for {slot} already runs", flush=True)
        return 1
    identity = worker_identity(settings)  # this process's code, settings and environment, as started
    torch_device = None if device == "cpu" else device
    backend, load_seconds = load_layout_backend(settings, device=torch_device)
    start = time.perf_counter()
    warm_up(backend)
    warmup_seconds = time.perf_counter() - start
    worker = _Worker(slot, device, idle, identity, backend)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(worker))
    server.daemon_threads = True
    worker.server = server
    # the GPUs this host shows under this CUDA_VISIBLE_DEVICES: a step reads them here, without importing torch
    info = {"pid": os.getpid(), "port": server.server_address[1], "slot": slot, "device": device,
            "load_seconds": load_seconds, "warmup_seconds": warmup_seconds,
            "gpus": cuda_count(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    write_registration(registration(slot), info)
    print(f"layout worker for {slot} on {device}: ready on port {info['port']} (load {load_seconds:.2f} s, "
          f"warm-up {warmup_seconds:.2f} s)", flush=True)
    threading.Thread(target=_watch_idle, args=(worker,), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # a step arriving now is refused at once, and starts another worker
        try:
            if json.loads(registration(slot).read_text()).get("pid") == os.getpid():
                registration(slot).unlink()
        except (OSError, ValueError):
            pass
        os.close(fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a layout worker for one GPU (started by the layout step)")
    parser.add_argument("--slot", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--settings", required=True, help="the layout settings as JSON")
    parser.add_argument("--idle", type=float, default=config.DEFAULT_LAYOUT_WORKER_IDLE)
    args = parser.parse_args(argv)
    return serve(args.slot, args.device, json.loads(args.settings), args.idle)


if __name__ == "__main__":
    sys.exit(main())
