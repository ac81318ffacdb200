"""The `openai` recognizer against a scripted server on localhost: every fault ends as one region's
error with a reason (or a retry that passes), never as a failed step; stopping stops at once.

`ScriptedServer` is a real aiohttp server whose chat handler a test writes: it sees which crop
(the number at the end of the crop's bytes) and which attempt of it a request is, and may
answer, refuse, stay silent, trickle its answer or drop the connection half-way.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter, defaultdict

import pyarrow as pa
import pytest
from aiohttp import web

from ocr_assets.backends.recognition.base import Crop
from ocr_assets.backends.recognition.openai_replies import retry_after_seconds
from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer
from ocr_assets.schemas import CROPS
from ocr_assets.stages.recognition import run_recognition


def completion(text: str, finish: str = "stop") -> web.Response:
    return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": "glm-ocr",
                              "choices": [{"index": 0, "finish_reason": finish,
                                           "message": {"role": "assistant", "content": text}}]})


async def drop_mid_answer(request: web.Request) -> web.StreamResponse:
    """Headers and half a body, then the connection closes."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = 1000
    await response.prepare(request)
    await response.write(b'{"choices": [{"index": 0, "message": ')
    await asyncio.sleep(0.05)
    request.transport.close()
    return response


class ScriptedServer:
    """POST /v1/chat/completions -> ``await handler(request, n, attempt)``; arrivals are recorded."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.calls: Counter = Counter()  # crop number -> requests received
        self.arrivals: dict[int, list[float]] = defaultdict(list)
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._open())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)  # hanging handlers end at close
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "glm-ocr"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = json.loads(await request.read())
        url = payload["messages"][0]["content"][0]["image_url"]["url"]
        n = int(base64.b64decode(url.split(",", 1)[1]).rsplit(b"-", 1)[1])
        self.calls[n] += 1
        self.arrivals[n].append(time.perf_counter())
        return await self.handler(request, n, self.calls[n])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture()
def serve():
    servers: list[ScriptedServer] = []

    def start(handler) -> ScriptedServer:
        servers.append(ScriptedServer(handler))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def crops_table(n: int) -> pa.Table:
    return pa.Table.from_pylist(
        [dict(page_id=f"p{i}", region=0, task="text", image=f"jpeg-bytes-{i}".encode(), format="jpeg",
              width=56, height=28, status="ok", error=None) for i in range(n)], schema=CROPS)


def recognizer(server: ScriptedServer, **kwargs) -> OpenAIRecognizer:
    # timeouts well above what a loaded 2-core machine needs to answer; the tests on timeouts set their own
    options = dict(concurrency=4, timeout=5.0, max_attempts=3, backoff_base=0.01, backoff_max=0.5)
    options.update(kwargs)
    return OpenAIRecognizer(server.base_url, **options)


BAD_RETRY_AFTER = ["soon", "-3", "nan", "inf", "1e400", "Wed, 21 Oct 2015 07:28:00 GMT",
                   "Mon, 99 Foo 2024 99:99:99 GMT", "99999999999", "", "2, 3"]


def test_retry_after_parsing_never_raises():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past: now
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    future = retry_after_seconds({"retry-after": in_a_minute})
    assert 55 <= future <= 61
    for value in ("soon", "-3", "nan", "inf", "1e400", "Mon, 99 Foo 2024 99:99:99 GMT", "", "2, 3"):
        assert retry_after_seconds({"retry-after": value}) is None, value
    assert retry_after_seconds(None) is None and retry_after_seconds({}) is None


def test_malformed_retry_after_falls_back_to_backoff(serve):
    async def handler(request, n, attempt):
        if attempt == 1:
            return web.json_response({"error": "slow down"}, status=429,
                                     headers={"Retry-After": BAD_RETRY_AFTER[n]})
        return completion(f"text-{n}")

    server = serve(handler)
    table, _ = run_recognition(crops_table(len(BAD_RETRY_AFTER)), recognizer(server))
    assert [(r["status"], r["text"]) for r in table.to_pylist()] == [
        ("ok", f"text-{n}") for n in range(len(BAD_RETRY_AFTER))]
    assert all(server.calls[n] == 2 for n in range(len(BAD_RETRY_AFTER)))


def test_retry_after_is_honoured(serve):
    async def handler(request, n, attempt):
        if attempt == 1:
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "2"})
        return completion("late but fine")

    server = serve(handler)
    # backoff alone would retry within 10 ms: only the header makes the client wait
    table, _ = run_recognition(crops_table(1), recognizer(server, backoff_base=0.01, backoff_max=5.0))
    assert table.column("status").to_pylist() == ["ok"]
    first, second = server.arrivals[0]
    assert second - first >= 1.9


def test_connection_dropped_mid_answer_is_retried_then_reported(serve):
    async def handler(request, n, attempt):
        if n == 1 or (n == 0 and attempt == 1):  # crop 1: every time; crop 0: once
            return await drop_mid_answer(request)
        return completion(f"text-{n}")

    server = serve(handler)
    table, _ = run_recognition(crops_table(4), recognizer(server))
    rows = table.to_pylist()
    assert (rows[0]["status"], rows[0]["text"]) == ("ok", "text-0") and server.calls[0] == 2
    assert rows[1]["status"] == "error" and "connection" in rows[1]["error"] and "3 attempts" in rows[1]["error"]
    assert [(r["status"], r["text"]) for r in rows[2:]] == [("ok", "text-2"), ("ok", "text-3")]


def test_an_unexpected_exception_fails_one_region_only(serve, monkeypatch):
    class Surprise(Exception):
        pass

    judge = OpenAIRecognizer._judge

    def judging(self, answer):
        if answer["choices"][0]["message"]["content"] == "boom":
            raise Surprise("the client met something nobody expected")
        return judge(self, answer)

    monkeypatch.setattr(OpenAIRecognizer, "_judge", judging)

    async def handler(request, n, attempt):
        return completion("boom" if n == 2 else f"text-{n}")

    server = serve(handler)
    table, _ = run_recognition(crops_table(5), recognizer(server))
    rows = table.to_pylist()
    assert rows[2]["status"] == "error" and "Surprise" in rows[2]["error"] and "expected" in rows[2]["error"]
    assert [(r["status"], r["text"]) for i, r in enumerate(rows) if i != 2] == [
        ("ok", f"text-{i}") for i in (0, 1, 3, 4)]


def _hanging():
    """Crop 0 is answered at once; every other request hangs for a minute."""

    async def handler(request, n, attempt):
        if n == 0:
            return completion("first")
        await asyncio.sleep(60)
        return completion("too late")

    return handler


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the requests never arrived"
        time.sleep(0.02)


def test_closing_the_stream_cancels_requests_in_flight(serve):
    server = serve(_hanging())
    client = recognizer(server, timeout=30.0)
    stream = client.recognize_stream((i, Crop("text", f"jpeg-bytes-{i}".encode(), 56, 28)) for i in range(8))
    assert next(stream)[0] == 0
    _wait_for(lambda: sum(server.calls.values()) >= 4)  # three requests hang on the server
    start = time.perf_counter()
    stream.close()
    assert time.perf_counter() - start < 3


def test_an_interrupted_step_returns_at_once(serve):
    server = serve(_hanging())
    client = recognizer(server, timeout=30.0)
    stream = client.recognize_stream

    def interrupted(items):  # what Dagster's termination does: an exception in the step's thread
        for n, item in enumerate(stream(items)):
            _wait_for(lambda: sum(server.calls.values()) >= 4)
            raise KeyboardInterrupt("terminated from the UI")
            yield item

    client.recognize_stream = interrupted
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_recognition(crops_table(8), client)
    assert time.perf_counter() - start < 3 + 0.5


def test_a_slow_steady_answer_is_not_a_timeout(serve):
    async def handler(request, n, attempt):
        body = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "slow but steady"}}]}).encode()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        step = len(body) // 7 + 1
        for i in range(0, len(body), step):  # 7 pieces, 0.3 s apart: 2 s in all, never 1 s silent
            await response.write(body[i:i + step])
            await asyncio.sleep(0.3)
        return response

    server = serve(handler)
    table, _ = run_recognition(crops_table(1), recognizer(server, timeout=1.5, max_attempts=1))
    assert (table.column("status")[0].as_py(), table.column("text")[0].as_py()) == ("ok", "slow but steady")


def test_a_silent_server_times_out_with_the_reason(serve):
    async def handler(request, n, attempt):
        await asyncio.sleep(3)
        return completion("too late")

    server = serve(handler)
    table, _ = run_recognition(crops_table(1), recognizer(server, timeout=0.5, max_attempts=2))
    (row,) = table.to_pylist()
    assert row["status"] == "error" and "sent nothing for 0.5 s" in row["error"] and "2 attempts" in row["error"]
    assert server.calls[0] == 2


def test_an_aborted_answer_is_asked_again_never_kept(serve, tmp_path):
    """vLLM and SGLang can end a 200 with finish_reason abort or error: that is no answer."""
    from ocr_assets.recognition_cache import RecognitionCache
    from ocr_assets.storage import ParquetStore

    async def handler(request, n, attempt):
        if n == 0 or attempt == 1:
            return completion("", finish="abort" if n else "error")
        return completion(f"text {n}")

    server = serve(handler)
    store = ParquetStore(str(tmp_path))
    table, _ = run_recognition(crops_table(3), recognizer(server), cache=RecognitionCache(store, "s"))
    assert table.column("status").to_pylist() == ["error", "ok", "ok"]
    assert table.column("text").to_pylist()[1:] == ["text 1", "text 2"]
    assert "finish_reason='error'" in table.column("error")[0].as_py()
    assert server.calls[0] == 3 and server.calls[1] == 2  # retried, not taken as an empty text
    cached = store.read_segments("recognition_cache", "s")
    assert sorted(cached.column("status").to_pylist()) == ["ok", "ok"]  # the failure is not kept
