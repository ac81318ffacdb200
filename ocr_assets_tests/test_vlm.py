"""The `openai` recognizer against real HTTP servers on localhost: `ocr-assets serve` and a faulty one.

The real client (the `openai` recognizer, on aiohttp) talks to `OcrServer`, either backed by the local PP-OCRv6
recognizer or with an answer function that injects every failure a VLM server shows: 503, 429
with Retry-After, answers slower than the timeout, malformed JSON, empty choices, answers cut
at max_tokens and repetition loops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ocr_assets import config
from ocr_assets.backends.recognition import create_recognizer
from ocr_assets.backends.recognition.base import Crop
from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer, repetition_loop
from ocr_assets.imaging import decode_page, vlm_crop, vlm_size
from ocr_assets.recognition_cache import RecognitionCache
from ocr_assets.schemas import CROPS
from ocr_assets.serve import OcrServer, _json
from ocr_assets.stages.recognition import run_recognition
from ocr_assets.storage import ParquetStore
from ocr_assets_tests.test_recognition import LINE, _f1, _render


class FaultyServer(OcrServer):
    """Answers "text-<n>" for the crop whose bytes end in <n>, with faults chosen by n, and counts."""

    def __init__(self, **kwargs):
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.calls: dict[int, int] = {}
        super().__init__(answer=lambda image, prompt, max_tokens: "", **kwargs)

    def chat(self, payload):
        url = payload["messages"][0]["content"][0]["image_url"]["url"]
        import base64

        n = int(base64.b64decode(url.split(",", 1)[1]).rsplit(b"-", 1)[1])
        with self.lock:
            self.calls[n] = self.calls.get(n, 0) + 1
            attempt = self.calls[n]
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        abandoned = False
        try:
            time.sleep(0.05)
            kind = n % 10
            if kind == 1 and attempt == 1:
                return _json(503, {"error": {"message": "overloaded"}})
            if kind == 2 and attempt == 1:
                return _json(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
            if kind == 3 and attempt == 1:
                with self.lock:  # the client gives up after 1 s: from then on it is not in flight
                    self.in_flight -= 1
                    abandoned = True
                time.sleep(1.5)
            if kind == 4 and attempt == 1:
                return 200, {"Content-Type": "application/json"}, b'{"choices": [ {"message": '
            if kind == 5 and attempt == 1:
                return _json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": self.model,
                                   "choices": []})
            if kind == 6:
                return _json(503, {"error": {"message": "always down for this one"}})
            text, finish = f"text-{n}", "stop"
            if kind == 7:
                text, finish = "cut " * 20, "length"
            if kind == 8:
                text = "ab " * 400
            return _json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": self.model,
                               "choices": [{"index": 0, "finish_reason": finish,
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})
        finally:
            with self.lock:
                self.in_flight -= 0 if abandoned else 1


def _crops_table(n: int) -> pa.Table:
    rows = [dict(page_id=f"p{i // 10}", region=i % 10, task=("table" if i % 3 == 0 else "text"),
                 image=f"jpeg-bytes-{i}".encode(), format="jpeg", width=56, height=28, status="ok", error=None)
            for i in range(n)]
    rows.append(dict(page_id="p-skip", region=0, task="skip", image=b"skip-bytes-999", format="jpeg", width=1,
                     height=1, status="ok", error=None))
    return pa.Table.from_pylist(rows, schema=CROPS)


@pytest.fixture()
def faulty():
    server = FaultyServer().start()
    yield server
    server.shutdown()
    server.server_close()


def _recognizer(server, **kwargs) -> OpenAIRecognizer:
    options = dict(concurrency=4, timeout=1.0, max_attempts=3, backoff_base=0.05, backoff_max=2.0)
    options.update(kwargs)
    return OpenAIRecognizer(server.base_url, **options)


def test_every_region_ends_ok_or_with_a_reason(faulty, tmp_path):
    crops = _crops_table(40)
    recognizer = _recognizer(faulty)
    start = time.perf_counter()
    table, report = run_recognition(crops, recognizer)
    rows = table.to_pylist()
    assert len(rows) == 41 and rows[-1]["status"] == "ok" and rows[-1]["text"] == ""  # skip: never sent
    for i, row in enumerate(rows[:40]):
        kind = i % 10
        if kind == 6:
            assert row["status"] == "error" and "503" in row["error"] and "3 attempts" in row["error"]
        elif kind == 7:
            assert row["status"] == "error" and "max_tokens" in row["error"]
        elif kind == 8:
            assert row["status"] == "error" and "repetition" in row["error"]
        else:  # recovered after one retry
            assert (row["status"], row["text"]) == ("ok", f"text-{i}"), (i, row)
    assert sum(faulty.calls.values()) == recognizer.stats.requests
    assert faulty.peak <= 4 and recognizer.stats.peak_in_flight <= 4
    assert 999 not in faulty.calls  # the skip crop was never sent
    meta = recognizer.run_metadata()
    assert meta["retries"] == meta["requests"] - 40
    for kind in ("errors_http_503", "errors_http_429", "errors_timeout", "errors_malformed",
                 "errors_empty_choices", "errors_length", "errors_repetition"):
        assert meta[kind] > 0, kind
    assert meta["latency_max_seconds"] >= meta["latency_p95_seconds"] >= meta["latency_p50_seconds"] > 0
    assert meta["tokens_in"] > 0 and meta["peak_in_flight"] <= 4
    # the 429 said Retry-After: 1 s, so the run cannot have been faster than that
    assert time.perf_counter() - start >= 1.0
    assert report.counts["recognized"] == 28 and report.counts["errors"] == 12


def test_concurrency_limit_holds_under_load(faulty):
    crops = _crops_table(200)
    keep = [i for i in range(200) if i % 10 in (0, 9)]  # the clean ones: no faults
    crops = crops.take(keep)
    recognizer = _recognizer(faulty, concurrency=16)
    table, _ = run_recognition(crops, recognizer)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert 8 < faulty.peak <= 16 and recognizer.stats.peak_in_flight == faulty.peak


def test_a_second_run_sends_no_request(faulty, tmp_path):
    crops = _crops_table(30)
    store = ParquetStore(str(tmp_path))
    first, _ = run_recognition(crops, _recognizer(faulty), cache=RecognitionCache(store, "shard-0"))
    sent = sum(faulty.calls.values())
    # the always-503 regions are not cached (another attempt may pass); everything else is
    retried = _recognizer(faulty)
    second, report = run_recognition(crops, retried, cache=RecognitionCache(store, "shard-0"))
    assert report.counts["cache_hits"] == 27
    assert sum(faulty.calls.values()) - sent == retried.stats.requests == 3 * 3
    assert second.column("text").to_pylist() == first.column("text").to_pylist()
    # another model means other answers: nothing is reused
    other = RecognitionCache(store, "shard-0")
    assert all(other.get(_recognizer(faulty, model="glm-ocr", max_tokens={"text": 10}).cache_key(
        Crop("text", f"jpeg-bytes-{i}".encode(), 56, 28))) is None for i in range(30) if i % 3)


def test_a_crash_keeps_what_was_paid_for(faulty, tmp_path):
    crops = _crops_table(20).filter(pc.field("region") != 6)
    store = ParquetStore(str(tmp_path))
    cache = RecognitionCache(store, "s", flush_every=1)
    recognizer = _recognizer(faulty)
    stream = recognizer.recognize_stream

    def crashing(items):  # the process dies after 5 answers
        for n, item in enumerate(stream(items)):
            if n == 5:
                raise KeyboardInterrupt("killed")
            yield item

    recognizer.recognize_stream = crashing
    with pytest.raises(KeyboardInterrupt):
        run_recognition(crops, recognizer, cache=cache)
    again = _recognizer(faulty)
    _, report = run_recognition(crops, again, cache=RecognitionCache(store, "s"))
    assert report.counts["cache_hits"] == 5


def test_server_down_fails_fast_naming_the_setting():
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=config.ENV_VLM_BASE_URL):
        OpenAIRecognizer("http://127.0.0.1:9/v1")
    assert time.perf_counter() - start < 10
    with pytest.raises(ValueError, match=config.ENV_VLM_BASE_URL):
        create_recognizer("openai", base_url=None)


def test_unknown_model_names_the_setting(faulty):
    with pytest.raises(ValueError, match=config.ENV_VLM_MODEL):
        OpenAIRecognizer(faulty.base_url, model="other")


def test_vlm_crop_sizes():
    for w, h in [(10, 10), (500, 40), (1275, 1650), (4000, 3000), (20000, 40), (28, 28)]:
        vw, vh = vlm_size(w, h)
        assert vw % 28 == 0 and vh % 28 == 0
        assert config.VLM_MIN_PIXELS <= vw * vh <= config.VLM_MAX_PIXELS
    image = np.full((600, 1400, 3), 255, np.uint8)
    data, w, h = vlm_crop(image)
    assert data[:3] == b"\xff\xd8\xff" and decode_page(data).shape[:2] == (h, w) == (588, 1400)


def test_repetition_loop():
    assert repetition_loop("x" * 50 + "the end. " * 100)
    assert not repetition_loop(" ".join(f"word{i}" for i in range(300)))


def test_local_server_reads_crops_over_http(tmp_path):
    """`ocr-assets serve` as a user starts it, and the openai recognizer reading through it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCR_ASSETS_")}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ocr_assets.cli", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}/v1" in line, line
        data, w, h = vlm_crop(_render([LINE]))
        crops = pa.Table.from_pylist([dict(page_id="p", region=0, task="text", image=data, format="jpeg",
                                           width=w, height=h, status="ok", error=None)], schema=CROPS)
        table, _ = run_recognition(crops, OpenAIRecognizer(f"http://127.0.0.1:{port}/v1"))
        (row,) = table.to_pylist()
        assert row["status"] == "ok" and _f1(row["text"], LINE) >= 0.9
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # SIGTERM stops it cleanly


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dagster_pipeline_with_the_openai_recognizer(small_dataset, tmp_path):
    """crops stores VLM-ready JPEGs, recognition reads them through the server, a re-run is all cache."""
    import dagster as dg
    import pyarrow.parquet as pq

    from ocr_assets.assets import ASSETS
    from ocr_assets.partitions import SHARDS
    from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource

    server = OcrServer().start()
    try:
        resources = {
            "dataset": DatasetResource(path=small_dataset),
            "storage": StorageResource(root=str(tmp_path / "out")),
            "layout_model": LayoutResource(),
            "recognizer": RecognizerResource(vlm_base_url=server.base_url, vlm_concurrency=8),
        }
        (tmp_path / "home").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
            key = DatasetResource(path=small_dataset).shards()[0].key
            instance.add_dynamic_partitions(SHARDS, [key])
            events = []
            for _ in range(2):
                result = dg.materialize(ASSETS, partition_key=key, instance=instance, resources=resources)
                assert result.success
                events.append({e.asset_key.to_user_string(): e.materialization.metadata
                               for e in result.get_asset_materialization_events()})
    finally:
        server.shutdown()
        server.server_close()
    crops = pq.read_table(tmp_path / "out" / "crops" / f"{key}.parquet").to_pylist()
    sent = [c for c in crops if c["status"] == "ok" and c["task"] != "skip"]
    assert sent and all(c["format"] == "jpeg" and c["width"] % 28 == 0 and c["height"] % 28 == 0 for c in sent)
    first, second = events[0]["recognition"], events[1]["recognition"]
    assert first["requests"].value >= len(sent) and first["cache_hits"].value == 0
    assert second["cache_hits"].value == len(sent) and second["requests"].value == 0
    assert "vlm_api_key" not in json.dumps({k: str(v) for k, v in first.items()})
    docs = pq.read_table(tmp_path / "out" / "documents" / f"{key}.parquet")
    assert set(docs.column("status").to_pylist()) == {"ok"}
    # the server's logprobs carry the local models' confidence over HTTP, to every page
    assert all(c is not None and c > 0.9 for c in docs.column("confidence").to_pylist())
    assert first["mean_confidence"].value > 0.9 and first["confident_regions"].value > 0
