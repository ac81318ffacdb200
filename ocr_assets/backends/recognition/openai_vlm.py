"""The `openai` recognizer: a VLM (GLM-OCR on vLLM or SGLang) behind the OpenAI chat-completions API.

Requests are posted as the chat-completions JSON with aiohttp (its HTTP parser is compiled),
all of them on one event loop: the client's CPU per request bounds how many requests one
process keeps in flight (``bench/vlm.py`` measures it against the GLM-OCR SDK's client).

Each crop is one request: the crop's JPEG bytes (already resized by the crops stage) in a
base64 data URL, then the task's prompt; temperature 0 and a ``max_tokens`` per task.

``base_url`` names one server or several (``OCR_ASSETS_VLM_BASE_URL``, comma-separated): each gets
at most ``concurrency`` of this recognizer's requests at once, retries included (``set_concurrency``
changes it mid-stream), and a request goes to the in-service server with the fewest in flight
(``vlm_fleet``). The next crop is pulled from the stage as soon as a request finishes, so the
servers stay full without a burst they cannot queue; one stream runs at a time. ``timeout`` bounds
an attempt from its sending to the answer's headers (a server that stops reading the request is
silent too), then each pause in the answer. A server that stops answering (refused, reset, silent:
two such failures in a row, or one refused connection) is taken out of service and probed until
it answers again; its requests are retried on the others at once. 429, 5xx, connection errors,
timeouts and malformed answers are retried, on another server where one is in service, with
exponential backoff and jitter, honouring a well-formed ``Retry-After``. With no server in service
a request waits for a probe to bring one back until ``timeout`` seconds after the last server
went out, not after it began to wait: in a long outage requests fail at once instead of each
waiting the whole timeout again. A crop that still fails, or that hits anything unexpected, gets
the reason, and the others go on. An answer cut at ``max_tokens`` or caught in a repetition loop
is flagged, not kept as text. When the caller stops reading (the step is interrupted or failed),
the requests in flight are cancelled at once.

Each request asks for ``logprobs`` (unless ``logprobs=False``: the resource's ``vlm_logprobs``);
a region's confidence is exp of the mean log-probability of the answer's tokens (see
``openai_replies.token_confidence``). A server that sends none gives the region no confidence
(null), not an error. A 400 to a request with ``logprobs`` is asked once more without them (not
counted as an attempt); when that one is answered, the server refuses the parameter and the rest
of the run reads without it. Those answers lack what the cache key promises (a confidence), so
they are not cached: a user of such a server sets ``vlm_logprobs`` to false, which changes the key.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import aiohttp

from ocr_assets import config
from ocr_assets.backends.recognition.base import Crop, Recognized, content_key
from ocr_assets.backends.recognition.openai_replies import (ServerStats, VlmStats, http_reason, repetition_loop,
                                                           retry_after_seconds, token_confidence)
from ocr_assets.backends.recognition.vlm_fleet import SendTimeout, VlmFleet, channel_failure, check_servers, post

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# Bumped when the way an answer becomes a region's text changes: cached answers are then read again.
ANSWER_FORMAT = "3"  # 3: logprobs asked for, the answer's confidence kept
_DONE = object()
_STOP_POLL_SECONDS = 0.05  # how soon the event loop notices that the caller stopped reading
_JOIN_SECONDS = 10.0  # the longest a stopped stream waits for its event loop to wind down


def _loop_factory():
    """uvloop's event loop where it is installed (it comes with the Dagster webserver): less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _cancel_on_stop(stop: threading.Event, main: asyncio.Task) -> None:
    """Cancel ``main`` (and so every request in flight) once the caller sets ``stop``."""
    while not stop.is_set():
        await asyncio.sleep(_STOP_POLL_SECONDS)
    main.cancel()


class UnfinishedAnswer(ValueError):
    """A 200 whose choice did not finish (vLLM's or SGLang's abort or error): retried, never cached."""


