"""PDF pages rendered with PDFium (``pypdfium2``) straight into BGR numpy arrays, and sized without rendering.

A page is rendered at OCR_ASSETS_PDF_DPI into a white BGR bitmap whose pixels are the returned
array: no PIL, no encoded image in between. Its size is the page box (``/Rotate`` applied) at
that DPI, the longest side capped at ``config.PDF_MAX_SIDE``; ``pdf_page_sizes`` gives exactly
the sizes ``PdfRenderer.render`` produces.

PDFium is not thread-safe. In this process every PDFium call holds one lock. A ``PdfRenderer``
with more than one worker renders in spawned processes, one render thread each, a page a task
so that a batch spreads over all of them. A document is written once into a spool file in shared
memory (``/dev/shm``, else the temporary folder when that is full) and mapped by each worker that
renders some of its pages; a worker renders into a page buffer in shared memory that stays mapped
on both sides, and the page is copied from there once, into the array returned. A worker that
dies (PDFium crashing on a hostile file) turns its page into an error and is replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import math
import mmap
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pypdfium2  # noqa: F401  (importing the package initialises the PDFium library)
import pypdfium2.raw as pdfium

from ocr_assets import config

_LOCK = threading.Lock()  # PDFium in this process: one call at a time, whichever thread asks
_WHITE = 0xFFFFFFFF
_OPEN_PER_WORKER = 8  # documents a worker keeps open between tasks
_PAGE_TIMEOUT_S = 300  # a page that renders longer than this is abandoned and its worker replaced
_SPOOL_PREFIX = "ocr-assets-pdf-"
_BROKEN = "the PDF is truncated or broken"
_LOAD_ERRORS = {
    pdfium.FPDF_ERR_PASSWORD: "the PDF is password-protected (encrypted): it cannot be opened without "
                              "its password; decrypt it first (e.g. qpdf --decrypt --password=...)",
    pdfium.FPDF_ERR_SECURITY: "the PDF is password-protected (encrypted) with a security handler PDFium "
                              "does not support; decrypt it first (e.g. qpdf --decrypt)",
    pdfium.FPDF_ERR_FILE: f"{_BROKEN}: PDFium could not read it",
    pdfium.FPDF_ERR_FORMAT: f"{_BROKEN}: PDFium cannot parse it (no readable cross-reference table or page tree)",
}


class PdfError(ValueError):
    """A PDF, or one of its pages, that cannot be rendered; the message says why."""


def _pixel_size(width_pt: float, height_pt: float, dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of a page box in points at ``dpi``, the longest side capped."""
    width_pt = min(width_pt, 1e6) if width_pt > 0 else 1.0  # also maps NaN to 1
    height_pt = min(height_pt, 1e6) if height_pt > 0 else 1.0
    scale = dpi / 72
    longest = max(width_pt, height_pt)
    if longest * scale > config.PDF_MAX_SIDE:  # a poster: this page gets a lower resolution
        scale = config.PDF_MAX_SIDE / longest
    # a float error of 1e-4 px must not add a pixel row (792 pt at 150 dpi is 1650 px, not 1651)
    return tuple(min(config.PDF_MAX_SIDE, max(1, math.ceil(side * scale - 1e-4)))
                 for side in (width_pt, height_pt))


class _Document:
    """One open PDFium document over bytes this object keeps alive; use it under ``_LOCK`` or in a worker."""

    def __init__(self, data: bytes | memoryview | mmap.mmap) -> None:
        self._data = np.frombuffer(data, np.uint8)  # any buffer, read-only too, without a copy
        if self._data.size == 0:
            raise PdfError(f"{_BROKEN}: it is empty (0 bytes)")
        self.handle = pdfium.FPDF_LoadMemDocument64(self._data.ctypes.data, self._data.size, None)
        if not self.handle:
            code = pdfium.FPDF_GetLastError()
            if b"%PDF-" not in bytes(self._data[:1024]):  # readers accept a header within the first 1 KB
                raise PdfError(f"{_BROKEN}: it has no %PDF- header, so it is not a PDF file")
            raise PdfError(_LOAD_ERRORS.get(code, f"{_BROKEN}: PDFium cannot open it (error {code})"))
        self.pages = pdfium.FPDF_GetPageCount(self.handle)
        if self.pages < 1:
            self.close()
            raise PdfError("the PDF has no pages")

    def pixel_size(self, index: int, dpi: int) -> tuple[int, int]:
        """The page's size in pixels as rendered at ``dpi``, from its page box: nothing is rendered."""
        if not 0 <= index < self.pages:
            raise IndexError(f"page {index} of a {self.pages}-page PDF does not exist (pages are 0-based)")
        size = pdfium.FS_SIZEF()
        if not pdfium.FPDF_GetPageSizeByIndexF(self.handle, index, ctypes.byref(size)):
            raise PdfError(f"{_BROKEN}: page {index + 1} has no readable page box")
        return _pixel_size(size.width, size.height, dpi)

    def render_into(self, index: int, width: int, height: int, address: int) -> None:
        """Render page ``index`` scaled to ``width`` x ``height`` into the BGR pixels at ``address``."""
        page = pdfium.FPDF_LoadPage(self.handle, index)
        if not page:
            raise PdfError(f"{_BROKEN}: page {index + 1} cannot be read")
        try:
            bitmap = pdfium.FPDFBitmap_CreateEx(width, height, pdfium.FPDFBitmap_BGR, address, width * 3)
            if not bitmap:
                raise MemoryError(f"PDFium could not set up a {width}x{height} bitmap")
            try:
                pdfium.FPDFBitmap_FillRect(bitmap, 0, 0, width, height, _WHITE)
                pdfium.FPDF_RenderPageBitmap(bitmap, page, 0, 0, width, height, 0, pdfium.FPDF_ANNOT)
            finally:
                pdfium.FPDFBitmap_Destroy(bitmap)
        finally:
            pdfium.FPDF_ClosePage(page)

    def close(self) -> None:
        if self.handle:
            pdfium.FPDF_CloseDocument(self.handle)
            self.handle = None
        self._data = None


