"""The VLM servers one `openai` recognizer balances over: who is in service, who has a free slot.

A request takes a slot on the in-service server with the fewest requests in flight (ties take turns),
and only when that server has fewer than ``concurrency`` of this recognizer's requests in flight:
retries take a slot like any request, so the bound holds at every instant. A request that finds
every in-service server full waits in line (first come, first served) for the next free slot.
A stream holds at most ``concurrency`` x servers crops at once (``admit``), waiting or retrying
included: its memory is bounded by that batch. ``set_concurrency`` changes the bound from any
thread while a stream runs: the next pick obeys it; requests in flight are never cancelled.

A server stops answering when a request to it fails in the channel (refused, reset, disconnected,
cut off, or silent past the timeout; an HTTP status is an answer). ``post`` bounds an attempt
from its sending to the answer's headers: a server that stops reading the request (a stopped
process whose kernel still accepts connections) is silent too. It is taken out of service
after ``failures_to_take_out`` such failures in a row with no answer between, and at once when the
connection is refused (nothing listens there: every request would fail at once). While out it is
probed with ``GET {url}/models``, at once and then after ``probe_interval`` seconds, doubling up to
``probe_interval_max``, on the event loop of the stream that is running; a 200 puts it back.

When no server is in service, a request waits for a probe to bring one back, until ``patience``
seconds after the last one went out: a long outage fails the requests at once instead of holding
each one for the whole timeout again.

``check_servers`` is the probe before any crop is sent: it tells a broken configuration (a refused
key, a model that is not served, a host name that does not resolve, a URL that is no OpenAI API)
from servers that are only down.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp

from ocr_assets import config

progress = logging.getLogger("ocr_assets.progress")


@dataclass(eq=False)
class VlmServer:
    """One server of the fleet and its state; ``in_flight`` counts this recognizer's requests to it."""

    index: int
    url: str  # the OpenAI API's base URL, ending in /v1
    in_service: bool = True
    in_flight: int = 0
    failures: int = 0  # channel failures in a row, with no answer between

    @property
    def chat_url(self) -> str:
        return f"{self.url}/chat/completions"


def channel_failure(exc: BaseException) -> bool:
    """Whether a request's failure says the server did not answer (not an HTTP status: that is an answer)."""
    return isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ClientError, OSError))


class SendTimeout(TimeoutError):
    """No answer's headers within the timeout of sending: the server did not read the request, or did not answer."""


async def post(session: aiohttp.ClientSession, url: str, body: bytes, timeout: float) -> aiohttp.ClientResponse:
    """POST ``body`` to ``url``: the response once its headers arrived, within ``timeout`` seconds.

    aiohttp's read timeout starts only once the body is written, so a server that stops reading
    would hold the upload forever (its kernel accepts, with a zero window, once the buffers fill).
    """
    try:
        if hasattr(asyncio, "timeout"):  # 3.11+: wait_for there can drop a cancellation that races the answer
            async with asyncio.timeout(timeout):
                return await session.post(url, data=body)
        return await asyncio.wait_for(session.post(url, data=body), timeout)
    except asyncio.TimeoutError as exc:
        if isinstance(exc, aiohttp.ClientError):  # aiohttp's own connect or read timeout
            raise
        raise SendTimeout(f"the VLM server sent nothing for {timeout:g} s (vlm_timeout): no answer, "
                          f"or the request not even read") from None


def refused(exc: BaseException) -> bool:
    """A connection refused: nothing listens at the server's address."""
    cause = getattr(exc, "os_error", None) or exc
    return isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED


