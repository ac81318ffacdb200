"""The `openai` recognizer over a fleet of fixed-latency servers, one of which fails part-way through.

    python bench/vlm_fleet.py [--regions 2000] [--latency 0.2] [--concurrency 32] [--servers 2,4]
                              [--fail-at 0.3] [--failure kill|stop] [--timeout 10] [--no-baseline]
    python bench/vlm.py --fleet ...            (the same)

For each fleet size K, K OpenAI-compatible servers (`ocr_assets.serve.OcrServer`, each in its own
process on 127.0.0.1) answer every chat request after ``--latency`` seconds. Each counts, at the
server, the chat requests it holds at once (from the handler's start, before the body is read,
to the reply) and the ones it answered, in shared memory that this process reads even after the
server was killed. ``--regions`` VLM-ready JPEG crops go through `run_recognition` with the
openai recognizer over the comma-separated fleet (no cache), ``--concurrency`` requests in flight
per server. The last server fails once it has answered ``--fail-at`` of its share (regions / K):
``kill`` sends it SIGKILL (its requests in flight are cut, new connections refused), ``stop``
sends SIGSTOP (connections hang until the client's ``--timeout``). The baseline, measured in the
same run: each fleet first takes the load with no failure (``--no-baseline`` skips it).

The ideal is the work at the full bound: regions × latency / (concurrency × servers in service),
with the answers given before the failure at K servers and the rest (the cut requests included)
at K - 1. The bench exits non-zero, saying why, when a server saw more than ``--concurrency``
requests in flight, when a region was lost (no result, or status error), or when the failure
never happened (the failing server never reached its threshold).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
from vlm import make_crops  # noqa: E402

from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer  # noqa: E402
from ocr_assets.serve import OcrServer  # noqa: E402
from ocr_assets.stages.recognition import run_recognition  # noqa: E402

# The shared counters of one server, written by its event loop only.
PORT, IN_FLIGHT, PEAK, ANSWERED, RECEIVED = range(5)
_SPAWN = multiprocessing.get_context("spawn")


class CountingServer(OcrServer):
    """A fixed-latency server that counts the chat requests it holds and answers in ``counters``."""

    def __init__(self, counters, latency: float) -> None:
        self.counters = counters

        async def answer(image: bytes, prompt: str, max_tokens: int) -> str:
            await asyncio.sleep(latency)
            return "a fixed answer of a few words"

        super().__init__("127.0.0.1", 0, answer=answer)

    async def _chat(self, request):
        counters = self.counters
        counters[RECEIVED] += 1
        counters[IN_FLIGHT] += 1
        counters[PEAK] = max(counters[PEAK], counters[IN_FLIGHT])
        try:
            response = await super()._chat(request)
        finally:
            counters[IN_FLIGHT] -= 1
        if response.status == 200:
            counters[ANSWERED] += 1
        return response


def _serve(counters, latency: float) -> None:
    server = CountingServer(counters, latency)
    counters[PORT] = server.port  # the parent waits for it: the server is listening
    server.serve_forever()


@dataclass
class Server:
    process: multiprocessing.Process
    counters: object  # a shared array of PORT, IN_FLIGHT, PEAK, ANSWERED, RECEIVED

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.counters[PORT]}/v1"


def start_fleet(size: int, latency: float) -> list[Server]:
    """``size`` counting servers, each in its own process, listening when this returns."""
    fleet = []
    for _ in range(size):
        counters = _SPAWN.Array("q", 5, lock=False)
        process = _SPAWN.Process(target=_serve, args=(counters, latency), daemon=True)
        process.start()
        fleet.append(Server(process, counters))
    deadline = time.monotonic() + 120
    while not all(s.counters[PORT] for s in fleet):
        if time.monotonic() > deadline or not all(s.process.is_alive() for s in fleet):
            stop_fleet(fleet)
            raise RuntimeError("a bench server did not start listening within 120 s")
        time.sleep(0.05)
    return fleet


def stop_fleet(fleet: list[Server]) -> None:
    for server in fleet:
        if server.process.is_alive():
            server.process.kill()  # SIGKILL also ends a stopped (SIGSTOP) server
        server.process.join(10)


@dataclass
class Failure:
    """When the failing server failed: seconds into the run, the fleet's answers by then, requests cut."""

    server: int
    mode: str
    threshold: int
    at_seconds: float | None = None
    fleet_answered: int = 0
    answered: int = 0  # by the failing server, when it failed
    cut: int = 0

    def describe(self) -> str:
        verb = "killed" if self.mode == "kill" else "stopped"
        if self.at_seconds is None:
            return f"#{self.server}: never {verb} (threshold {self.threshold} answers not reached)"
        return (f"#{self.server} {verb} at {self.at_seconds:.1f} s, after {self.answered} answers "
                f"({self.cut} in flight {'cut' if self.mode == 'kill' else 'left hanging'})")


