"""Small datasets in every layout the pipeline reads, written the way `datasets` and the hub write them.

Every page is a short paragraph of known words. PDFs are written by ``ocr_assets.sample.text_pdf``
(matplotlib's PDF backend: a real text layer, TrueType fonts); images and TIFF frames are those
PDF pages rendered, so a page looks the same in every layout. Each builder writes one dataset
folder and returns a ``Built``: the folder to set OCR_ASSETS_DATASET to, the id column, and per
shard key and source row the ground-truth text of each page (``None`` for a page that cannot be
read, with the words its error should contain in ``errors``).

Pages are small (4 x 3 inches: 400 x 300 px images, 600 x 450 px PDF pages at 150 dpi) so that
tests stay fast on two cores; the text (14 pt) is large enough for the CPU OCR to read.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import datasets
import pypdfium2
from datasets import Features, Image, List, Pdf, Value
from PIL import Image as PILImage

from ocr_assets import sample
from ocr_assets.sources import shard_key

WORDS = (
    "harbor lantern meadow copper violet summit orchard canyon bridge garden silver marble window "
    "river forest castle planet rocket anchor basket candle desert engine falcon glacier hammer "
    "island jacket kettle ladder magnet napkin ocean pepper quartz rabbit saddle tunnel velvet "
    "walnut yellow zipper button cotton dragon feather guitar helmet lemon mirror pencil rubber"
).split()
PAGE_INCHES = (4.0, 3.0)
IMAGE_DPI = 100
FONT_SIZE = 14
TOP, LINE_STEP = 0.82, 0.14  # baselines as shares of the page height: five lines of a paragraph


@dataclass
class Built:
    """A dataset written by a builder.

    ``path``: the dataset folder (OCR_ASSETS_DATASET). ``id_column``: the column (or WebDataset
    ``.json`` field) holding unique ids, None where the dataset has none. ``truth[key][row]``: the
    text of each page of that source row, lines joined by newlines; ``None`` for a page that
    cannot be read (a whole row that cannot be read is ``[None]``). ``errors[key][(row, page)]``:
    words the error of such a page contains. ``ids[key][row]``: the row's id where the dataset has
    ids (``id_column``; a WebDataset sample's key otherwise).
    """

    path: Path
    id_column: str | None = None
    truth: dict[str, list[list[str | None]]] = field(default_factory=dict)
    errors: dict[str, dict[tuple[int, int], str]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)


def page_lines(seed: int, lines: int = 5, words: int = 4) -> list[str]:
    """Lines of known words for page ``seed``: the same seed always gives the same lines."""
    return [" ".join(WORDS[(seed * 7 + line * 5 + k * 11) % len(WORDS)] for k in range(words))
            for line in range(lines)]


def text_pdf(pages: list[list[str]]) -> bytes:
    """A PDF of 4 x 3 inch pages, one per entry of ``pages``, each holding those lines as real text."""
    return sample.text_pdf(pages, page_inches=PAGE_INCHES, fontsize=FONT_SIZE, top=TOP, line_step=LINE_STEP)


def _rendered(pages: list[list[str]]) -> list[PILImage.Image]:
    """The pages of ``text_pdf(pages)`` rendered at IMAGE_DPI: raster pages drawn exactly as the PDFs are."""
    document = pypdfium2.PdfDocument(text_pdf(pages))
    try:
        return [document[k].render(scale=IMAGE_DPI / 72).to_pil().convert("RGB") for k in range(len(pages))]
    finally:
        document.close()


def text_png(lines: list[str]) -> bytes:
    """A 400 x 300 PNG of the lines."""
    out = io.BytesIO()
    _rendered([lines])[0].save(out, format="PNG")
    return out.getvalue()


def text_tiff(pages: list[list[str]]) -> bytes:
    """A multi-frame TIFF (deflate-compressed), one 400 x 300 frame per entry of ``pages``."""
    frames = _rendered(pages)
    out = io.BytesIO()
    frames[0].save(out, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    return out.getvalue()


def encrypted_pdf(lines: list[str], password: str = "secret") -> bytes:
    """A one-page PDF that opens only with ``password`` (AES-256; written with PyMuPDF, a test tool)."""
    import pymupdf

    with pymupdf.open("pdf", text_pdf([lines])) as doc:
        return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw=password + "-owner")


def zero_page_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def truncated_pdf(lines: list[str]) -> bytes:
    """The first third of a one-page PDF: no page tree, no cross-reference table."""
    data = text_pdf([lines])
    return data[: len(data) // 3]


def _documents(seed: int, pages_per_row: tuple[int, ...]) -> list[list[list[str]]]:
    """The lines of every page of every row: page ``k`` of row ``r`` holds ``page_lines(seed + 10 * r + k)``."""
    return [[page_lines(seed + 10 * row + page) for page in range(n)] for row, n in enumerate(pages_per_row)]


def _truth(docs: list[list[list[str]]]) -> list[list[str | None]]:
    return [["\n".join(lines) for lines in doc] for doc in docs]


def _image(lines: list[str]) -> dict:
    return {"bytes": text_png(lines), "path": None}


def _write(folder: Path, columns: dict[str, list], features: dict, layout: str, shards: int = 1) -> list[str]:
    """Write ``columns`` with ``datasets``, as ``save_to_disk`` does (``data-0000X-of-0000N.arrow``
    IPC streams, ``state.json``, ``dataset_info.json``) or as the hub stores it (``hub_parquet``:
    ``data/train-0000X-of-0000N.parquet``); returns the shard keys."""
    ds = datasets.Dataset.from_dict(columns, features=Features(features))
    if layout == "save_to_disk":
        ds.save_to_disk(str(folder), num_shards=shards)
        return [f"data-{index:05d}-of-{shards:05d}" for index in range(shards)]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    keys = []
    for index in range(shards):
        name = f"train-{index:05d}-of-{shards:05d}"
        ds.shard(shards, index, contiguous=True).to_parquet(str(folder / "data" / f"{name}.parquet"))
        keys.append(name)
    return keys


def _split(rows: list, shards: int) -> list[list]:
    """Rows per shard as ``Dataset.shard(contiguous=True)`` and ``save_to_disk(num_shards=)`` cut them."""
    size, extra = divmod(len(rows), shards)
    out, at = [], 0
    for index in range(shards):
        n = size + (1 if index < extra else 0)
        out.append(rows[at:at + n])
        at += n
    return out


def _built(folder: Path, id_column: str, keys: list[str], truth: list[list[str | None]], ids: list[str],
           errors: dict[tuple[int, int], str] | None = None) -> Built:
    """A ``Built`` of rows cut into ``keys`` as ``_split`` cuts them; ``errors`` by dataset-wide row."""
    built = Built(folder, id_column)
    first = 0
    for key, rows, row_ids in zip(keys, _split(truth, len(keys)), _split(ids, len(keys))):
        built.truth[key], built.ids[key] = rows, row_ids
        for (row, page), words in (errors or {}).items():
            if first <= row < first + len(rows):
                built.errors.setdefault(key, {})[(row - first, page)] = words
        first += len(rows)
    return built


def _pdf_rows(folder: Path, layout: str, seed: int, prefix: str, pages_per_row: tuple[int, ...],
              shards: int = 1, plain_bytes: bool = False) -> Built:
    """An ``id`` column and a ``pdf`` column of one PDF per row: a ``Pdf`` feature, or plain bytes."""
    docs = _documents(seed, pages_per_row)
    ids = [f"{prefix}-{row}" for row in range(len(docs))]
    pdfs = [text_pdf(doc) for doc in docs]
    column, feature = (pdfs, Value("binary")) if plain_bytes else ([{"bytes": p, "path": None} for p in pdfs], Pdf())
    keys = _write(folder, {"id": ids, "pdf": column}, {"id": Value("string"), "pdf": feature}, layout, shards)
    return _built(folder, "id", keys, _truth(docs), ids)


def _image_lists(folder: Path, layout: str, seed: int, pages_per_row: tuple[int, ...], null_element: bool,
                 empty_list: bool) -> Built:
    """An ``id`` column and a ``List(Image())`` column ``images``, in one shard; see ``hub_parquet_image_lists``."""
    docs = _documents(seed, pages_per_row)
    images: list[list[dict | None]] = [[_image(lines) for lines in doc] for doc in docs]
    truth = _truth(docs)
    errors = {}
    if null_element:
        images[-1][1] = truth[-1][1] = None
        errors[(len(docs) - 1, 1)] = "element 1 of the list"
    if empty_list:
        images.append([])
        truth.append([None])
        errors[(len(images) - 1, 0)] = "empty"
    ids = [f"list-{row}" for row in range(len(images))]
    keys = _write(folder, {"id": ids, "images": images}, {"id": Value("string"), "images": List(Image())}, layout)
    return _built(folder, "id", keys, truth, ids, errors)


def save_to_disk_images(folder: Path, rows: int = 4, shards: int = 2) -> Built:
    """``Dataset.save_to_disk`` of an ``Image`` column (PNG pages, one per row) and an ``id`` column."""
    docs = _documents(0, (1,) * rows)
    ids = [f"img-{row}" for row in range(rows)]
    keys = _write(folder, {"id": ids, "image": [_image(doc[0]) for doc in docs]},
                  {"id": Value("string"), "image": Image()}, "save_to_disk", shards)
    return _built(folder, "id", keys, _truth(docs), ids)


def save_to_disk_pdfs(folder: Path, pages_per_row: tuple[int, ...] = (1, 3, 2)) -> Built:
    """``Dataset.save_to_disk`` of a ``Pdf`` column (one PDF per row, ``pages_per_row`` pages each)
    and an ``id`` column, in one shard ``data-00000-of-00001``."""
    return _pdf_rows(folder, "save_to_disk", 800, "pdf", pages_per_row)


def save_to_disk_image_lists(folder: Path, pages_per_row: tuple[int, ...] = (2, 1)) -> Built:
    """``Dataset.save_to_disk`` of a ``List(Image())`` column ``images`` (several pages per row) and
    an ``id`` column, in one shard ``data-00000-of-00001``."""
    return _image_lists(folder, "save_to_disk", 1000, pages_per_row, null_element=False, empty_list=False)


def hub_parquet_pdfs(folder: Path, pages_per_row: tuple[int, ...] = (2, 1)) -> Built:
    """A ``Pdf`` column ``pdf`` (stored as a struct of ``bytes`` and ``path``) and an ``id`` column,
    as one hub Parquet shard ``data/train-00000-of-00001.parquet``."""
    return _pdf_rows(folder, "hub_parquet", 900, "hubpdf", pages_per_row)


def hub_parquet_pdf_bytes(folder: Path, pages_per_row: tuple[int, ...] = (2, 1, 1, 2), shards: int = 2) -> Built:
    """Docmatix's ``pdf`` config: a plain ``Value("binary")`` column ``pdf`` of PDF bytes (no Pdf
    feature) and an ``id`` column, as hub Parquet ``data/train-0000X-of-0000N.parquet``."""
    return _pdf_rows(folder, "hub_parquet", 100, "doc", pages_per_row, shards, plain_bytes=True)


def hub_parquet_image_bytes(folder: Path, rows: int = 3) -> Built:
    """A plain ``Value("binary")`` column ``png`` of PNG bytes beside a ``page_number`` int column,
    as one hub Parquet shard ``data/train-00000-of-00001.parquet``."""
    docs = _documents(200, (1,) * rows)
    keys = _write(folder, {"page_number": list(range(rows)), "png": [text_png(doc[0]) for doc in docs]},
                  {"page_number": Value("int64"), "png": Value("binary")}, "hub_parquet")
    return _built(folder, "page_number", keys, _truth(docs), [str(row) for row in range(rows)])


def hub_parquet_image_lists(folder: Path, pages_per_row: tuple[int, ...] = (2, 1, 3),
                            null_element: bool = False, empty_list: bool = False) -> Built:
    """Docmatix ``images`` / the_cauldron: a ``List(Image())`` column ``images`` (several pages per
    row) and an ``id`` column, one hub Parquet shard. ``null_element``: the last row's second
    element is null (that page fails alone); ``empty_list``: one more row with ``[]`` (a row error)."""
    return _image_lists(folder, "hub_parquet", 300, pages_per_row, null_element, empty_list)


def hub_parquet_pdf_lists(folder: Path, pages_per_pdf: tuple[tuple[int, ...], ...] = ((1, 2), (2,))) -> Built:
    """A ``List(Pdf())`` column ``pdfs`` (each row several PDFs; its pages are every page of each,
    in order) and an ``id`` column, one hub Parquet shard."""
    rows = [_documents(400 + 100 * row, pdfs) for row, pdfs in enumerate(pages_per_pdf)]
    ids = [f"pdfs-{row}" for row in range(len(rows))]
    pdfs = [[{"bytes": text_pdf(doc), "path": None} for doc in row] for row in rows]
    keys = _write(folder, {"id": ids, "pdfs": pdfs}, {"id": Value("string"), "pdfs": List(Pdf())}, "hub_parquet")
    return _built(folder, "id", keys, [[page for doc in _truth(row) for page in doc] for row in rows], ids)


def imagefolder_cache(folder: Path, rows: int = 3, missing: bool = False) -> Built:
    """The ``datasets`` cache of ``load_dataset("imagefolder")`` over PNG files with a
    ``metadata.jsonl`` (``id``): one nested ``imagefolder-train.arrow`` whose rows hold only the
    images' absolute paths (bytes null). The PNGs sit in ``folder / "images"``, outside the dataset
    folder ``folder / "cache"``. ``missing``: the last PNG is deleted after the cache is written."""
    images = folder / "images"
    images.mkdir(parents=True)
    docs = _documents(500, (1,) * rows)
    ids = [f"file-{row}" for row in range(rows)]
    with open(images / "metadata.jsonl", "w") as meta:
        for row, doc in enumerate(docs):
            (images / f"page{row}.png").write_bytes(text_png(doc[0]))
            meta.write(json.dumps({"file_name": f"page{row}.png", "id": ids[row]}) + "\n")
    cache = folder / "cache"
    with mock.patch.dict(os.environ, {"HF_DATASETS_OFFLINE": "1"}):  # built from local files: no hub look-up
        datasets.load_dataset("imagefolder", data_dir=str(images), cache_dir=str(cache))
    (arrow,) = cache.rglob("imagefolder-train.arrow")
    truth, errors = _truth(docs), {}
    if missing:
        (images / f"page{rows - 1}.png").unlink()
        truth[-1] = [None]
        errors[(rows - 1, 0)] = f"page{rows - 1}.png"
    return _built(cache, "id", [shard_key(str(arrow.relative_to(cache)))], truth, ids, errors)


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], compress: bool = False) -> None:
    """A WebDataset tar: each sample's members ``<key>.<ext>`` in order, as ``tarfile`` writes them."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    if compress:
        with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()


