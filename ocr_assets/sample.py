"""A deterministic sample dataset of synthetic document pages, with ground-truth text.

Each page is a US-letter page at 150 dpi: running header and footer, a title or section
heading, two columns of pseudo-English paragraphs with headings, a ruled table, a displayed
formula and a chart with its caption. The ground truth holds the words a reader extracts
from the page body, in reading order; the header, footer, formula and chart are left out,
as the pipeline drops or does not compare them. Besides these clean pages, ``write_sample`` can
add multi-page documents and scanned-looking pages (``scanner.scan_page``), some turned sideways or
upside down, each with the upright page's text as its ground truth.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import uuid
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ocr_assets.scanner import scan_page, stored_as

PAGE_WIDTH, PAGE_HEIGHT = 1275, 1650  # US letter at 150 dpi
MARGIN = 100
GUTTER = 60
COLUMN_WIDTH = (PAGE_WIDTH - 2 * MARGIN - GUTTER) // 2
BODY_TOP = 130
BODY_BOTTOM = PAGE_HEIGHT - 115
INK = (20, 20, 20)
HEADER_TEXT = "Journal of Synthetic Documents — page {n}"
FOOTER_TEXT = "Synthetic Documents Press"
JPEG_QUALITY = 90
# written beside the save_to_disk shards by ``write_sample(documents=True)``
MULTIPAGE_SHARDS = ("documents-pdf.parquet", "documents-multipage.parquet")
# written beside them by ``write_sample(scans=True)``: scanned-looking pages, upright and turned
SCANS_SHARD = "scans.parquet"
# each scanned page's clockwise quarter turn back to upright (the LAYOUT ``rotation`` convention)
SCAN_ROTATIONS = (0, 0, 90, 180, 270, 180)
SCAN_START = 2000  # page indices apart from the other shards' pages

# Common English words, none of them in the running header or footer.
VOCABULARY = """
about above across action active actual after again against agree ahead allow almost along already always amount
analysis animal another answer appear apply area argue around arrive article aspect assume attempt attention
author average avoid balance basic became become before begin behind believe below benefit better between beyond
black board body border bright bring broad brother build business call camera capital careful carry cause center
central certain chance change chapter choice choose church city claim class clear climate close coast cold
college color common company compare complete concern condition consider contain control correct could country
course cover create current daily danger debate decade decide deep degree demand depend describe design detail
develop differ direct discover distance divide doctor dream driver during early earth east easy economy effect
effort eight either energy enough entire equal escape even evening event every exact example expect explain
factor family famous farmer father favor feature field figure final finger first floor follow force forest
formal forward free friend front future garden general glass global golden good great green ground group growth
guess habit half happen happy harbor heavy height help history hold home hope horse hotel house human idea image
impact improve include income increase indeed inside instead island issue itself join journey judge kitchen
knowledge labor large later laugh layer leader learn least leave legal lesson letter level light limit listen
little local long machine major manager market master matter measure medium member memory method middle might
minute model modern moment money month morning mother motion mountain move music narrow nation natural nature
near nearly network never night normal north notice number object ocean offer office often open order other
outside owner paper parent part party pattern peace people period person picture piece place plan plant player
point police policy popular position power prepare present pressure pretty price private problem process produce
product program project proper public purpose quality quarter question quick quiet radio range rather reach
ready reason record region remain report require research result return river road round rule safety sample
scale school science season second section security select sense series serve service several shape share short
should simple single sister small social society soldier south space speak special spring square stage standard
station stone story street strong student study subject summer support surface system table teacher theory thing
third thousand through title today together toward trade travel tree trial under unit until upon usual valley
value various village visit voice water wealth weather week weight west whole window winter within without woman
wonder worker world writer yellow young
""".split()

TABLE_HEADERS = ["Method", "Score", "Time", "Size", "Count", "Rate", "Group", "Level", "Cost",
                 "Error", "Total", "Mean", "Width", "Depth", "Speed", "Share"]

FORMULAS = [
    r"$E = mc^2$",
    r"$\int_0^1 x^2\,dx = \frac{1}{3}$",
    r"$a^2 + b^2 = c^2$",
    r"$\sum_{k=1}^{n} k = \frac{n(n+1)}{2}$",
    r"$f(x) = \frac{1}{\sqrt{2\pi}}\, e^{-x^2/2}$",
    r"$\nabla \cdot \mathbf{E} = \frac{\rho}{\varepsilon_0}$",
    r"$\lim_{n \to \infty} \left(1 + \frac{1}{n}\right)^n = e$",
    r"$y = \alpha + \beta x + \epsilon$",
]

# Font files bundled with matplotlib: (regular, bold, italic) per family.
FAMILIES = [
    ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf"),
    ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"),
    ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf"),
]
CHART_COLORS = [(55, 100, 170), (215, 120, 40), (70, 150, 80), (180, 60, 60), (120, 90, 160)]


@lru_cache(maxsize=None)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A matplotlib-bundled TrueType font, loaded once per (file, size)."""
    import matplotlib

    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    return ImageFont.truetype(os.path.join(folder, name), size)


