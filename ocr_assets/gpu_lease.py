"""GPU leases on one host: a layout step runs on a GPU no other layout step holds.

A lease is an exclusive ``flock`` on one file per GPU in the host's run folder
(``config.run_dir()``). The kernel drops the lock when its process ends, however it ends, so
a step that crashes or is killed frees its GPU at once; nothing has to clean up after it.
``auto`` takes the first free GPU and waits when all are held; ``cuda:N`` waits for GPU N.
GPUs are named by their physical id (the entry of ``CUDA_VISIBLE_DEVICES``, else the index),
so processes that see the GPUs through different ``CUDA_VISIBLE_DEVICES`` still agree.
"""

from __future__ import annotations

import fcntl
import logging
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ocr_assets import config

log = logging.getLogger("ocr_assets.progress")
WAIT_LOG_SECONDS = 30.0  # how often a step waiting for a GPU says so


def visible_devices(count: int) -> list[str]:
    """This process's ``count`` CUDA devices as CUDA_VISIBLE_DEVICES names them (else their indices)."""
    names = [v.strip() for v in (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if v.strip()]
    return names[:count] if len(names) >= count else [str(i) for i in range(count)]


def physical_ids(count: int) -> list[str]:
    """The physical id of each of this process's ``count`` CUDA devices (CUDA_VISIBLE_DEVICES order),
    usable in a file name."""
    return [name.replace("/", "_") for name in visible_devices(count)]  # MIG ids hold slashes


def gpu_slot(physical_id: str) -> str:
    """The host-wide slot name of a GPU: its lease, its layout worker."""
    return f"gpu-{physical_id}"


@dataclass
class Lease:
    """One held GPU: its index in this process (``cuda:<index>``) and its slot name on the host."""

    index: int
    slot: str
    path: Path
    waited: float = 0.0  # seconds spent waiting for it
    _fd: int | None = field(default=None, repr=False)

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    os.set_inheritable(fd, False)  # a process the holder starts (a layout worker) must not keep it
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def holder(path: Path) -> str:
    """What the lock file says about its holder (pid, host, since), for messages."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def slot_path(slot: str) -> Path:
    return config.run_dir() / f"{slot}.lock"


def wanted_indices(setting: str, count: int) -> list[int]:
    """The GPU indices ``setting`` allows (``auto``/``cuda``: every one; ``cuda:N``: N), checked."""
    name = (setting or "auto").strip().lower()
    if count < 1:
        raise ValueError(f"{config.ENV_DEVICE}={setting!r} but CUDA is not available here: use auto or cpu")
    if name in ("auto", "cuda"):
        return list(range(count))
    if name.startswith("cuda:") and name[5:].isdigit():
        index = int(name[5:])
        if index >= count:
            raise ValueError(f"{config.ENV_DEVICE}={setting!r} but this machine has {count} GPU(s)")
        return [index]
    raise ValueError(f"{config.ENV_DEVICE}={setting!r} is not a GPU: use auto, cuda or cuda:N")


def lease_gpu(
    setting: str, count: int, *, timeout: float | None = None, poll: float = 0.25,
    sleep: Callable[[float], None] = time.sleep,
) -> Lease:
    """Hold a free GPU among those ``setting`` allows, waiting while every one is held.

    ``timeout`` (seconds, None = wait for ever) raises TimeoutError naming the holders.
    """
    indices = wanted_indices(setting, count)
    ids = physical_ids(count)
    start = last_log = time.monotonic()
    while True:
        for index in indices:
            path = slot_path(gpu_slot(ids[index]))
            fd = _try_lock(path)
            if fd is not None:
                return Lease(index, gpu_slot(ids[index]), path, time.monotonic() - start, fd)
        now = time.monotonic()
        held = "; ".join(f"GPU {ids[i]}: {holder(slot_path(gpu_slot(ids[i])))}" for i in indices)
        if timeout is not None and now - start >= timeout:
            raise TimeoutError(f"no GPU came free for layout in {timeout:.0f} s ({held})")
        if now - last_log >= WAIT_LOG_SECONDS:
            last_log = now
            log.info("waiting for a GPU held by another layout step (%s)", held)
        sleep(poll)


def lease_slot(slot: str, poll: float = 0.25) -> Lease:
    """Hold the host-wide ``slot`` (not a GPU: e.g. the CPU layout worker's), waiting while it is held."""
    path = slot_path(slot)
    start = time.monotonic()
    fd = hold_lock(path, f"the {slot} slot, held by another layout step", poll=poll)
    return Lease(-1, slot, path, time.monotonic() - start, fd)


def hold_lock(path: Path, what: str, timeout: float | None = None, poll: float = 0.1) -> int | None:
    """An exclusive lock on ``path``, waiting (and saying so every WAIT_LOG_SECONDS) while another
    process holds it; None after ``timeout`` seconds."""
    start = last_log = time.monotonic()
    while (fd := _try_lock(path)) is None:
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            return None
        if now - last_log >= WAIT_LOG_SECONDS:
            last_log = now
            log.info("waiting for %s (%s)", what, holder(path))
        time.sleep(poll)
    return fd


def write_registration(path: Path, info: dict) -> None:
    """A host-wide registration (a worker's, a server's) as JSON, whole or not at all."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def cuda_count() -> int:
    """CUDA devices this process sees (0 without a working CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
