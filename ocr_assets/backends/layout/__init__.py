"""Layout backends: `detect(images) -> detections per page`, chosen by name."""

from __future__ import annotations

from ocr_assets.backends.layout.base import Detection, LayoutBackend
from ocr_assets.config import ENV_LAYOUT_BACKEND, ENV_LAYOUT_MODEL

LAYOUT_BACKENDS = ("picodet-cdla",)

__all__ = ["Detection", "LayoutBackend", "LAYOUT_BACKENDS", "create_layout_backend", "resolve_layout_backend"]


def resolve_layout_backend(backend: str | None, model: str | None) -> str:
    """The backend to use: the configured one, else pp-doclayout-v3 when a model is set, else picodet-cdla."""
    if backend:
        return backend
    return "pp-doclayout-v3" if model else "picodet-cdla"


def create_layout_backend(
    name: str,
    *,
    model: str | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
    conf_threshold: float | None = None,
    label_tasks: dict[str, str] | None = None,
) -> LayoutBackend:
    """Build (load) one layout backend; raises ValueError naming the setting on a bad configuration."""
    if name == "picodet-cdla":
        from ocr_assets.backends.layout.picodet_cdla import PicodetCdlaBackend

        options = {"threads": threads, "batch_size": batch_size, "label_tasks": label_tasks}
        if conf_threshold is not None:
            options["conf_threshold"] = conf_threshold
        return PicodetCdlaBackend(**{k: v for k, v in options.items() if v is not None})
    if name == "pp-doclayout-v3":
        raise ValueError(
            f"{ENV_LAYOUT_BACKEND}=pp-doclayout-v3 (or {ENV_LAYOUT_MODEL} set) selects the "
            f"PP-DocLayoutV3 backend, which this version does not include yet; unset "
            f"{ENV_LAYOUT_MODEL} or set {ENV_LAYOUT_BACKEND}=picodet-cdla."
        )
    raise ValueError(
        f"{ENV_LAYOUT_BACKEND}={name!r} is not a layout backend; choose one of {', '.join(LAYOUT_BACKENDS)}."
    )
