"""The `layout` stage with PP-DocLayoutV3 against the GLM-OCR SDK's own detector, same pages, same model.

    pip install glmocr==0.1.5   (in the dev extras)
    python bench/layout.py [--pages N] [--device cpu|cuda] [--formats jpeg,png] [--checkpoint DIR]
    python bench/layout.py --pages 8 --batch-sizes 1,2,4     # the default batch size, measured

Both sides load the same checkpoint, a randomly initialised PP-DocLayoutV3 with the 25 labels
saved to a local folder (the released architecture, so the same shapes and cost), unless
--checkpoint points at real weights. Both run on the same device. Ours is the layout stage as a
user runs it (`run_layout`: decode, preprocess, model, post-processing, text recovery, reading
order) with its defaults for the device. The baseline is glmocr's `PPDocLayoutDetector` with the
SDK's shipped config (threshold 0.3, batch 1, NMS, merge modes), fed PIL images opened from
the same bytes, as its page loader does. Models are loaded before the clock starts on both
sides, and one page is run first on each side to warm up.

The SDK runs float32 only. Ours runs in float32 and, where it differs, at its default dtype (what
`auto` picks: bf16 on a GPU; on a CPU bf16 only where measured faster at load). The table compares
like with like: float32 against float32, default against default, and our default against our
float32, so no ratio comes from a change of precision alone.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ocr_assets.backends.layout import pp_postprocess as post, precision
from ocr_assets.backends.layout.pp_doclayout_v3 import PPDocLayoutV3Backend, write_random_checkpoint
from ocr_assets.sample import encode_page, render_page
from ocr_assets.stages.layout import run_layout
from ocr_assets.timing import StageReport

FORMAT_INDEX = {"png": 0, "jpeg": 1}  # encode_page writes PNG for even indices, JPEG for odd


def make_pages(n: int, fmt: str, distinct: int = 16) -> list[bytes]:
    """``n`` 150-dpi sample pages stored as ``fmt``; ``distinct`` different pages, repeated."""
    base = [encode_page(render_page(i)[0], FORMAT_INDEX[fmt]) for i in range(min(n, distinct))]
    return [base[i % len(base)] for i in range(n)]


def pages_table(n: int) -> pa.Table:
    return pa.table({"page_id": [f"p{i}" for i in range(n)], "row": list(range(n)), "page": [0] * n,
                     "status": ["ok"] * n})


class BlobShard:
    """The bench pages as a shard of one-page rows (the part of ``sources.base.Shard`` layout reads)."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.key, self.blobs = "bench", blobs

    def read_pages(self, pages):
        return [self.blobs[row] for row, _ in pages]


class Timers:
    """Seconds per part of the baseline, from wrappers around the SDK's own calls (behaviour unchanged)."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start
        return timed


def glm_detector(checkpoint: str, device: str, timers: Timers):
    """glmocr 0.1.5's PPDocLayoutDetector with the shipped config, started, with timed parts."""
    import glmocr.layout.layout_detector as sdk
    from glmocr.config import GlmOcrConfig

    layout_cfg = GlmOcrConfig.from_yaml().pipeline.layout.model_copy(
        update={"model_dir": checkpoint, "device": device}
    )
    detector = sdk.PPDocLayoutDetector(layout_cfg)
    detector.start()
    processor = detector._image_processor
    model = detector._model
    # time the SDK's own steps where it calls them; what they do is untouched
    call = type(processor).__call__
    type(processor).__call__ = lambda self, *a, **k: timers.wrap("preprocess", call)(self, *a, **k)
    forward = model.forward
    model.forward = timers.wrap("inference", forward)
    processor.post_process_object_detection = timers.wrap("postprocess", processor.post_process_object_detection)
    sdk.apply_layout_postprocess = timers.wrap("postprocess", sdk.apply_layout_postprocess)
    return detector