@lru_cache(maxsize=None)
def _formula_image(tex: str, points: int) -> Image.Image:
    """A mathtext formula rendered by matplotlib's Agg canvas (no pyplot), black on white."""
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties

    buf = io.BytesIO()
    mathtext.math_to_image(tex, buf, prop=FontProperties(size=points), dpi=150, format="png")
    buf.seek(0)
    with Image.open(buf) as img:
        rgba = img.convert("RGBA")
    page = Image.new("RGB", rgba.size, "white")
    page.paste(rgba, mask=rgba.getchannel("A"))
    return page


def _sentence(rng: random.Random, lo: int = 6, hi: int = 14, period: bool = True) -> str:
    """Pseudo-English sentence: vocabulary words, a capital, maybe a comma, a period."""
    picked = [rng.choice(VOCABULARY) for _ in range(rng.randint(lo, hi))]
    picked[0] = picked[0].capitalize()
    if len(picked) > 6 and rng.random() < 0.35:
        picked[rng.randint(2, len(picked) - 3)] += ","
    return " ".join(picked) + ("." if period else "")


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of text to lines no wider than width pixels."""
    space = font.getlength(" ")
    lines: list[str] = []
    line: list[str] = []
    used = 0.0
    for word in text.split():
        w = font.getlength(word)
        if line and used + space + w > width:
            lines.append(" ".join(line))
            line, used = [], 0.0
        used += (space if line else 0.0) + w
        line.append(word)
    if line:
        lines.append(" ".join(line))
    return lines


class _Flow:
    """Places blocks top to bottom in the left column, then the right; remembers the text placed."""

    def __init__(self, top: int, bottom: int):
        self.columns = [MARGIN, MARGIN + COLUMN_WIDTH + GUTTER]
        self.top, self.bottom = top, bottom
        self.col, self.y = 0, top
        self.done = False

    def take(self, height: int, keep: int = 0) -> tuple[int, int] | None:
        """Top-left corner for a block of `height` px (plus `keep` px that must follow it), or None when full."""
        if self.done:
            return None
        if self.y + height + keep > self.bottom and self.y > self.top:
            self.col += 1
            self.y = self.top
        if self.col >= len(self.columns) or self.y + height + keep > self.bottom:
            self.done = True
            return None
        x, y = self.columns[self.col], self.y
        self.y += height
        return x, y

    def gap(self, px: int) -> None:
        """Vertical space after a block; dropped at the top of a column."""
        if self.y > self.top:
            self.y += px


def _draw_lines(draw: ImageDraw.ImageDraw, flow: _Flow, lines: list[str], font, line_h: int,
                out: list[str]) -> None:
    """Draw wrapped lines into the flow, one at a time, and record the ones that fit."""
    for line in lines:
        spot = flow.take(line_h)
        if spot is None:
            return
        draw.text(spot, line, font=font, fill=INK)
        out.append(line)


def _table(rng: random.Random, font, bold) -> tuple[list[list[str]], list[int]]:
    """Cells (header row first) and column widths of a small table that fits in one column."""
    ncols = rng.choice([3, 4])
    nrows = rng.randint(3, 5)
    headers = rng.sample(TABLE_HEADERS, ncols)
    rows = [headers]
    for _ in range(nrows):
        row = [rng.choice(VOCABULARY).capitalize()]
        for _ in range(ncols - 1):
            kind = rng.random()
            row.append(str(rng.randint(2, 999)) if kind < 0.4 else
                       f"{rng.randint(0, 99)}.{rng.randint(1, 9)}" if kind < 0.8 else
                       f"0.{rng.randint(10, 99)}")
        rows.append(row)
    pad = 16
    widths = [int(max(max(font.getlength(r[c]) for r in rows[1:]), bold.getlength(rows[0][c]))) + 2 * pad
              for c in range(ncols)]
    while sum(widths) > COLUMN_WIDTH:  # too wide for the column: drop the last column
        widths.pop()
        rows = [r[:-1] for r in rows]
    return rows, widths


def _draw_table(draw, x: int, y: int, rows, widths, row_h: int, font, bold) -> None:
    """A ruled grid with a bold header row, centered in the column."""
    x0 = x + (COLUMN_WIDTH - sum(widths)) // 2
    edges = [x0]
    for w in widths:
        edges.append(edges[-1] + w)
    height = row_h * len(rows)
    for i, row in enumerate(rows):
        for c, cell in enumerate(row):
            draw.text((edges[c] + 16, y + i * row_h + row_h // 2), cell, font=bold if i == 0 else font,
                      fill=INK, anchor="lm")
    for i in range(len(rows) + 1):
        draw.line([(edges[0], y + i * row_h), (edges[-1], y + i * row_h)], fill=INK, width=3 if i in (0, 1) else 2)
    for e in edges:
        draw.line([(e, y), (e, y + height)], fill=INK, width=2)


def _draw_chart(draw, rng: random.Random, x: int, y: int, w: int, h: int) -> None:
    """A bar or line chart with axes, ticks and grid lines, and no text at all."""
    left, bottom, right, top = x + 30, y + h - 20, x + w - 10, y + 10
    for k in range(1, 5):
        gy = bottom - k * (bottom - top) // 5
        draw.line([(left, gy), (right, gy)], fill=(215, 215, 215), width=1)
        draw.line([(left - 8, gy), (left, gy)], fill=INK, width=2)
    n = rng.randint(5, 9)
    step = (right - left) / n
    values = [rng.uniform(0.15, 0.95) for _ in range(n)]
    if rng.random() < 0.5:
        color = rng.choice(CHART_COLORS)
        for i, v in enumerate(values):
            bx = left + i * step
            draw.rectangle([bx + step * 0.18, bottom - v * (bottom - top), bx + step * 0.82, bottom], fill=color)
    else:
        for series in range(rng.randint(1, 2)):
            vals = values if series == 0 else [min(0.97, max(0.05, v + rng.uniform(-0.3, 0.3))) for v in values]
            pts = [(left + (i + 0.5) * step, bottom - v * (bottom - top)) for i, v in enumerate(vals)]
            color = CHART_COLORS[(series * 2 + len(vals)) % len(CHART_COLORS)]
            draw.line(pts, fill=color, width=4)
            for px, py in pts:
                draw.ellipse([px - 6, py - 6, px + 6, py + 6], fill=color)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=3)
    for i in range(n + 1):
        tx = int(left + i * step)
        draw.line([(tx, bottom), (tx, bottom + 8)], fill=INK, width=2)


def render_page(index: int, seed: int = 0) -> tuple[Image.Image, str]:
    """Render page `index` of the sample: an RGB 1275×1650 page and its ground-truth text.

    The same (index, seed) always gives the same pixels and text. The ground truth lists the
    title, headings, paragraphs, table captions and cells, and figure captions in reading order
    (left column, right column, then a full-width figure); the running header and footer, the
    formula and the chart are not in it.
    """
    rng = random.Random(f"ocr_assets.sample:{seed}:{index}")
    regular, bold, italic = rng.choice(FAMILIES)
    stix = regular.startswith("STIX")
    body = _font(regular, rng.randint(23, 25) if stix else rng.randint(21, 23))
    body_h = int(body.size * 1.6)
    heading = _font(bold, rng.randint(27, 29) if stix else rng.randint(26, 28))
    caption = _font(italic, 22 if stix else 20)
    caption_h = int(caption.size * 1.55)
    cell, cell_bold = _font("DejaVuSans.ttf", 20), _font("DejaVuSans-Bold.ttf", 20)

    page = Image.new("RGB", (PAGE_WIDTH, PAGE_HEIGHT), "white")
    draw = ImageDraw.Draw(page)
    small = _font("DejaVuSans.ttf", 18)
    number = index + 1
    draw.text((MARGIN, 52), HEADER_TEXT.format(n=number), font=small, fill=(90, 90, 90))
    draw.line([(MARGIN, 84), (PAGE_WIDTH - MARGIN, 84)], fill=(150, 150, 150), width=1)
    draw.text((MARGIN, PAGE_HEIGHT - 75), FOOTER_TEXT, font=small, fill=(90, 90, 90))
    draw.text((PAGE_WIDTH - MARGIN, PAGE_HEIGHT - 75), str(number), font=small, fill=(90, 90, 90), anchor="ra")

    truth: list[str] = []
    top = BODY_TOP
    if index % 4 == 0:  # first page of an article: a full-width title
        title_font = _font(bold, rng.randint(38, 42))
        title = " ".join(w.capitalize() for w in _sentence(rng, 4, 8, period=False).split())
        for line in _wrap(title, title_font, PAGE_WIDTH - 2 * MARGIN):
            draw.text((PAGE_WIDTH // 2, top), line, font=title_font, fill=INK, anchor="ma")
            top += int(title_font.size * 1.4)
        truth.append(title)
        top += 30

    figure_no = table_no = rng.randint(1, 9)
    bottom = BODY_BOTTOM
    wide_figure = index % 4 != 0 and rng.random() < 0.3
    if wide_figure:  # a full-width chart at the foot of the page, below both columns
        wide_caption = f"Figure {figure_no}: " + _sentence(rng, 8, 18)
        wide_lines = _wrap(wide_caption, caption, PAGE_WIDTH - 2 * MARGIN)
        chart_h = 300
        bottom -= chart_h + 16 + caption_h * len(wide_lines) + 30
        _draw_chart(draw, rng, MARGIN + 150, bottom + 30, PAGE_WIDTH - 2 * MARGIN - 300, chart_h)
        for i, line in enumerate(wide_lines):
            draw.text((MARGIN, bottom + 30 + chart_h + 16 + i * caption_h), line, font=caption, fill=INK)

    extras = [kind for kind in ("table", "formula", "figure")
              if rng.random() < 0.88 and not (kind == "figure" and wide_figure)]
    rng.shuffle(extras)
    plan = ["para", "para"]
    for kind in extras:
        plan += [kind, "para"] + (["heading", "para"] if rng.random() < 0.5 else [])
    if index % 4 != 0:
        plan.insert(0, "heading")

    flow = _Flow(top, bottom)
    section = 1 + index % 4
    subsection = 0
    while not flow.done:
        kind = plan.pop(0) if plan else ("heading" if rng.random() < 0.2 else "para")
        if kind == "para":
            text = " ".join(_sentence(rng) for _ in range(rng.randint(3, 5)))
            _draw_lines(draw, flow, _wrap(text, body, COLUMN_WIDTH), body, body_h, truth)
            flow.gap(14)
        elif kind == "heading":
            subsection += 1
            text = f"{section}.{subsection} " + _sentence(rng, 2, 4, period=False)
            lines = _wrap(text, heading, COLUMN_WIDTH)
            head_h = int(heading.size * 1.35)
            flow.gap(12)
            spot = flow.take(head_h * len(lines) + 10, keep=2 * body_h)
            if spot is not None:
                for i, line in enumerate(lines):
                    draw.text((spot[0], spot[1] + i * head_h), line, font=heading, fill=INK)
                truth.append(text)
        elif kind == "table":
            rows, widths = _table(rng, cell, cell_bold)
            label = f"Table {table_no}: " + _sentence(rng, 4, 9)
            label_lines = _wrap(label, caption, COLUMN_WIDTH)
            row_h = 46
            spot = flow.take(caption_h * len(label_lines) + 10 + row_h * len(rows) + 4)
            if spot is not None:
                for i, line in enumerate(label_lines):
                    draw.text((spot[0], spot[1] + i * caption_h), line, font=caption, fill=INK)
                _draw_table(draw, spot[0], spot[1] + caption_h * len(label_lines) + 10, rows, widths, row_h,
                            cell, cell_bold)
                truth.append(label)
                truth.extend(" ".join(row) for row in rows)
            flow.gap(20)
        elif kind == "formula":
            img = _formula_image(rng.choice(FORMULAS), rng.choice([15, 16, 17]))
            if img.width > COLUMN_WIDTH:
                img = img.resize((COLUMN_WIDTH, round(img.height * COLUMN_WIDTH / img.width)), Image.LANCZOS)
            flow.gap(8)
            spot = flow.take(img.height + 24)
            if spot is not None:
                page.paste(img, (spot[0] + (COLUMN_WIDTH - img.width) // 2, spot[1] + 12))
            flow.gap(16)
        elif kind == "figure":
            text = f"Figure {figure_no}: " + _sentence(rng, 5, 12)
            lines = _wrap(text, caption, COLUMN_WIDTH)
            chart_h = rng.randint(220, 280)
            spot = flow.take(chart_h + 14 + caption_h * len(lines))
            if spot is not None:
                _draw_chart(draw, rng, spot[0], spot[1], COLUMN_WIDTH, chart_h)
                for i, line in enumerate(lines):
                    draw.text((spot[0], spot[1] + chart_h + 14 + i * caption_h), line, font=caption, fill=INK)
                truth.append(text)
            flow.gap(20)
    if wide_figure:
        truth.append(wide_caption)
    return page, "\n".join(truth)


def encode_page(page: Image.Image, index: int) -> bytes:
    """PNG bytes for even pages and JPEG (quality 90) for odd pages, so both formats are exercised."""
    buf = io.BytesIO()
    if index % 2 == 0:
        page.save(buf, format="PNG", compress_level=6)
    else:
        page.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def text_pdf(pages: list[list[str]], page_inches: tuple[float, float] = (8.5, 11), fontsize: float = 11,
             top: float = 0.92, line_step: float = 0.028) -> bytes:
    """A PDF with a real text layer: each page's lines set in DejaVu Sans by matplotlib's PDF
    backend (TrueType fonts embedded, so the text can be extracted). Pages are ``page_inches``
    (US letter unless given); line k's baseline sits at ``top - line_step * k`` of the page
    height, 10% in from the left edge. The same arguments give the same bytes."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    buf = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42, "font.family": "DejaVu Sans"}):
        with PdfPages(buf, metadata={"CreationDate": None, "Creator": None, "Producer": None}) as pdf:
            for lines in pages:
                figure = Figure(figsize=page_inches)
                for k, line in enumerate(lines):
                    figure.text(0.1, top - line_step * k, line, fontsize=fontsize)
                pdf.savefig(figure)
    return buf.getvalue()


