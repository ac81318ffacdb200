"""The `openai` recognizer: a VLM (GLM-OCR on vLLM or SGLang) behind the OpenAI chat-completions API.

Requests are posted as the chat-completions JSON with aiohttp (its HTTP parser is compiled)
rather than through the OpenAI SDK: measured on 2 cores against a fixed-latency server, the
SDK cost 3.0-3.3 ms of client CPU per request, httpx alone 1.6-2.1 ms, aiohttp 0.5 ms, and the
client's CPU per request bounds how many requests one process keeps in flight.

Each crop is one request: the crop's JPEG bytes (already resized by the crops stage) in a
base64 data URL, then the task's prompt; temperature 0 and a ``max_tokens`` per task. At most
``concurrency`` requests are in flight; the next crop is pulled from the stage as soon as one
finishes, so the server stays full without a burst it cannot queue. 429, 5xx, connection
errors, timeouts and malformed answers are retried with exponential backoff and jitter,
honouring ``Retry-After``; a crop that still fails gets the reason, and the others go on. An
answer cut at ``max_tokens`` or caught in a repetition loop is flagged, not kept as text.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import queue
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp

from ocr_assets import config
from ocr_assets.backends.recognition.base import Crop, Recognized, content_key

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_DONE = object()


@dataclass
class VlmStats:
    """What the requests cost: the recognition asset's metadata."""

    requests: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)  # by kind: http_503, timeout, length, ...
    tokens_in: int = 0
    tokens_out: int = 0
    latencies: list[float] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    started: float = 0.0
    finished: float = 0.0

    def metadata(self) -> dict[str, float | int]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else 0.0

        wall = max(self.finished - self.started, 1e-9)
        out: dict[str, float | int] = {
            "requests": self.requests, "retries": self.retries, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "latency_p50_seconds": pct(0.5), "latency_p95_seconds": pct(0.95),
            "latency_max_seconds": round(lat[-1], 4) if lat else 0.0,
            "requests_per_second": round(self.requests / wall, 2) if self.requests else 0.0,
            "peak_in_flight": self.peak_in_flight,
        }
        out.update({f"errors_{kind}": n for kind, n in sorted(self.errors.items())})
        return out


def repetition_loop(text: str, min_chars: int = 400, max_period: int = 200, repeats: int = 8) -> bool:
    """Whether ``text`` ends in one short chunk repeated over and over (a decoding loop)."""
    if len(text) < min_chars:
        return False
    tail = text[-max_period * repeats:]
    for period in range(1, max_period + 1):
        if period * repeats > len(tail):
            break
        unit = tail[-period:]
        if tail.endswith(unit * repeats) and unit.strip():
            return True
    return False


def _loop_factory():
    """uvloop's event loop where it is installed (it comes with the Dagster webserver): less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _retry_after(headers) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


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
        self._url = f"{self.base_url}/chat/completions"
        self.stats = VlmStats()
        if probe:
            self.probe()

    # -- settings that decide an answer --

    def cache_key(self, crop: Crop) -> str:
        prompt = self.prompts.get(crop.task, self.prompts["text"])
        return content_key(crop.image, self.name, self.model, prompt, "temperature=0",
                           f"max_tokens={self.max_tokens.get(crop.task, 8192)}")

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
        return aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=self.timeout))

    # -- reading --

    def recognize(self, crops: Sequence[Crop]) -> list[Recognized]:
        results: dict[int, Recognized] = dict(self.recognize_stream(enumerate(crops)))
        return [results[i] for i in range(len(crops))]

    def recognize_stream(self, items: Iterable[tuple[int, Crop]]) -> Iterator[tuple[int, Recognized]]:
        """(key, result) as answers arrive; an event loop on a worker thread keeps the requests going."""
        self.stats = VlmStats()
        answers: queue.Queue = queue.Queue()
        stop = threading.Event()  # the caller stopped reading: send nothing more

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
            worker.join()

    async def _run(self, items: Iterable[tuple[int, Crop]], answers: queue.Queue, stop: threading.Event) -> None:
        session = self._session()
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()
        self.stats.started = self.stats.started or time.perf_counter()
        try:
            for key, crop in items:
                await slots.acquire()
                if stop.is_set():
                    slots.release()
                    break
                task = asyncio.create_task(self._answer(session, key, crop, slots, answers))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            self.stats.finished = time.perf_counter()
            await session.close()

    async def _answer(self, session, key, crop: Crop, slots: asyncio.Semaphore, answers: queue.Queue) -> None:
        try:
            answers.put((key, await self._read(session, crop)))
        finally:
            slots.release()

    def _request(self, crop: Crop) -> dict:
        data = base64.b64encode(crop.image).decode("ascii")
        mime = "image/png" if crop.image[:4] == b"\x89PNG" else "image/jpeg"
        return dict(
            model=self.model,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
                {"type": "text", "text": self.prompts.get(crop.task, self.prompts["text"])},
            ]}],
            temperature=0.0,
            max_tokens=self.max_tokens.get(crop.task, 8192),
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max) + random.uniform(0, self.backoff_base)
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))  # full jitter

    async def _read(self, session: aiohttp.ClientSession, crop: Crop) -> Recognized:
        if not crop.image:
            return Recognized("", "error", "empty crop image")
        body = json.dumps(self._request(crop)).encode()
        stats = self.stats
        reason = "no attempt"
        for attempt in range(self.max_attempts):
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
            except asyncio.TimeoutError:
                stats.errors["timeout"] += 1
                reason = f"no answer within {self.timeout:g} s"
            except aiohttp.ClientError as exc:
                stats.errors["connection"] += 1
                reason = f"connection to the VLM server failed: {type(exc).__name__}: {exc}"
            else:
                if status != 200:
                    kind = f"http_{status}"
                    reason = f"HTTP {status} from the VLM server: {content[:300].decode(errors='replace')}"
                    stats.errors[kind] += 1
                    if status not in RETRY_STATUS:
                        return Recognized("", "error", reason)
                    retry_after = _retry_after(headers)
                else:
                    stats.latencies.append(time.perf_counter() - start)
                    try:
                        result = self._judge(json.loads(content))
                    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
                        stats.errors["malformed"] += 1
                        reason = f"malformed answer from the VLM server: {type(exc).__name__}: {exc}"
                    else:
                        if result is not None:
                            return result
                        stats.errors["empty_choices"] += 1
                        reason = "the VLM server answered without a choice"
            finally:
                stats.in_flight -= 1
            if attempt + 1 < self.max_attempts:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        return Recognized("", "error", f"{reason} (after {self.max_attempts} attempts)", retryable=True)

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
        if choices[0].get("finish_reason") == "length":
            self.stats.errors["length"] += 1
            return Recognized("", "error", "answer cut at max_tokens (finish_reason=length)")
        if repetition_loop(text):
            self.stats.errors["repetition"] += 1
            return Recognized("", "error", "answer is a repetition loop")
        return Recognized(text.strip())
