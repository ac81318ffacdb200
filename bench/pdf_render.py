"""PDF rendering in pages/s: PdfRenderer (pypdfium2) against pdftoppm (poppler) and PyMuPDF, same PDFs, same DPI.

    apt-get install -y poppler-utils            (pdftoppm)
    pip install pymupdf                         (the PyMuPDF baseline; not a dependency)
    python bench/pdf_render.py [--pages 60] [--dpi 150] [--repeat 5] [FILE.pdf ...]

Without files, ``--pages`` realistic Letter pages are written with matplotlib's PDF backend (a
title, 50 lines of 9-point text, and on every third page a chart and a small table). Each side
renders every page once per round at the same DPI; the sides take turns within each round and
each keeps its best of ``--repeat`` rounds (a busy moment on a shared machine then hits all alike).
Besides wall-clock pages/s, the CPU time of every process involved (this one, render workers,
pdftoppm, PyMuPDF's pool) gives CPU ms a page, which other load on the machine hardly moves:

- PdfRenderer with 1 worker (in this process) and with every core (a pool of render processes),
  pages asked for in batches of ``--batch`` as the stages do, each returned as a BGR numpy array
  in this process. The pool is started (a page rendered on each worker) before the clock starts.
- pdftoppm writing binary PPM files (its cheapest output) to a tmpfs folder: one process, and
  one process per core over page ranges.
- PyMuPDF ``page.get_pixmap(dpi=...)`` viewed as a numpy array, ``--batch`` pages held at a time
  as ours are: in this process, and one process per core over page ranges (its own
  recommendation for parallel rendering; there the pixels stay in the children, which is less
  work than delivering them to one process).
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ocr_assets.sources.pdf import PdfRenderer, pdf_page_sizes

WORDS = ("the of and to in is for that with as on by this be are from at an which or data model page text "
         "results method table figure section value analysis sample measured between during however each "
         "process reading document corpus training evaluation accuracy throughput parallel").split()


def make_pdf(pages: int, seed: int = 0) -> bytes:
    """Letter pages of body text, with a chart and a table on every third page; TrueType fonts embedded."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    rng = random.Random(seed)
    buf = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        with PdfPages(buf) as pdf:
            for p in range(pages):
                figure = Figure(figsize=(8.5, 11))
                figure.text(0.1, 0.94, f"{p + 1}. {' '.join(rng.choice(WORDS) for _ in range(5)).title()}",
                            fontsize=15, weight="bold")
                lines = 28 if p % 3 == 0 else 50
                for k in range(lines):
                    figure.text(0.1, 0.91 - 0.0165 * k, " ".join(rng.choice(WORDS) for _ in range(13)), fontsize=9)
                if p % 3 == 0:
                    axes = figure.add_axes((0.12, 0.08, 0.45, 0.3))
                    x = np.linspace(0, 10, 200)
                    axes.plot(x, np.sin(x + p), x, np.cos(x * 0.7))
                    axes.set_title("measured throughput", fontsize=9)
                    cells = [[f"{rng.uniform(0, 100):.1f}" for _ in range(3)] for _ in range(6)]
                    table = figure.add_axes((0.65, 0.1, 0.28, 0.25))
                    table.axis("off")
                    table.table(cellText=cells, colLabels=["a", "b", "c"], loc="center")
                pdf.savefig(figure)
    return buf.getvalue()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ours(datas: list[bytes], counts: list[int], dpi: int, workers: int, batch: int, stack: ExitStack):
    jobs = [(f, data, i) for f, (data, n) in enumerate(zip(datas, counts)) for i in range(n)]
    renderer = stack.enter_context(PdfRenderer(dpi=dpi, workers=workers))
    renderer.render(jobs[:workers])  # start the pool before the clock

    def workers_cpu() -> float:
        return sum(process_cpu(child.pid) for child in multiprocessing.active_children()
                   if child.name == "ocr-assets-pdf-render")

    def run() -> float:
        before = workers_cpu()
        for start in range(0, len(jobs), batch):
            pages = renderer.render(jobs[start:start + batch])
            assert all(isinstance(p, np.ndarray) for p in pages), [p for p in pages if not isinstance(p, np.ndarray)]
        return workers_cpu() - before
    return run


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ranges(counts: list[int], parts: int) -> list[tuple[int, int, int]]:
    """(file index, first page, last page) 1-based inclusive chunks, about two per process."""
    step = max(1, math.ceil(sum(counts) / (2 * parts))) if parts > 1 else max(counts)
    return [(f, first, min(first + step - 1, n)) for f, n in enumerate(counts) for first in range(1, n + 1, step)]


def pdftoppm(files: list[Path], counts: list[int], dpi: int, processes: int, out: Path):
    def one(chunk):
        f, first, last = chunk
        subprocess.run(["pdftoppm", "-r", str(dpi), "-f", str(first), "-l", str(last), str(files[f]),
                        str(out / f"f{f}")], check=True)

    def run() -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with ThreadPoolExecutor(processes) as threads:
            list(threads.map(one, ranges(counts, processes)))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        for ppm in out.iterdir():
            ppm.unlink()
        return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return run


