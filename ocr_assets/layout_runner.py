"""Where a partition's layout runs: on a GPU no other step holds, in this process or in a warm worker.

``run_partition`` is what the `layout` asset calls. It leases a GPU (``gpu_lease``) when layout
runs on CUDA, then runs the stage for the partition (``layout_partition``) either here, loading
the model into this process, or in the host's layout worker for that GPU (``layout_worker``),
which keeps the model loaded and warm between shards: a step then pays no CUDA start-up, model
load or warm-up. ``OCR_ASSETS_LAYOUT_WORKER``: ``auto`` uses a worker where layout runs on CUDA,
``on`` everywhere (the CPU too), ``off`` never. The lease is held for the whole of the layout
work and dropped when the step ends, however it ends.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ocr_assets import config
from ocr_assets.backends.layout import LayoutBackend, check_settings, load_layout_backend, resolve_layout_backend
from ocr_assets.gpu_lease import cuda_count, lease_gpu, lease_slot
from ocr_assets.schemas import layout_schema
from ocr_assets.sources import open_shard
from ocr_assets.stages.layout import run_layout
from ocr_assets.storage import ParquetStore
from ocr_assets.timing import StageReport

PAGES_COLUMNS = ["page_id", "row", "page", "status"]
CPU_SLOT = "cpu"


# what a layout worker's work depends on besides its settings: a step whose environment differs
# here (a setting, storage credentials, the GPUs it sees) gets a worker started with its own
ENV_PREFIXES = ("OCR_ASSETS_", "HF_", "TRANSFORMERS_", "PYTORCH_", "CUDA_VISIBLE_DEVICES", "AWS_", "GOOGLE_",
                "GCS_", "AZURE_", "FSSPEC_")
ENV_IGNORED = ("OCR_ASSETS_VLM_", "OCR_ASSETS_LAYOUT_WORKER")  # recognition's settings, the worker's own


@dataclass
class LayoutJob:
    """One partition's layout, as the step and a worker both read it: where the pages and outputs
    are (absolute), the layout settings (``backends.layout.SETTINGS``), and the identity of the
    worker that may run it (``worker_identity``)."""

    dataset: str
    storage: str
    partition: str
    settings: dict
    image_column: str | None = None
    id_column: str | None = None
    identity: str = ""

    @classmethod
    def for_step(cls, *, dataset: str, storage: str, settings: dict, **kwargs) -> "LayoutJob":
        """A job whose local paths no longer depend on this process's working folder (a worker has its own)."""
        settings = step_settings(settings)
        return cls(dataset=_absolute(dataset), storage=_absolute(storage), settings=settings,
                   identity=worker_identity(settings), **kwargs)


def step_settings(settings: dict) -> dict:
    """The layout settings as a worker must get them: a local model folder made absolute."""
    settings = dict(settings)
    model = settings.get("model")
    if model and (model.startswith((".", "~", "/")) or Path(model).expanduser().exists()):
        settings["model"] = _absolute(model)
    return settings


def _absolute(location: str) -> str:
    """A local path made absolute; a URL (``s3://``, ``hf://``, ...) as it is."""
    return location if "://" in location else str(Path(location).expanduser().absolute())


