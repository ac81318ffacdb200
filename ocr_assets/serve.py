"""`ocr-assets serve`: an OpenAI-compatible chat-completions server backed by the local PP-OCRv6 recognizer.

It answers ``GET /v1/models``, ``GET /health`` and ``POST /v1/chat/completions`` with one
image (a base64 data URL) and a GLM-OCR prompt per request, so the `openai` recognizer runs on
a laptop with no GPU, and the tests drive the real client over real HTTP. The answer function
is pluggable (``OcrServer(answer=...)``): the bench and the tests use the same server with a
fixed-latency or fault-injecting answer.

Log-probabilities (``"logprobs": true``) are derived from the local recognizer's confidence: each
token of the answer (a word, with the whitespace before it) gets ``ln(confidence)``, so the
client's exp of the mean token log-probability is exactly the region confidence that the local
recognizer gives (the character-weighted mean of its line scores). An answer with no confidence
(an answer function that returns only text) is sent with ``"logprobs": null``, as a server that
computes none would.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from ocr_assets import config

# (image bytes, prompt, max_tokens) -> text, or (text, confidence in [0, 1] or None)
Answer = Callable[[bytes, str, int], "str | tuple[str, float | None] | Awaitable[str | tuple[str, float | None]]"]
Reply = tuple[int, dict[str, str], bytes]  # status, headers, body


def local_answer(threads: int | None = None) -> Answer:
    """Read the image with the local PP-OCRv6 recognizer, with the task the prompt names."""
    from ocr_assets.backends.recognition.base import Crop
    from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer

    recognizer = RapidOcrRecognizer(threads=threads) if threads else RapidOcrRecognizer()
    task_of = {prompt: task for task, prompt in config.TASK_PROMPTS.items()}
    lock = threading.Lock()  # one crop at a time: the models already use every core

    def answer(image: bytes, prompt: str, max_tokens: int) -> tuple[str, float | None]:
        with lock:
            (result,) = recognizer.recognize([Crop(task_of.get(prompt.strip(), "text"), image, 0, 0)])
        if result.status != "ok":
            raise ValueError(result.error or "the image could not be read")
        return result.text, result.confidence

    return answer


def token_logprobs(text: str, confidence: float | None) -> dict | None:
    """The chat-completions ``logprobs`` of an answer: one token per word (with the whitespace
    before it), each at ``ln(confidence)``; None when there is no confidence."""
    if confidence is None:
        return None
    logprob = math.log(confidence) if confidence > 0 else -9999.0  # vLLM's stand-in for -inf
    return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
                        for token in re.findall(r"\s*\S+", text)]}


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _error(status: int, message: str) -> Reply:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})


def parse_chat(payload: dict) -> tuple[bytes, str, int]:
    """(image bytes, prompt, max_tokens) of a chat request with an image and a text part (no image: b"")."""
    image, prompt = None, ""
    for message in payload.get("messages") or []:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        for part in parts:
            if part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:") or "," not in url:
                    raise ValueError("image_url must be a base64 data URL")
                image = base64.b64decode(url.split(",", 1)[1])
            elif part.get("type") == "text":
                prompt += part.get("text") or ""
    return image or b"", prompt, int(payload.get("max_tokens") or 8192)


class OcrServer:
    """The HTTP server (aiohttp, on its own event loop): ``start()`` in the background or ``serve_forever()``.

    A synchronous ``answer`` (the local models) runs on a thread pool, so slow answers do not
    hold up the others; an ``async`` one runs on the loop (the bench's fixed-latency answer).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, answer: Answer | None = None,
                 model: str = "glm-ocr", threads: int = 512, ssl_context=None) -> None:
        self.answer = answer or local_answer()
        self.model = model
        self.ssl_context = ssl_context  # serve https
        self.host, self.port = host, port
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ocr-serve")
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop.run_until_complete(self._open())

    async def _open(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}/v1"

    def models(self) -> Reply:
        return _json(200, {"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "ocr_assets"}]})

    def chat(self, payload: dict) -> Reply:
        """The reply to one chat-completions request (override to inject faults in tests)."""
        checked = self._check(payload)
        if isinstance(checked, tuple) and len(checked) == 3 and isinstance(checked[0], int):
            return checked
        image, prompt, max_tokens = checked
        try:
            text = self.answer(image, prompt, max_tokens) if image else ""  # no image, no text to read
        except Exception as exc:
            return _error(422, f"could not read the image: {exc}")
        return self._completion(text, image, prompt, max_tokens, bool(payload.get("logprobs")))

    def _check(self, payload: dict):
        if payload.get("model") not in (None, self.model):
            return _error(404, f"model {payload.get('model')!r} is not served here; {self.model!r} is")
        try:
            return parse_chat(payload)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))

    def _completion(self, answer: "str | tuple[str, float | None]", image: bytes, prompt: str, max_tokens: int,
                    logprobs: bool = False) -> Reply:
        text, confidence = answer if isinstance(answer, tuple) else (answer, None)
        words = text.split()
        finish = "length" if len(words) > max_tokens else "stop"
        text = " ".join(words[:max_tokens]) if finish == "length" else text
        prompt_tokens = len(image) // 1024 + len(prompt.split())
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = token_logprobs(text, confidence)
        return _json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": min(len(words), max_tokens),
                      "total_tokens": prompt_tokens + min(len(words), max_tokens)},
        })

    # -- HTTP --

    @staticmethod
    def _response(reply: Reply) -> web.Response:
        status, headers, body = reply
        return web.Response(status=status, headers=headers, body=body)

    async def _models(self, request: web.Request) -> web.Response:
        return self._response(self.models())

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return self._response(_error(400, "the body is not JSON"))
        if inspect.iscoroutinefunction(self.answer) and type(self).chat is OcrServer.chat:
            checked = self._check(payload)
            if isinstance(checked[0], int):
                return self._response(checked)
            image, prompt, max_tokens = checked
            text = await self.answer(image, prompt, max_tokens) if image else ""
            return self._response(self._completion(text, image, prompt, max_tokens, bool(payload.get("logprobs"))))
        reply = await asyncio.get_running_loop().run_in_executor(self._pool, self.chat, payload)
        return self._response(reply)

    # -- lifecycle --

    def serve_forever(self) -> None:
        """Serve on this thread until ``shutdown()`` (or Ctrl-C)."""
        self._loop.run_forever()

    def start(self) -> "OcrServer":
        """Serve on a background thread (tests, the bench); returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="ocr-serve", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def server_close(self) -> None:
        if self._runner is not None and not self._loop.is_running():
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()
        self._pool.shutdown(wait=False)


def serve(host: str, port: int, model: str, threads: int | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    server = OcrServer(host, port, answer=local_answer(threads), model=model)
    # stop cleanly on SIGTERM (containers, process managers), even where a parent ignored it
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print(f"serving {model!r} (local PP-OCRv6) at {server.base_url}; set "
          f"{config.ENV_VLM_BASE_URL}={server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