def mupdf_range(args: tuple[str, int, int, int, int]) -> float:
    """Pages first..last of one file as numpy arrays, a batch of them held at a time as a stage holds
    them; returns the CPU seconds it took."""
    import pymupdf

    path, first, last, dpi, batch = args
    start, held = time.process_time(), []
    with pymupdf.open(path) as document:
        for index in range(first - 1, last):
            pix = document[index].get_pixmap(dpi=dpi)
            held.append((pix, np.frombuffer(pix.samples_mv, np.uint8).reshape(pix.h, pix.w, pix.n)))
            if len(held) == batch:
                held = []
    return time.process_time() - start


def mupdf(files: list[Path], counts: list[int], dpi: int, processes: int, batch: int, stack: ExitStack):
    tasks = [(str(files[f]), first, last, dpi, batch) for f, first, last in ranges(counts, processes)]
    if processes == 1:
        return lambda: [mupdf_range(t) for t in tasks] and 0.0
    pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(processes))
    pool.map(mupdf_range, tasks[:processes])  # processes started and modules imported before the clock
    return lambda: sum(pool.map(mupdf_range, tasks, chunksize=1))


def page_one_sizes(file: Path, dpi: int, scratch: Path) -> dict[str, tuple[int, int]]:
    """Page 1's size in pixels from the baselines, to show that all sides render the same pixel count."""
    sizes = {}
    if shutil.which("pdftoppm"):
        subprocess.run(["pdftoppm", "-r", str(dpi), "-f", "1", "-l", "1", "-singlefile", str(file),
                        str(scratch / "size")], check=True)
        header = (scratch / "size.ppm").read_bytes()[:32].split()
        sizes["pdftoppm"] = (int(header[1]), int(header[2]))
    try:
        import pymupdf
        with pymupdf.open(file) as document:
            pix = document[0].get_pixmap(dpi=dpi)
            sizes["PyMuPDF"] = (pix.w, pix.h)
    except ImportError:
        pass
    return sizes


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="PDFs to render (default: generated pages)")
    parser.add_argument("--pages", type=int, default=60, help="pages to generate when no file is given")
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="pages per PdfRenderer.render call")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    scratch = Path(tempfile.mkdtemp(prefix="pdf-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    stack = ExitStack()
    try:
        files = args.files
        if not files:
            files = [scratch / "generated.pdf"]
            files[0].write_bytes(make_pdf(args.pages))
        datas = [f.read_bytes() for f in files]
        sizes = [pdf_page_sizes(data, args.dpi) for data in datas]
        counts = [len(s) for s in sizes]
        total = sum(counts)
        out = scratch / "ppm"
        out.mkdir()
        runs = [("PdfRenderer (pypdfium2), 1 worker, in process", 1,
                 lambda: ours(datas, counts, args.dpi, 1, args.batch, stack)),
                (f"PdfRenderer (pypdfium2), {cores} workers", cores,
                 lambda: ours(datas, counts, args.dpi, cores, args.batch, stack))]
        if shutil.which("pdftoppm"):
            version = subprocess.run(["pdftoppm", "-v"], capture_output=True, text=True).stderr.split("\n")[0]
            runs += [(f"{version}, PPM to tmpfs, {n} process{'es' * (n > 1)}", n,
                      lambda n=n: pdftoppm(files, counts, args.dpi, n, out)) for n in (1, cores)]
        try:
            import pymupdf
            runs += [(f"PyMuPDF {pymupdf.VersionBind} get_pixmap, {where}", n,
                      lambda n=n: mupdf(files, counts, args.dpi, n, args.batch, stack))
                     for n, where in ((1, "in process"), (cores, f"{cores} processes"))]
        except ImportError:
            pass
        timed = [(name, used, setup()) for name, used, setup in runs]
        seconds, cpu = [math.inf] * len(timed), [math.inf] * len(timed)
        for _ in range(args.repeat):
            for k, (_, _, run) in enumerate(timed):
                start, start_cpu = time.perf_counter(), time.process_time()
                elsewhere = run()  # CPU seconds of other processes (workers, pdftoppm, PyMuPDF's pool)
                seconds[k] = min(seconds[k], time.perf_counter() - start)
                cpu[k] = min(cpu[k], time.process_time() - start_cpu + elsewhere)
        rows = [(name, used, f"{s:.2f}", f"{total / s:.1f}", f"{total / s / used:.1f}", f"{1000 * c / total:.1f}",
                 f"{total / c:.1f}") for (name, used, _), s, c in zip(timed, seconds, cpu)]
        width, height = sizes[0][0]
        others = page_one_sizes(files[0], args.dpi, scratch)
        agree = ", ".join(f"{who} {w}x{h}" for who, (w, h) in others.items())
        print(f"\nPDF rendering, {total} pages ({len(files)} file{'s' * (len(files) > 1)}, first page {width}x{height} px) "
              f"at {args.dpi} dpi, best of {args.repeat}; {cpu_model()}, {cores} cores, load average "
              f"{os.getloadavg()[0]:.2f} at the end\npage 1: ours {width}x{height}, {agree}\n"
              f"command: python bench/pdf_render.py {' '.join(sys.argv[1:])}\n")
        print(table(rows, ("renderer", "cores", "seconds", "pages/s", "pages/s per core", "CPU ms/page",
                           "pages per CPU-second")))
    finally:
        stack.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
