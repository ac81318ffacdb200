"""Which precision the PP-DocLayoutV3 model runs in, and why.

GPUs run under bf16 autocast, or fp16 where bf16 is missing (the backend then runs a batch whose
outputs are not finite again in fp32). On a CPU, bf16 autocast is used only where it is measured
faster than fp32 on that machine: with AVX512-BF16 but no AMX it can be slower. The measurement
(a few forward passes of the loaded model, both precisions interleaved) runs once per machine,
model and batch size; its result is kept in ``<cache dir>/layout_dtype.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ocr_assets import config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_FILE = "layout_dtype.json"
MIN_GAIN = 0.05  # bf16 must be at least this much faster by median: a tie keeps fp32's exact numbers
ROUNDS = 3  # timed passes per precision, after one warm-up pass each

# seconds of one forward pass of ``model`` on ``pixels`` under ``dtype``: injected by tests
Timer = Callable[[torch.nn.Module, torch.Tensor, torch.dtype], float]


@dataclass(frozen=True)
class DtypeChoice:
    """The precision the model runs in and a short reason, shown in the layout asset's metadata."""

    dtype: torch.dtype
    reason: str


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): only then is bf16 worth measuring."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 natively (compute capability 8 or more, or ROCm); older ones
    only emulate it, slowly, and run fp16 instead."""
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).major >= 8


def _setting(dtype: str | None) -> str:
    name = (dtype or "auto").strip().lower()
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"{config.ENV_LAYOUT_DTYPE}={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return name


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The precision a setting means before any model is loaded (cheap: the preflight check).

    ``auto`` → bf16 on GPUs that have it, else fp16; fp32 on a CPU, which the backend replaces by
    bf16 once ``choose_dtype`` has measured bf16 faster there. A bad value raises naming the setting.
    """
    name = _setting(dtype)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if gpu_has_bf16(device) else torch.float16
        return torch.float32
    if device.type == "cpu" and DTYPES[name] is torch.float16:
        raise ValueError(f"{config.ENV_LAYOUT_DTYPE}=float16 is for GPUs; on the CPU use bfloat16 or float32")
    return DTYPES[name]


def choose_dtype(
    dtype: str | None,
    device: torch.device,
    model: torch.nn.Module,
    *,
    batch_size: int,
    input_size: tuple[int, int],
    timer: Timer | None = None,
) -> DtypeChoice:
    """The precision for the loaded ``model``: an explicit setting is obeyed; ``auto`` on a CPU with
    bf16 instructions measures both (or reads an earlier measurement from the cache)."""
    name = _setting(dtype)
    if name != "auto":
        return DtypeChoice(resolve_dtype(name, device), f"set by {config.ENV_LAYOUT_DTYPE}")
    if device.type == "cuda":
        if gpu_has_bf16(device):
            return DtypeChoice(torch.bfloat16, "GPU with bf16")
        return DtypeChoice(torch.float16, "GPU without bf16: fp16, a batch with non-finite outputs rerun in fp32")
    if not cpu_has_bf16():
        return DtypeChoice(torch.float32, "no bf16 instructions")
    return measured_cpu_dtype(model, batch_size=batch_size, input_size=input_size, timer=timer)


def autocast(dtype: torch.dtype, device: torch.device):
    """The autocast context the model runs under: none for fp32."""
    return nullcontext() if dtype is torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)


def checked_forward(model: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype, report=None):
    """The model's outputs on ``pixels`` under ``dtype``. fp16's range is narrow: a batch whose logits,
    boxes or masks are not all finite runs again in fp32, counted in ``report.counts["fp16_fallbacks"]``
    (present, 0 or more, whenever the model runs in fp16)."""
    with autocast(dtype, pixels.device):
        outputs = model(pixel_values=pixels)
    if dtype is not torch.float16:
        return outputs
    checked = [outputs.logits, outputs.pred_boxes] + [t for t in (getattr(outputs, "out_masks", None),) if t is not None]
    finite = all(bool(torch.isfinite(t).all()) for t in checked)
    if report is not None:
        report.count("fp16_fallbacks", 0 if finite else 1)
    return outputs if finite else model(pixel_values=pixels)


def forward_seconds(model: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype) -> float:
    """Seconds of one forward pass of ``model`` on ``pixels``, under ``dtype`` autocast (fp32: none)."""
    start = time.perf_counter()
    with torch.inference_mode(), autocast(dtype, pixels.device):
        model(pixel_values=pixels)
    return time.perf_counter() - start