def _pdf_page_lines(rng: random.Random, title: str) -> list[str]:
    """A title and a few short paragraphs, wrapped to about 80 characters a line."""
    lines = [title, ""]
    for _ in range(3):
        words = " ".join(_sentence(rng) for _ in range(3)).split()
        line: list[str] = []
        for word in words:
            if line and len(" ".join(line)) + 1 + len(word) > 80:
                lines.append(" ".join(line))
                line = []
            line.append(word)
        lines += [" ".join(line), ""]
    return lines[:-1]


def _write_documents(dest: Path, seed: int) -> None:
    """The two documents shards: ``documents-pdf.parquet`` (a datasets ``Pdf`` column: a two-page
    and a one-page PDF with a text layer) and ``documents-multipage.parquet`` (a ``List(Image)``
    column: two pages, then one), each with ``id`` and ``ground_truth`` (pages joined by a blank line)."""
    import datasets

    rng = random.Random(f"ocr_assets.sample.pdf:{seed}")
    pdfs, pdf_truths = [], []
    for doc, n_pages in enumerate((2, 1)):
        pages = [_pdf_page_lines(rng, f"Document {doc + 1}, page {p + 1}") for p in range(n_pages)]
        pdfs.append({"bytes": text_pdf(pages), "path": None})
        pdf_truths.append("\n\n".join("\n".join(line for line in page if line) for page in pages))
    pdf_features = datasets.Features({"id": datasets.Value("string"), "pdf": datasets.Pdf(),
                                      "ground_truth": datasets.Value("string")})
    datasets.Dataset.from_dict({"id": ["pdf-0000", "pdf-0001"], "pdf": pdfs, "ground_truth": pdf_truths},
                               features=pdf_features).to_parquet(str(dest / MULTIPAGE_SHARDS[0]))
    images, truths, start = [], [], 1000  # page indices apart from the image shards' pages
    for n_pages in (2, 1):
        rendered = [render_page(start + k, seed) for k in range(n_pages)]
        images.append([{"bytes": encode_page(page, start + k), "path": None} for k, (page, _) in enumerate(rendered)])
        truths.append("\n\n".join(truth for _, truth in rendered))
        start += n_pages
    list_features = datasets.Features({"id": datasets.Value("string"), "pages": datasets.List(datasets.Image()),
                                       "ground_truth": datasets.Value("string")})
    datasets.Dataset.from_dict({"id": ["multipage-0000", "multipage-0001"], "pages": images, "ground_truth": truths},
                               features=list_features).to_parquet(str(dest / MULTIPAGE_SHARDS[1]))


