"""The recognition cache: only answers are kept, keys follow every setting, and the partition's
segments are compacted and pruned without losing an entry."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest
from aiohttp import web

from ocr_assets.backends.recognition.base import Crop, Recognized, content_key
from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer
from ocr_assets.recognition_cache import CACHE_KIND, RecognitionCache, prune
from ocr_assets.schemas import CROPS
from ocr_assets.stages.recognition import reachable_keys, run_recognition
from ocr_assets.storage import ParquetStore
from ocr_assets_tests.test_recognition import _crop
from ocr_assets_tests.test_recognition_faults import (  # noqa: F401 (serve: the server fixture)
    completion, crops_table, drop_mid_answer, recognizer, serve)


class EchoRecognizer:
    """Reads a crop as its own bytes: a stage-level recognizer with no model and no server."""

    name, batch_size, version = "echo", 8, "1"

    def recognize_stream(self, items):
        for key, crop in items:
            yield key, Recognized(crop.image.decode(), cacheable=True)

    def cache_key(self, crop: Crop) -> str:
        return content_key(crop.image, self.name, self.version, crop.task)

    def run_metadata(self):
        return {}


def _cached(store: ParquetStore, partition: str) -> dict[str, Recognized]:
    cache = RecognitionCache(store, partition)
    return dict(cache._known)


def test_only_answers_are_cached_and_a_rerun_asks_again(serve, tmp_path):
    async def handler(request, n, attempt):
        if n in (0, 1, 2):  # a rotated key, a renamed model, a body over the server's limit
            return web.json_response({"error": {"message": "refused"}}, status={0: 401, 1: 404, 2: 413}[n])
        if n == 4:
            return completion("cut " * 20, finish="length")
        if n == 5:
            await asyncio.sleep(4)  # longer than the 2 s read timeout
        if n == 6:
            return await drop_mid_answer(request)
        return completion(f"text-{n}")

    server = serve(handler)
    store = ParquetStore(str(tmp_path))
    crops = crops_table(7)
    first, _ = run_recognition(crops, recognizer(server, timeout=2.0, max_attempts=1),
                               cache=RecognitionCache(store, "s"))
    rows = first.to_pylist()
    assert [r["status"] for r in rows] == ["error", "error", "error", "ok", "error", "error", "error"]
    assert "OCR_ASSETS_VLM_API_KEY" in rows[0]["error"] and "OCR_ASSETS_VLM_MODEL" in rows[1]["error"]
    client = recognizer(server)
    crop = {n: Crop("text", f"jpeg-bytes-{n}".encode(), 56, 28) for n in range(7)}
    cached = _cached(store, "s")
    assert set(cached) == {client.cache_key(crop[3]), client.cache_key(crop[4])}  # an answer, a length verdict
    assert "max_tokens" in cached[client.cache_key(crop[4])].error

    before = dict(server.calls)
    second, report = run_recognition(crops, recognizer(server, timeout=2.0, max_attempts=1),
                                     cache=RecognitionCache(store, "s"))
    assert report.counts["cache_hits"] == 2
    assert {n for n in range(7) if server.calls[n] > before[n]} == {0, 1, 2, 5, 6}
    assert second.to_pylist()[4] == rows[4]


def test_a_failed_local_batch_is_not_cached(tmp_path, monkeypatch):
    from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer

    local = RapidOcrRecognizer(batch_size=2)
    line = _crop("text", ["Nothing silent"])
    crops = pa.Table.from_pylist([dict(page_id="p", region=0, task="text", image=line.image, format="png",
                                       width=line.width, height=line.height, status="ok", error=None)],
                                 schema=CROPS)
    store = ParquetStore(str(tmp_path))

    def broken(*args, **kwargs):
        raise MemoryError("onnxruntime could not allocate the batch")

    with monkeypatch.context() as patch:
        patch.setattr(local._engine, "text_rec", broken)
        failed, _ = run_recognition(crops, local, cache=RecognitionCache(store, "s"))
    assert failed.column("status").to_pylist() == ["error"] and "batch" in failed.column("error")[0].as_py()
    assert _cached(store, "s") == {}
    again, report = run_recognition(crops, local, cache=RecognitionCache(store, "s"))
    assert report.counts["cache_hits"] == 0 and again.column("status").to_pylist() == ["ok"]
    assert "silent" in again.column("text")[0].as_py().lower()

    # the local key follows its version and its reading settings, not its thread count
    key = local.cache_key(line)
    assert local.version.startswith("rapidocr ") and ".onnx" in local.version
    local.settings = {**local.settings, "EngineConfig.onnxruntime.intra_op_num_threads": 7}
    assert local.cache_key(line) == key
    local.settings = {**local.settings, "Global.text_score": 0.9}
    assert local.cache_key(line) != key
    local.version = "rapidocr 0.0.1"
    assert local.cache_key(line) != key


def test_the_openai_key_follows_every_setting():
    crop = Crop("text", b"jpeg-bytes-1", 56, 28)

    def key(**kwargs) -> str:
        return OpenAIRecognizer("http://127.0.0.1:9/v1", probe=False, **kwargs).cache_key(crop)

    base = key()
    assert key() == base and key(concurrency=3, timeout=5.0) == base  # how it asks is not what it reads
    assert key(max_tokens={"text": 100}) != base
    assert key(prompts={"text": "Read this:"}) != base
    assert key(model="other") != base
    newer = OpenAIRecognizer("http://127.0.0.1:9/v1", probe=False)
    newer.version = "openai-client/99"
    assert newer.cache_key(crop) != base


def test_a_finished_step_leaves_one_segment_with_every_entry(tmp_path):
    store = ParquetStore(str(tmp_path))
    crops = crops_table(25)
    table, _ = run_recognition(crops, EchoRecognizer(), cache=RecognitionCache(store, "s", flush_every=1))
    assert len(store.segment_files(CACHE_KIND, "s")) == 1
    cached = _cached(store, "s")
    assert len(cached) == 25 and {r.text for r in cached.values()} == {f"jpeg-bytes-{i}" for i in range(25)}
    _, report = run_recognition(crops, EchoRecognizer(), cache=RecognitionCache(store, "s"))
    assert report.counts["cache_hits"] == 25 and len(store.segment_files(CACHE_KIND, "s")) == 1


def test_a_crash_during_compaction_loses_nothing(tmp_path, monkeypatch):
    store = ParquetStore(str(tmp_path))
    cache = RecognitionCache(store, "s", flush_every=1)
    for i in range(5):
        cache.put(f"k{i}", Recognized(f"t{i}", cacheable=True))

    def crash_after_writing(self, kind, partition, table, old):  # the new file is whole, the old ones stay
        self.append_segment(kind, partition, table)
        raise SystemExit("killed before the old segments were deleted")

    with monkeypatch.context() as patch:
        patch.setattr(ParquetStore, "replace_segments", crash_after_writing)
        with pytest.raises(SystemExit):
            cache.compact()
    assert len(store.segment_files(CACHE_KIND, "s")) == 6  # duplicates, not losses
    assert {k: r.text for k, r in _cached(store, "s").items()} == {f"k{i}": f"t{i}" for i in range(5)}
    assert RecognitionCache(store, "s").compact() == (5, 5)
    assert len(store.segment_files(CACHE_KIND, "s")) == 1 and len(_cached(store, "s")) == 5


def test_prune_keeps_what_the_current_settings_reach(tmp_path):
    store = ParquetStore(str(tmp_path))
    crops = pa.concat_tables([crops_table(6), pa.Table.from_pylist([
        dict(page_id="skip", region=0, task="skip", image=b"jpeg-bytes-98", format="jpeg", width=1, height=1,
             status="ok", error=None),
        dict(page_id="failed", region=0, task="text", image=b"jpeg-bytes-99", format="jpeg", width=1, height=1,
             status="error", error="crop failed")], schema=CROPS)])
    old = EchoRecognizer()
    run_recognition(crops.slice(0, 4), old, cache=RecognitionCache(store, "s"))  # an earlier, smaller shard
    new = EchoRecognizer()
    new.version = "2"  # a new recognizer version: none of the old entries can be reached
    run_recognition(crops, new, cache=RecognitionCache(store, "s"))
    assert len(_cached(store, "s")) == 10

    keep = reachable_keys(crops, new)
    assert keep == {new.cache_key(Crop("text", f"jpeg-bytes-{i}".encode(), 56, 28)) for i in range(6)}
    assert prune(store, "s", keep) == (6, 4)
    assert set(_cached(store, "s")) == keep and len(store.segment_files(CACHE_KIND, "s")) == 1
    assert prune(store, "s", keep) == (6, 0)
    assert prune(store, "s", set()) == (0, 6) and store.segment_files(CACHE_KIND, "s") == []
    assert prune(store, "never-run", keep) == (0, 0)


def test_a_half_cached_rerun_streamed_from_the_crops_file_writes_the_same_file(serve, tmp_path):
    """Crops read from a Parquet file a batch at a time, half of them cache hits (answered on the
    recognizer's thread), the rest from a server: the written file is the table run's, row for row."""
    import pyarrow.parquet as pq

    async def handler(request, n, attempt):
        await asyncio.sleep(0.01 * (n % 3))  # answers come back out of order
        return completion(f"text-{n}")

    server = serve(handler)
    store = ParquetStore(str(tmp_path))
    crops = crops_table(40)
    pq.write_table(crops, tmp_path / "crops.parquet", row_group_size=8)
    run_recognition(crops.filter(pa.array([i % 2 == 0 for i in range(40)])), recognizer(server),
                    cache=RecognitionCache(store, "s"))
    expected, _ = run_recognition(crops, recognizer(server))

    sent = sum(server.calls.values())
    batches = pq.ParquetFile(tmp_path / "crops.parquet").iter_batches(batch_size=5)
    with pq.ParquetWriter(tmp_path / "recognition.parquet", expected.schema) as writer:
        result, report = run_recognition(batches, recognizer(server), cache=RecognitionCache(store, "s"),
                                         chunk_rows=4, sink=writer.write_table, rows=crops.num_rows)
    assert result is None and report.counts["cache_hits"] == 20
    assert sum(server.calls.values()) - sent == 20  # only the odd crops were asked for
    written = pq.ParquetFile(tmp_path / "recognition.parquet")
    assert written.metadata.num_row_groups > 1  # written as the run went, not at the end
    assert written.read().equals(expected)
