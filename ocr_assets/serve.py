"""`ocr-assets serve`: an OpenAI-compatible chat-completions server backed by the local PP-OCRv6 recognizer.

It answers ``GET /v1/models``, ``GET /health`` and ``POST /v1/chat/completions`` with one
image (a base64 data URL) and a GLM-OCR prompt per request, so the `openai` recognizer runs on
a laptop with no GPU, and the tests drive the real client over real HTTP. The answer function
is pluggable (``OcrServer(answer=...)``): the bench and the tests use the same server with a
fixed-latency or fault-injecting answer.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ocr_assets import config

Answer = Callable[[bytes, str, int], str]  # (image bytes, prompt, max_tokens) -> text
Reply = tuple[int, dict[str, str], bytes]  # status, headers, body


def local_answer(threads: int | None = None) -> Answer:
    """Read the image with the local PP-OCRv6 recognizer, with the task the prompt names."""
    from ocr_assets.backends.recognition.base import Crop
    from ocr_assets.backends.recognition.rapidocr_local import RapidOcrRecognizer

    recognizer = RapidOcrRecognizer(threads=threads) if threads else RapidOcrRecognizer()
    task_of = {prompt: task for task, prompt in config.TASK_PROMPTS.items()}
    lock = threading.Lock()  # one crop at a time: the models already use every core

    def answer(image: bytes, prompt: str, max_tokens: int) -> str:
        with lock:
            (result,) = recognizer.recognize([Crop(task_of.get(prompt.strip(), "text"), image, 0, 0)])
        if result.status != "ok":
            raise ValueError(result.error or "the image could not be read")
        return result.text

    return answer


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


class OcrServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, keep-alive, a deep listen queue for bursts."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, answer: Answer | None = None,
                 model: str = "glm-ocr") -> None:
        self.answer = answer or local_answer()
        self.model = model
        super().__init__((host, port), _Handler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def models(self) -> Reply:
        return _json(200, {"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "ocr_assets"}]})

    def chat(self, payload: dict) -> Reply:
        """The reply to one chat-completions request (override to inject faults in tests)."""
        if payload.get("model") not in (None, self.model):
            return _error(404, f"model {payload.get('model')!r} is not served here; {self.model!r} is")
        try:
            image, prompt, max_tokens = parse_chat(payload)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        try:
            text = self.answer(image, prompt, max_tokens) if image else ""  # no image, no text to read
        except Exception as exc:
            return _error(422, f"could not read the image: {exc}")
        words = text.split()
        finish = "length" if len(words) > max_tokens else "stop"
        text = " ".join(words[:max_tokens]) if finish == "length" else text
        return _json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(image) // 1024 + len(prompt.split()),
                      "completion_tokens": min(len(words), max_tokens),
                      "total_tokens": len(image) // 1024 + len(prompt.split()) + min(len(words), max_tokens)},
        })

    def start(self) -> "OcrServer":
        """Serve on a background thread (tests, the bench); returns self."""
        threading.Thread(target=self.serve_forever, name="ocr-serve", daemon=True).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client with many requests reuses its connections
    server: OcrServer

    def log_message(self, format, *args):  # noqa: A002 - one line per request would drown the output
        pass

    def _send(self, reply: Reply) -> None:
        status, headers, body = reply
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - the http.server API
        if self.path.rstrip("/") == "/v1/models":
            self._send(self.server.models())
        elif self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send((200, {}, b""))
        else:
            self._send(_error(404, f"no route {self.path}"))

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(_error(404, f"no route {self.path}"))
            return
        try:
            payload = json.loads(body)
        except ValueError:
            self._send(_error(400, "the body is not JSON"))
            return
        self._send(self.server.chat(payload))


def serve(host: str, port: int, model: str, threads: int | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    server = OcrServer(host, port, answer=local_answer(threads), model=model)
    print(f"serving {model!r} (local PP-OCRv6) at {server.base_url}; set "
          f"{config.ENV_VLM_BASE_URL}={server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