def fail_when_reached(fleet: list[Server], failure: Failure, started: float, done: threading.Event) -> None:
    """Kill (or stop) the failing server as soon as it has answered ``failure.threshold`` requests."""
    counters = fleet[failure.server].counters
    while not done.is_set():
        if counters[ANSWERED] >= failure.threshold:
            os.kill(fleet[failure.server].process.pid, signal.SIGKILL if failure.mode == "kill" else signal.SIGSTOP)
            failure.at_seconds = time.perf_counter() - started
            failure.fleet_answered = sum(s.counters[ANSWERED] for s in fleet)
            time.sleep(0.05)  # let the signal land before reading the counts it froze
            failure.answered, failure.cut = counters[ANSWERED], counters[IN_FLIGHT]
            return
        time.sleep(0.002)


@dataclass
class FleetResult:
    servers: int
    regions: int
    ok: int
    wall: float
    ideal: float
    peaks: list[int]
    answered: list[int]
    retries: int
    failure: Failure | None
    metadata: dict = field(default_factory=dict)
    first_error: str | None = None

    @property
    def lost(self) -> int:
        return self.regions - self.ok


def ideal_seconds(regions: int, latency: float, concurrency: int, servers: int, failure: Failure | None) -> float:
    """The work at the full bound: before the failure at ``servers``, after it at one fewer."""
    if failure is None or failure.at_seconds is None:
        return regions * latency / (concurrency * servers)
    before = min(failure.fleet_answered, regions)
    return (before * latency / (concurrency * servers)
            + (regions - before) * latency / (concurrency * (servers - 1)))


def run_fleet(size: int, crops, latency: float, concurrency: int, fail_at: float, mode: str,
              timeout: float) -> FleetResult:
    """One load test: ``crops`` over ``size`` fresh servers, the last failing after ``fail_at`` of its share."""
    regions = crops.num_rows
    fleet = start_fleet(size, latency)
    try:
        urls = ",".join(s.url for s in fleet)
        warm = crops.slice(0, min(regions, 2 * concurrency * size))
        run_recognition(warm, OpenAIRecognizer(urls, concurrency=concurrency, timeout=timeout))  # imports, connections
        for server in fleet:  # count the load alone; the peak keeps the warm-up's, which was bounded too
            server.counters[ANSWERED] = server.counters[RECEIVED] = 0
        failure = None
        if size > 1 and fail_at > 0:
            failure = Failure(size - 1, mode, max(1, math.ceil(fail_at * regions / size)))
        recognizer = OpenAIRecognizer(urls, concurrency=concurrency, timeout=timeout)
        done = threading.Event()
        started = time.perf_counter()
        watcher = None
        if failure is not None:
            watcher = threading.Thread(target=fail_when_reached, args=(fleet, failure, started, done), daemon=True)
            watcher.start()
        first_error = None
        try:
            table, _ = run_recognition(crops, recognizer)
            wall = time.perf_counter() - started
            statuses = table.column("status").to_pylist()
            ok = statuses.count("ok") if table.num_rows == regions else 0
            first_error = next((e for s, e in zip(statuses, table.column("error").to_pylist()) if s != "ok"), None)
        except RuntimeError as exc:  # rows the recognizer never answered
            wall, ok, first_error = time.perf_counter() - started, 0, str(exc)
        done.set()
        if watcher is not None:
            watcher.join()
        metadata = recognizer.run_metadata()
        return FleetResult(size, regions, ok, wall, ideal_seconds(regions, latency, concurrency, size, failure),
                           [s.counters[PEAK] for s in fleet], [s.counters[ANSWERED] for s in fleet],
                           int(metadata.get("retries", 0)), failure, metadata, first_error)
    finally:
        stop_fleet(fleet)