def write_scans(path: str | Path, rotations: tuple[int, ...] = SCAN_ROTATIONS, seed: int = 0,
                start: int = SCAN_START) -> Path:
    """Write a Parquet shard of scanned-looking pages to ``path`` and return it.

    Page k is sample page ``start + k`` turned by ``rotations[k]`` (``scanner.stored_as``: the
    clockwise quarter turn that makes it upright again) and then scanned (``scanner.scan_page``:
    tinted paper, 1-2 degree skew, blur, speckle, sometimes a dark border strip, JPEG quality 60).
    Columns: ``id`` ("scan-0000", ...), ``image`` (an ``Image()`` feature), ``ground_truth`` (the
    upright page's text) and ``rotation`` (int16, the turn back to upright). Same arguments,
    same bytes.
    """
    import datasets

    ids, images, truths = [], [], []
    for k, rotation in enumerate(rotations):
        page, truth = render_page(start + k, seed)
        rng = random.Random(f"ocr_assets.sample.scan:{seed}:{start + k}")
        ids.append(f"scan-{k:04d}")
        images.append({"bytes": scan_page(stored_as(page, rotation), rng), "path": None})
        truths.append(truth)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "ground_truth": datasets.Value("string"), "rotation": datasets.Value("int16")})
    path = Path(path)
    datasets.Dataset.from_dict({"id": ids, "image": images, "ground_truth": truths, "rotation": list(rotations)},
                               features=features).to_parquet(str(path))
    return path