def pdf_page_sizes(data: bytes | memoryview, dpi: int) -> list[tuple[int, int]]:
    """(width, height) in pixels of every page of the PDF in ``data`` exactly as ``PdfRenderer`` renders
    it at ``dpi``: the page box in points × dpi/72 with the page's /Rotate applied, the longest side
    capped at ``config.PDF_MAX_SIDE``. Reads the page boxes only (no rendering). Raises PdfError."""
    with _LOCK:
        document = _Document(data)
        try:
            return [document.pixel_size(index, dpi) for index in range(document.pages)]
        finally:
            document.close()


# ---- spool files in shared memory: documents to the workers, page buffers back ----

def _spool_folders() -> tuple[list[str], list[int]]:
    """A new private folder in /dev/shm and one in the temporary folder (for when /dev/shm is full),
    each held by a lock for as long as the returned descriptors stay open. Folders whose lock is
    free were left by a process that died without closing its renderer: they are removed first
    (a lock, not a process id, tells: containers sharing /dev/shm do not see each other's ids)."""
    token = f"{_SPOOL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    folders, locks = [], []
    for base in dict.fromkeys(("/dev/shm", tempfile.gettempdir())):
        if not (os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)):
            continue
        for stale in Path(base).glob(f"{_SPOOL_PREFIX}*/lock"):
            with contextlib.suppress(OSError), open(stale, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its owner lives
                shutil.rmtree(stale.parent, ignore_errors=True)
        folder = os.path.join(base, token)
        os.mkdir(folder, 0o700)
        locks.append(os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT, 0o600))
        fcntl.flock(locks[-1], fcntl.LOCK_EX)
        folders.append(folder)
    if not folders:
        raise OSError("neither /dev/shm nor the temporary folder (TMPDIR) is writable: PDF pages cannot "
                      "be passed between render processes; set TMPDIR to a writable folder")
    return folders, locks


def _spool_file(folders: Sequence[str], name: str, size: int) -> tuple[str, int]:
    """A new file of ``size`` bytes, its space reserved (a full /dev/shm fails here, not with a SIGBUS
    later), in the first folder with room: (path, open read-write descriptor)."""
    problem: OSError | None = None
    for folder in folders:
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            return path, fd
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            problem = exc
    raise OSError(f"no room for {size} bytes in {', '.join(folders)} ({problem}): free memory or disk "
                  "there, or set OCR_ASSETS_PDF_DPI lower")


# ---- the render process ----

def _open_spooled(path: str) -> _Document:
    with open(path, "rb") as file:
        return _Document(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))