def run_glm(detector, blobs: list[bytes], timers: Timers) -> float:
    start = time.perf_counter()
    batch = detector.batch_size
    for i in range(0, len(blobs), batch):
        t0 = time.perf_counter()
        images = [Image.open(io.BytesIO(b)) for b in blobs[i:i + batch]]
        images = [im.convert("RGB") for im in images]  # decode (PIL decodes lazily, on convert)
        timers.parts["decode"] = timers.parts.get("decode", 0.0) + time.perf_counter() - t0
        detector.process(images)
        if str(detector._device).startswith("cuda"):
            torch.cuda.synchronize()
    return time.perf_counter() - start


def run_ours(backend, blobs: list[bytes]) -> tuple[float, StageReport, pa.Table]:
    start = time.perf_counter()
    table, report = run_layout(pages_table(len(blobs)), BlobShard(blobs), backend)
    return time.perf_counter() - start, report, table


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def dtype_check(fast: PPDocLayoutV3Backend, exact: PPDocLayoutV3Backend, blobs: list[bytes]) -> str:
    """How the fast dtype moves the float32 detections: found again after post-processing, and
    among all of the fast model's scored candidates (same label, IoU >= 0.9) with the score change."""
    pages = exact.prepare(blobs)
    reference = exact.detect(pages)
    final = fast.detect(fast.prepare(blobs))
    with torch.inference_mode(), fast._autocast():
        out = fast.model(pixel_values=fast._batch_tensor(fast.prepare(blobs)))
    raws = post.select(out.logits, out.pred_boxes, out.order_logits, [(p.height, p.width) for p in pages],
                       torch.zeros(len(fast.labels)))
    total = kept = found = 0
    deltas = []
    for ref, fin, raw in zip(reference, final, raws):
        for d in ref:
            total += 1
            box = (d.x0, d.y0, d.x1, d.y1)
            kept += any(f.label == d.label and _iou(box, (f.x0, f.y0, f.x1, f.y1)) >= 0.9 for f in fin)
            same = [s for lab, s, b in zip(raw.labels, raw.scores, raw.boxes)
                    if fast.labels[lab] == d.label and _iou(box, b) >= 0.9]
            if same:
                found += 1
                deltas.append(min(abs(s - d.score) for s in same))
    if not total:
        return "no float32 detections to compare"
    return (f"{fast.info['dtype']} against float32 on {len(blobs)} pages ({total / len(blobs):.1f} detections "
            f"per page): {kept / total:.0%} kept after post-processing; {found / total:.0%} of the boxes among its "
            f"candidates, score change median {np.median(deltas):.4f}, max {max(deltas):.4f}")


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def batch_sizes(args) -> None:
    """Seconds per page of the layout stage at each batch size, in float32 and at the default dtype
    (where it differs), same pages."""
    checkpoint = args.checkpoint or str(write_random_checkpoint(Path(tempfile.mkdtemp(prefix="ppdl3-"))))
    blobs = make_pages(args.pages, "png")
    rows = []
    for size in (int(x) for x in args.batch_sizes.split(",")):
        default = PPDocLayoutV3Backend(checkpoint, device=args.device, batch_size=size)
        sides = {"float32": PPDocLayoutV3Backend(checkpoint, device=args.device, dtype="float32", batch_size=size)}
        if default.dtype is not torch.float32:
            sides[f"default ({default.info['dtype']})"] = default
        for name, backend in sides.items():
            run_ours(backend, blobs[:size])  # warm-up
            best = min(run_ours(backend, blobs)[0] for _ in range(2))
            label = name if len(sides) > 1 else "float32 (the default here)"
            rows.append((label, size, f"{best / len(blobs):.3f}"))
    print(f"\nlayout stage, {len(blobs)} PNG pages, device {args.device}\n")
    print(table(rows, ("dtype", "batch size", "seconds per page")))


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = precision.cpu_name()
    flags = set(precision.cpu_flags().split())
    has = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu}, {os.cpu_count()} cores, {' '.join(has) or 'no avx512/bf16/amx'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=12, help="pages per format (>= 256 for the GPU goal)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", default="jpeg,png")
    parser.add_argument("--checkpoint", help="a PP-DocLayoutV3 folder; default: a random one made here")
    parser.add_argument("--batch-sizes", help="instead: seconds per page of our layout stage at these batch "
                        "sizes (e.g. 1,2,4), in float32 and the default dtype")
    args = parser.parse_args()
    if args.batch_sizes:
        return batch_sizes(args)

    checkpoint = args.checkpoint or str(write_random_checkpoint(Path(tempfile.mkdtemp(prefix="ppdl3-"))))
    default = PPDocLayoutV3Backend(checkpoint, device=args.device)
    ours = {"float32": PPDocLayoutV3Backend(checkpoint, device=args.device, dtype="float32",
                                            batch_size=default.batch_size)}
    if default.dtype is not torch.float32:  # else the float32 run is the default's too
        ours["default"] = default
    timers = Timers()
    glm = glm_detector(checkpoint, args.device, timers)  # the SDK runs float32: that is its default
    goal = ">= 5x, >= 150 pages/s" if args.device.startswith("cuda") else ">= 1.5x"
    rows, parts_rows, notes = [], [], []
    for fmt in args.formats.split(","):
        blobs = make_pages(args.pages, fmt)
        n = len(blobs)
        for backend in ours.values():  # warm-up, every side
            run_ours(backend, blobs[:1])
        run_glm(glm, blobs[:1], timers)
        timers.parts.clear()
        seconds, reports = {}, {}
        for name, backend in ours.items():  # ours and the SDK's, in turn, so drifting load hits all
            seconds[name], reports[name], _ = run_ours(backend, blobs)
            if name == "float32":
                glm_s = run_glm(glm, blobs, timers)
        seconds.setdefault("default", seconds["float32"])
        dtype = default.info["dtype"]
        for label, name, theirs in ((f"{fmt}, float32 against float32", "float32", "float32"),
                                    (f"{fmt}, default against default", "default", "float32")):
            mine = dtype if name == "default" else "float32"
            rows.append((label, f"{n / seconds[name]:.2f} pages/s ({mine})", f"{n / glm_s:.2f} pages/s ({theirs})",
                         f"{glm_s / seconds[name]:.2f}x", goal))
        rows.append((f"{fmt}, ours default against ours float32", f"{n / seconds['default']:.2f} pages/s ({dtype})",
                     f"{n / seconds['float32']:.2f} pages/s (ours, float32)",
                     f"{seconds['float32'] / seconds['default']:.2f}x", ">= 1.00x"))
        for name, parts, total in ((f"ours {ours[k].info['dtype']}", reports[k].parts, seconds[k]) for k in ours):
            parts_rows.append(_parts_row(fmt, name, parts, total, n))
        parts_rows.append(_parts_row(fmt, "glmocr float32", timers.parts, glm_s, n))
        if default.dtype is not torch.float32:  # how the default dtype moves the detections
            exact = PPDocLayoutV3Backend(checkpoint, device=args.device, dtype="float32", batch_size=8)
            fast = PPDocLayoutV3Backend(checkpoint, device=args.device, dtype=dtype, batch_size=8)
            notes.append(f"{fmt}: " + dtype_check(fast, exact, blobs[: min(n, 8)]))
            del exact, fast
    print(f"\nPP-DocLayoutV3 layout stage, {args.pages} pages per format, device {args.device} "
          f"({machine(args.device)}), batch {default.batch_size} (glmocr batch {glm.batch_size})")
    print(f"ours by default: {dtype} ({default.info['dtype_reason']}); glmocr: float32 (its only precision)\n")
    print(table(rows, ("measure", "ours", "glmocr 0.1.5", "ratio", "goal")))
    print("\nmilliseconds per page, by part:\n")
    print(table(parts_rows, ("format", "side", "decode", "preprocess", "inference", "postprocess", "recovery",
                             "total")))
    if notes:
        print("\n" + "\n".join(notes))


def _parts_row(fmt: str, side: str, parts: dict, total: float, n: int) -> tuple:
    return (fmt, side, *(f"{1000 * parts.get(k, 0) / n:.1f}" for k in
                         ("decode", "preprocess", "inference", "postprocess", "recovery")), f"{1000 * total / n:.1f}")


if __name__ == "__main__":
    main()
