"""A confidence on every region and page: the local models' line scores, a VLM's token
log-probabilities over real HTTP, the cache, `suspect` pages in documents, and the check on their rate."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow as pa
import pytest

from ocr_assets import checks, config
from ocr_assets.backends.recognition.base import Crop, Recognized
from ocr_assets.backends.recognition.openai_replies import token_confidence
from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer
from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer
from ocr_assets.imaging import encode_image
from ocr_assets.recognition_cache import CACHE_KIND, RecognitionCache
from ocr_assets.schemas import CROPS, DOCUMENTS, LAYOUT, PAGES, RECOGNITION
from ocr_assets.serve import OcrServer, _error, local_answer
from ocr_assets.stages.documents import assemble_documents
from ocr_assets.stages.recognition import run_recognition
from ocr_assets.storage import ParquetStore
from ocr_assets_tests.test_recognition import LINE, PARAGRAPH, _f1, _render


def _crop(image: np.ndarray, task: str = "text") -> Crop:
    return Crop(task, encode_image(image), image.shape[1], image.shape[0])


CLEAN = _render([LINE])
UPSIDE_DOWN = np.ascontiguousarray(_render(PARAGRAPH)[::-1, ::-1])
NOISE = np.random.default_rng(0).integers(0, 256, (120, 600, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def recognizer() -> RapidOcrRecognizer:
    return RapidOcrRecognizer(batch_size=4)


@pytest.fixture(scope="module")
def served():
    """`ocr-assets serve`'s server, in process, on localhost, recording the requests it gets."""
    server = RecordingServer(answer=local_answer()).start()
    yield server
    server.shutdown()
    server.server_close()


class RecordingServer(OcrServer):
    def __init__(self, **kwargs):
        self.payloads: list[dict] = []
        super().__init__(**kwargs)

    def chat(self, payload):
        self.payloads.append(payload)
        return super().chat(payload)


def test_local_line_scores_give_clean_text_a_high_confidence_and_garbage_a_lower_one(recognizer):
    clean, upside_down, paragraph, noise = recognizer.recognize(
        [_crop(CLEAN), _crop(UPSIDE_DOWN), _crop(_render(PARAGRAPH), "table"), _crop(NOISE)])
    assert _f1(clean.text, LINE) >= 0.9 and clean.confidence > 0.95
    assert paragraph.confidence > 0.95
    # read upside down, the models still return text, but less sure of it (about 0.7 here)
    assert upside_down.text.strip() and _f1(upside_down.text, " ".join(PARAGRAPH)) < 0.5
    assert upside_down.confidence < 0.85 and upside_down.confidence < clean.confidence - 0.15
    assert (noise.status, noise.text, noise.confidence) == ("ok", "", None)  # nothing read: no confidence


def test_token_confidence_is_exp_of_the_mean_logprob():
    tokens = [{"token": "a", "logprob": math.log(0.01)}] + [{"token": "b", "logprob": 0.0}] * 19
    assert token_confidence({"content": tokens}) == pytest.approx(0.01 ** (1 / 20))
    assert token_confidence({"content": [{"token": "x", "logprob": -9999.0}]}) == pytest.approx(0.0, abs=1e-12)
    for nothing in (None, {}, {"content": None}, {"content": []}, {"content": [{"token": "x"}]}, "bad"):
        assert token_confidence(nothing) is None


def test_openai_recognizer_asks_for_logprobs_and_gets_the_local_confidence_back(recognizer, served):
    crops = [_crop(CLEAN), _crop(UPSIDE_DOWN), _crop(NOISE)]
    local = [recognizer.recognize([crop])[0] for crop in crops]  # as the server reads them: one at a time
    remote = OpenAIRecognizer(served.base_url, concurrency=2).recognize(crops)
    assert all(p.get("logprobs") is True for p in served.payloads[-3:])
    for here, there in zip(local, remote):
        assert there.status == "ok" and there.text == here.text
        if here.confidence is None:
            assert there.confidence is None
        else:  # every token carries ln(confidence): exp of their mean is the local confidence
            assert there.confidence == pytest.approx(here.confidence, abs=1e-6)
    assert remote[0].confidence > 0.95 and remote[1].confidence < 0.85


