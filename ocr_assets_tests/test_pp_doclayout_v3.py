"""The PP-DocLayoutV3 backend, run on the CPU with a randomly initialised model of the real architecture.

The model is created in the test and saved to a temporary folder (no download). GPU paths
(nvJPEG decode, half-precision autocast) have their own tests that skip without CUDA.
"""

from __future__ import annotations

import io
import json

import cv2
import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import PPDocLayoutV3ForObjectDetection, PPDocLayoutV3ImageProcessor

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.backends.layout import create_layout_backend
from ocr_assets.backends.layout import pp_postprocess as post
from ocr_assets.backends.layout.pp_doclayout_v3 import PPDocLayoutV3Backend, write_random_checkpoint
from ocr_assets.image_header import read_header
from ocr_assets.imaging import decode_page
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.sample import encode_page, render_page
from ocr_assets.stages.layout import run_layout
from ocr_assets.timing import StageReport
from ocr_assets.upright import PageTurner, turn_page
from ocr_assets_tests.memory_shard import MemoryShard

LABELS = list(config.PP_DOCLAYOUT_V3_LABELS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_random_checkpoint(tmp_path_factory.mktemp("pp_doclayout_v3")))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """A dtype measured at load is cached in a temporary folder, never in the user's."""
    monkeypatch.setenv(config.ENV_CACHE_DIR, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def backend(checkpoint) -> PPDocLayoutV3Backend:
    return PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def page_bytes() -> dict[str, bytes]:
    """A sample page stored as PNG and as JPEG (encode_page: even index PNG, odd JPEG)."""
    page = render_page(0)[0]
    return {"png": encode_page(page, 0), "jpeg": encode_page(page, 1)}


def _processor_pixels(data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return PPDocLayoutV3ImageProcessor()(images=[image], return_tensors="pt")["pixel_values"]


def _boxes(dets) -> list[tuple]:
    return [(d.label, d.x0, d.y0, d.x1, d.y1, d.order) for d in dets]


def _share_found(wanted, got, tolerance: int) -> float:
    """The share of ``wanted`` detections that ``got`` has too: same label, every side within ``tolerance`` px."""
    found = [any(g.label == w.label and max(abs(g.x0 - w.x0), abs(g.y0 - w.y0), abs(g.x1 - w.x1),
                                            abs(g.y1 - w.y1)) <= tolerance for g in got) for w in wanted]
    return sum(found) / max(1, len(found))


def _exif_page(orientation: int) -> bytes:
    """The sample page as a JPEG stored sideways or mirrored, with the EXIF orientation that turns it upright."""
    from ocr_assets_tests.test_exif_orientation import exif_image

    return exif_image(orientation, picture=render_page(0)[0].resize((637, 825)))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_fast_tensor_matches_the_image_processor(backend, page_bytes, fmt):
    data = page_bytes[fmt]
    (prepared,) = backend.prepare([data])
    ours = backend._batch_tensor([prepared])
    theirs = _processor_pixels(data)
    assert ours.shape == theirs.shape == (1, 3, 800, 800)
    assert (ours - theirs).abs().mean().item() <= 0.001  # the README states this bound
    # the same detections from either input
    with torch.inference_mode():
        from_processor = backend.model(pixel_values=theirs)
    expected = backend._postprocess(from_processor, [prepared])[0]
    got = backend.detect([prepared])[0]
    assert len(got) > 0
    assert _boxes(got) == _boxes(expected)


def test_selection_and_order_match_transformers_post_processing(backend, page_bytes):
    data = page_bytes["png"]
    pixels = _processor_pixels(data)
    with torch.inference_mode():
        outputs = backend.model(pixel_values=pixels)
    h, w = render_page(0)[0].size[::-1]
    reference = PPDocLayoutV3ImageProcessor().post_process_object_detection(
        outputs, threshold=0.3, target_sizes=[(h, w)]
    )[0]
    (raw,) = post.select(outputs.logits, outputs.pred_boxes, outputs.order_logits, [(h, w)],
                         torch.full((len(LABELS),), 0.3))
    assert len(raw.scores) == len(reference["scores"]) > 10
    # a query can pass under two labels with one rank: compare rows sorted by (rank, label)
    ours = sorted(zip(raw.ranks.tolist(), raw.labels.tolist(), raw.scores.tolist(), raw.boxes.tolist()))
    theirs = sorted(zip(reference["order_seq"].tolist(), reference["labels"].tolist(),
                        reference["scores"].tolist(), reference["boxes"].tolist()))
    assert [r[:2] for r in ours] == [r[:2] for r in theirs]
    assert np.allclose([r[2] for r in ours], [r[2] for r in theirs], atol=1e-6)
    assert np.allclose([r[3] for r in ours], [r[3] for r in theirs], atol=1e-2)


def test_boxes_are_in_page_pixels(backend, page_bytes):
    from ocr_assets.backends.layout.base import PreparedPage

    (page,) = backend.prepare([page_bytes["png"]])
    assert (page.height, page.width) == (1650, 1275)
    # the same model input, said to come from a page twice the size: every box doubles
    double = PreparedPage(page.height * 2, page.width * 2, page.inputs)
    full, big = backend.detect([page, double])
    assert full and len(full) == len(big)
    for d, b in zip(full, big):
        assert d.label == b.label and 0 <= d.x0 < d.x1 <= 1275 and 0 <= d.y0 < d.y1 <= 1650
        assert max(abs(2 * d.x0 - b.x0), abs(2 * d.y0 - b.y0), abs(2 * d.x1 - b.x1), abs(2 * d.y1 - b.y1)) <= 2
    # a decoded page of another size: boxes stay within it
    image = cv2.imdecode(np.frombuffer(page_bytes["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(image, (600, 777), interpolation=cv2.INTER_AREA)
    assert all(0 <= d.x0 < d.x1 <= 600 and 0 <= d.y0 < d.y1 <= 777 for d in backend.detect([small])[0])


def test_detections_come_in_the_models_reading_order(backend, page_bytes):
    (prepared,) = backend.prepare([page_bytes["png"]])
    dets = backend.detect([prepared])[0]
    ranks = [d.order for d in dets]
    assert None not in ranks and ranks == sorted(ranks) and len(set(ranks)) == len(ranks)


def test_reading_ranks_match_transformers():
    logits = torch.randn(2, 30, 30)
    expected = PPDocLayoutV3ImageProcessor()._get_order_seqs(logits)
    assert torch.equal(post.reading_ranks(logits), expected)


def test_thresholds_global_and_per_label(checkpoint, backend, page_bytes):
    (prepared,) = backend.prepare([page_bytes["png"]])
    base = backend.detect([prepared])[0]
    assert all(d.score >= 0.3 for d in base)
    labels = {d.label for d in base}
    dropped = sorted(labels)[0]
    strict = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32",
                                  threshold_by_label={dropped: 0.99})
    assert dropped not in {d.label for d in strict.detect([prepared])[0]}
    none = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32", conf_threshold=0.99)
    assert none.detect([prepared])[0] == []
    with pytest.raises(ValueError, match="no_such_label"):
        PPDocLayoutV3Backend(checkpoint, device="cpu", threshold_by_label={"no_such_label": 0.5})


def _raw(rows) -> post.RawDetections:
    """RawDetections from (label, score, x0, y0, x1, y1, rank) rows."""
    a = np.array([[LABELS.index(r[0]), *r[1:]] for r in rows], dtype=np.float64)
    return post.RawDetections(a[:, 0].astype(np.int64), a[:, 1], a[:, 2:6], a[:, 6].astype(np.int64),
                              np.arange(len(rows)))


def test_nms_within_and_across_classes():
    raw = _raw([
        ("text", 0.9, 100, 100, 500, 200, 0),
        ("text", 0.8, 105, 102, 505, 204, 1),  # same class, IoU ~0.95: suppressed
        ("table", 0.7, 105, 102, 505, 204, 2),  # other class, IoU ~0.95 < 0.98: kept
        ("table", 0.6, 100, 100, 500, 200, 3),  # other class, identical box to the text: suppressed
        ("text", 0.5, 100, 300, 500, 400, 4),  # elsewhere: kept
    ])
    assert sorted(post.nms(raw).tolist()) == [0, 2, 4]


def test_merge_modes_large_and_small():
    labels = np.array([LABELS.index(x) for x in ("text", "text", "image", "reference")])
    boxes = np.array([
        [0, 0, 1000, 1000],  # a big text box
        [100, 100, 200, 200],  # text inside it
        [300, 300, 400, 400],  # an image inside it: protected
        [1200, 0, 1900, 900],  # a reference block beside it
    ], dtype=np.float64)
    protected = np.array([x in post.NEVER_CONTAINED for x in LABELS])
    modes = np.array([("union", "large", "small").index(m) for m in post.default_merge_modes(LABELS).values()])
    # large (text): the box inside the big text goes, the protected image stays
    assert post.merge_keep(labels, boxes, modes, protected).tolist() == [True, False, True, True]
    # small (reference): a box holding a reference box goes, the reference stays
    only_small = np.array([2 if x == "reference" else 0 for x in LABELS])
    holder = np.array([[1100, 0, 2000, 1000], [1200, 0, 1900, 900]], dtype=np.float64)
    keep = post.merge_keep(labels[[0, 3]], holder, only_small, protected)
    assert keep.tolist() == [False, True]
    # union: both stay
    assert post.merge_keep(labels, boxes, np.zeros(len(LABELS), dtype=int), protected).all()


def test_postprocessing_matches_glm_ocr():
    """Our NMS, image filter, merge modes and order against the GLM-OCR SDK's own function."""
    glm = pytest.importorskip("glmocr.utils.layout_postprocess_utils")
    rng = np.random.default_rng(0)
    id2label = dict(enumerate(LABELS))
    protected = np.array([x in post.NEVER_CONTAINED for x in LABELS])
    modes = np.array([("union", "large", "small").index(m) for m in post.default_merge_modes(LABELS).values()])
    for trial in range(30):
        n = int(rng.integers(2, 40))
        xy = rng.uniform(0, 1000, size=(n, 2))
        wh = rng.uniform(10, 600, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        boxes[rng.random(n) < 0.3] = boxes[0] + rng.uniform(-5, 5, 4)  # near-duplicates
        raw = post.RawDetections(rng.integers(0, len(LABELS), n), rng.uniform(0.3, 1, n), boxes,
                                 rng.permutation(300)[:n] + 1, np.arange(n))
        reference = glm.apply_layout_postprocess(
            [{"scores": torch.tensor(raw.scores), "labels": torch.tensor(raw.labels),
              "boxes": torch.tensor(raw.boxes), "order_seq": torch.tensor(raw.ranks)}],
            id2label, [(1275, 1650)], layout_nms=True, layout_unclip_ratio=[1.0, 1.0],
            layout_merge_bboxes_mode={i: m for i, m in enumerate(post.default_merge_modes(LABELS).values())},
        )[0]
        keep = post.nms(raw)
        keep = keep[~post.page_image_too_large(raw.labels[keep], raw.boxes[keep], LABELS.index("image"), 1650, 1275)]
        keep = keep[post.merge_keep(raw.labels[keep], raw.boxes[keep], modes, protected)]
        keep = keep[np.argsort(raw.ranks[keep], kind="stable")]
        ours = np.clip(raw.boxes[keep], 0, [1275, 1650, 1275, 1650]).astype(np.int64)
        ours_rows = [(LABELS[raw.labels[k]], *b) for k, b in zip(keep, ours.tolist()) if b[0] < b[2] and b[1] < b[3]]
        assert ours_rows == [(r["label"], *r["coordinate"]) for r in reference], trial


def test_polygons_only_when_asked(checkpoint, page_bytes):
    fast = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32")
    slow = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32", keep_polygons=True)
    (prepared,) = fast.prepare([page_bytes["png"]])
    plain, shaped = fast.detect([prepared])[0], slow.detect([prepared])[0]
    assert all(d.polygon is None for d in plain)
    assert _boxes(plain) == _boxes(shaped)
    for d in shaped:
        xy = np.array(d.polygon).reshape(-1, 2)
        assert len(xy) >= 4
        assert (xy[:, 0] >= d.x0 - 1).all() and (xy[:, 0] <= d.x1 + 1).all()
        assert (xy[:, 1] >= d.y0 - 1).all() and (xy[:, 1] <= d.y1 + 1).all()
    table, _ = run_layout(_pages_table(["p0"]), MemoryShard([page_bytes["png"]]), slow, recover_text=False)
    assert "polygon" in table.column_names
    assert all(p for p in table.column("polygon").to_pylist())
    table, _ = run_layout(_pages_table(["p0"]), MemoryShard([page_bytes["png"]]), fast, recover_text=False)
    assert "polygon" not in table.column_names


def _pages_table(page_ids):
    import pyarrow as pa

    n = len(page_ids)
    return pa.table({"page_id": page_ids, "row": list(range(n)), "page": [0] * n, "status": ["ok"] * n})


def test_run_layout_maps_labels_to_tasks_and_reports_its_parts(checkpoint, page_bytes):
    backend = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32", batch_size=2)
    blobs = [page_bytes["png"], page_bytes["jpeg"], b"not an image"]
    report = StageReport()
    table, report = run_layout(_pages_table(["a", "b", "c"]), MemoryShard(blobs), backend, report=report)
    rows = table.to_pylist()
    (bad,) = [r for r in rows if r["status"] != "ok"]
    assert bad["page_id"] == "c" and bad["status"] == "error" and "decoded" in bad["error"]
    found = sum(len(d) for d in backend.detect(backend.prepare(blobs[:2])))
    assert found > 0 and report.counts["abandoned_regions"] > 0  # the random model finds footers too
    for r in rows:
        if r["source"] == "model":
            task = config.PP_DOCLAYOUT_V3_LABEL_TASKS[r["label"]]
            assert task != config.ABANDON and r["task"] == task
    # with nothing abandoned, both good pages have regions
    backend.label_tasks = {label: "text" for label in LABELS}
    table, _ = run_layout(_pages_table(["a", "b", "c"]), MemoryShard(blobs), backend)
    assert {r["page_id"] for r in table.to_pylist() if r["status"] == "ok"} == {"a", "b"}
    assert {"decode", "preprocess", "inference", "postprocess"} <= set(report.parts)
    assert report.info["device"] == "cpu" and report.info["dtype"] == "float32"
    assert report.info["model"] == checkpoint and report.info["batch_size"] == 2


def test_recovery_applies_to_this_backend(checkpoint, page_bytes):
    # nothing passes the threshold, so every line of text must come back as recovered regions
    blind = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32", conf_threshold=0.99)
    table, report = run_layout(_pages_table(["a"]), MemoryShard([page_bytes["png"]]), blind)
    sources = set(table.column("source").to_pylist())
    assert sources == {"recovered"} and report.counts["recovered_regions"] >= 5


def test_configuration_errors_name_the_setting(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=config.ENV_LAYOUT_MODEL):
        create_layout_backend("pp-doclayout-v3", model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=config.ENV_LAYOUT_MODEL):
        create_layout_backend("pp-doclayout-v3", model=None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=f"{config.ENV_LAYOUT_MODEL}.*offline"):
        create_layout_backend("pp-doclayout-v3", model="PaddlePaddle/PP-DocLayoutV3_safetensors")
    with pytest.raises(ValueError, match=config.ENV_DEVICE):
        create_layout_backend("pp-doclayout-v3", model=str(tmp_path), device="tpu")


def test_cpu_default_dtype_and_batch(checkpoint, tmp_path, monkeypatch):
    """On this CPU, ``auto`` is fp32 without bf16 instructions; with them, the faster of the two as
    measured here at load (the measurement itself: test_precision.py)."""
    from ocr_assets.backends.layout import precision

    monkeypatch.setenv(config.ENV_CACHE_DIR, str(tmp_path))
    auto = PPDocLayoutV3Backend(checkpoint, device="cpu")
    assert auto.batch_size == 1
    cache = tmp_path / precision.CACHE_FILE
    if precision.cpu_has_bf16():
        (entry,) = json.loads(cache.read_text()).values()
        assert auto.dtype is precision.faster_dtype(entry["fp32_seconds"], entry["bf16_seconds"])
        assert auto.info["dtype"] == entry["dtype"] and auto.info["dtype_reason"].startswith("measured: ")
    else:
        assert auto.info["dtype"] == "float32" and auto.info["dtype_reason"] == "no bf16 instructions"
        assert not cache.exists()


def test_gpu_memory_share_and_batch(checkpoint):
    from ocr_assets.backends.layout.pp_doclayout_v3 import default_batch_size

    assert default_batch_size(torch.device("cuda"), shared=False) == 32
    assert default_batch_size(torch.device("cuda"), shared=True) == 8  # leaves a shared vLLM room to decode
    assert default_batch_size(torch.device("cpu"), shared=True) == default_batch_size(torch.device("cpu")) == 1
    # ignored on the CPU, but a share that is no share is refused, naming the setting
    cpu = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32", gpu_memory=0.3)
    assert cpu.batch_size == 1 and "gpu_memory" not in cpu.info
    for bad in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=config.ENV_LAYOUT_GPU_MEMORY):
            PPDocLayoutV3Backend(checkpoint, device="cpu", gpu_memory=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_share_caps_the_process(checkpoint, page_bytes):
    gpu = PPDocLayoutV3Backend(checkpoint, device="cuda", gpu_memory=0.25)
    try:
        assert gpu.batch_size == 8 and gpu.info["gpu_memory"] == 0.25
        assert gpu.info["dtype_reason"] in ("GPU with bf16", "GPU without bf16: fp16, a batch with non-finite "
                                            "outputs rerun in fp32")
        assert gpu.detect(gpu.prepare([page_bytes["png"]]))[0]
        free, total = torch.cuda.mem_get_info(gpu.device)
        with pytest.raises(torch.OutOfMemoryError):  # more than a quarter of the GPU is refused
            torch.empty(int(total * 0.3), dtype=torch.uint8, device=gpu.device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, gpu.device.index or 0)


def test_layout_asset_with_pp_doclayout_v3(checkpoint, small_dataset, tmp_path):
    """The layout asset in a real Dagster instance, with the model selected through the resource."""
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        key = DatasetResource(path=small_dataset).shards()[0].key
        instance.add_dynamic_partitions(SHARDS, [key])
        resources = {
            "dataset": DatasetResource(path=small_dataset),
            "storage": StorageResource(root=str(tmp_path / "out")),
            # the random model's boxes are mostly footers: read every label as text here
            "layout_model": LayoutResource(model=checkpoint, device="cpu",
                                           label_tasks=json.dumps({label: "text" for label in LABELS})),
            "recognizer": RecognizerResource(),
        }
        result = dg.materialize(ASSETS[:2], partition_key=key, instance=instance, resources=resources)
        assert result.success
        (event,) = [e for e in result.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == "layout"]
        meta = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    for part in ("decode", "preprocess", "inference", "postprocess"):
        assert meta[f"{part}_seconds"] > 0
    assert meta["backend"] == "pp-doclayout-v3" and meta["device"] == "cpu" and meta["model"] == checkpoint
    assert meta["batch_size"] == 1 and meta["dtype"] in ("bfloat16", "float32")
    assert meta["model_load_seconds"] >= 0
    table = pq.read_table(tmp_path / "out" / "layout" / f"{key}.parquet")
    assert table.num_rows > 0 and set(table.column("status").to_pylist()) == {"ok"}


def test_cli_runs_layout_with_the_model_from_the_environment(checkpoint, small_dataset, tmp_path):
    from ocr_assets_tests.test_cli import _run

    done = _run(["run", "--select", "pages,layout", "--partition", "data-00000-of-00002"], tmp_path,
                OCR_ASSETS_DATASET=small_dataset, OCR_ASSETS_LAYOUT_MODEL=checkpoint,
                OCR_ASSETS_DEVICE="cpu", DAGSTER_HOME=str(tmp_path / "home"),
                OCR_ASSETS_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ocr_data" / "layout" / "data-00000-of-00002.parquet").exists()
    missing = _run(["run", "--select", "pages,layout", "--partition", "data-00000-of-00002"], tmp_path,
                   OCR_ASSETS_DATASET=small_dataset, OCR_ASSETS_LAYOUT_MODEL=str(tmp_path / "no-model"),
                   DAGSTER_HOME=str(tmp_path / "home"))
    assert missing.returncode == 1 and "OCR_ASSETS_LAYOUT_MODEL" in missing.stderr


@pytest.fixture
def unturned(backend, monkeypatch) -> PPDocLayoutV3Backend:
    """The backend with orientation and deskew off: pages keep the EXIF-upright frame."""
    monkeypatch.setattr(backend, "turner", PageTurner(orientation=False, deskew=False))
    return backend


def test_the_device_decode_path_turns_pages_upright_and_keeps_no_full_page(unturned):
    """The nvJPEG path's code, run with torchvision's CPU JPEG decoder: EXIF applied, a bad JPEG alone."""
    backend = unturned
    blobs = [_exif_page(6), b"\xff\xd8\xff not a jpeg", _exif_page(1), _exif_page(7)]
    out = backend._prepare_jpegs_on_device(blobs)
    assert out[1] is None  # left to cv2, which gives the page its reason; the others decode
    for blob, page in zip(blobs[::2] + blobs[3:], out[::2] + out[3:]):
        upright = decode_page(blob)
        assert (page.height, page.width) == upright.shape[:2] == read_header(blob)[2:0:-1]
        # the host copy is gray, made at once: no lazy reference keeps the full-resolution tensor
        assert isinstance(page.host, np.ndarray) and page.host.shape == upright.shape[:2]
        gray = cv2.cvtColor(upright, cv2.COLOR_BGR2GRAY).astype(np.float32)
        assert np.abs(page.host.astype(np.float32) - gray).mean() <= 2.0
        (host,) = backend.prepare([blob])  # the cv2 path's model input
        assert (page.inputs.permute(1, 2, 0).float() - torch.from_numpy(host.inputs).float()).abs().mean() <= 2.0
    assert (out[0].height, out[0].width) == (637, 825)  # orientation 6: the stored 637x825 page, turned


def test_a_page_already_decoded_is_prepared_as_its_png(backend, page_bytes):
    """A rendered PDF page arrives as a BGR array: taken as it is, the model input is the PNG's."""
    array = decode_page(page_bytes["png"])
    from_array, from_png = backend.prepare([array, page_bytes["png"]])
    assert (from_array.height, from_array.width) == (from_png.height, from_png.width) == array.shape[:2]
    np.testing.assert_array_equal(from_array.inputs, from_png.inputs)
    assert from_array.image is array  # text recovery reads the page's own pixels, not a copy


def test_cpu_prepare_gives_the_pages_table_size_for_a_turned_page(unturned):
    backend = unturned
    for orientation in (1, 3, 6, 8):
        data = _exif_page(orientation)
        (page,) = backend.prepare([data])
        width, height = read_header(data)[1:]
        assert (page.height, page.width) == (height, width) == decode_page(data).shape[:2]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_nvjpeg_prepare_matches_the_processor(checkpoint, page_bytes):
    gpu = PPDocLayoutV3Backend(checkpoint, device="cuda")
    for fmt in ("jpeg", "png"):
        (prepared,) = gpu.prepare([page_bytes[fmt]])
        assert isinstance(prepared.inputs, torch.Tensor) and prepared.inputs.is_cuda
        ours = gpu._batch_tensor([prepared]).cpu()
        assert (ours - _processor_pixels(page_bytes[fmt])).abs().mean().item() <= 0.01  # the README's bound
        assert prepared.image.shape[:2] == (prepared.height, prepared.width)


@cuda
@pytest.mark.parametrize("orientation", range(1, 9))
def test_nvjpeg_turns_an_exif_page_as_cv2_does(checkpoint, backend, orientation):
    gpu = PPDocLayoutV3Backend(checkpoint, device="cuda")
    data = _exif_page(orientation)
    (page,) = gpu.prepare([data])
    (host,) = backend.prepare([data])
    assert page.turn == host.turn  # decided on near-identical small copies, whichever decoder
    upright = turn_page(decode_page(data), host.turn)
    assert page.inputs.is_cuda and (page.height, page.width) == (host.height, host.width) == upright.shape[:2]
    gray = cv2.cvtColor(upright, cv2.COLOR_BGR2GRAY).astype(np.float32)
    assert np.abs(page.image.astype(np.float32) - gray).mean() <= 2.0
    assert (page.inputs.permute(1, 2, 0).cpu().float() - torch.from_numpy(host.inputs).float()).abs().mean() <= 2.0


@cuda
def test_gpu_prepare_takes_decoded_pages_through_the_host_path(checkpoint, page_bytes):
    gpu = PPDocLayoutV3Backend(checkpoint, device="cuda", batch_size=3)
    array = decode_page(page_bytes["jpeg"])
    from_array, from_png, from_jpeg = gpu.prepare([array, page_bytes["png"], page_bytes["jpeg"]])
    assert all(p.inputs.is_cuda for p in (from_array, from_png, from_jpeg))
    assert from_array.image is array and from_jpeg.image.ndim == 2  # host path keeps BGR; nvJPEG, gray
    host = PPDocLayoutV3Backend(checkpoint, device="cpu", dtype="float32")
    (expected,) = host.prepare([array])
    assert torch.equal(from_array.inputs.permute(1, 2, 0).cpu(), torch.from_numpy(expected.inputs))


@cuda
def test_gpu_float32_finds_the_cpu_detections(checkpoint, backend, page_bytes, monkeypatch):
    # TF32 convolutions would make the GPU's float32 a different computation from the CPU's
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    gpu = PPDocLayoutV3Backend(checkpoint, device="cuda", dtype="float32", batch_size=2)
    png, jpeg = gpu.detect(gpu.prepare([page_bytes["png"], page_bytes["jpeg"]]))
    cpu_png, cpu_jpeg = backend.detect(backend.prepare([page_bytes["png"], page_bytes["jpeg"]]))
    assert cpu_png and cpu_jpeg
    # PNG: cv2 decodes and resizes on the host either way: the same input, the same detections
    assert [d.label for d in png] == [d.label for d in cpu_png]
    assert _share_found(cpu_png, png, 2) == 1.0
    assert all(abs(g.score - c.score) <= 1e-3 for g, c in zip(png, cpu_png))
    # JPEG: nvJPEG and the GPU resize give an input within 0.01 of the CPU's: most boxes stay
    assert jpeg and _share_found(cpu_jpeg, jpeg, 8) >= 0.5


@cuda
def test_gpu_autocast_detects_in_page_pixels(checkpoint, page_bytes):
    gpu = PPDocLayoutV3Backend(checkpoint, device="cuda", batch_size=4)
    assert gpu.info["dtype"] in ("bfloat16", "float16")
    prepared = gpu.prepare([page_bytes["jpeg"], page_bytes["png"], b"broken", page_bytes["jpeg"]])
    assert isinstance(prepared[2], str)
    pages = [p for p in prepared if not isinstance(p, str)]
    found = gpu.detect(pages)
    assert len(found) == 3 and all(found)  # every page has detections
    for dets, page in zip(found, pages):
        assert all(0 <= d.x0 < d.x1 <= page.width and 0 <= d.y0 < d.y1 <= page.height for d in dets)
    # the same page twice in one batch: the same detections
    assert _share_found(found[0], found[2], 2) == 1.0 and _share_found(found[2], found[0], 2) == 1.0


def test_both_prepare_paths_turn_a_sideways_page_upright(backend):
    """A page stored a quarter turn off: the host path and the device path's code (torchvision's CPU
    JPEG decoder, the turn on CPU tensors) find the same turn and give the same upright page."""
    page = render_page(2)[0]
    for rotation, stored in ((90, page.transpose(Image.Transpose.ROTATE_90)),
                             (270, page.transpose(Image.Transpose.ROTATE_270)),
                             (180, page.transpose(Image.Transpose.ROTATE_180))):
        data = encode_page(stored, 1)  # odd index: JPEG
        (host,) = backend.prepare([data])
        (device,) = backend._prepare_jpegs_on_device([data])
        assert host.turn.rotation == device.turn.rotation == rotation and host.turn.skew == 0.0
        assert (host.height, host.width) == (device.height, device.width) == (page.height, page.width)
        upright = cv2.cvtColor(np.asarray(page), cv2.COLOR_RGB2GRAY).astype(np.float32)
        assert np.abs(cv2.cvtColor(host.image, cv2.COLOR_BGR2GRAY) - upright).mean() <= 3.0
        assert np.abs(device.image.astype(np.float32) - upright).mean() <= 3.0