def write_sample(dest: str | Path, pages: int = 16, shards: int = 2, seed: int = 0, documents: bool = False,
                 scans: bool = False) -> Path:
    """Write the sample dataset to `dest` with `datasets.Dataset.save_to_disk` and return the folder.

    Columns: `id` ("sample-0000", ...), `image` (a datasets `Image()` feature holding PNG or
    JPEG bytes) and `ground_truth`. With ``documents``, two more shards hold multi-page rows:
    ``documents-pdf`` (PDFs) and ``documents-multipage`` (lists of images); see
    ``_write_documents``. With ``scans``, ``scans.parquet`` holds scanned-looking pages, two
    upright and the others turned 90, 180 or 270 degrees; see ``write_scans``. The same
    arguments write identical bytes every time. The
    dataset is saved to a temporary folder beside `dest` and renamed into place, so a
    half-written folder is never taken for a finished one; an existing `dest` is replaced.
    """
    import datasets

    if pages < 1 or shards < 1 or shards > pages:
        raise ValueError(f"write_sample needs 1 <= shards <= pages, got pages={pages}, shards={shards}")
    dest = Path(dest).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ids, images, truths = [], [], []
    for index in range(pages):
        page, truth = render_page(index, seed)
        ids.append(f"sample-{index:04d}")
        images.append({"bytes": encode_page(page, index), "path": None})
        truths.append(truth)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "ground_truth": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"id": ids, "image": images, "ground_truth": truths}, features=features)

    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a progress bar for a few pages is noise in `ocr-assets run`
    try:
        dataset.save_to_disk(str(tmp), num_shards=shards)
        if documents:
            _write_documents(tmp, seed)
        if scans:
            write_scans(tmp / SCANS_SHARD, seed=seed)
        if dest.exists():
            # Move the old folder aside first so `dest` is never a mix of old and new files.
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(dest)
            except OSError:
                # Another writer finished first; the content is the same, so keep theirs.
                if not (dest / "state.json").exists():
                    raise
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