def webdataset_pdfs(folder: Path, pages_per_sample: tuple[int, ...] = (2, 1, 3), shards: int = 1,
                    bad_samples: bool = False, compress: bool = False) -> Built:
    """pixparse/pdfa-eng-wds: tar shards ``pdfa-eng-train-0000X.tar`` of samples ``<key>.pdf`` +
    ``<key>.json`` (``{"id": ..., "pages": n}``); the key is a nested path like the hub's
    (``docs/0000ab``). ``bad_samples`` adds to the first shard, after the good samples: a sample with
    only a ``.json`` member, a truncated PDF, a zero-page PDF and a password-protected PDF (each a
    row error). ``compress`` writes ``.tar.gz`` shards instead (refused when opened)."""
    folder.mkdir(parents=True, exist_ok=True)
    built = Built(folder, "id")
    docs = _documents(600, pages_per_sample)
    per_shard = _split(list(enumerate(docs)), shards)
    for index, shard_docs in enumerate(per_shard):
        key = f"pdfa-eng-train-{index:05d}"
        samples = [(f"docs/{s:06x}", {"pdf": text_pdf(doc), "json": json.dumps({"id": f"pdfa-{s}",
                                                                                  "pages": len(doc)}).encode()})
                   for s, doc in shard_docs]
        truth = _truth([doc for _, doc in shard_docs])
        if bad_samples and index == 0:
            lines = page_lines(699)
            bad = [("nocontent", {"json": json.dumps({"id": "bad-0"}).encode()}, "no image or PDF member"),
                   ("truncated", {"pdf": truncated_pdf(lines), "json": b'{"id": "bad-1"}'}, "truncated"),
                   ("nopages", {"pdf": zero_page_pdf(), "json": b'{"id": "bad-2"}'}, "no pages"),
                   ("locked", {"pdf": encrypted_pdf(lines), "json": b'{"id": "bad-3"}'}, "password")]
            for name, members, words in bad:
                built.errors.setdefault(key, {})[(len(samples), 0)] = words
                samples.append((f"docs/{name}", members))
                truth.append([None])
        _write_tar(folder / f"{key}.tar", samples, compress=compress)
        built.truth[key] = truth
        built.ids[key] = [json.loads(m["json"])["id"] for _, m in samples]
    return built


def webdataset_tiffs(folder: Path, frames_per_sample: tuple[int, ...] = (2, 1, 3)) -> Built:
    """pixparse/idl-wds: one tar shard ``idl-train-00000.tar`` of samples ``<key>.tif`` (a
    multi-frame TIFF: one page per frame) + ``<key>.json`` (``{"id": ...}``)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = _documents(700, frames_per_sample)
    ids = [f"idl-{s}" for s in range(len(docs))]
    samples = [(f"{s:08x}", {"tif": text_tiff(doc), "json": json.dumps({"id": ids[s]}).encode()})
               for s, doc in enumerate(docs)]
    _write_tar(folder / "idl-train-00000.tar", samples)
    return _built(folder, "id", ["idl-train-00000"], _truth(docs), ids)