def shown_url(url: str) -> str:
    """The URL without any user:password in it, for logs and metadata."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class VlmFleet:
    """The servers of ``OCR_ASSETS_VLM_BASE_URL`` and this recognizer's slots on them; see the module docstring."""

    def __init__(self, urls: list[str], concurrency: int, *, probe_interval: float = 1.0,
                 probe_interval_max: float = 30.0, failures_to_take_out: int = 2) -> None:
        self.servers = [VlmServer(i, url) for i, url in enumerate(urls)]
        self.concurrency = int(concurrency)
        self.probe_interval = max(0.001, float(probe_interval))
        self.probe_interval_max = max(self.probe_interval, float(probe_interval_max))
        self.failures_to_take_out = max(1, int(failures_to_take_out))
        self._turn = 0  # where the next tie starts: equally loaded servers take turns
        self._waiters: deque = deque()  # (future, server to avoid): requests waiting for a slot, in order
        self._probes: dict[int, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None
        self._probe_timeout = 10.0
        self._outage_since: float | None = None  # when the last server went out (none in service)
        self._loop: asyncio.AbstractEventLoop | None = None  # the running stream's: set_concurrency wakes it
        self._admitted = 0  # crops the stream holds (waiting, in flight, or retrying)
        self._room: asyncio.Event | None = None  # set when a crop leaves or the bound is raised

    # -- state --

    def in_service(self) -> list[VlmServer]:
        return [s for s in self.servers if s.in_service]

    def describe(self) -> str:
        """"0=<url>, 1=<url>": which server each per-server figure is about."""
        return ", ".join(f"{s.index}={shown_url(s.url)}" for s in self.servers)

    def set_in_service(self, up: list[bool]) -> None:
        """Take each server in or out as the probe at construction found it."""
        for server, answers in zip(self.servers, up):
            server.in_service, server.failures = answers, 0

    # -- a stream's life: slots and probes live on its event loop --

    def start(self, session: aiohttp.ClientSession, probe_timeout: float) -> None:
        """Begin a stream (one at a time: the recognizer sees to it): no request in flight yet; the
        servers out of service are probed from now on."""
        loop = self._loop = asyncio.get_running_loop()
        self._session, self._probe_timeout = session, probe_timeout
        self._waiters = deque()
        self._admitted, self._room = 0, asyncio.Event()
        for server in self.servers:
            server.in_flight = 0
        self._outage_since = None if self.in_service() else loop.time()
        for server in self.servers:
            if not server.in_service:
                self._start_probe(server)

    async def stop(self) -> None:
        """End a stream: stop probing (the next stream probes again) and forget the waiting requests."""
        probes = list(self._probes.values())
        self._probes.clear()
        for task in probes:
            task.cancel()
        if probes:
            await asyncio.gather(*probes, return_exceptions=True)
        for waiter, _ in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        self._session = self._loop = None

    def set_concurrency(self, concurrency: int) -> None:
        """The most requests in flight to each server, from now on; safe from any thread."""
        self.concurrency = int(concurrency)  # every later pick reads it: new requests obey it at once
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._resized)
            except RuntimeError:  # the stream's loop closed meanwhile: nothing waits on it
                pass

    def _resized(self) -> None:
        """On the stream's loop: a raised bound lets waiting crops and requests go."""
        if self._room is not None:
            self._room.set()
        self._wake()

    # -- the stream's crops: memory bounded by a batch --

    async def admit(self) -> None:
        """Room for one more crop in the stream: at most ``concurrency`` x servers at once."""
        while self._admitted >= self.concurrency * len(self.servers):
            self._room.clear()
            await self._room.wait()
        self._admitted += 1

    def discharge(self) -> None:
        """A crop of the stream is done (answered or failed)."""
        self._admitted -= 1
        self._room.set()

    # -- slots --

    def _pick(self, avoid: VlmServer | None) -> VlmServer | None:
        """The in-service server with a free slot and the fewest in flight; not ``avoid`` while another serves."""
        live = self.in_service()
        if avoid is not None and len(live) > 1:
            live = [s for s in live if s is not avoid]
        free = [s for s in live if s.in_flight < self.concurrency]
        if not free:
            return None
        low = min(s.in_flight for s in free)
        n = len(self.servers)
        choice = min((s for s in free if s.in_flight == low), key=lambda s: (s.index - self._turn) % n)
        self._turn = (choice.index + 1) % n
        return choice

    async def acquire(self, avoid: VlmServer | None = None, patience: float = 120.0) -> VlmServer | None:
        """A slot on a server (its ``in_flight`` already counts the request); None when no server has
        been in service for ``patience`` seconds. ``avoid``: the server the last attempt failed on."""
        loop = asyncio.get_running_loop()
        while True:
            server = self._pick(avoid)
            if server is not None:
                server.in_flight += 1
                return server
            wait = None  # servers in service but all full: wait for a slot, however long answers take
            if not self.in_service():
                self._outage_since = self._outage_since if self._outage_since is not None else loop.time()
                wait = self._outage_since + patience - loop.time()
                if wait <= 0:
                    return None
            waiter = loop.create_future()
            entry = (waiter, avoid)
            self._waiters.append(entry)
            try:
                await asyncio.wait((waiter,), timeout=wait)
            except BaseException:  # cancelled: hand back a slot given in the meantime
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self.release(waiter.result())
                waiter.cancel()
                raise
            finally:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass  # _wake took it off the line
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                return waiter.result()
            waiter.cancel()  # timed out, or woken to look again (the servers changed)

    def release(self, server: VlmServer) -> None:
        server.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        """Give free slots to the waiting requests, in order; with no server in service, wake them all
        to start their wait for one."""
        if not self._waiters:
            return
        if not self.in_service():
            for waiter, _ in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()
            return
        kept: deque = deque()
        while self._waiters and any(s.in_flight < self.concurrency for s in self.in_service()):
            waiter, avoid = self._waiters.popleft()
            if waiter.done():
                continue
            server = self._pick(avoid)
            if server is None:  # only the server it avoids is free: it keeps its place
                kept.append((waiter, avoid))
                continue
            server.in_flight += 1
            waiter.set_result(server)
        kept.extend(self._waiters)
        self._waiters = kept

    # -- answers and failures --

    def answered(self, server: VlmServer) -> None:
        """The server answered (any HTTP status): its run of channel failures ends."""
        server.failures = 0

    def failed(self, server: VlmServer, exc: BaseException, reason: str) -> bool:
        """A channel failure on ``server``; True when it took the server out of service."""
        if not server.in_service:
            return False
        server.failures += 1
        if not (refused(exc) or server.failures >= self.failures_to_take_out):
            return False
        server.in_service = False
        left = len(self.in_service())
        progress.warning(
            "VLM server %d (%s) stopped answering: %s; out of service and probed until it answers, %s",
            server.index, shown_url(server.url), reason,
            f"its requests go to the {left} other(s)" if left else
            f"and no server of {config.ENV_VLM_BASE_URL} is left in service")
        if not left:
            self._outage_since = asyncio.get_running_loop().time()
        self._start_probe(server)
        self._wake()
        return True

    # -- probes --

    def _start_probe(self, server: VlmServer) -> None:
        if self._session is not None and server.index not in self._probes:
            self._probes[server.index] = asyncio.get_running_loop().create_task(self._probe(server))

    async def _probe(self, server: VlmServer) -> None:
        delay = self.probe_interval
        try:
            while not await self._answers(server):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.probe_interval_max)
        finally:
            self._probes.pop(server.index, None)
        server.in_service, server.failures = True, 0
        self._outage_since = None
        progress.info("VLM server %d (%s) answers again: back in service", server.index, shown_url(server.url))
        self._wake()

    async def _answers(self, server: VlmServer) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=self._probe_timeout)
            async with self._session.get(f"{server.url}/models", timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False


def check_servers(urls: list[str], *, model: str, api_key: str | None, verify_tls: bool,
                  timeout: float) -> list[bool]:
    """Probe every server at once (GET /models); which of them answer.

    Raises on a broken configuration: PermissionError for a refused key, ValueError for a model
    that is not served or a host name that does not resolve (a typo: it never will), ConnectionError
    for a URL that is no OpenAI API, or when no server answers. A server that answers 5xx or not at
    all (a refused connection, a timeout, a resolver that fails for now) is only down: it is left
    out, with a warning, and probed back in.
    """
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        found = list(pool.map(lambda url: _check(url, model, api_key, verify_tls, timeout), urls))
    for result in found:
        if isinstance(result, Exception):
            raise result
    down = {url: reason for url, reason in zip(urls, found) if reason is not None}
    if len(down) == len(urls):
        if len(urls) == 1:
            raise ConnectionError(
                f"the VLM server at {config.ENV_VLM_BASE_URL}={shown_url(urls[0])} does not answer "
                f"({down[urls[0]]}); start it or point {config.ENV_VLM_BASE_URL} at a running one")
        listed = "; ".join(f"{shown_url(url)} ({reason})" for url, reason in down.items())
        raise ConnectionError(f"no VLM server in {config.ENV_VLM_BASE_URL} answers: {listed}; start them "
                              f"or point {config.ENV_VLM_BASE_URL} at running ones")
    if down:
        progress.warning("VLM servers of %s that do not answer, left out of service and probed until they do: %s",
                         config.ENV_VLM_BASE_URL, "; ".join(f"{shown_url(u)} ({r})" for u, r in down.items()))
    return [url not in down for url in urls]


def _check(url: str, model: str, api_key: str | None, verify_tls: bool, timeout: float) -> str | Exception | None:
    """None when the server answers and serves ``model``; why it is down; or the configuration error."""
    request = urllib.request.Request(f"{url}/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    context = None
    if not verify_tls:  # turned off on purpose (vlm_verify_tls): a self-signed server
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    shown = shown_url(url)
    try:
        with urllib.request.urlopen(request, timeout=min(timeout, 15.0), context=context) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, b""
    except (urllib.error.URLError, OSError) as exc:
        if _no_such_host(getattr(exc, "reason", exc)):
            return ValueError(f"{config.ENV_VLM_BASE_URL} names {shown}, whose host name does not resolve "
                              f"({exc}); correct the URL")
        return f"{type(exc).__name__}: {exc}"
    if status in (401, 403):
        return PermissionError(f"the VLM server at {shown} refused the key (HTTP {status}); "
                               f"set {config.ENV_VLM_API_KEY}")
    if status >= 500:
        return f"GET /models answered HTTP {status}"
    if status != 200:
        return ConnectionError(
            f"the VLM server at {config.ENV_VLM_BASE_URL}={shown} answered GET /models with HTTP {status}; "
            f"is it an OpenAI-compatible server (base URL ending in /v1)?")
    try:
        served = [m.get("id") for m in json.loads(body).get("data", [])]
    except (ValueError, AttributeError):
        return ConnectionError(f"GET {shown}/models did not return the model list ({config.ENV_VLM_BASE_URL})")
    if served and model not in served:
        return ValueError(f"{config.ENV_VLM_MODEL}={model!r} is not served at {shown}; it serves {served}")
    return None


def _no_such_host(cause) -> bool:
    """The name does not exist (not a resolver that fails for now: EAI_AGAIN is a server that is down)."""
    missing = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    return isinstance(cause, socket.gaierror) and cause.errno in missing
