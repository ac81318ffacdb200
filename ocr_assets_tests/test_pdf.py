"""PDF rendering: page sizes from the page boxes agree with the rendered pixels, text is where the
PDF draws it, a pool of render processes gives the same pixels as one process, broken PDFs give
their reason, a long PDF is rendered in batches without growing, and a crashed worker costs only
its own pages. PDFs are built here: matplotlib's PDF backend for text, pypdfium2 for page boxes."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pypdfium2
import pytest

from ocr_assets import config
from ocr_assets.sources import pdf
from ocr_assets.sources.pdf import PdfError, PdfRenderer, pdf_page_sizes

DPI = 72  # 612 x 792 px for a Letter page: quick, and text is still readable as ink


def text_pdf(lines: list[str]) -> bytes:
    """A Letter PDF with one page per line: the line in large black text across the top fifth,
    and a pure red square in the lower left quarter (to check the channel order)."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    buf = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        with PdfPages(buf) as pages:
            for line in lines:
                figure = Figure(figsize=(8.5, 11))
                figure.text(0.08, 0.88, line, fontsize=36)
                figure.patches.append(Rectangle((0.1, 0.1), 0.2, 0.15, transform=figure.transFigure,
                                                facecolor=(1, 0, 0), edgecolor="none", figure=figure))
                pages.savefig(figure)
    return buf.getvalue()


def boxes_pdf(boxes: list[tuple[float, float, int]]) -> bytes:
    """Blank pages of the given (width pt, height pt, /Rotate degrees)."""
    document = pypdfium2.PdfDocument.new()
    for width, height, rotation in boxes:
        document.new_page(width, height).set_rotation(rotation)
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def rotated(data: bytes, rotation: int) -> bytes:
    document = pypdfium2.PdfDocument(data)
    for page in document:
        page.set_rotation(rotation)
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool():
    with PdfRenderer(dpi=DPI, workers=2) as renderer:
        yield renderer


@pytest.fixture(scope="module")
def letters() -> bytes:
    return text_pdf(["Alpha beta gamma", "Delta epsilon", "Zeta eta theta"])


def spool_files(renderer: PdfRenderer) -> list[str]:
    return sorted(f for folder in renderer._pool.folders for f in os.listdir(folder) if f != "lock")


def test_sizes_of_boxes_and_rotations_agree_with_the_rendered_pages():
    boxes = [(612, 792, 0), (612, 792, 90), (300, 500, 180), (300.5, 500.25, 270),
             (2384, 3370, 0), (10000, 200, 90)]  # an A0 poster and a long banner, both capped
    data = boxes_pdf(boxes)
    expected = [(1275, 1650), (1650, 1275), (625, 1042), (1043, 627), (3538, 5000), (100, 5000)]
    assert config.PDF_MAX_SIDE == 5000
    assert pdf_page_sizes(data, 150) == expected
    jobs = [("boxes", data, i) for i in range(len(boxes))]
    for renderer in (PdfRenderer(dpi=150, workers=1), PdfRenderer(dpi=150, workers=2)):
        with renderer:
            pages = renderer.render(jobs)
        assert [(p.shape[1], p.shape[0]) for p in pages] == expected
        for page in pages:
            assert page.dtype == np.uint8 and page.shape[2] == 3 and page.flags.c_contiguous
            assert page.min() == 255  # blank pages: the background is white
    # the size at another dpi, and the rendered size there
    assert pdf_page_sizes(data, 72)[:4] == [(612, 792), (792, 612), (300, 500), (501, 301)]