def violations(result: FleetResult, bound: int) -> list[str]:
    """Why the run failed the load test: a server above its bound, a lost region, no failure injected."""
    found = [f"{result.servers} servers: server #{i} saw {peak} requests in flight at once, above the bound "
             f"of {bound} per server (--concurrency)" for i, peak in enumerate(result.peaks) if peak > bound]
    if result.lost:
        found.append(f"{result.servers} servers: {result.lost} of {result.regions} regions lost "
                     f"(no result, or status error), e.g. {result.first_error}")
    if result.failure is not None and result.failure.at_seconds is None:
        found.append(f"{result.servers} servers: the failure was not injected: server #{result.failure.server} "
                     f"answered {result.answered[result.failure.server]} requests, fewer than "
                     f"{result.failure.threshold}")
    return found


def _per_server(metadata: dict, name: str, servers: int) -> str:
    values = [metadata.get(f"server_{i}_{name}") for i in range(servers)]
    return " / ".join("?" if v is None else str(v) for v in values)


def markdown(results: list[FleetResult]) -> str:
    header = ("servers", "failing server", "regions", "ok", "lost", "wall s", "ideal s", "wall/ideal",
              "peak in flight at each server", "answered by each server", "retries", "taken out")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = (r.servers, r.failure.describe() if r.failure else "none", r.regions, r.ok, r.lost,
                 f"{r.wall:.2f}", f"{r.ideal:.2f}", f"{r.wall / r.ideal:.2f}", " / ".join(map(str, r.peaks)),
                 " / ".join(map(str, r.answered)), r.retries, _per_server(r.metadata, "taken_out", r.servers))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds each server takes per request")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per server")
    parser.add_argument("--servers", default="2,4", help="fleet sizes, comma-separated")
    parser.add_argument("--fail-at", type=float, default=0.3,
                        help="share of its regions the last server answers before it fails (0: none fails)")
    parser.add_argument("--failure", choices=("kill", "stop"), default="kill")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the run of each fleet with no failure")
    parser.add_argument("--timeout", type=float, default=10.0, help="the recognizer's read timeout, seconds")
    parser.add_argument("--bound-check", type=int, default=None, help=argparse.SUPPRESS)  # the checker's own test
    args = parser.parse_args(argv)

    crops = make_crops(args.regions)
    results = []
    for size in (int(k) for k in args.servers.split(",")):
        shares = (0.0, args.fail_at) if args.baseline and size > 1 and args.fail_at > 0 else (args.fail_at,)
        results += [run_fleet(size, crops, args.latency, args.concurrency, share, args.failure, args.timeout)
                    for share in shares]
    print(f"\n{machine()}; {args.regions} regions, server latency {args.latency:g} s, "
          f"{args.concurrency} requests in flight per server, the last server fails "
          f"({args.failure}) after {args.fail_at:.0%} of its share\n")
    print(markdown(results))
    bound = args.concurrency if args.bound_check is None else args.bound_check
    found = [v for r in results for v in violations(r, bound)]
    for message in found:
        print(f"failed: {message}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