def time_both(model: torch.nn.Module, pixels: torch.Tensor, *, rounds: int | None = None,
              timer: Timer | None = None) -> tuple[float, float]:
    """Median seconds per pass in (fp32, bf16): one warm-up pass each, then ``rounds`` (ROUNDS) timed
    passes each, interleaved and alternating which goes first, so drifting load hits both alike."""
    timer = timer or forward_seconds  # looked up at call time, so a test can count the calls
    rounds = rounds or ROUNDS
    for dtype in (torch.float32, torch.bfloat16):
        timer(model, pixels, dtype)
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for r in range(rounds):
        for dtype in (torch.float32, torch.bfloat16) if r % 2 == 0 else (torch.bfloat16, torch.float32):
            times[dtype].append(timer(model, pixels, dtype))
    return statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])


def faster_dtype(fp32_seconds: float, bf16_seconds: float) -> torch.dtype:
    """bf16 only when at least MIN_GAIN faster than fp32; a tie or a loss keeps fp32."""
    return torch.bfloat16 if bf16_seconds <= fp32_seconds * (1 - MIN_GAIN) else torch.float32


def measured_cpu_dtype(model: torch.nn.Module, *, batch_size: int, input_size: tuple[int, int],
                       timer: Timer | None = None) -> DtypeChoice:
    """fp32 or bf16 for ``model`` on this CPU, from the cache when this machine measured it before."""
    key = cache_key(model, batch_size, input_size)
    path = config.cache_dir() / CACHE_FILE
    entry = read_cache(path).get(key)
    if _valid(entry):
        return DtypeChoice(DTYPES[entry["dtype"]], "cached measurement: " + _times(entry))
    # one process measures at a time: two measuring at once on the same cores would time each other
    with _measuring(path):
        entry = read_cache(path).get(key)
        if _valid(entry):
            return DtypeChoice(DTYPES[entry["dtype"]], "cached measurement: " + _times(entry))
        return _measure(model, key, path, batch_size, input_size, timer)


@contextmanager
def _measuring(path: Path):
    """An exclusive lock beside the cache file, held while measuring; none where it cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # an unwritable cache folder: measure unlocked (the result is not cached either)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _measure(model: torch.nn.Module, key: str, path: Path, batch_size: int, input_size: tuple[int, int],
             timer: Timer | None) -> DtypeChoice:
    pixels = torch.rand(batch_size, 3, *input_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.contiguous(memory_format=torch.channels_last)  # as the backend feeds the model
    try:
        fp32_s, bf16_s = time_both(model, pixels, timer=timer)
    except RuntimeError as exc:  # an op bf16 autocast cannot run here: fp32, which the model is made for
        return DtypeChoice(torch.float32, f"bf16 failed when measured ({exc}); fp32")
    dtype = faster_dtype(fp32_s, bf16_s)
    entry = {"dtype": str(dtype).removeprefix("torch."), "fp32_seconds": round(fp32_s, 4),
             "bf16_seconds": round(bf16_s, 4), "batch_size": batch_size, "input_size": list(input_size),
             "threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__,
             "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    reason = "measured: " + _times(entry)
    try:
        write_cache(path, {**read_cache(path), key: entry})  # read again: another process may have written
    except OSError as exc:  # the choice stands; the next load measures again
        reason += f" (not cached: {exc}; set {config.ENV_CACHE_DIR} to a writable folder)"
    return DtypeChoice(dtype, reason)


def _times(entry: dict) -> str:
    return (f"bf16 {entry['bf16_seconds']:.2f} s, fp32 {entry['fp32_seconds']:.2f} s per pass "
            f"(batch {entry['batch_size']}, {entry['threads']} threads)")


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and entry.get("dtype") in ("float32", "bfloat16")
            and all(isinstance(entry.get(k), (int, float)) for k in
                    ("fp32_seconds", "bf16_seconds", "batch_size", "threads")))


def read_cache(path: Path) -> dict:
    """The cached measurements, or {} where the file is missing, unreadable or not ours."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or broken: measured again and rewritten
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache(path: Path, entries: dict) -> None:
    """Write the measurements atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_key(model: torch.nn.Module, batch_size: int, input_size: tuple[int, int]) -> str:
    """A digest of what changes the answer: the CPU and its flags, torch and transformers, the
    thread count, the instruction sets torch is told to use, the model's architecture and input
    size, and the batch size."""
    import transformers

    cfg = model.config.to_dict() if hasattr(model, "config") else {"module": type(model).__name__}
    architecture = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}
    parts = {"cpu": cpu_name(), "flags": cpu_flags(), "torch": torch.__version__,
             "transformers": transformers.__version__, "threads": torch.get_num_threads(),
             "isa": [os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")],
             "architecture": architecture, "input_size": list(input_size), "batch_size": int(batch_size)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo, or {} where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    return fields


def cpu_name() -> str:
    """This CPU's model name (/proc/cpuinfo, else what the platform says)."""
    info = _cpuinfo()
    return info.get("model name") or info.get("cpu part") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """This CPU's instruction-set flags, space-separated (/proc/cpuinfo; else the OS and architecture)."""
    info = _cpuinfo()
    return info.get("flags") or info.get("features") or f"{platform.system()} {platform.machine()}"
