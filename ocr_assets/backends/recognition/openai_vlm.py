"""The `openai` recognizer: a VLM (GLM-OCR on vLLM or SGLang) behind the OpenAI chat-completions API.

Requests are posted as the chat-completions JSON with aiohttp (its HTTP parser is compiled),
all of them on one event loop: the client's CPU per request bounds how many requests one
process keeps in flight (``bench/vlm.py`` measures it against the GLM-OCR SDK's client).

Each crop is one request: the crop's JPEG bytes (already resized by the crops stage) in a
base64 data URL, then the task's prompt; temperature 0 and a ``max_tokens`` per task. At most
``concurrency`` requests are in flight; the next crop is pulled from the stage as soon as one
finishes, so the server stays full without a burst it cannot queue. 429, 5xx, connection
errors, read timeouts (the server silent for ``timeout`` seconds) and malformed answers are
retried with exponential backoff and jitter, honouring a well-formed ``Retry-After``; a crop
that still fails, or that hits anything unexpected, gets the reason, and the others go on. An
answer cut at ``max_tokens`` or caught in a repetition loop is flagged, not kept as text.
When the caller stops reading (the step is interrupted or failed), the requests in flight are
cancelled at once.

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
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence

import aiohttp

from ocr_assets import config
from ocr_assets.backends.recognition.base import Crop, Recognized, content_key
from ocr_assets.backends.recognition.openai_replies import (VlmStats, http_reason, repetition_loop,
                                                           retry_after_seconds, token_confidence)

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
        base_url: str,
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
    ) -> None:
        if not base_url:
            raise ValueError(f"the openai recognizer needs {config.ENV_VLM_BASE_URL}, e.g. http://localhost:8000/v1")
        if concurrency < 1:
            raise ValueError(f"{config.ENV_VLM_CONCURRENCY}={concurrency}: at least 1 request must be in flight")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.concurrency = int(concurrency)
        self.batch_size = self.concurrency
        self.prompts = {**config.TASK_PROMPTS, **(prompts or {})}
        self.max_tokens = {**config.TASK_MAX_TOKENS, **(max_tokens or {})}
        self.timeout = float(timeout)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self.verify_tls = bool(verify_tls)
        self.version = f"openai-client/{ANSWER_FORMAT}"
        self._url = f"{self.base_url}/chat/completions"
        self.logprobs = bool(logprobs)  # as configured: part of the cache key
        self.ask_logprobs = self.logprobs  # turned off when the server refuses the parameter
        self.stats = VlmStats()
        if probe:
            self.probe()

    # -- settings that decide an answer --

    def cache_key(self, crop: Crop) -> str:
        """Crop bytes, the client's answer format, model, prompt and sampling (the request as sent)."""
        prompt = self.prompts.get(crop.task, self.prompts["text"])
        return content_key(crop.image, self.name, self.version, self.model, prompt, "temperature=0",
                           f"max_tokens={self.max_tokens.get(crop.task, 8192)}", f"logprobs={self.logprobs}")

    def run_metadata(self) -> dict[str, int | float]:
        return self.stats.metadata()

    # -- the server --

    def probe(self) -> None:
        """Fail fast, before any crop is sent, when the server is down or does not serve the model."""
        request = urllib.request.Request(f"{self.base_url}/models")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        context = None
        if not self.verify_tls:  # turned off on purpose (vlm_verify_tls): a self-signed server
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 15.0), context=context) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, b""
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(
                f"the VLM server at {config.ENV_VLM_BASE_URL}={self.base_url} does not answer "
                f"({type(exc).__name__}: {exc}); start it or point {config.ENV_VLM_BASE_URL} at a running one"
            ) from exc
        if status in (401, 403):
            raise PermissionError(
                f"the VLM server at {self.base_url} refused the key (HTTP {status}); set {config.ENV_VLM_API_KEY}"
            )
        if status != 200:
            raise ConnectionError(
                f"the VLM server at {config.ENV_VLM_BASE_URL}={self.base_url} answered GET /models with "
                f"HTTP {status}; is it an OpenAI-compatible server (base URL ending in /v1)?"
            )
        try:
            served = [m.get("id") for m in json.loads(body).get("data", [])]
        except (ValueError, AttributeError) as exc:
            raise ConnectionError(f"GET {self.base_url}/models did not return the model list") from exc
        if served and self.model not in served:
            raise ValueError(
                f"{config.ENV_VLM_MODEL}={self.model!r} is not served at {self.base_url}; it serves {served}"
            )

    def _session(self) -> aiohttp.ClientSession:
        """One HTTP session holding up to ``concurrency`` keep-alive connections."""
        connector = aiohttp.TCPConnector(limit=self.concurrency, ssl=None if self.verify_tls else False)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key or 'none'}"}
        # A read timeout, not a total: a long answer that keeps arriving, or a wait for a free
        # connection, is not a server that stopped answering.
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
        about a second instead of waiting for their retries.
        """
        self.stats = VlmStats()
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

        worker = threading.Thread(target=work, name="vlm-requests", daemon=True)
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
        session = self._session()
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()  # in flight; _answer turns every failure into a result
        watcher = asyncio.create_task(_cancel_on_stop(stop, asyncio.current_task()))
        self.stats.started = self.stats.started or time.perf_counter()
        try:
            for key, crop in items:
                await asyncio.sleep(0)  # the stop watcher and finished requests run between crops
                await slots.acquire()
                if stop.is_set():
                    slots.release()
                    break
                task = asyncio.create_task(self._answer(session, key, crop, slots, answers))
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
            await session.close()

    async def _answer(self, session, key, crop: Crop, slots: asyncio.Semaphore, answers: queue.Queue) -> None:
        try:
            result = await self._read(session, crop)
        except Exception as exc:  # a bug or a surprise in the client fails this region, not the step
            self.stats.errors["unexpected"] += 1
            result = Recognized("", "error", f"the VLM client failed: {type(exc).__name__}: {exc}")
        finally:
            slots.release()
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
        stats = self.stats
        reason = "no attempt"
        probe = False  # the next request asks again without logprobs after a 400 (once; no attempt)
        attempt = -1
        while attempt + 1 < self.max_attempts or probe:
            probing, probe = probe, False
            if not probing:
                attempt += 1
                if asked_logprobs != self.ask_logprobs:  # the probe went unanswered, or another request
                    asked_logprobs = self.ask_logprobs  # found that the server refuses them
                    body = json.dumps(self._request(crop, asked_logprobs)).encode()
                if attempt:
                    stats.retries += 1
            retry_after = None
            stats.requests += 1
            stats.in_flight += 1
            stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
            start = time.perf_counter()
            try:
                async with session.post(self._url, data=body) as response:
                    status, headers, content = response.status, response.headers, await response.read()
                if status == 400 and asked_logprobs and not probing:  # the request, or only its logprobs? ask to see
                    probe, asked_logprobs = True, False
                    body = json.dumps(self._request(crop, False)).encode()
                    reason = http_reason(status, content)
                    continue
                if probing:
                    if status == 200 and self.ask_logprobs:  # answered without them: the server refuses them
                        stats.errors["logprobs_refused"] += 1
                        self.ask_logprobs = False
                if status != 200:
                    stats.errors[f"http_{status}"] += 1
                    reason = http_reason(status, content)
                    if status not in RETRY_STATUS:  # the request itself is refused: not an answer, not cached
                        return Recognized("", "error", reason)
                    retry_after = retry_after_seconds(headers)
                else:
                    stats.latencies.append(time.perf_counter() - start)
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
                if isinstance(exc, aiohttp.ConnectionTimeoutError):
                    reason = f"no connection to the VLM server within {min(self.timeout, 30.0):g} s"
                else:
                    reason = f"the VLM server sent nothing for {self.timeout:g} s (vlm_timeout)"
            except (aiohttp.ClientError, OSError) as exc:  # refused, reset, disconnected, cut mid-answer
                stats.errors["connection"] += 1
                reason = f"connection to the VLM server failed: {type(exc).__name__}: {exc}"
            except Exception as exc:  # anything else in the client: this attempt failed, try again
                stats.errors["unexpected"] += 1
                reason = f"the VLM client failed: {type(exc).__name__}: {exc}"
            finally:
                stats.in_flight -= 1
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