def test_a_server_without_logprobs_gives_no_confidence_not_an_error(recognizer):
    plain = OcrServer(answer=lambda image, prompt, max_tokens: "some text").start()  # text only: logprobs null
    try:
        (result,) = OpenAIRecognizer(plain.base_url).recognize([_crop(CLEAN)])
    finally:
        plain.shutdown()
        plain.server_close()
    assert (result.status, result.text, result.confidence) == ("ok", "some text", None)


class RefusesLogprobs(OcrServer):
    """A server that rejects the parameter, as some OpenAI-compatible servers do."""

    def chat(self, payload):
        if "logprobs" in payload:
            return _error(400, "logprobs is not supported by this server")
        return super().chat(payload)


class RefusesEverything(RefusesLogprobs):
    """A server that rejects every request as malformed (quoting it, logprobs and all)."""

    def chat(self, payload):
        return _error(400, f"invalid request: {json.dumps(payload)[:200]} logprobs")


def test_a_server_that_refuses_logprobs_is_asked_again_without_them():
    server = RefusesLogprobs(answer=lambda image, prompt, max_tokens: ("words", 0.9)).start()
    try:
        vlm = OpenAIRecognizer(server.base_url, concurrency=1, backoff_base=0.01)
        results = vlm.recognize([_crop(CLEAN), _crop(UPSIDE_DOWN)])
    finally:
        server.shutdown()
        server.server_close()
    assert [(r.status, r.text, r.confidence) for r in results] == [("ok", "words", None)] * 2
    assert vlm.ask_logprobs is False and vlm.run_metadata()["errors_logprobs_refused"] == 1
    assert not any(r.cacheable for r in results)  # no confidence, where the cache key promises one


def test_the_refusal_costs_no_attempt_and_a_bad_request_stays_an_error():
    server = RefusesLogprobs(answer=lambda image, prompt, max_tokens: ("words", 0.9)).start()
    try:
        once = OpenAIRecognizer(server.base_url, concurrency=1, max_attempts=1, backoff_base=0.01)
        (read,) = once.recognize([_crop(CLEAN)])
        # told not to ask: nothing refused, and the answers are cached under another key
        plain = OpenAIRecognizer(server.base_url, concurrency=1, logprobs=False, backoff_base=0.01)
        (cached,) = plain.recognize([_crop(CLEAN)])
    finally:
        server.shutdown()
        server.server_close()
    assert (read.status, read.text) == ("ok", "words")
    assert cached.cacheable and plain.run_metadata().get("errors_logprobs_refused", 0) == 0
    assert plain.cache_key(_crop(CLEAN)) != once.cache_key(_crop(CLEAN))
    server = RefusesEverything().start()
    try:
        vlm = OpenAIRecognizer(server.base_url, concurrency=1, max_attempts=2, backoff_base=0.01)
        (failed,) = vlm.recognize([_crop(CLEAN)])
    finally:
        server.shutdown()
        server.server_close()
    # a request the server refuses with or without logprobs: an error, and logprobs still asked
    assert failed.status == "error" and "400" in failed.error and vlm.ask_logprobs is True


class RefusesThenHangs(RefusesLogprobs):
    """Rejects logprobs, then says nothing to the request without them (a server going down)."""

    def chat(self, payload):
        if "logprobs" not in payload:
            time.sleep(1.0)
        return super().chat(payload)