class OpenAIRecognizer:
    """Reads crops through an OpenAI-compatible server; see the module docstring."""

    name = "openai"

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        model: str = "glm-ocr",
        api_key: str | None = None,
        concurrency: int = 64,
        prompts: dict[str, str] | None = None,
        max_tokens: dict[str, int] | None = None,
        timeout: float = 120.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        verify_tls: bool = True,
        logprobs: bool = True,
        probe: bool = True,
        probe_interval: float = 1.0,
        probe_interval_max: float = 30.0,
    ) -> None:
        """``base_url``: one URL, several comma-separated, or a list; ``concurrency``: the most requests
        this recognizer keeps in flight to each server. A server out of service is probed at once, then
        after ``probe_interval`` seconds, doubling up to ``probe_interval_max``."""
        urls = config.vlm_base_urls(base_url if isinstance(base_url, str) else ",".join(base_url or ()))
        if not urls:
            raise ValueError(f"the openai recognizer needs {config.ENV_VLM_BASE_URL}, e.g. http://localhost:8000/v1")
        if concurrency < 1:
            raise ValueError(f"{config.ENV_VLM_CONCURRENCY}={concurrency}: at least 1 request must be in flight")
        self.base_urls: list[str] = urls
        self.base_url = ",".join(urls)
        self.model = model
        self.api_key = api_key
        self.concurrency = int(concurrency)
        self.batch_size = self.concurrency * len(urls)
        self.prompts = {**config.TASK_PROMPTS, **(prompts or {})}
        self.max_tokens = {**config.TASK_MAX_TOKENS, **(max_tokens or {})}
        self.timeout = float(timeout)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self.verify_tls = bool(verify_tls)
        self.version = f"openai-client/{ANSWER_FORMAT}"
        self.logprobs = bool(logprobs)  # as configured: part of the cache key
        self.ask_logprobs = self.logprobs  # turned off when the server refuses the parameter
        self.fleet = VlmFleet(urls, self.concurrency, probe_interval=probe_interval,
                              probe_interval_max=probe_interval_max)
        self._lock = threading.Lock()  # a stream's start, and set_concurrency, from any thread
        self._worker: threading.Thread | None = None  # the last stream's event loop thread
        self.stats = self._new_stats()
        if probe:
            self.probe()

    # -- settings that decide an answer --

    def cache_key(self, crop: Crop) -> str:
        """Crop bytes, the client's answer format, model, prompt and sampling (the request as sent)."""
        prompt = self.prompts.get(crop.task, self.prompts["text"])
        return content_key(crop.image, self.name, self.version, self.model, prompt, "temperature=0",
                           f"max_tokens={self.max_tokens.get(crop.task, 8192)}", f"logprobs={self.logprobs}")

    def run_metadata(self) -> dict[str, int | float | str]:
        """The last stream's figures, with each server's (``server_<i>_*``, i as in ``vlm_servers``)."""
        meta: dict[str, int | float | str] = dict(self.stats.metadata())
        meta["servers_in_service"] = len(self.fleet.in_service())
        meta["vlm_servers"] = self.fleet.describe()
        return meta

    def _new_stats(self) -> VlmStats:
        return VlmStats(servers=[ServerStats() for _ in self.base_urls])

    def set_concurrency(self, concurrency: int) -> None:
        """Change the most requests in flight to each server; safe from any thread while a stream runs.

        New requests obey the new bound at once. Lowering it cancels nothing: the requests in flight
        finish, and a server gets no new one until it is under the new bound. Raising it lets the
        waiting crops go at once, and the running stream then holds up to the new bound times the
        servers in memory. ``concurrency`` and ``batch_size`` give the new value to the next streams.
        """
        n = int(concurrency)
        if n < 1:
            raise ValueError(f"{config.ENV_VLM_CONCURRENCY}={concurrency}: at least 1 request must be in flight")
        with self._lock:
            self.concurrency, self.batch_size = n, n * len(self.base_urls)
            self.fleet.set_concurrency(n)

    # -- the servers --

    def probe(self) -> None:
        """Fail fast, before any crop is sent, when no server answers or the configuration is wrong
        (a refused key, a model not served); servers that are only down start out of service."""
        self.fleet.set_in_service(check_servers(self.base_urls, model=self.model, api_key=self.api_key,
                                                verify_tls=self.verify_tls, timeout=self.timeout))

    def _session(self) -> aiohttp.ClientSession:
        """A stream's HTTP session: a keep-alive connection per request in flight (the fleet bounds
        them, ``concurrency`` per server) and one per server being probed. No connector limit: a
        bound raised mid-stream must not leave requests waiting for a connection inside their timeout."""
        connector = aiohttp.TCPConnector(limit=0, ssl=None if self.verify_tls else False)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key or 'none'}"}
        # Up to the headers an attempt is bounded by `post`; then a read timeout, not a total: a
        # long answer that keeps arriving is not a server that stopped answering.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout, 30.0), sock_read=self.timeout)
        return aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)

    # -- reading --

    def recognize(self, crops: Sequence[Crop]) -> list[Recognized]:
        results: dict[int, Recognized] = dict(self.recognize_stream(enumerate(crops)))
        return [results[i] for i in range(len(crops))]

    def recognize_stream(self, items: Iterable[tuple[int, Crop]]) -> Iterator[tuple[int, Recognized]]:
        """(key, result) as answers arrive; an event loop on a worker thread keeps the requests going.

        When the caller stops reading (closes the generator, or an exception such as Dagster's
        interruption unwinds it), the requests in flight are cancelled and this returns within
        about a second instead of waiting for their retries. RuntimeError when the last stream's
        worker still runs: the servers' counts belong to one stream at a time.
        """
        answers: queue.Queue = queue.Queue()
        stop = threading.Event()  # the caller stopped reading: cancel what is in flight, send nothing more

        def work() -> None:
            try:
                if hasattr(asyncio, "Runner"):  # Python 3.11+: uvloop where installed
                    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                        runner.run(self._run(items, answers, stop))
                else:
                    asyncio.run(self._run(items, answers, stop))
            except BaseException as exc:  # handed to the caller's thread
                answers.put(exc)
            answers.put(_DONE)

        with self._lock:
            if self._worker is not None and self._worker.is_alive():
                raise RuntimeError(
                    "the openai recognizer's last stream is still running (still being read, or its requests "
                    f"did not wind down within {_JOIN_SECONDS:g} s of its end): end it before starting another")
            self.stats = self._new_stats()
            worker = self._worker = threading.Thread(target=work, name="vlm-requests", daemon=True)
            worker.start()
        try:
            while True:
                item = answers.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join(_JOIN_SECONDS)

    async def _run(self, items: Iterable[tuple[int, Crop]], answers: queue.Queue, stop: threading.Event) -> None:
        session, fleet = self._session(), self.fleet
        tasks: set[asyncio.Task] = set()  # in flight; _answer turns every failure into a result
        watcher = asyncio.create_task(_cancel_on_stop(stop, asyncio.current_task()))
        self.stats.started = self.stats.started or time.perf_counter()
        fleet.start(session, probe_timeout=min(self.timeout, 10.0))
        try:
            for key, crop in items:
                await asyncio.sleep(0)  # the stop watcher and finished requests run between crops
                await fleet.admit()  # crops being read, waiting or retrying included: a batch
                if stop.is_set():
                    fleet.discharge()
                    break
                task = asyncio.create_task(self._answer(session, key, crop, answers))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            watcher.cancel()
            for task in list(tasks):  # stopped: the caller reads no more answers
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.stats.finished = time.perf_counter()
            await self.fleet.stop()
            await session.close()

    async def _answer(self, session, key, crop: Crop, answers: queue.Queue) -> None:
        try:
            result = await self._read(session, crop)
        except Exception as exc:  # a bug or a surprise in the client fails this region, not the step
            self.stats.errors["unexpected"] += 1
            result = Recognized("", "error", f"the VLM client failed: {type(exc).__name__}: {exc}")
        finally:
            self.fleet.discharge()
        answers.put((key, result))

    def _request(self, crop: Crop, logprobs: bool) -> dict:
        data = base64.b64encode(crop.image).decode("ascii")
        mime = "image/png" if crop.image[:4] == b"\x89PNG" else "image/jpeg"
        extra = {"logprobs": True} if logprobs else {}
        return dict(
            model=self.model,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
                {"type": "text", "text": self.prompts.get(crop.task, self.prompts["text"])},
            ]}],
            temperature=0.0,
            max_tokens=self.max_tokens.get(crop.task, 8192),
            **extra,
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max) + random.uniform(0, self.backoff_base)
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))  # full jitter

    async def _read(self, session: aiohttp.ClientSession, crop: Crop) -> Recognized:
        if not crop.image:
            return Recognized("", "error", "empty crop image")
        asked_logprobs = self.ask_logprobs
        body = json.dumps(self._request(crop, asked_logprobs)).encode()
        stats, fleet = self.stats, self.fleet
        reason = "no attempt"
        recheck = False  # the next request asks again without logprobs after a 400 (once; no attempt)
        failed_on = None  # the server the last attempt failed on: the retry goes to another one
        attempt = -1
        while attempt + 1 < self.max_attempts or recheck:
            rechecking, recheck = recheck, False
            if not rechecking:
                attempt += 1
                if asked_logprobs != self.ask_logprobs:  # the recheck went unanswered, or another request
                    asked_logprobs = self.ask_logprobs  # found that the server refuses them
                    body = json.dumps(self._request(crop, asked_logprobs)).encode()
                if attempt:
                    stats.retries += 1
            server = await fleet.acquire(avoid=failed_on, patience=self.timeout)
            if server is None:  # the wait was the delay: no backoff after it
                stats.errors["no_server"] += 1
                reason = (f"no VLM server in {config.ENV_VLM_BASE_URL} answers (none in service for "
                          f"{self.timeout:g} s)")
                continue
            retry_after = channel = None
            mine = stats.servers[server.index]
            stats.requests += 1
            mine.requests += 1
            stats.in_flight += 1
            stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
            mine.peak_in_flight = max(mine.peak_in_flight, server.in_flight)
            start = time.perf_counter()
            try:
                async with await post(session, server.chat_url, body, self.timeout) as response:
                    status, headers, content = response.status, response.headers, await response.read()
                fleet.answered(server)
                if status == 400 and asked_logprobs and not rechecking:  # the request, or only its logprobs? ask to see
                    recheck, asked_logprobs = True, False
                    body = json.dumps(self._request(crop, False)).encode()
                    reason = http_reason(status, content)
                    continue
                if rechecking:
                    if status == 200 and self.ask_logprobs:  # answered without them: the server refuses them
                        stats.errors["logprobs_refused"] += 1
                        self.ask_logprobs = False
                if status != 200:
                    stats.errors[f"http_{status}"] += 1
                    reason = http_reason(status, content)
                    if status not in RETRY_STATUS:  # the request itself is refused: not an answer, not cached
                        mine.errors += 1
                        return Recognized("", "error", reason)
                    retry_after = retry_after_seconds(headers)
                else:
                    latency = time.perf_counter() - start
                    stats.latencies.append(latency)
                    mine.latencies.append(latency)
                    try:
                        result = self._judge(json.loads(content))
                    except UnfinishedAnswer as exc:  # aborted or failed on the server: ask again
                        stats.errors["unfinished"] += 1
                        reason = str(exc)
                    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
                        stats.errors["malformed"] += 1
                        reason = f"malformed answer from the VLM server: {type(exc).__name__}: {exc}"
                    else:
                        if result is not None:
                            if self.logprobs and not asked_logprobs:  # no confidence, where the key promises one
                                result = dataclasses.replace(result, cacheable=False)
                            return result
                        stats.errors["empty_choices"] += 1
                        reason = "the VLM server answered without a choice"
            except (asyncio.TimeoutError, TimeoutError) as exc:  # asyncio's and aiohttp's timeouts alike
                stats.errors["timeout"] += 1
                channel = exc
                if isinstance(exc, aiohttp.ConnectionTimeoutError):
                    reason = f"no connection to the VLM server within {min(self.timeout, 30.0):g} s"
                else:  # SendTimeout: no answer, or the request not even read
                    reason = str(exc) if isinstance(exc, SendTimeout) else \
                        f"the VLM server sent nothing for {self.timeout:g} s (vlm_timeout)"
            except (aiohttp.ClientError, OSError) as exc:  # refused, reset, disconnected, cut mid-answer
                stats.errors["connection"] += 1
                channel = exc
                reason = f"connection to the VLM server failed: {type(exc).__name__}: {exc}"
            except Exception as exc:  # anything else in the client: this attempt failed, try again
                stats.errors["unexpected"] += 1
                reason = f"the VLM client failed: {type(exc).__name__}: {exc}"
            finally:
                stats.in_flight -= 1
                fleet.release(server)
            mine.errors += 1
            failed_on = server
            if channel is not None and channel_failure(channel):
                if fleet.failed(server, channel, reason):
                    mine.taken_out += 1
                if not server.in_service:  # the others are tried at once (or waited for)
                    continue
            if attempt + 1 < self.max_attempts:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        return Recognized("", "error", f"{reason} (after {self.max_attempts} attempts)")

    def _judge(self, answer: dict) -> Recognized | None:
        """The answer of one completed request (the chat-completion JSON), flagged when degenerate;
        None when it has no choice."""
        choices = answer.get("choices")
        if not choices or not isinstance(choices[0].get("message"), dict):
            return None
        usage = answer.get("usage") or {}
        self.stats.tokens_in += int(usage.get("prompt_tokens") or 0)
        self.stats.tokens_out += int(usage.get("completion_tokens") or 0)
        text = choices[0]["message"].get("content") or ""
        finish = choices[0].get("finish_reason")
        if finish not in (None, "stop", "length"):  # abort, error, content_filter: not the model's answer
            raise UnfinishedAnswer(f"the VLM server ended the answer with finish_reason={finish!r}")
        if finish == "length":
            self.stats.errors["length"] += 1
            return Recognized("", "error", "answer cut at max_tokens (finish_reason=length)", cacheable=True)
        if repetition_loop(text):
            self.stats.errors["repetition"] += 1
            return Recognized("", "error", "answer is a repetition loop", cacheable=True)
        text = text.strip()
        confidence = token_confidence(choices[0].get("logprobs")) if text else None
        return Recognized(text, cacheable=True, confidence=confidence)
