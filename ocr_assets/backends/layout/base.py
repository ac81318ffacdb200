"""The interface every layout backend implements."""

from __future__ import annotations

import builtins
import functools
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ocr_assets.imaging import decode_page
from ocr_assets.sources.base import Pixels
from ocr_assets.timing import StageReport
from ocr_assets.upright import NO_TURN, PageTurner, Turn


# Words in an exception that say the device failed, not the page: CUDA, cuDNN, cuBLAS, the driver.
_DEVICE_ERRORS = ("cuda error", "cuda failure", "cudnn", "cublas", "cufft", "cusolver", "nvjpeg_status",
                  "device-side assert")


class DeviceFault(RuntimeError):
    """The accelerator failed (a CUDA error, or out of memory with one page alone): the step must fail.

    Not a page's fault, so not an error row: every later page would fail the same way.
    """


def device_fault_kind(exc: BaseException) -> str | None:
    """``"memory"`` for an out-of-memory error, ``"device"`` for another device error, else None."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).lower()
    if "OutOfMemoryError" in names or "out of memory" in text:
        return "memory"
    if "AcceleratorError" in names or "CudaError" in names or any(w in text for w in _DEVICE_ERRORS):
        return "device"
    return None


def free_device_memory() -> None:
    """Give cached GPU memory back, where torch has used CUDA in this process (torch is not imported for it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Detection:
    """One region found on a page, in the page's own pixel coordinates."""

    label: str
    score: float
    x0: int
    y0: int
    x1: int
    y1: int
    order: int | None = None  # the model's reading-order rank, where it has one
    polygon: tuple[int, ...] | None = None  # x, y, x, y, ... in page pixels, only when asked for


@dataclass
class PreparedPage:
    """One page decoded once and made ready for ``detect``.

    ``inputs`` is what the backend's model takes (a normalised array, a tensor on the device);
    ``host`` holds the upright page's pixels on the host for the stage's text recovery (BGR, or
    gray uint8 where the page was decoded on a device: the full-resolution device copy is dropped
    once the model input exists), at full resolution or downscaled by ``host_scale``.
    ``height``/``width`` are the upright page's at full resolution: the stored page after
    ``turn``, the frame every box is in.
    """

    height: int
    width: int
    inputs: Any
    decode_seconds: float = 0.0
    preprocess_seconds: float = 0.0
    host: np.ndarray | None = None
    turn: Turn = NO_TURN  # how the stored page was turned upright before ``inputs`` were made
    host_scale: int = 1  # ``host`` is the page downscaled by this whole factor (see PageTurner.upright)
    orientation_seconds: float = 0.0
    deskew_seconds: float = 0.0

    @property
    def image(self) -> np.ndarray:
        if self.host is None:
            raise ValueError("this prepared page keeps no host pixels")
        return self.host


class LayoutBackend(Protocol):
    """Finds the regions of pages: ``prepare`` decodes a batch of stored images, ``detect`` finds regions."""

    name: str
    label_tasks: dict[str, str]  # every label the model emits → text/table/formula/skip/abandon
    batch_size: int
    keep_polygons: bool  # whether detections carry polygons (the LAYOUT table then has a polygon column)
    info: dict[str, str | int | float]  # device, dtype, model id...: shown in the stage's metadata

    def prepare(self, blobs: Sequence[Pixels | None]) -> list[PreparedPage | str]:
        """Decode each page once and preprocess it for the model; a page that fails gives its reason.

        A page is encoded bytes as stored, or an array already decoded (BGR uint8, H x W x 3: a
        rendered PDF page, a TIFF frame), which is taken as it is.

        The layout stage calls this one batch ahead of ``detect``, from another thread, so
        decoding and preprocessing overlap the model.
        """
        ...

    def detect(
        self, pages: Sequence[PreparedPage | np.ndarray], report: StageReport | None = None
    ) -> list[list[Detection]]:
        """Regions of each page (prepared, or a decoded BGR uint8 array), in the order given.

        Times its work into ``report`` as the parts ``preprocess`` (for pages not prepared
        beforehand), ``inference`` and ``postprocess``.
        """
        ...


def decode_blob(data: Pixels | None) -> tuple[np.ndarray | None, str | None, float]:
    """(BGR page, reason it failed, seconds) for one page's pixels (``decode_page``); never raises."""
    start = time.perf_counter()
    try:
        if data is None:
            return None, "no image bytes for this page's source row", time.perf_counter() - start
        return decode_page(data), None, time.perf_counter() - start
    except Exception as exc:  # one bad page must not stop the shard
        return None, f"page image could not be decoded: {exc}", time.perf_counter() - start


def _preprocess_timed(preprocess: Callable[[np.ndarray], Any], page: np.ndarray) -> tuple[Any, float, str | None]:
    """(model input, seconds, None), or (None, 0, the reason) where ``preprocess`` fails on the page."""
    start = time.perf_counter()
    try:
        return preprocess(page), time.perf_counter() - start, None
    except Exception as exc:
        return None, 0.0, f"page could not be preprocessed for the layout model: {exc}"


def prepare_with(
    blobs: Sequence[Pixels | None], preprocess: Callable[[np.ndarray], Any], turner: PageTurner | None = None,
    model_size: tuple[int, int] | None = None, map: Callable = builtins.map,
) -> list[PreparedPage | str]:
    """``prepare`` for backends that take host arrays: ``decode_page``, turn the decoded pages upright
    (``turner``: one batched decision; a page may come back downscaled, no smaller than
    ``model_size``, the model input's height and width: see ``PageTurner.upright``), then
    ``preprocess`` each page. Decoding and preprocessing go through ``map`` (a thread pool's, to
    spread them over cores; cv2 releases the GIL)."""
    decoded = list(map(decode_blob, blobs))
    out: list[PreparedPage | str] = [error or "" for _, error, _ in decoded]
    good = [k for k, (_, error, _) in enumerate(decoded) if error is None]
    if not good:
        return out
    pages = [decoded[k][0] for k in good]
    turns, scales, orient_s, deskew_s = [NO_TURN] * len(pages), [1] * len(pages), 0.0, 0.0
    if turner is not None and turner.enabled:
        pages, turns, scales, orient_s, deskew_s = turner.upright(pages, model_size)
    share = 1 / len(pages)  # the batched decision's cost, shared by its pages
    prepared = map(functools.partial(_preprocess_timed, preprocess), pages)
    for k, page, turn, scale, (inputs, seconds, error) in zip(good, pages, turns, scales, prepared):
        out[k] = error or PreparedPage(
            page.shape[0] * scale, page.shape[1] * scale, inputs, decoded[k][2], seconds, host=page, turn=turn,
            host_scale=scale, orientation_seconds=orient_s * share, deskew_seconds=deskew_s * share)
    return out


def ensure_prepared(
    pages: Sequence[PreparedPage | np.ndarray], preprocess: Callable[[np.ndarray], Any], report: StageReport
) -> list[PreparedPage]:
    """``pages`` as PreparedPages: decoded arrays are preprocessed here (timed as ``preprocess``)."""
    out = []
    for page in pages:
        if isinstance(page, PreparedPage):
            out.append(page)
            continue
        with report.part("preprocess"):
            out.append(PreparedPage(page.shape[0], page.shape[1], preprocess(page), host=page))
    return out