def test_an_unanswered_probe_counts_as_an_attempt_and_the_read_ends():
    server = RefusesThenHangs(answer=lambda image, prompt, max_tokens: ("words", 0.9)).start()
    try:
        vlm = OpenAIRecognizer(server.base_url, concurrency=1, max_attempts=2, timeout=0.3, backoff_base=0.01)
        (result,) = vlm.recognize([_crop(CLEAN)])
    finally:
        server.shutdown()
        server.server_close()
    # each attempt: asked with logprobs (400), asked again without them (no answer in time)
    assert result.status == "error" and "0.3 s" in result.error
    assert vlm.run_metadata()["requests"] == 4 and vlm.ask_logprobs is True


def _crops_table(images: list[np.ndarray]) -> pa.Table:
    return pa.Table.from_pylist(
        [dict(page_id=f"p{i}", region=0, task="text", image=encode_image(image), format="png", width=image.shape[1],
              height=image.shape[0], status="ok", error=None) for i, image in enumerate(images)], schema=CROPS)


def test_the_stage_writes_confidence_and_the_cache_keeps_it(recognizer, tmp_path):
    store = ParquetStore(str(tmp_path))
    crops = _crops_table([CLEAN, UPSIDE_DOWN, NOISE])
    first, report = run_recognition(crops, recognizer, cache=RecognitionCache(store, "s"))
    assert first.schema == RECOGNITION
    conf = first.column("confidence").to_pylist()
    assert conf[0] > 0.95 and conf[1] < 0.85 and conf[2] is None
    weights = [sum(not c.isspace() for c in t) for t in first.column("text").to_pylist()]
    mean = (conf[0] * weights[0] + conf[1] * weights[1]) / (weights[0] + weights[1])
    assert report.info["mean_confidence"] == pytest.approx(mean, abs=1e-3)
    assert report.counts["confident_regions"] == 2

    again, report = run_recognition(crops, recognizer, cache=RecognitionCache(store, "s"))
    assert report.counts["cache_hits"] == 3
    assert again.column("confidence").to_pylist() == conf


def test_cache_segments_from_before_confidences_are_stale(tmp_path):
    store = ParquetStore(str(tmp_path))
    old = pa.table({"key": ["k0", "k1"], "text": ["old", "old"], "status": ["ok", "ok"], "error": [None, None]})
    store.append_segment(CACHE_KIND, "s", old)
    cache = RecognitionCache(store, "s")
    assert len(cache) == 0 and cache.get("k0") is None  # read again, not mixed in with a null confidence
    cache.put("k1", Recognized("new", cacheable=True, confidence=0.75))
    assert cache.compact() == (1, 0)
    assert len(store.segment_files(CACHE_KIND, "s")) == 1  # the stale segment is gone
    back = RecognitionCache(store, "s").get("k1")
    assert (back.text, back.confidence) == ("new", pytest.approx(0.75))


# -- documents --


def _docs_inputs(pages: list[tuple], regions: list[tuple], with_turns: bool = True):
    """pages: (page_id, row, page); regions: (page_id, region, text, confidence, source, rotation, skew,
    recognition status)."""
    page_table = pa.Table.from_pylist(
        [dict(page_id=p, shard="s", row=r, page=n, format="png", width=100, height=100, nbytes=1, status="ok",
              error=None) for p, r, n in pages], schema=PAGES)
    layout = pa.Table.from_pylist(
        [dict(page_id=p, region=i, label="text", task="text", score=0.9, x0=0, y0=0, x1=9, y1=9, source=source,
              rotation=rot, skew=skew, status="ok", error=None)
         for p, i, _, _, source, rot, skew, _ in regions], schema=LAYOUT)
    if not with_turns:  # a layout partition written before these columns existed
        layout = layout.drop_columns(["rotation", "skew"])
    recognition = pa.Table.from_pylist(
        [dict(page_id=p, region=i, task="text", text=text, confidence=conf, status=status,
              error="server timeout" if status == "error" else None)
         for p, i, text, conf, _, _, _, status in regions], schema=RECOGNITION)
    return page_table, layout, recognition


PAGES_ = [("good", 0, 0), ("bad", 1, 0), ("doc/0", 2, 0), ("doc/1", 2, 1), ("torn/0", 3, 0), ("torn/1", 3, 1),
          ("none", 4, 0)]
