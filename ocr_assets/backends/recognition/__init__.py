"""Recognition backends: `recognize(crops) -> texts`, chosen by name."""

from __future__ import annotations

from ocr_assets.backends.recognition.base import Crop, Recognized, Recognizer
from ocr_assets.config import ENV_RECOGNIZER, ENV_VLM_BASE_URL

RECOGNIZERS = ("local",)

__all__ = ["Crop", "Recognized", "Recognizer", "RECOGNIZERS", "create_recognizer", "resolve_recognizer"]


def resolve_recognizer(name: str | None, vlm_base_url: str | None) -> str:
    """The recognizer to use: the configured one, else openai when a VLM URL is set, else local."""
    if name:
        return name
    return "openai" if vlm_base_url else "local"


def create_recognizer(name: str, *, threads: int | None = None) -> Recognizer:
    """Build (load) one recognizer; raises ValueError naming the setting on a bad configuration."""
    if name == "local":
        from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer

        return RapidOcrRecognizer(threads=threads) if threads else RapidOcrRecognizer()
    if name == "openai":
        raise ValueError(
            f"{ENV_RECOGNIZER}=openai (or {ENV_VLM_BASE_URL} set) selects the VLM recognizer, "
            f"which this version does not include yet; unset {ENV_VLM_BASE_URL} or set "
            f"{ENV_RECOGNIZER}=local."
        )
    raise ValueError(f"{ENV_RECOGNIZER}={name!r} is not a recognizer; choose one of {', '.join(RECOGNIZERS)}.")
