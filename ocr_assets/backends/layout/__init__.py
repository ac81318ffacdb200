"""Layout backends: `detect(images) -> detections per page`, chosen by name."""

from __future__ import annotations

from ocr_assets.backends.layout.base import Detection, LayoutBackend
from ocr_assets.config import ENV_LAYOUT_BACKEND

LAYOUT_BACKENDS = ("picodet-cdla", "pp-doclayout-v3")

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
    **pp_options,
) -> LayoutBackend:
    """Build (load) one layout backend; raises ValueError naming the setting on a bad configuration.

    ``pp_options`` go to the PP-DocLayoutV3 backend only: device, dtype, decode_threads,
    threshold_by_label, merge_modes, nms, keep_polygons.
    """
    if name == "picodet-cdla":
        from ocr_assets.backends.layout.picodet_cdla import PicodetCdlaBackend

        options = {"threads": threads, "batch_size": batch_size, "label_tasks": label_tasks}
        if conf_threshold is not None:
            options["conf_threshold"] = conf_threshold
        return PicodetCdlaBackend(**{k: v for k, v in options.items() if v is not None})
    if name == "pp-doclayout-v3":
        from ocr_assets.backends.layout.pp_doclayout_v3 import PPDocLayoutV3Backend

        return PPDocLayoutV3Backend(
            model or "", threads=threads, batch_size=batch_size, conf_threshold=conf_threshold,
            label_tasks=label_tasks, **pp_options,
        )
    raise ValueError(
        f"{ENV_LAYOUT_BACKEND}={name!r} is not a layout backend; choose one of {', '.join(LAYOUT_BACKENDS)}."
    )