REGIONS = [
    ("good", 0, "clean words here", 0.98, "model", 0, 0.0, "ok"),
    ("good", 1, "and a figure's text", 0.96, "figure", 0, 0.0, "ok"),
    ("bad", 0, "Th or s oo o oog", 0.70, "model", 180, 0.0, "ok"),
    ("doc/0", 0, "a fine first page", 0.99, "model", 0, 1.5, "ok"),
    ("doc/1", 0, "x", 0.99, "model", 90, 0.0, "ok"),  # one character at 0.99 ...
    ("doc/1", 1, "ggggggggggggggggggg", 0.31, "model", 90, 0.0, "ok"),  # ... cannot lift 19 at 0.31
    ("torn/0", 0, "", None, "model", 0, 0.0, "error"),
    ("torn/0", 1, "garbled garbled", 0.4, "model", 0, 0.0, "ok"),
    ("torn/1", 0, "fine", 0.97, "model", 0, 0.0, "ok"),
    ("none", 0, "read by a server without logprobs", None, "model", 0, 0.0, "ok"),
]


def test_low_confidence_pages_are_suspect_with_the_reason_and_their_flags(monkeypatch):
    monkeypatch.setenv(config.ENV_MIN_PAGE_CONFIDENCE, "0.75")  # not the default: that is calibrated on a bench
    table, report = assemble_documents(*_docs_inputs(PAGES_, REGIONS))
    assert table.schema == DOCUMENTS
    docs = {d["page_id"]: d for d in table.to_pylist()}

    good = docs["good"]
    assert (good["status"], good["error"]) == ("ok", None)
    assert good["confidence"] == pytest.approx((0.98 * 14 + 0.96 * 16) / 30, abs=1e-6)
    assert good["flags"] == ["figure_text"] and good["page_flags"] == [["figure_text"]]
    assert [r["confidence"] for r in json.loads(good["regions"])] == [0.98, 0.96]

    bad = docs["bad"]
    assert bad["status"] == "suspect" and bad["page_status"] == ["suspect"]
    assert bad["error"].startswith("confidence 0.70 is below OCR_ASSETS_MIN_PAGE_CONFIDENCE=0.75: the text may be")
    assert bad["flags"] == ["low_confidence", "rotated"]
    assert bad["markdown"] == "Th or s oo o oog"  # the text is kept: suspect, not thrown away

    doc = docs["doc"]  # a suspect page in a row of read pages: the row is suspect, the reason names its page
    assert doc["page_status"] == ["ok", "suspect"] and doc["status"] == "suspect"
    assert doc["page_confidence"][1] == pytest.approx((0.99 + 0.31 * 19) / 20, abs=1e-6)
    assert doc["error"].startswith("page 1: confidence 0.34 is below OCR_ASSETS_MIN_PAGE_CONFIDENCE")
    assert doc["page_flags"] == [["skewed"], ["low_confidence", "rotated"]]
    assert doc["flags"] == ["low_confidence", "rotated", "skewed"]
    assert doc["confidence"] == pytest.approx((0.99 * 14 + doc["page_confidence"][1] * 20) / 34, abs=1e-6)

    torn = docs["torn"]  # a region failed on the doubtful page: partial is stronger than suspect
    assert torn["page_status"] == ["partial", "ok"] and torn["status"] == "partial"
    assert torn["page_flags"] == [["low_confidence"], []]
    assert "server timeout" in torn["error"] and "page 0: confidence 0.40" in torn["error"]

    none = docs["none"]  # no confidence to judge by: never suspect
    assert (none["status"], none["confidence"], none["page_confidence"], none["flags"]) == ("ok", None, [None], [])

    assert report.counts["suspect_pages"] == 2 and report.counts["pages_low_confidence"] == 3
    assert report.counts["pages_rotated"] == 2 and report.counts["pages_skewed"] == 1
    assert report.counts["pages_figure_text"] == 1 and report.counts["confident_pages"] == 6
    assert report.counts["suspect"] == 2 and report.counts["partial"] == 1
    assert 0 < report.info["mean_confidence"] < 1