def test_text_is_dark_where_the_pdf_draws_it_in_bgr(pool, letters):
    pages = pool.render([("letters", letters, i) for i in range(3)])
    for page in pages:
        assert page.shape == (792, 612, 3)
        top, bottom = page[: 792 // 5], page[792 // 2:]
        assert (top.max(axis=2) < 100).sum() > 500  # the line of text, black
        assert np.array_equal(page[5, 5], [255, 255, 255])  # white paper
        # the red square at x 10-30 %, y 75-90 % from the top: red in BGR order
        assert np.array_equal(page[int(792 * 0.82), int(612 * 0.2)], [0, 0, 255])
        assert (bottom.max(axis=2) < 100).sum() == 0  # nothing black below the text
    assert not np.array_equal(pages[0], pages[1])  # each page its own text


def test_rotate_turns_the_rendered_page(letters):
    turned = rotated(letters, 90)
    assert pdf_page_sizes(turned, DPI) == [(792, 612)] * 3
    with PdfRenderer(dpi=DPI, workers=1) as renderer:
        upright, sideways = renderer.render([("a", letters, 0), ("b", turned, 0)])
    assert sideways.shape == (612, 792, 3)
    # /Rotate 90 is a quarter turn clockwise (the same ink; anti-aliasing differs at a few edges)
    for turn, close in ((-1, True), (1, False)):
        differ = np.abs(np.rot90(upright, k=turn).astype(int) - sideways).max(axis=2) > 64
        assert bool(differ.mean() < 0.01) == close


def test_one_process_and_a_pool_give_the_same_pixels(pool, letters):
    jobs = [("letters", letters, i) for i in (2, 0, 1, 0)]
    with PdfRenderer(dpi=DPI, workers=1) as single:
        alone = single.render(jobs)
    together = pool.render(jobs)
    assert len(alone) == len(together) == 4
    for a, b in zip(alone, together):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        assert np.array_equal(a, b)
    assert np.array_equal(alone[1], alone[3])
    together[0][:] = 0  # pages are writable arrays of their own
    assert together[2].min() < 255 and together[2].max() == 255


def encrypted_pdf(data: bytes, user_password: str) -> bytes:
    pymupdf = pytest.importorskip("pymupdf")
    document = pymupdf.open("pdf", data)
    return document.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=user_password, owner_pw="owner")


