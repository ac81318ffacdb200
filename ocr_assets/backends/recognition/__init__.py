"""Recognition backends: `recognize(crops) -> texts`, chosen by name."""

from __future__ import annotations

from ocr_assets.backends.recognition.base import Crop, Recognized, Recognizer
from ocr_assets.config import ENV_RECOGNIZER, ENV_VLM_BASE_URL

RECOGNIZERS = ("local", "openai")

__all__ = ["Crop", "Recognized", "Recognizer", "RECOGNIZERS", "create_recognizer", "resolve_recognizer"]


def resolve_recognizer(name: str | None, vlm_base_url: str | None) -> str:
    """The recognizer to use: the configured one, else openai when a VLM URL is set, else local."""
    if name:
        return name
    return "openai" if vlm_base_url else "local"


def create_recognizer(name: str, *, threads: int | None = None, **vlm_options) -> Recognizer:
    """Build (load) one recognizer; raises ValueError naming the setting on a bad configuration.

    ``vlm_options`` go to the openai recognizer: base_url, model, api_key, concurrency, prompts,
    max_tokens, timeout, max_attempts, verify_tls.
    """
    if name == "local":
        from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer

        return RapidOcrRecognizer(threads=threads) if threads else RapidOcrRecognizer()
    if name == "openai":
        from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer

        if not vlm_options.get("base_url"):
            raise ValueError(
                f"{ENV_RECOGNIZER}=openai needs {ENV_VLM_BASE_URL}: the server's OpenAI API, "
                f"e.g. http://localhost:8000/v1 (`ocr-assets serve` or vLLM)"
            )
        return OpenAIRecognizer(vlm_options.pop("base_url"), **vlm_options)
    raise ValueError(f"{ENV_RECOGNIZER}={name!r} is not a recognizer; choose one of {', '.join(RECOGNIZERS)}.")