def test_the_threshold_is_a_setting(monkeypatch):
    monkeypatch.setenv(config.ENV_MIN_PAGE_CONFIDENCE, "0.3")
    table, _ = assemble_documents(*_docs_inputs(PAGES_, REGIONS))
    assert "suspect" not in {s for statuses in table.column("page_status").to_pylist() for s in statuses}
    monkeypatch.setenv(config.ENV_MIN_PAGE_CONFIDENCE, "0.99")
    table, _ = assemble_documents(*_docs_inputs(PAGES_, REGIONS))
    assert table.column("status").to_pylist()[0] == "suspect"  # 0.97 over the good page
    monkeypatch.setenv(config.ENV_MIN_PAGE_CONFIDENCE, "high")
    with pytest.raises(ValueError, match="OCR_ASSETS_MIN_PAGE_CONFIDENCE"):
        assemble_documents(*_docs_inputs(PAGES_, REGIONS))


def test_layout_without_rotation_and_skew_columns_reads_as_upright(monkeypatch):
    monkeypatch.setenv(config.ENV_MIN_PAGE_CONFIDENCE, "0.75")
    table, _ = assemble_documents(*_docs_inputs(PAGES_, REGIONS, with_turns=False))
    flags = dict(zip(table.column("page_id").to_pylist(), table.column("flags").to_pylist()))
    assert flags["bad"] == ["low_confidence"] and flags["doc"] == ["low_confidence"]


def test_documents_from_real_reads_make_the_suspect_page_rate_check_fail(recognizer, monkeypatch):
    """Pages read by the local models: upright ones pass, upside-down ones are suspect and turn the check red."""
    images = [CLEAN, _render(PARAGRAPH), CLEAN, UPSIDE_DOWN]
    recognition, _ = run_recognition(_crops_table(images), recognizer)
    pages = [(f"p{i}", i, 0) for i in range(len(images))]
    regions = [(f"p{i}", 0, "", None, "model", 0, 0.0, "ok") for i in range(len(images))]
    page_table, layout, _ = _docs_inputs(pages, regions)
    monkeypatch.setenv(config.ENV_MIN_PAGE_CONFIDENCE, "0.85")  # between clean print and upside-down text
    docs, _ = assemble_documents(page_table, layout, recognition)
    assert docs.column("status").to_pylist() == ["ok", "ok", "ok", "suspect"]

    passed, meta = checks.suspect_page_rate(docs)  # 1 page in 4 at the default 5%
    assert not passed and meta == {"suspect_page_rate": 0.25, "suspect_pages": 1, "pages": 4,
                                   "max_suspect_page_rate": config.DEFAULT_MAX_SUSPECT_PAGE_RATE}
    assert checks.suspect_page_rate(docs.slice(0, 3))[0]  # the upright pages alone pass
    monkeypatch.setenv(config.ENV_MAX_SUSPECT_PAGE_RATE, "0.25")
    assert checks.suspect_page_rate(docs)[0]  # at the limit: passes
    monkeypatch.setenv(config.ENV_MAX_SUSPECT_PAGE_RATE, "lots")
    with pytest.raises(ValueError, match="OCR_ASSETS_MAX_SUSPECT_PAGE_RATE"):
        checks.suspect_page_rate(docs)


def test_a_partial_page_read_below_the_threshold_counts_against_the_check():
    """A page read upside down where one region also failed is partial, not suspect: still counted."""
    docs = pa.table({"page_status": [["partial", "ok"], ["ok"]],
                     "page_flags": [[["low_confidence"], []], [["rotated"]]]})
    passed, meta = checks.suspect_page_rate(docs)
    assert not passed and meta["suspect_pages"] == 1 and meta["pages"] == 3
