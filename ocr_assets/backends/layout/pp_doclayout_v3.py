"""Layout backend `pp-doclayout-v3`: transformers' PPDocLayoutV3ForObjectDetection, GPU first.

The transformers image processor only resizes to 800×800 (bicubic, no antialiasing) and divides
by 255 (mean 0, std 1), so it is skipped: each page is decoded once (JPEG with nvJPEG on CUDA,
batched; every other format, and everything on the CPU, with cv2), resized (on the device
where there is one), stacked into one batch and divided by 255 there. The precision comes from
``precision``: bf16 autocast on a GPU (fp16 where bf16 is missing, a batch with non-finite
outputs run again in fp32), and on a CPU bf16 only where it was measured faster than fp32 on
that machine, else fp32. On a GPU shared with a VLM server the model keeps to its share of the
GPU's memory and runs small batches. Post-processing is in ``pp_postprocess``.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from ocr_assets import config
from ocr_assets.backends.layout import pp_postprocess as post, precision
from ocr_assets.backends.layout.precision import DTYPES, cpu_has_bf16, resolve_dtype  # noqa: F401 (their old home)
from ocr_assets.backends.layout.base import Detection, Pixels, PreparedPage, ensure_prepared, prepare_with
from ocr_assets.image_header import read_header, read_orientation
from ocr_assets.imaging import check_pixels
from ocr_assets.timing import StageReport
from ocr_assets.upright import NO_TURN, PageTurner, small_factor, turn_page_tensor

INPUT_SIZE = (800, 800)  # (height, width) the processor resizes to, unless the checkpoint says otherwise
JPEG_MAGIC = b"\xff\xd8\xff"


def resolve_device(device: str | None) -> torch.device:
    """``auto`` → the first GPU when CUDA works, else the CPU; ``cuda`` without CUDA is an error."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{config.ENV_DEVICE}={device!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{config.ENV_DEVICE}={device!r} but CUDA is not available here: use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{config.ENV_DEVICE}={device!r} but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type != "cpu":
        raise ValueError(f"{config.ENV_DEVICE}={device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def default_batch_size(device: torch.device, *, shared: bool = False) -> int:
    """Pages per forward pass: 1 on the CPU (bench/layout.py --batch-sizes: batch 2 and 4 cost more
    per page); 32 on a GPU of its own, 8 on a GPU shared with a VLM server, whose decoding a long
    layout batch would stall."""
    return (8 if shared else 32) if device.type == "cuda" else 1


def _gpu_memory_share(share: float | None, device: torch.device) -> float | None:
    """The share of the GPU's memory the model may use, set as this process's cap on CUDA; None where
    the whole GPU is the model's (or on the CPU, where it means nothing)."""
    if share is None or share >= 1:
        return None
    if not 0 < share < 1:
        raise ValueError(f"{config.ENV_LAYOUT_GPU_MEMORY}={share!r} must be a share of the GPU between 0 and 1")
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(float(share), index)
    return float(share)


def _not_found(model: str, exc: Exception) -> ValueError:
    offline = config.env("HF_HUB_OFFLINE") not in (None, "0", "false", "False")
    where = (
        "the Hugging Face hub is offline here (HF_HUB_OFFLINE) and it is not in the local cache"
        if offline
        else "it is neither a local folder nor a model the Hugging Face hub could give"
    )
    return ValueError(
        f"{config.ENV_LAYOUT_MODEL}={model!r} could not be loaded: {where} ({type(exc).__name__}: {exc}). "
        f"Set {config.ENV_LAYOUT_MODEL} to a folder holding config.json and model.safetensors "
        f"(for example one made with `hf download PaddlePaddle/PP-DocLayoutV3_safetensors --local-dir DIR`)."
    )


def load_model(model: str) -> torch.nn.Module:
    """The PPDocLayoutV3ForObjectDetection checkpoint at ``model`` (folder or hub id), in eval mode."""
    from transformers import PPDocLayoutV3ForObjectDetection

    if not model:
        raise ValueError(
            f"{config.ENV_LAYOUT_BACKEND}=pp-doclayout-v3 needs {config.ENV_LAYOUT_MODEL}: a checkpoint "
            f"folder or hub id such as PaddlePaddle/PP-DocLayoutV3_safetensors"
        )
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ValueError(
            f"{config.ENV_LAYOUT_MODEL}={model!r}: no config.json in that folder; point it at a "
            f"PP-DocLayoutV3 checkpoint folder (config.json and model.safetensors)"
        )
    try:
        net = PPDocLayoutV3ForObjectDetection.from_pretrained(str(path) if looks_local else model)
    except (OSError, ValueError) as exc:
        raise _not_found(model, exc) from exc
    return net.eval()


def checkpoint_input_size(model: str) -> tuple[int, int]:
    """(height, width) from the checkpoint's preprocessor_config.json where it has one, else 800×800."""
    file = Path(model).expanduser() / "preprocessor_config.json"
    if not file.is_file():
        return INPUT_SIZE
    size = json.loads(file.read_text()).get("size") or {}
    return int(size.get("height", INPUT_SIZE[0])), int(size.get("width", INPUT_SIZE[1]))


class PPDocLayoutV3Backend:
    """PP-DocLayoutV3 (25 labels, masks, reading order) through transformers, on CUDA or the CPU."""

    name = "pp-doclayout-v3"

    def __init__(
        self,
        model: str,
        *,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int | None = None,
        threads: int | None = None,
        decode_threads: int | None = None,
        conf_threshold: float | None = None,
        threshold_by_label: dict[str, float] | None = None,
        merge_modes: dict[str, str] | None = None,
        nms: bool = True,
        keep_polygons: bool = False,
        label_tasks: dict[str, str] | None = None,
        turner: PageTurner | None = None,
        gpu_memory: float | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # pinned memory and streams go to this GPU, not GPU 0
        precision.resolve_dtype(dtype, self.device)  # a bad setting fails before the model loads
        self.gpu_memory = _gpu_memory_share(gpu_memory, self.device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))
        # channels-last convolutions: measured 1.9x with bf16 on a 2-core CPU (1.7x from bf16 alone)
        self.model = load_model(model).to(self.device, memory_format=torch.channels_last)
        self.labels = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
        self.label_tasks = dict(config.PP_DOCLAYOUT_V3_LABEL_TASKS if label_tasks is None else label_tasks)
        shared = self.gpu_memory is not None
        self.batch_size = max(1, int(batch_size or default_batch_size(self.device, shared=shared)))
        self.input_size = checkpoint_input_size(model)
        choice = precision.choose_dtype(dtype, self.device, self.model, batch_size=self.batch_size,
                                        input_size=self.input_size)
        self.dtype = choice.dtype
        self.keep_polygons = bool(keep_polygons)
        self.settings = post.PostprocessSettings(
            threshold=0.3 if conf_threshold is None else float(conf_threshold),
            threshold_by_label=dict(threshold_by_label or {}),
            nms=nms,
            merge_modes={**post.default_merge_modes(self.labels), **(merge_modes or {})},
            keep_polygons=self.keep_polygons,
        )
        self._check_labels()
        ids = {label: i for i, label in enumerate(self.labels)}
        self._thresholds = torch.full((len(self.labels),), self.settings.threshold)
        for label, value in self.settings.threshold_by_label.items():
            self._thresholds[ids[label]] = float(value)
        self._modes = np.array([("union", "large", "small").index(self.settings.merge_modes.get(label, "union"))
                                for label in self.labels])
        self._protected = np.array([label in post.NEVER_CONTAINED for label in self.labels])
        self._image_id = ids.get("image")
        cores = os.cpu_count() or 2
        self._decoders = ThreadPoolExecutor(
            max_workers=max(1, int(decode_threads or min(8, cores))), thread_name_prefix="layout-decode"
        )
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # pages are turned upright before layout, as OCR_ASSETS_ORIENTATION / OCR_ASSETS_DESKEW say
        self.turner = turner if turner is not None else PageTurner.from_config(threads)
        self.info = {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": choice.reason,
            **({"gpu_memory": self.gpu_memory} if shared else {}),
            "model": model,
            **self.turner.info,
        }

    def _check_labels(self) -> None:
        known = set(self.labels)
        for what, table in (("threshold_by_label", self.settings.threshold_by_label),
                            ("merge_modes", self.settings.merge_modes)):
            unknown = sorted(set(table) - known)
            if unknown:
                raise ValueError(f"layout {what} names labels the model does not have: {unknown}; "
                                 f"its labels are {self.labels}")
        bad = {k: v for k, v in self.settings.merge_modes.items() if v not in post.MERGE_MODES}
        if bad:
            raise ValueError(f"layout merge_modes {bad}: each must be one of {post.MERGE_MODES}")
        missing = sorted(known - set(self.label_tasks))
        if missing:
            raise ValueError(f"the checkpoint's labels {missing} have no task; add them to label_tasks")

    # -- decode and preprocess (a worker thread, one batch ahead of the model) --

    def _resize_host(self, bgr: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB uint8 at the model's input size: cv2's bicubic, the processor's resize."""
        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        h, w = self.input_size
        resized = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_CUBIC)
        return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)

    def _prepare_host(self, blobs: list) -> list[PreparedPage | str]:
        """Pages decoded with cv2 and resized on the decode threads, turned upright between the two."""
        return prepare_with(blobs, self._resize_host, self.turner, self.input_size, map=self._decoders.map)

    def _prepare_jpegs_on_device(self, blobs: list) -> list[PreparedPage | None]:
        """nvJPEG decode of a batch of JPEGs straight into GPU memory; None where it cannot (cv2 then).

        nvJPEG ignores EXIF orientation, which cv2 applies: it is applied here, so a page is the
        same way up on either path. Each page is then turned upright on the device, decided on a
        small host copy of it. Each full-resolution page is dropped as soon as its resized input
        and its gray host copy (for text recovery) exist, so they do not pile up.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        start = time.perf_counter()
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except Exception:  # one bad or unsupported JPEG fails the batch: try each alone
            images = []
            for d in data:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except Exception:
                    images.append(None)
        del data
        decoded = time.perf_counter() - start
        smalls: dict[int, np.ndarray] = {}
        start = time.perf_counter()
        for k, blob in enumerate(blobs):
            if images[k] is None:
                continue
            try:
                images[k] = apply_exif_orientation(images[k], read_orientation(blob))
                if self.turner.enabled:
                    smalls[k] = _host_small(images[k])
            except Exception:  # the cv2 path decides: a page error, or a device fault it raises
                images[k] = None
        shrunk = time.perf_counter() - start
        turns, orient_s, deskew_s = [NO_TURN] * len(blobs), 0.0, 0.0
        if smalls:
            decided, orient_s, deskew_s = self.turner.decide(list(smalls.values()))
            for k, turn in zip(smalls, decided):
                turns[k] = turn
            orient_s += shrunk
        n = max(1, sum(image is not None for image in images))
        out: list[PreparedPage | None] = []
        for k, blob in enumerate(blobs):
            image, images[k] = images[k], None  # the batch list must not keep the full-resolution page
            if image is None:
                out.append(None)
                continue
            start = time.perf_counter()
            try:
                turned = turn_page_tensor(image, turns[k])
                turning = time.perf_counter() - start
                height, width = turned.shape[1:]
                inputs, gray = self._resize_device(turned), _host_gray(turned)
            except Exception:  # the cv2 path decides: a page error, or a device fault it raises
                out.append(None)
                continue
            finally:
                del image
            out.append(PreparedPage(height, width, inputs, decoded / len(blobs), time.perf_counter() - start - turning,
                                    host=gray, turn=turns[k], orientation_seconds=orient_s / n,
                                    deskew_seconds=deskew_s / n + turning))
        return out

    def _resize_device(self, rgb: torch.Tensor) -> torch.Tensor:
        """(3, h, w) uint8 at the model's input size, resized on the device as the processor does."""
        resized = torch.nn.functional.interpolate(
            rgb[None].float(), size=self.input_size, mode="bicubic", align_corners=False, antialias=False
        )
        return resized[0].clamp_(0, 255).round_().to(torch.uint8)

    def prepare(self, blobs: Sequence[Pixels | None]) -> list[PreparedPage | str]:
        """Decode each page once and resize it to the model's input; on CUDA, JPEG bytes decode on the
        GPU; decoded arrays (rendered PDF pages) and other formats are resized on the host."""
        blobs = list(blobs)
        out: list[PreparedPage | str | None] = [None] * len(blobs)
        if self.device.type == "cuda":
            jpegs = [i for i, b in enumerate(blobs) if _decodes_on_device(b)]
            if jpegs:
                with torch.cuda.stream(self._stream):
                    for i, page in zip(jpegs, self._prepare_jpegs_on_device([blobs[i] for i in jpegs])):
                        out[i] = page
        rest = [i for i, p in enumerate(out) if p is None]
        # host pages keep their BGR pixels (full resolution, or a copy no smaller than the model
        # input) for text recovery; they live as long as the batch (this one and the one ahead)
        if rest:
            for i, page in zip(rest, self._prepare_host([blobs[i] for i in rest])):
                out[i] = page
        if self._stream is not None:
            for i in rest:
                if isinstance(out[i], PreparedPage):
                    with torch.cuda.stream(self._stream):
                        out[i].inputs = self._to_device(out[i].inputs)
            self._stream.synchronize()  # the model runs on another stream: hand over finished tensors
        return out  # type: ignore[return-value]

    def _to_device(self, rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rgb).pin_memory().to(self.device, non_blocking=True).permute(2, 0, 1)

    # -- the model and post-processing --

    def _batch_tensor(self, pages: list[PreparedPage]) -> torch.Tensor:
        """(B, 3, H, W) float in 0..1 on the device, from the prepared uint8 pages."""
        tensors = []
        for p in pages:
            if isinstance(p.inputs, torch.Tensor):
                if p.inputs.is_cuda:  # made on the decode stream: keep its memory until this stream is done
                    p.inputs.record_stream(torch.cuda.current_stream(p.inputs.device))
                tensors.append(p.inputs)
            else:
                tensors.append(torch.from_numpy(p.inputs).permute(2, 0, 1))
        batch = torch.stack([t.to(self.device) for t in tensors])
        return batch.float().div_(255.0).contiguous(memory_format=torch.channels_last)

    def _autocast(self):
        return precision.autocast(self.dtype, self.device)

    def detect(
        self, pages: Sequence[PreparedPage | np.ndarray], report: StageReport | None = None
    ) -> list[list[Detection]]:
        """Regions of each page, boxes in the page's own pixels, in the model's reading order."""
        report = report if report is not None else StageReport()
        prepared = ensure_prepared(pages, self._resize_host, report)
        if not prepared:
            return []
        with report.part("preprocess"):
            pixels = self._batch_tensor(prepared)
        with report.part("inference"), torch.inference_mode():
            outputs = precision.checked_forward(self.model, pixels, self.dtype, report)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # so the time lands in inference, not postprocess
        with report.part("postprocess"), torch.inference_mode():
            return self._postprocess(outputs, prepared)

    def _postprocess(self, outputs, pages: list[PreparedPage]) -> list[list[Detection]]:
        sizes = [(p.height, p.width) for p in pages]
        raws = post.select(outputs.logits, outputs.pred_boxes, outputs.order_logits, sizes, self._thresholds)
        masks = outputs.out_masks if self.keep_polygons else None
        return [self._page_detections(raw, h, w, None if masks is None else masks[b])
                for b, (raw, (h, w)) in enumerate(zip(raws, sizes))]

    def _page_detections(self, raw: post.RawDetections, height: int, width: int, masks) -> list[Detection]:
        keep = post.nms(raw) if self.settings.nms else np.arange(len(raw.scores))
        labels, boxes = raw.labels[keep], raw.boxes[keep]
        keep = keep[~post.page_image_too_large(labels, boxes, self._image_id, height, width)]
        keep = keep[post.merge_keep(raw.labels[keep], raw.boxes[keep], self._modes, self._protected)]
        keep = keep[np.argsort(raw.ranks[keep], kind="stable")]
        boxes = np.clip(raw.boxes[keep], 0, [width, height, width, height]).astype(np.int64)
        valid = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
        keep, boxes = keep[valid], boxes[valid]
        polygons: list = [None] * len(keep)
        if masks is not None and len(keep):
            # a mask pixel is in where its probability passes the detection threshold, as in GLM-OCR
            cut = float(np.log(self.settings.threshold / (1 - self.settings.threshold)))
            chosen = (masks[torch.as_tensor(raw.queries[keep], device=masks.device)].float() > cut)
            chosen = chosen.cpu().numpy()
            mh, mw = chosen.shape[1:]
            scale = (mw / width, mh / height)
            polygons = [post.mask_polygon(m, b, scale) for m, b in zip(chosen, boxes)]
        return [
            Detection(self.labels[raw.labels[k]], float(raw.scores[k]), *(int(v) for v in box),
                      order=int(raw.ranks[k]), polygon=poly)
            for k, box, poly in zip(keep.tolist(), boxes, polygons)
        ]


