"""The layout model's precision: bf16 on a CPU only where measured faster, cached per machine; fp16's
non-finite batches run again in fp32.

A randomly initialised PP-DocLayoutV3 (the real architecture) with a 128×128 input keeps the
real forward passes short; most tests inject a fake timer and count its calls instead of timing.
The cache lives in a temporary folder (OCR_ASSETS_CACHE_DIR), never in the user's.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ocr_assets import config
from ocr_assets.backends.layout import precision
from ocr_assets.backends.layout.pp_doclayout_v3 import PPDocLayoutV3Backend, write_random_checkpoint
from ocr_assets.sample import encode_page, render_page
from ocr_assets.timing import StageReport

FP32, BF16 = torch.float32, torch.bfloat16


def _with_input_size(folder, size: int):
    file = folder / "preprocessor_config.json"
    cfg = json.loads(file.read_text())
    cfg["size"] = {"height": size, "width": size}
    file.write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """The real architecture at a 128×128 input, so a real forward pass takes a fraction of a second."""
    return str(_with_input_size(write_random_checkpoint(tmp_path_factory.mktemp("tiny")), 128))


@pytest.fixture(scope="module")
def model(tiny):
    from ocr_assets.backends.layout.pp_doclayout_v3 import load_model

    return load_model(tiny).to(memory_format=torch.channels_last)


@pytest.fixture(autouse=True)
def cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_CACHE_DIR, str(tmp_path / "cache"))
    return tmp_path / "cache" / precision.CACHE_FILE


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU said to have bf16 instructions, so that ``auto`` measures."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)


class FakeTimer:
    """Seconds per pass by dtype (a list: one value per call, the last repeated), and every call seen."""

    def __init__(self, fp32, bf16) -> None:
        self.seconds = {FP32: fp32 if isinstance(fp32, list) else [fp32],
                        BF16: bf16 if isinstance(bf16, list) else [bf16]}
        self.calls: list[tuple[torch.dtype, tuple]] = []

    def __call__(self, model, pixels, dtype) -> float:
        n = sum(d is dtype for d, _ in self.calls)
        self.calls.append((dtype, tuple(pixels.shape)))
        values = self.seconds[dtype]
        return values[min(n, len(values) - 1)]


@pytest.fixture
def timer(monkeypatch) -> FakeTimer:
    """The timing function the backend uses, replaced: bf16 0.5 s, fp32 1.0 s per pass."""
    fake = FakeTimer(1.0, 0.5)
    monkeypatch.setattr(precision, "forward_seconds", fake)
    return fake


def _entries(cache_file) -> dict:
    return json.loads(cache_file.read_text())


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [
    (1.0, 0.5, BF16),  # bf16 faster
    (1.0, 1.3, FP32),  # fp32 faster
    (1.0, 1.0, FP32),  # a tie keeps fp32
    (1.0, 0.97, FP32),  # 3% is within noise: fp32
    # the median decides: one slow bf16 pass and a slow warm-up do not
    ([9.0, 1.0], [0.1, 0.6, 5.0, 0.6], BF16),
])
def test_the_faster_precision_by_median_is_chosen(model, bf16_cpu, cache_file, fp32, bf16, expected):
    fake = FakeTimer(fp32, bf16)
    choice = precision.choose_dtype("auto", torch.device("cpu"), model, batch_size=2, input_size=(128, 128),
                                    timer=fake)
    assert choice.dtype is expected and choice.reason.startswith("measured: bf16 ")
    # one warm-up pass each, then three rounds, interleaved, alternating which goes first
    assert [d for d, _ in fake.calls] == [FP32, BF16, FP32, BF16, BF16, FP32, FP32, BF16]
    # the batch the backend runs, channels first, at the model's input size
    assert {shape for _, shape in fake.calls} == {(2, 3, 128, 128)}
    (entry,) = _entries(cache_file).values()
    assert entry["dtype"] == str(expected).removeprefix("torch.") and entry["batch_size"] == 2


def test_a_real_measurement_times_the_loaded_model(tiny, bf16_cpu, cache_file, monkeypatch):
    real = precision.forward_seconds
    seen = []

    def counted(model, pixels, dtype):
        seen.append((dtype, pixels.is_contiguous(memory_format=torch.channels_last)))
        return real(model, pixels, dtype)

    monkeypatch.setattr(precision, "forward_seconds", counted)
    monkeypatch.setattr(precision, "ROUNDS", 1)  # bf16 without bf16 instructions is slow: few passes
    backend = PPDocLayoutV3Backend(tiny, device="cpu")
    assert [d for d, _ in seen] == [FP32, BF16, FP32, BF16] and all(last for _, last in seen)
    (entry,) = _entries(cache_file).values()
    assert entry["fp32_seconds"] > 0 and entry["bf16_seconds"] > 0
    assert backend.info["dtype"] == entry["dtype"]
    assert backend.dtype is precision.faster_dtype(entry["fp32_seconds"], entry["bf16_seconds"])
    assert backend.info["dtype_reason"].startswith("measured: ")


def test_the_cache_is_written_then_read_without_measuring(tiny, bf16_cpu, timer, cache_file):
    first = PPDocLayoutV3Backend(tiny, device="cpu")
    assert first.dtype is BF16 and len(timer.calls) == 8
    assert first.info["dtype_reason"] == "measured: bf16 0.50 s, fp32 1.00 s per pass " \
        f"(batch 1, {torch.get_num_threads()} threads)"
    (entry,) = _entries(cache_file).values()
    assert entry["dtype"] == "bfloat16" and entry["torch"] == torch.__version__
    second = PPDocLayoutV3Backend(tiny, device="cpu")
    assert len(timer.calls) == 8  # no pass timed again
    assert second.dtype is BF16 and second.info["dtype_reason"].startswith("cached measurement: bf16 0.50 s")


def test_a_different_key_measures_again(tiny, bf16_cpu, timer, cache_file, tmp_path):
    PPDocLayoutV3Backend(tiny, device="cpu")
    assert len(timer.calls) == 8
    # another batch size
    PPDocLayoutV3Backend(tiny, device="cpu", batch_size=2)
    assert len(timer.calls) == 16
    # another input size
    other = _with_input_size(shutil.copytree(tiny, tmp_path / "other"), 160)
    PPDocLayoutV3Backend(str(other), device="cpu")
    assert len(timer.calls) == 24 and len(_entries(cache_file)) == 3
    # each of the three read back from the cache
    for options in ({}, {"batch_size": 2}):
        PPDocLayoutV3Backend(tiny, device="cpu", **options)
    PPDocLayoutV3Backend(str(other), device="cpu")
    assert len(timer.calls) == 24


def test_the_key_follows_the_machine_torch_and_threads(model, monkeypatch):
    key = precision.cache_key(model, 1, (128, 128))
    assert precision.cache_key(model, 1, (128, 128)) == key
    assert precision.cache_key(model, 2, (128, 128)) != key
    assert precision.cache_key(model, 1, (160, 128)) != key
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 97)
        assert precision.cache_key(model, 1, (128, 128)) != key
    with monkeypatch.context() as m:
        m.setattr(precision, "cpu_flags", lambda: "avx512f avx512_bf16")
        assert precision.cache_key(model, 1, (128, 128)) != key
    with monkeypatch.context() as m:
        m.setattr(precision, "cpu_name", lambda: "Another CPU")
        assert precision.cache_key(model, 1, (128, 128)) != key
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.1")
        assert precision.cache_key(model, 1, (128, 128)) != key


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "", '{"KEY": {"dtype": "float64"}}'])
def test_a_broken_cache_file_is_measured_again_and_rewritten(model, bf16_cpu, cache_file, content):
    key = precision.cache_key(model, 1, (128, 128))
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(content.replace("KEY", key))
    fake = FakeTimer(1.0, 0.5)
    choice = precision.choose_dtype("auto", torch.device("cpu"), model, batch_size=1, input_size=(128, 128),
                                    timer=fake)
    assert choice.dtype is BF16 and choice.reason.startswith("measured") and len(fake.calls) == 8
    assert _entries(cache_file)[key]["dtype"] == "bfloat16"


def test_bf16_that_fails_when_measured_means_fp32(model, bf16_cpu, cache_file):
    def failing(model, pixels, dtype):
        if dtype is BF16:
            raise RuntimeError("no bf16 kernel for this op")
        return 1.0

    choice = precision.choose_dtype("auto", torch.device("cpu"), model, batch_size=1, input_size=(128, 128),
                                    timer=failing)
    assert choice.dtype is FP32 and "no bf16 kernel" in choice.reason


def test_an_unwritable_cache_never_fails_the_load(tiny, bf16_cpu, timer, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(config.ENV_CACHE_DIR, str(blocker / "cache"))
    backend = PPDocLayoutV3Backend(tiny, device="cpu")
    assert backend.dtype is BF16
    assert "not cached" in backend.info["dtype_reason"] and config.ENV_CACHE_DIR in backend.info["dtype_reason"]


def test_without_bf16_instructions_fp32_and_no_measurement(tiny, timer, cache_file, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    backend = PPDocLayoutV3Backend(tiny, device="cpu")
    assert backend.dtype is FP32 and backend.info["dtype_reason"] == "no bf16 instructions"
    assert timer.calls == [] and not cache_file.exists()


def test_explicit_settings_are_obeyed_and_preflight_never_measures(tiny, bf16_cpu, timer, cache_file):
    from ocr_assets.backends.layout.pp_doclayout_v3 import resolve_device, resolve_dtype

    for setting, dtype in (("float32", FP32), ("bfloat16", BF16), (" BFloat16 ", BF16)):
        backend = PPDocLayoutV3Backend(tiny, device="cpu", dtype=setting)
        assert backend.dtype is dtype and backend.info["dtype_reason"] == f"set by {config.ENV_LAYOUT_DTYPE}"
    # what the resource's preflight calls: cheap, no model, no measurement
    assert resolve_dtype("auto", resolve_device("cpu")) is FP32
    assert timer.calls == [] and not cache_file.exists()
    for bad in ("float16", "float64"):
        with pytest.raises(ValueError, match=config.ENV_LAYOUT_DTYPE):
            PPDocLayoutV3Backend(tiny, device="cpu", dtype=bad)


def test_fp16_non_finite_outputs_run_again_in_fp32(tiny, monkeypatch):
    from ocr_assets.backends.layout import pp_postprocess as post

    half = PPDocLayoutV3Backend(tiny, device="cpu", dtype="float32")
    half.dtype = torch.float16  # what a GPU without bf16 gets: forced here, CPU autocast runs fp16 too
    pages = half.prepare([encode_page(render_page(0)[0], 0)])
    real = half.model.forward
    with torch.inference_mode():
        exact = real(pixel_values=half._batch_tensor(pages)).logits
    poisoned, selected = [], []

    def nan_once(*args, **kwargs):
        out = real(*args, **kwargs)
        if not poisoned:
            poisoned.append(torch.is_autocast_enabled("cpu"))
            out.logits[0, 0, 0] = float("nan")
        return out

    select = post.select
    monkeypatch.setattr(half.model, "forward", nan_once)
    monkeypatch.setattr(post, "select", lambda logits, *rest: selected.append(logits.clone()) or select(logits, *rest))
    report = StageReport()
    half.detect(pages, report)
    assert poisoned == [True]  # the poisoned pass ran under fp16 autocast
    assert report.counts["fp16_fallbacks"] == 1
    # post-processing got the fp32 pass's outputs, not the fp16 ones
    assert selected[0].dtype is torch.float32 and torch.allclose(selected[0], exact, atol=1e-5)
    half.detect(pages, report)  # finite this time: the fp16 outputs are used, no fallback counted
    assert report.counts["fp16_fallbacks"] == 1 and selected[1].dtype is torch.float16
    clean = StageReport()
    half.detect(pages, clean)
    assert clean.counts == {"fp16_fallbacks": 0}  # present whenever the model runs in fp16
    half.dtype = torch.float32
    half.detect(pages, fp32 := StageReport())
    assert "fp16_fallbacks" not in fp32.counts


def test_the_finite_check_covers_boxes_too(model):
    from types import SimpleNamespace

    def fake(pixel_values):
        boxes = torch.zeros(1, 4, 4)
        boxes[0, 0, 0] = float("inf") if len(calls) == 0 else 0.5
        calls.append(torch.is_autocast_enabled("cpu"))
        return SimpleNamespace(logits=torch.zeros(1, 4, 3), pred_boxes=boxes)

    calls: list[bool] = []
    report = StageReport()
    out = precision.checked_forward(fake, torch.zeros(1, 3, 8, 8), torch.float16, report)
    assert calls == [True, False] and report.counts["fp16_fallbacks"] == 1
    assert torch.isfinite(out.pred_boxes).all()
    calls.clear()
    precision.checked_forward(fake, torch.zeros(1, 3, 8, 8), torch.bfloat16, report)
    assert calls == [True] and report.counts["fp16_fallbacks"] == 1  # only fp16 is checked