def worker_identity(settings: dict) -> str:
    """What a worker must share with a step to run its shards: this package's code, the layout
    settings and the environment they are read with (ENV_PREFIXES)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and not k.startswith(ENV_IGNORED)}
    text = json.dumps([code_digest(), settings, env], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class LayoutOutcome:
    """What the asset publishes: the file written and the stage's report, with where it ran."""

    rows: int
    uri: str
    keep_polygons: bool
    report: StageReport

    @property
    def schema(self):
        return layout_schema(self.keep_polygons)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of this package's code and interpreter, taken once per process (the code it runs):
    a worker running other code is not used."""
    root = Path(__file__).parent
    digest = hashlib.sha1(sys.executable.encode())
    for path in sorted(root.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _device_of(backend: LayoutBackend):
    device = getattr(backend, "device", None)
    return device if getattr(device, "type", None) == "cuda" else None


def layout_partition(job: LayoutJob, backend: LayoutBackend, report: StageReport) -> LayoutOutcome:
    """Run the layout stage on ``job``'s partition with a loaded ``backend``, writing its Parquet file.

    Adds the GPU memory peak of the work (``gpu_memory_peak_mb``; 0 on the CPU) to the report.
    """
    store = ParquetStore(job.storage)
    pages = store.read("pages", job.partition, columns=PAGES_COLUMNS)
    device = _device_of(backend)
    if device is not None:
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    shard = open_shard(job.dataset, job.partition, image_column=job.image_column, id_column=job.id_column)
    try:
        with store.writer("layout", job.partition, layout_schema(backend.keep_polygons)) as written:
            run_layout(pages, shard, backend, recover_text=bool(job.settings.get("recover_text", True)),
                       report=report, sink=written.write)
    finally:
        shard.close()
    peak = 0.0
    if device is not None:
        import torch

        peak = torch.cuda.max_memory_allocated(device) / 2**20
    report.info["gpu_memory_peak_mb"] = round(peak, 1)
    return LayoutOutcome(written.rows, written.uri, backend.keep_polygons, report)


def on_cuda(settings: dict) -> bool:
    """Whether these settings run layout on a GPU (pp-doclayout-v3, device auto with CUDA, or cuda/cuda:N)."""
    if resolve_layout_backend(settings.get("backend"), settings.get("model")) != "pp-doclayout-v3":
        return False
    device = (settings.get("device") or "auto").strip().lower()
    if device == "cpu":
        return False
    if device == "auto":
        return gpu_count() > 0
    return True  # cuda or cuda:N: the lease checks that CUDA and that GPU exist


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """The GPUs this process sees: as a live layout worker on this host recorded them under the same
    CUDA_VISIBLE_DEVICES, else from torch. A step that finds a warm worker does not import torch
    (seconds of the step's start-up). Counted once per process: a step asks three times (device,
    lease, pool), and each look at the workers is a request to each of them."""
    if "torch" not in sys.modules:
        from ocr_assets.layout_worker import workers

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        for info in workers():
            if "gpus" in info and info.get("visible") == visible:
                return int(info["gpus"])
    return cuda_count()


def run_partition(job: LayoutJob, report: StageReport) -> LayoutOutcome:
    """The partition's layout, on a leased GPU where it runs on CUDA, here or in a warm worker.

    Sets, in ``report.info``: ``gpu`` (``gpu-<physical id>``, or ``cpu``), ``startup_seconds`` (lease
    wait, worker start or model load, up to the first page; in the step, the first batch's warm-up
    falls in the stage), ``lease_wait_seconds``, ``model_load_seconds`` and ``layout_worker`` (off,
    warm or started).
    """
    start = time.perf_counter()
    check_settings(job.settings)  # a bad setting fails here, as in the step, before any worker is touched
    mode = config.layout_worker_mode()
    cuda = on_cuda(job.settings)
    use_worker = mode == "on" or (mode == "auto" and cuda)
    # a GPU for this step alone; the CPU worker, too, takes one step at a time
    lease = lease_gpu(job.settings.get("device") or "auto", gpu_count()) if cuda else None
    if lease is None and use_worker:
        lease = lease_slot(CPU_SLOT)
    try:
        waited = lease.waited if lease is not None else 0.0
        if use_worker:
            from ocr_assets.layout_worker import run_in_worker

            outcome, how, load_seconds, began = run_in_worker(job, lease.slot, lease.device if cuda else "cpu",
                                                              report)
            startup = began - start
        else:
            backend, load_seconds = load_layout_backend(job.settings, device=lease.device if lease else None)
            startup = time.perf_counter() - start
            how = "off"
            outcome = layout_partition(job, backend, report)
        outcome.report.info.update({
            "gpu": lease.slot if (lease is not None and cuda) else "cpu",
            "layout_worker": how,
            "startup_seconds": round(startup, 4),
            "lease_wait_seconds": round(waited, 4),
            "model_load_seconds": round(load_seconds, 4),
        })
        return outcome
    finally:
        if lease is not None:
            lease.release()