def _decodes_on_device(data: bytes | memoryview | np.ndarray | None) -> bool:
    """Whether nvJPEG takes this page: JPEG bytes within the pixel limit (cv2 refuses the rest with a
    reason; a page already decoded, such as a rendered PDF page, goes the host path)."""
    if data is None or isinstance(data, np.ndarray) or bytes(data[:3]) != JPEG_MAGIC:
        return False
    try:
        header = read_header(data)
        check_pixels(header.width, header.height)
    except ValueError:  # ImageHeaderError, ImageDecodeError
        return False
    return True


def _host_gray(rgb: torch.Tensor) -> np.ndarray:
    """Gray uint8 host copy of a (3, H, W) RGB device page: a third of the bytes of the colour page."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=rgb.device)[:, None, None]
    return (rgb.float() * weights).sum(0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def _host_small(rgb: torch.Tensor) -> np.ndarray:
    """BGR uint8 host copy of a (3, H, W) RGB device page, area-downscaled as ``upright.small_copy`` does."""
    height, width = rgb.shape[1:]
    factor = small_factor(height, width)
    h, w = height // factor, width // factor
    small = rgb[None, :, :h * factor, :w * factor].float()
    if factor > 1:
        small = torch.nn.functional.avg_pool2d(small, factor)
    return small[0].round_().to(torch.uint8).flip(0).permute(1, 2, 0).contiguous().cpu().numpy()


def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) page turned upright for its EXIF orientation (1-8), as cv2 and PIL's exif_transpose do."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:  # rotate 90 degrees clockwise
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # rotate 90 degrees anticlockwise
        return image.transpose(-2, -1).flip(-2)
    return image


def write_random_checkpoint(folder: str | Path, *, seed: int = 0, class_prior: float = 0.05) -> Path:
    """A randomly initialised PP-DocLayoutV3 (the real architecture and 25 labels) saved to ``folder``.

    Same shapes and cost as the released checkpoint, no download: what the tests and the bench
    run. ``class_prior`` sets the initial class bias, so that a random model still finds a
    page's worth of regions above the default threshold.
    """
    from transformers import PPDocLayoutV3Config, PPDocLayoutV3ForObjectDetection, PPDocLayoutV3ImageProcessor

    labels = list(config.PP_DOCLAYOUT_V3_LABELS)
    cfg = PPDocLayoutV3Config(
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        initializer_bias_prior_prob=class_prior,
    )
    torch.manual_seed(seed)
    folder = Path(folder)
    PPDocLayoutV3ForObjectDetection(cfg).eval().save_pretrained(folder)
    PPDocLayoutV3ImageProcessor().save_pretrained(folder)
    return folder
