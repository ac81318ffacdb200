"""Layout backends: `detect(images) -> detections per page`, chosen by name."""

from __future__ import annotations

import json

from ocr_assets import config
from ocr_assets.backends import load_once
from ocr_assets.backends.layout.base import Detection, LayoutBackend
from ocr_assets.config import ENV_LAYOUT_BACKEND

LAYOUT_BACKENDS = ("picodet-cdla", "pp-doclayout-v3")
# the layout settings (the `layout_model` resource's fields): what a layout worker is sent with each shard
SETTINGS = ("backend", "model", "device", "dtype", "threads", "decode_threads", "batch_size", "conf_threshold",
            "threshold_by_label", "merge_modes", "keep_polygons", "recover_text", "label_tasks")

__all__ = ["Detection", "LayoutBackend", "LAYOUT_BACKENDS", "SETTINGS", "create_layout_backend",
           "check_settings", "load_layout_backend", "parse_label_tasks", "resolve_layout_backend"]


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


def parse_label_tasks(value: str | None) -> dict[str, str]:
    table = config.parse_json_object("label_tasks", value)
    allowed = set(config.TASKS) | {config.ABANDON}
    bad = {k: v for k, v in table.items() if v not in allowed}
    if bad:
        raise ValueError(f"label_tasks maps to unknown tasks {bad}; tasks are {sorted(allowed)}")
    return table


def check_settings(settings: dict) -> str:
    """The backend name of ``settings``, after the checks that need no model (a bad backend name or
    JSON setting raises ValueError naming it)."""
    name = resolve_layout_backend(settings.get("backend"), settings.get("model"))
    if name not in LAYOUT_BACKENDS:
        raise ValueError(f"{ENV_LAYOUT_BACKEND}={name!r} is not a layout backend; choose one of "
                         f"{', '.join(LAYOUT_BACKENDS)}")
    check_device(settings.get("device"))
    dtype = (settings.get("dtype") or "auto").strip().lower()
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"{config.ENV_LAYOUT_DTYPE}={settings.get('dtype')!r} is not one of auto, float32, "
                         f"bfloat16, float16")
    parse_label_tasks(settings.get("label_tasks"))
    for option in ("threshold_by_label", "merge_modes"):
        config.parse_json_object(option, settings.get(option))
    return name


def check_device(device: str | None) -> str:
    """The device setting's spelling (auto, cpu, cuda, cuda:N), checked without torch and without
    looking for a GPU: a step that does not run layout (a CPU pod on Kubernetes) must not need one."""
    name = (device or "auto").strip().lower()
    kind, _, index = name.partition(":")
    if name in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return name
    raise ValueError(f"{config.ENV_DEVICE}={device!r} is not a device: use auto, cpu, cuda or cuda:N")


def load_layout_backend(settings: dict, device: str | None = None) -> tuple[LayoutBackend, float]:
    """The backend the layout ``settings`` (SETTINGS) describe, loaded once per process; returns
    (backend, seconds spent loading now). ``device`` (a leased ``cuda:N``) replaces the device setting.

    The orientation/deskew switches and the GPU memory share are read from the environment here:
    a change of them loads anew.
    """
    name = check_settings(settings)
    overrides = parse_label_tasks(settings.get("label_tasks"))
    options: dict = {}
    if name == "pp-doclayout-v3":
        options = {
            "device": device or settings.get("device") or "auto", "dtype": settings.get("dtype") or "auto",
            "decode_threads": settings.get("decode_threads") or None,
            "threshold_by_label": config.parse_json_object("threshold_by_label", settings.get("threshold_by_label")),
            "merge_modes": config.parse_json_object("merge_modes", settings.get("merge_modes")),
            "keep_polygons": bool(settings.get("keep_polygons")),
            "gpu_memory": config.layout_gpu_memory(),
        }
    key = ("layout", name, settings.get("model"), settings.get("threads"), settings.get("batch_size"),
           settings.get("conf_threshold"), json.dumps(overrides, sort_keys=True), json.dumps(options, sort_keys=True),
           config.orientation_enabled(), config.deskew_enabled())

    def load() -> LayoutBackend:
        backend = create_layout_backend(
            name, model=settings.get("model"), threads=settings.get("threads") or None,
            batch_size=settings.get("batch_size") or None, conf_threshold=settings.get("conf_threshold"), **options,
        )
        backend.label_tasks = {**backend.label_tasks, **overrides}
        return backend

    return load_once(key, load)