def _serve(conn, folders: Sequence[str]) -> None:
    """A render process: answers each task ``(live documents, document, page, dpi)`` with
    ``(buffer file, height, width)`` once the page's pixels are in its buffer, or with the exception,
    until told to stop or its parent goes away. The buffer is reused from page to page: new shared
    memory costs more to map than the page takes to render."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then stops us
    documents: OrderedDict[str, _Document | Exception] = OrderedDict()
    buffer_path, buffer = "", None
    serial = itertools.count()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        live, path, index, dpi = task
        for gone in dict.fromkeys([p for p in documents if p not in live] + list(documents)[:-_OPEN_PER_WORKER]):
            if isinstance(document := documents.pop(gone), _Document):  # released, or the least recent
                document.close()
        if path not in documents:
            try:
                documents[path] = _open_spooled(path)
            except Exception as exc:  # noqa: BLE001  the document's fault: the answer for its pages
                documents[path] = exc
        documents.move_to_end(path)
        try:
            if isinstance(document := documents[path], Exception):
                raise PdfError(str(document)) if isinstance(document, PdfError) else document
            width, height = document.pixel_size(index, dpi)
            size = width * height * 3
            if buffer is None or not size <= len(buffer) <= 4 * size:  # grow, or shrink after a poster
                if buffer is not None:  # the parent has mapped and unlinked it, or never will
                    buffer.close()
                    Path(buffer_path).unlink(missing_ok=True)
                buffer = None
                buffer_path, fd = _spool_file(folders, f"page-{os.getpid()}-{next(serial)}", size)
                try:
                    buffer = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
            # the temporary array is gone once the address is read; the mapping stays until close()
            document.render_into(index, width, height, np.frombuffer(buffer, np.uint8).ctypes.data)
            answer: tuple | Exception = (buffer_path, height, width)
        except Exception as exc:  # noqa: BLE001  one page's fault never stops the others
            answer = exc if isinstance(exc, (PdfError, IndexError, OSError)) else \
                PdfError(f"the page could not be rendered: {type(exc).__name__}: {exc}")
        conn.send(answer)


class _Worker:
    """One spawned render process, the pipe to it, and this side's view of its page buffer."""

    def __init__(self, target, folders: Sequence[str]) -> None:
        context = multiprocessing.get_context("spawn")  # never fork: the caller has threads, maybe CUDA
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, list(folders)), daemon=True,
                                       name="ocr-assets-pdf-render")
        self.process.start()
        child.close()  # so that the worker's death reads as end-of-file here
        self.view_path, self.view = "", None

    def render(self, task: tuple) -> np.ndarray | Exception:
        """The page of ``task``, copied out of the worker's buffer into an array of its own."""
        self.conn.send(task)
        if not self.conn.poll(_PAGE_TIMEOUT_S):
            raise TimeoutError
        answer = self.conn.recv()
        if isinstance(answer, Exception):
            return answer
        path, height, width = answer
        if path != self.view_path:  # a new buffer: map it once, and unlink it (both sides hold it)
            self.unmap()
            fd = os.open(path, os.O_RDONLY)
            try:
                self.view = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
                os.unlink(path)
            self.view_path = path
        page = np.empty((height, width, 3), np.uint8)
        page.reshape(-1)[:] = np.frombuffer(self.view, np.uint8, count=page.size)
        return page

    def unmap(self) -> None:
        if self.view is not None:
            self.view.close()
        self.view_path, self.view = "", None

    def stop(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for the process to end (after a None task), then kill it."""
        self.process.join(wait)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()
        self.unmap()


class _Pool:
    """The render processes, the spooled documents of the current call, and one parent thread per process."""

    def __init__(self, workers: int, target) -> None:
        self.target = target
        self.folders, self.locks = _spool_folders()
        self.idle: queue.Queue[_Worker] = queue.Queue()
        self.threads = ThreadPoolExecutor(workers, thread_name_prefix="ocr-assets-pdf")
        self.documents: dict[Hashable, tuple[str, int]] = {}  # key -> (spool path, size)
        self.names = (f"doc-{n}.pdf" for n in itertools.count())
        try:
            for _ in range(workers):
                self.idle.put(_Worker(target, self.folders))
        except BaseException:
            self.close()
            raise

    def render(self, jobs: Sequence[tuple[Hashable, bytes | memoryview, int]], dpi: int) -> list:
        wanted: dict[Hashable, bytes | memoryview] = {}
        for key, data, _ in jobs:
            wanted.setdefault(key, data)
        paths = self._spool(wanted)
        live = frozenset(path for path in paths.values() if isinstance(path, str))

        def run(job: tuple[Hashable, bytes | memoryview, int]) -> np.ndarray | Exception:
            path = paths[job[0]]
            return path if isinstance(path, Exception) else self._call((live, path, job[2], dpi))

        return list(self.threads.map(run, jobs))  # a page a task: the batch spreads over every worker

    def _spool(self, wanted: dict[Hashable, bytes | memoryview]) -> dict[Hashable, str | Exception]:
        """Each document of this call written once to the spool; documents of earlier calls released."""
        for key in [key for key in self.documents if key not in wanted]:
            Path(self.documents.pop(key)[0]).unlink(missing_ok=True)
        paths: dict[Hashable, str | Exception] = {}
        for key, data in wanted.items():
            size = memoryview(data).nbytes
            if key in self.documents and self.documents[key][1] != size:  # same key, other bytes
                Path(self.documents.pop(key)[0]).unlink(missing_ok=True)
            if key in self.documents:
                paths[key] = self.documents[key][0]
            elif size == 0:
                paths[key] = PdfError(f"{_BROKEN}: it is empty (0 bytes)")
            else:
                try:
                    path, fd = _spool_file(self.folders, next(self.names), size)
                    with open(fd, "wb") as file:
                        file.write(data)
                except Exception as exc:  # noqa: BLE001  no room, or a buffer that cannot be written
                    paths[key] = exc
                    continue
                self.documents[key] = (path, size)
                paths[key] = path
        return paths

    def _call(self, task: tuple) -> np.ndarray | Exception:
        """One worker's answer to ``task``; the page of a worker that dies or hangs becomes an error."""
        worker = self.idle.get()
        try:
            if not worker.process.is_alive():  # died between calls (killed from outside): not this page's fault
                worker = self._replace(worker)
            try:
                return worker.render(task)
            except TimeoutError:
                reason = f"rendering took longer than {_PAGE_TIMEOUT_S} s, so it was stopped"
            except (EOFError, OSError):
                worker.process.join(5)
                code = worker.process.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                reason = (f"the PDF crashed the renderer (the PDFium process died, {how}, on page {task[2]}): "
                          "the file is malformed or hostile")
            worker = self._replace(worker)
            return PdfError(reason)
        finally:
            self.idle.put(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop(0)
        for folder in self.folders:  # a buffer it made but never announced
            for left in Path(folder).glob(f"page-{worker.process.pid}-*"):
                left.unlink(missing_ok=True)
        return _Worker(self.target, self.folders)

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        workers = [self.idle.get() for _ in range(self.idle.qsize())]
        for worker in workers:  # all asked first, so that they end together
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in workers:
            worker.stop(5)
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        for lock in self.locks:
            os.close(lock)
        self.locks = []
        self.documents.clear()


class PdfRenderer:
    """Renders PDF pages at ``dpi`` (None: OCR_ASSETS_PDF_DPI) on ``workers`` processes (None: the
    CPUs this process may use; 1: in this process, with no start-up cost). The processes start on the
    first ``render`` and live until ``close``. Use as a context manager, or call ``close``."""

    _worker_main = staticmethod(_serve)  # what a render process runs

    def __init__(self, dpi: int | None = None, workers: int | None = None) -> None:
        self.dpi = config.pdf_dpi() if dpi is None else int(dpi)
        self.workers = config.usable_cores() if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"PdfRenderer needs at least 1 worker, got {workers}")
        if multiprocessing.current_process().daemon:  # a daemonic process may not start processes
            self.workers = 1
        self._open: dict[Hashable, _Document | Exception] = {}  # documents open in this process (1 worker)
        self._pool: _Pool | None = None
        self._closer: weakref.finalize | None = None

    def render(self, jobs: Sequence[tuple[Hashable, bytes | memoryview, int]]) -> list[np.ndarray | Exception]:
        """Render each job ``(document key, PDF bytes, 0-based page index)``; jobs with the same key are
        pages of the same document, whose bytes are read once. Returns, in job order, a C-contiguous BGR
        uint8 array (H, W, 3) of the size ``pdf_page_sizes`` gives, or the exception saying why that
        page cannot be rendered (PdfError, IndexError for a page out of range). Documents of earlier
        calls that are not in this one are released. Never raises for one page's or document's fault."""
        if not jobs:
            return []
        if self.workers > 1:
            if self._pool is None:
                self._pool = _Pool(self.workers, type(self)._worker_main)
                self._closer = weakref.finalize(self, self._pool.close)
            return self._pool.render(jobs, self.dpi)
        keys = {key for key, _, _ in jobs}
        for key in [key for key in self._open if key not in keys]:
            self._close_here(key)
        results: list[np.ndarray | Exception] = []
        for key, data, index in jobs:
            try:
                with _LOCK:
                    if key not in self._open:
                        try:
                            self._open[key] = _Document(data)
                        except PdfError as exc:
                            self._open[key] = exc
                    document = self._open[key]
                    if isinstance(document, Exception):
                        raise PdfError(str(document))
                    width, height = document.pixel_size(index, self.dpi)
                    page = np.empty((height, width, 3), np.uint8)
                    document.render_into(index, width, height, page.ctypes.data)
                results.append(page)
            except Exception as exc:  # noqa: BLE001  one page's fault never stops the others
                results.append(exc)
        return results

    def _close_here(self, key: Hashable) -> None:
        document = self._open.pop(key)
        if isinstance(document, _Document):
            with _LOCK:
                document.close()

    def close(self) -> None:
        """Stop the render processes and free every spooled or open document."""
        for key in list(self._open):
            self._close_here(key)
        if self._closer is not None:
            self._closer()
        self._pool = None

    def __enter__(self) -> PdfRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
