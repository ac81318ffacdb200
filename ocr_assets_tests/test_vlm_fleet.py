"""The `openai` recognizer over several VLM servers on localhost: balanced, bounded per server,
a server that stops answering taken out and its requests retried on the others, probed back in.

`CountingServer` is a real aiohttp server that answers every chat request after a fixed delay and
records the most requests it ever had in flight (and how many at each arrival); it can crash after
N requests (every connection closed unanswered, those in flight too), hold its requests until let
go, stop listening, and listen again on the same port. `DeafServer` answers the probe, then
accepts connections and never reads them: a server whose process is stopped while its kernel
still accepts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading

import pytest
from aiohttp import web

from ocr_assets import config
from ocr_assets.backends.recognition import openai_vlm
from ocr_assets.backends.recognition.base import Crop
from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer
from ocr_assets.stages.recognition import run_recognition
from ocr_assets_tests.test_recognition_faults import completion, crops_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingServer:
    """POST /v1/chat/completions answered "text-<n>" after ``latency`` s; counts and peak in flight."""

    def __init__(self, latency: float = 0.05, *, model: str = "glm-ocr", listen: bool = True) -> None:
        self.latency, self.model = latency, model
        self.port = _free_port()
        self.received = self.answered = self.in_flight = self.peak = 0
        self.arrivals: list[int] = []  # requests in flight at each request's arrival, itself included
        self.reached = {}  # n -> threading.Event set once n requests are in flight at once
        self._held: asyncio.Event | None = None  # set: the held requests go on
        self.crash_after: int | None = None  # from the request after this one on, nothing is answered
        self.models_status = 200  # what GET /models answers (401: a refused key)
        self.chat_status = 200  # 503: it answers every chat request "overloaded"
        self._runner: web.AppRunner | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        if listen:
            self.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def hold(self) -> None:
        """From now on every request waits, before its latency, until ``let_go``."""
        self._held = asyncio.Event()  # bound to the server's loop when first awaited there

    def let_go(self) -> None:
        if self._held is not None:
            self._loop.call_soon_threadsafe(self._held.set)

    def when_in_flight(self, n: int) -> threading.Event:
        """Set once ``n`` requests were in flight at once (already, or from now on)."""
        event = self.reached.setdefault(n, threading.Event())
        if self.peak >= n:  # the server checks after it counts, this after it registers: none missed
            event.set()
        return event

    def start(self) -> None:
        """Listen (again) on the same port."""
        self._call(self._open())

    def stop(self) -> None:
        """Stop listening; connections in flight are closed."""
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _open(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)  # crops of a few MB
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _crashed(self) -> bool:
        return self.crash_after is not None and self.received > self.crash_after

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        request.transport.close()  # no answer: the client sees the connection go
        return web.Response(status=500)

    async def _models(self, request: web.Request) -> web.Response:
        if self._crashed():
            return self._drop(request)
        if self.models_status != 200:
            return web.json_response({"error": "refused"}, status=self.models_status)
        return web.json_response({"data": [{"id": self.model}]})

    async def _chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.arrivals.append(self.in_flight)
        if self.in_flight in self.reached:
            self.reached[self.in_flight].set()
        try:
            if self._crashed():
                return self._drop(request)
            if self._held is not None:
                await self._held.wait()
            await asyncio.sleep(self.latency)
            if self._crashed():  # crashed while this one was in flight: it is lost too
                return self._drop(request)
            if self.chat_status != 200:
                return web.json_response({"error": "overloaded"}, status=self.chat_status)
            self.answered += 1
            return completion("read")
        finally:
            self.in_flight -= 1


class DeafServer:
    """Answers GET /v1/models until ``deaf`` is set; from then on it accepts connections and never
    reads them: its small receive buffer fills and the client's upload stalls on a zero window."""

    def __init__(self, model: str = "glm-ocr") -> None:
        self.model, self.deaf, self.held = model, False, []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the accepted sockets inherit it
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.held.append(conn)
            if not self.deaf:
                self._answer_models(conn)

    def _answer_models(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(65536)
            if not chunk:
                return
            request += chunk
        body = json.dumps({"data": [{"id": self.model}]}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        conn.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        self.listener.close()
        self._thread.join(timeout=10)
        for conn in self.held:
            conn.close()


@pytest.fixture()
def servers():
    made: list[CountingServer] = []

    def make(*args, **kwargs) -> CountingServer:
        made.append(CountingServer(*args, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def fleet(urls, **kwargs) -> OpenAIRecognizer:
    options = dict(concurrency=3, timeout=5.0, max_attempts=3, backoff_base=0.01, backoff_max=0.1,
                   probe_interval=0.02, probe_interval_max=0.1)
    options.update(kwargs)
    return OpenAIRecognizer(urls, **options)


def read_all(recognizer: OpenAIRecognizer, n: int, after=None) -> list:
    """Every crop's result, in order; ``after(k)`` is called once k answers have arrived."""
    results = {}
    items = ((i, Crop("text", f"jpeg-bytes-{i}".encode(), 56, 28)) for i in range(n))
    for i, result in recognizer.recognize_stream(items):
        results[i] = result
        if after is not None:
            after(len(results))
    assert sorted(results) == list(range(n))  # no region lost, none answered twice
    return [results[i] for i in range(n)]


def test_requests_are_balanced_and_bounded_per_server(servers):
    a, b = servers(0.1), servers(0.1)
    recognizer = fleet(f"{a.base_url}, {b.base_url}/")
    assert recognizer.base_urls == [a.base_url, b.base_url] and recognizer.base_url == f"{a.base_url},{b.base_url}"
    assert recognizer.batch_size == 6
    table, _ = run_recognition(crops_table(60), recognizer)
    assert set(table.column("status").to_pylist()) == {"ok"}
    # each server saw as many at once as it may take, never more, and about half the work
    assert a.peak == b.peak == 3
    assert a.received >= 15 and b.received >= 15 and a.received + b.received == 60
    meta = recognizer.run_metadata()
    assert meta["servers"] == 2 and meta["servers_in_service"] == 2
    assert meta["vlm_servers"] == f"0={a.base_url}, 1={b.base_url}"
    assert (meta["server_0_requests"], meta["server_1_requests"]) == (a.received, b.received)
    for i in (0, 1):
        assert meta[f"server_{i}_peak_in_flight"] == 3 and meta[f"server_{i}_errors"] == 0
        assert meta[f"server_{i}_latency_p95_seconds"] >= meta[f"server_{i}_latency_p50_seconds"] >= 0.1
        assert meta[f"server_{i}_taken_out"] == 0
    assert meta["requests"] == 60 and meta["peak_in_flight"] == 6
    # the servers decide nothing about an answer: the same key whichever serve it
    crop = Crop("text", b"jpeg-bytes-1", 56, 28)
    assert recognizer.cache_key(crop) == fleet([b.base_url], probe=False).cache_key(crop)


def test_one_server_has_the_same_keys(servers):
    a = servers(0.0)
    recognizer = fleet(a.base_url)
    assert recognizer.base_url == a.base_url and recognizer.batch_size == 3
    before = recognizer.run_metadata()
    read_all(recognizer, 5)
    meta = recognizer.run_metadata()
    assert set(before) <= set(meta) and meta["servers"] == 1 and meta["vlm_servers"] == f"0={a.base_url}"
    assert meta["server_0_requests"] == 5 and meta["servers_in_service"] == 1


def test_a_server_that_crashes_is_taken_out_and_its_requests_read_by_the_other(servers):
    a, b = servers(0.05), servers(0.05)
    a.crash_after = 8  # then drops what it holds and every request after
    recognizer = fleet([a.base_url, b.base_url], concurrency=4)
    results = read_all(recognizer, 60)
    assert [(r.status, r.text) for r in results] == [("ok", "read")] * 60
    meta = recognizer.run_metadata()
    assert meta["server_0_taken_out"] == 1 and meta["server_1_taken_out"] == 0
    assert meta["servers_in_service"] == 1  # its probes were not answered either
    assert meta["server_0_errors"] >= 2 and meta["server_1_errors"] == 0
    assert a.answered <= 8 and b.answered == 60 - a.answered
    assert a.peak <= 4 and b.peak <= 4 and meta["errors_connection"] >= 2


def test_a_retry_goes_to_another_server(servers):
    a, b = servers(0.05), servers(0.05)
    a.chat_status = 503  # an answer: it stays in service, but its requests are read elsewhere
    recognizer = fleet([a.base_url, b.base_url], concurrency=1, max_attempts=2)
    results = read_all(recognizer, 12)
    assert all(r.status == "ok" for r in results)  # two attempts each: the second never on a
    meta = recognizer.run_metadata()
    assert meta["server_0_errors"] == meta["server_0_requests"] == meta["errors_http_503"] > 0
    assert meta["server_0_taken_out"] == 0 and meta["servers_in_service"] == 2


def test_a_refused_connection_takes_the_server_out_at_once(servers):
    a, b = servers(0.05), servers(0.05)
    recognizer = fleet([a.base_url, b.base_url], concurrency=1)
    a.stop()  # after the probe found it: nothing listens there when the stream starts
    results = read_all(recognizer, 10)
    assert all(r.status == "ok" for r in results)
    meta = recognizer.run_metadata()
    # one refused request and no second one: it was out from then on (two failures would need two)
    assert (meta["server_0_requests"], meta["server_0_errors"], meta["server_0_taken_out"]) == (1, 1, 1)
    assert meta["server_1_requests"] == 10 and b.peak == 1


def test_a_server_down_at_start_is_probed_back_into_service(servers, caplog):
    a, b = servers(0.1, listen=False), servers(0.1)
    with caplog.at_level(logging.WARNING, logger="ocr_assets.progress"):
        recognizer = fleet([a.base_url, b.base_url], concurrency=2)
    assert any(a.base_url in r.getMessage() for r in caplog.records)
    assert recognizer.run_metadata()["servers_in_service"] == 1

    def restart(answers: int) -> None:
        if answers == 4:
            a.start()  # the same port: the probes find it

    results = read_all(recognizer, 60, after=restart)
    assert all(r.status == "ok" for r in results)
    meta = recognizer.run_metadata()
    assert a.received > 0 and meta["server_0_requests"] == a.received and meta["server_0_errors"] == 0
    assert meta["servers_in_service"] == 2 and meta["server_0_taken_out"] == 0
    assert a.peak <= 2 and b.peak <= 2


def test_the_bound_holds_per_server_while_another_is_out_and_retries_pile_up(servers):
    a, b, c = servers(0.05), servers(0.1), servers(0.1)
    a.crash_after = 6  # its requests come back to the other two all at once, as retries
    recognizer = fleet([a.base_url, b.base_url, c.base_url], concurrency=4, max_attempts=5)
    results = read_all(recognizer, 120)
    assert all(r.status == "ok" for r in results)
    meta = recognizer.run_metadata()
    assert meta["server_0_taken_out"] == 1 and meta["retries"] >= 2
    # 12 crops admitted for 8 slots: an unbounded client would push up to 6 at each
    assert b.peak == c.peak == 4 and a.peak <= 4
    assert meta["server_1_peak_in_flight"] == meta["server_2_peak_in_flight"] == 4


def test_when_every_server_is_gone_each_region_ends_with_the_reason(servers):
    a, b = servers(0.05), servers(0.05)
    a.crash_after = b.crash_after = 3
    recognizer = fleet([a.base_url, b.base_url], concurrency=2, timeout=0.5, max_attempts=3)
    results = read_all(recognizer, 20)
    failed = [r for r in results if r.status == "error"]
    assert failed and all(r.status == "ok" or r.error for r in results)
    assert any(config.ENV_VLM_BASE_URL in r.error and "no VLM server" in r.error for r in failed)
    meta = recognizer.run_metadata()
    assert meta["servers_in_service"] == 0 and meta["errors_no_server"] > 0
    assert meta["server_0_taken_out"] == meta["server_1_taken_out"] == 1


def test_no_server_answering_at_start_fails_naming_the_setting():
    down = [f"http://127.0.0.1:{_free_port()}/v1" for _ in range(2)]
    with pytest.raises(ConnectionError, match=config.ENV_VLM_BASE_URL) as error:
        fleet(down)
    assert all(url in str(error.value) for url in down)


def test_a_server_serving_another_model_is_a_configuration_error(servers):
    a, b = servers(0.0), servers(0.0, model="another-model")
    with pytest.raises(ValueError, match=config.ENV_VLM_MODEL):
        fleet([a.base_url, b.base_url])


def test_a_refused_key_names_the_key_setting(servers):
    a, b = servers(0.0), servers(0.0)
    b.models_status = 401
    with pytest.raises(PermissionError, match=config.ENV_VLM_API_KEY):
        fleet([a.base_url, b.base_url])


def test_a_url_named_twice_is_refused():
    for urls in ("http://127.0.0.1:9/v1,http://127.0.0.1:9/v1/", ["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"]):
        with pytest.raises(ValueError, match=config.ENV_VLM_BASE_URL):
            OpenAIRecognizer(urls, probe=False)
    with pytest.raises(ValueError, match=config.ENV_VLM_BASE_URL):
        OpenAIRecognizer([], probe=False)


def test_a_server_that_stops_reading_the_request_is_taken_out_and_the_stream_ends(servers):
    deaf, b = DeafServer(), servers(0.0)
    try:
        recognizer = fleet([deaf.base_url, b.base_url], concurrency=2, timeout=1.0, max_attempts=3)
        assert recognizer.run_metadata()["servers_in_service"] == 2  # the probe found both
        deaf.deaf = True  # from now on: a stopped process whose kernel still accepts connections
        image = b"\xff\xd8" + bytes(6 * 2**20)  # a body larger than the socket buffers can take
        results = {}

        def read() -> None:
            for i, result in recognizer.recognize_stream((i, Crop("text", image, 56, 28)) for i in range(6)):
                results[i] = result

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(60)  # a bound only so that a hang fails here instead of blocking the run
        assert not reader.is_alive(), "the stream never ended: an upload to a server that stopped reading hung"
        assert sorted(results) == list(range(6)) and all(r.status == "ok" for r in results.values())
        meta = recognizer.run_metadata()
        assert meta["server_0_taken_out"] == 1 and meta["servers_in_service"] == 1
        assert meta["errors_timeout"] >= 2 and meta["server_0_errors"] >= 2
        assert b.answered == 6 and len(deaf.held) >= 2  # its requests were read by the other one
    finally:
        deaf.close()


def test_a_host_name_that_does_not_resolve_is_a_configuration_error(servers):
    a = servers(0.0)
    typo = "http://vlm-1.example.invalid:8000/v1"
    for urls in ([a.base_url, typo], [typo]):
        with pytest.raises(ValueError, match=config.ENV_VLM_BASE_URL) as error:
            fleet(urls)
        assert typo in str(error.value)
    # a refused connection is a server that is down: left out, probed back in, the run goes on
    refused = f"http://127.0.0.1:{_free_port()}/v1"
    assert fleet([a.base_url, refused]).run_metadata()["servers_in_service"] == 1


def test_a_stream_does_not_start_while_the_last_ones_worker_still_runs(servers, monkeypatch):
    a = servers(0.0)
    recognizer = fleet(a.base_url, concurrency=1)  # one crop admitted at a time
    monkeypatch.setattr(openai_vlm, "_JOIN_SECONDS", 0.0)  # the stopped stream gives up on its worker at once
    release = threading.Event()

    def hanging_crops():
        yield 0, Crop("text", b"jpeg-bytes-0", 56, 28)
        yield 1, Crop("text", b"jpeg-bytes-1", 56, 28)  # pulled once crop 0 is answered
        release.wait()  # a crop source that hangs: the worker's event loop waits here

    before = set(threading.enumerate())
    first = recognizer.recognize_stream(hanging_crops())
    try:
        assert next(first)[0] == 0
        first.close()  # the caller stops reading; its worker still runs
        (worker,) = [t for t in threading.enumerate() if t not in before and t.name == "vlm-requests"]
        assert worker.is_alive()
        with pytest.raises(RuntimeError, match="still running"):
            read_all(recognizer, 3)
    finally:
        release.set()
    worker.join(60)
    assert not worker.is_alive()
    received = a.received
    results = read_all(recognizer, 5)  # the last stream over: the next one starts, its counts right
    assert all(r.status == "ok" for r in results) and a.received == received + 5
    assert recognizer.run_metadata()["server_0_requests"] == 5
    assert [s.in_flight for s in recognizer.fleet.servers] == [0]


def _stream_in_thread(recognizer: OpenAIRecognizer, n: int) -> tuple[threading.Thread, dict]:
    results: dict = {}

    def read() -> None:
        results.update(enumerate(read_all(recognizer, n)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, results


def test_lowering_the_concurrency_mid_stream_bounds_new_requests_at_once(servers):
    a, b = servers(0.01), servers(0.01)
    a.hold()
    b.hold()
    recognizer = fleet([a.base_url, b.base_url], concurrency=4)
    reader, results = _stream_in_thread(recognizer, 60)
    try:
        # each server holds 4: the client may send no more, so none is on its way
        assert a.when_in_flight(4).wait(60) and b.when_in_flight(4).wait(60)
        recognizer.set_concurrency(2)  # from this thread, while the stream runs on its own
        assert (recognizer.concurrency, recognizer.batch_size) == (2, 4)
        change = (len(a.arrivals), len(b.arrivals))
    finally:
        a.let_go()
        b.let_go()
    reader.join(120)
    assert not reader.is_alive() and all(r.status == "ok" for r in results.values()) and len(results) == 60
    assert change == (4, 4)
    after = a.arrivals[change[0]:] + b.arrivals[change[1]:]  # the 8 held drained, then only 2 at a time
    assert len(after) == 52 and max(after) <= 2
    assert a.peak == b.peak == 4


def test_raising_the_concurrency_mid_stream_lets_waiting_crops_go(servers):
    a = servers(0.0)
    a.hold()
    recognizer = fleet(a.base_url, concurrency=1)
    reader, results = _stream_in_thread(recognizer, 10)
    try:
        assert a.when_in_flight(1).wait(60)
        recognizer.set_concurrency(3)  # above the stream's start: its crops in memory follow
        assert a.when_in_flight(3).wait(60)  # two more went while the first is held
        assert a.in_flight == 3
    finally:
        a.let_go()
    reader.join(120)
    assert not reader.is_alive() and all(r.status == "ok" for r in results.values()) and len(results) == 10
    assert a.peak == 3 and (recognizer.concurrency, recognizer.batch_size) == (3, 3)
    meta = recognizer.run_metadata()  # none waited for a connection past its timeout
    assert meta["requests"] == a.received == 10 and meta["retries"] == 0 and meta["server_0_errors"] == 0
    with pytest.raises(ValueError, match=config.ENV_VLM_CONCURRENCY):
        recognizer.set_concurrency(0)