@pytest.mark.parametrize("workers", [1, 2])
def test_broken_pdfs_give_their_reason_and_the_others_render(workers, letters):
    broken = {
        "garbage": (b"this is not a PDF at all\n" * 20, "not a PDF"),
        "empty": (b"", "empty"),
        "truncated": (letters[: len(letters) // 2], "truncated or broken"),
        "no pages": (boxes_pdf([]), "has no pages"),
    }
    for name, (data, reason) in broken.items():
        with pytest.raises(PdfError, match=reason):
            pdf_page_sizes(data, DPI)
    jobs = [("letters", letters, 0)] + [(name, data, 0) for name, (data, _) in broken.items()]
    jobs += [("letters", letters, 3), ("letters", letters, -1), ("letters", letters, 2)]
    with PdfRenderer(dpi=DPI, workers=workers) as renderer:
        results = renderer.render(jobs)
    assert isinstance(results[0], np.ndarray) and isinstance(results[-1], np.ndarray)
    for result, (_, reason) in zip(results[1:5], broken.values()):
        assert isinstance(result, PdfError) and reason in str(result)
    assert isinstance(results[5], IndexError) and "3-page PDF" in str(results[5])
    assert isinstance(results[6], IndexError)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_encrypted_pdf_says_it_needs_its_password(workers, letters):
    locked = encrypted_pdf(letters, user_password="secret")
    restricted = encrypted_pdf(letters, user_password="")  # an owner password only: anyone may open it
    with pytest.raises(PdfError, match="password-protected"):
        pdf_page_sizes(locked, DPI)
    assert pdf_page_sizes(restricted, DPI) == pdf_page_sizes(letters, DPI)
    with PdfRenderer(dpi=DPI, workers=workers) as renderer:
        result, fine, opened = renderer.render([("locked", locked, 0), ("letters", letters, 1),
                                                ("restricted", restricted, 1)])
    assert isinstance(result, PdfError) and "password-protected (encrypted)" in str(result)
    assert isinstance(fine, np.ndarray) and np.array_equal(fine, opened)


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_300_page_pdf_in_batches_frees_each_batch(workers, letters):
    source = pypdfium2.PdfDocument(letters)
    long_document = pypdfium2.PdfDocument.new()
    long_document.import_pages(source, [0, 1, 2] * 100)
    buf = io.BytesIO()
    long_document.save(buf)
    data = buf.getvalue()
    sizes = pdf_page_sizes(data, 36)
    assert len(sizes) == 300 and set(sizes) == {(306, 396)}
    with PdfRenderer(dpi=36, workers=1) as single:
        reference = single.render([("ref", letters, k) for k in range(3)])
    memory = []
    with PdfRenderer(dpi=36, workers=workers) as renderer:
        for start in range(0, 300, 20):
            pages = renderer.render([("long", data, i) for i in range(start, start + 20)] +
                                    [("other", letters, start % 3)])
            for i, page in zip(range(start, start + 20), pages):
                assert np.array_equal(page, reference[i % 3]), i
            if workers > 1:  # the two documents spooled once; no page left behind
                assert len(spool_files(renderer)) == 2
                memory.append(rss_mb() + sum(rss_mb(w.process.pid) for w in list(renderer._pool.idle.queue)))
            else:
                memory.append(rss_mb())
            del pages
        last = renderer.render([("other", letters, 0)])  # the long document is released
        if workers > 1:
            assert len(spool_files(renderer)) == 1
        else:
            assert list(renderer._open) == ["other"]
        del last
    assert max(memory[3:]) - memory[2] < 40, memory  # flat: a batch's pages are freed


def _serve_with_a_fault(conn, folders):
    """A render process whose PDFium 'crashes' (SIGSEGV) on page 3 of any 7-page document."""
    render_into = pdf._Document.render_into

    def faulty(document, index, width, height, address):
        if document.pages == 7 and index == 3:
            os.kill(os.getpid(), signal.SIGSEGV)
        return render_into(document, index, width, height, address)

    pdf._Document.render_into = faulty
    pdf._serve(conn, folders)


class FaultyRenderer(PdfRenderer):
    _worker_main = staticmethod(_serve_with_a_fault)


def test_a_crashing_worker_costs_only_its_pages_and_is_replaced(letters):
    hostile = text_pdf([f"page {k}" for k in range(7)])
    with FaultyRenderer(dpi=DPI, workers=2) as renderer:
        jobs = [("letters", letters, 0)] + [("hostile", hostile, k) for k in range(7)] + [("letters", letters, 2)]
        results = renderer.render(jobs)
        crashed = [k for k, result in enumerate(results[1:8]) if not isinstance(result, np.ndarray)]
        assert crashed == [3]
        assert "crashed the renderer" in str(results[4]) and "signal 11" in str(results[4])
        assert isinstance(results[0], np.ndarray) and isinstance(results[8], np.ndarray)
        assert not [f for f in spool_files(renderer) if f.startswith("page-")]
        # a worker killed while idle is replaced without failing anyone's pages
        victim = renderer._pool.idle.queue[0].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        again = renderer.render([("letters", letters, k) for k in range(3)] * 2)
        assert all(isinstance(page, np.ndarray) for page in again)
        folders = renderer._pool.folders
    assert not any(os.path.exists(folder) for folder in folders)  # close() removes the spool


def test_default_workers_and_dpi(monkeypatch):
    monkeypatch.setenv(config.ENV_PDF_DPI, "100")
    renderer = PdfRenderer()
    assert renderer.dpi == 100 and renderer.workers == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        PdfRenderer(workers=0)
    assert renderer.render([]) == []
    renderer.close()


def test_spool_folders_of_dead_renderers_are_removed_and_live_ones_kept(letters):
    base = Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("no /dev/shm")
    dead, live = base / f"{pdf._SPOOL_PREFIX}1-dead", base / f"{pdf._SPOOL_PREFIX}2-live"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "doc-0.pdf").write_bytes(letters)
        (folder / "lock").touch()
    with open(live / "lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a renderer in another process (or container) holds it
        try:
            with PdfRenderer(dpi=DPI, workers=2) as renderer:
                assert isinstance(renderer.render([("letters", letters, 0)])[0], np.ndarray)
            assert not dead.exists() and live.exists()
        finally:
            shutil.rmtree(live)
            shutil.rmtree(dead, ignore_errors=True)
