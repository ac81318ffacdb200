"""The `openai` recognizer's client against a server that answers every request after a fixed delay.

    python bench/vlm.py [--regions N] [--latency 0.5] [--concurrency 64,256]

A local OpenAI-compatible server (`ocr_assets.serve.OcrServer`, in its own process) answers
each chat request after ``--latency`` seconds, whatever the image. For each concurrency the
recognition stage (`run_recognition` with the openai recognizer, no cache) reads ``--regions``
VLM-ready JPEG crops; its wall time is compared with the ideal ceil(regions / concurrency) ×
latency, and the client's CPU time per request is this process's CPU time over the requests.
The same load then goes through the GLM-OCR SDK's client (`glmocr==0.1.5`: its OCRClient with a
thread pool of the same size, the SDK's own way of keeping requests in flight).

    python bench/vlm.py --fleet [--regions N] [--latency S] [--concurrency C] [--servers 2,4]

runs the fleet load test instead (several servers, one failing part-way through): see bench/vlm_fleet.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import multiprocessing
import os
import platform
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer
from ocr_assets.imaging import vlm_crop
from ocr_assets.schemas import CROPS
from ocr_assets.serve import OcrServer
from ocr_assets.stages.recognition import run_recognition

PROMPT = "Text Recognition:"


def _serve(port: int, latency: float) -> None:
    async def answer(image: bytes, prompt: str, max_tokens: int) -> str:
        await asyncio.sleep(latency)
        return "a fixed answer of a few words"

    OcrServer("127.0.0.1", port, answer=answer).serve_forever()


def start_server(latency: float) -> tuple[multiprocessing.Process, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, latency), daemon=True)
    proc.start()
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}/v1"


def make_crops(n: int) -> pa.Table:
    """``n`` text-line crops like a page's (about 900×60 px, noisy so JPEG does not shrink them to nothing)."""
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(8):
        image = np.full((60, 900, 3), 255, np.uint8)
        image[rng.random((60, 900)) < 0.15] = 0
        crops.append(vlm_crop(image))
    return pa.Table.from_pylist(
        [dict(page_id=f"p{i // 20}", region=i % 20, task="text", image=crops[i % 8][0], format="jpeg",
              width=crops[i % 8][1], height=crops[i % 8][2], status="ok", error=None) for i in range(n)],
        schema=CROPS,
    )


def run_ours(base_url: str, crops: pa.Table, concurrency: int) -> tuple[float, float, int]:
    recognizer = OpenAIRecognizer(base_url, concurrency=concurrency, timeout=60)
    cpu, wall = time.process_time(), time.perf_counter()
    table, _ = run_recognition(crops, recognizer)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert set(table.column("status").to_pylist()) == {"ok"}, "some requests failed"
    return wall, cpu, recognizer.stats.requests


def run_glm(base_url: str, crops: pa.Table, concurrency: int) -> tuple[float, float, int]:
    from glmocr.config import OCRApiConfig
    from glmocr.ocr_client import OCRClient

    client = OCRClient(OCRApiConfig(api_url=f"{base_url}/chat/completions", model="glm-ocr",
                                    connection_pool_size=concurrency, request_timeout=60))
    client.start()
    images = crops.column("image").to_pylist()

    def one(image: bytes) -> int:
        data = base64.b64encode(image).decode("ascii")
        request = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
            {"type": "text", "text": PROMPT}]}], "max_tokens": 8192, "temperature": 0.0}
        _, status = client.process(request)
        return status

    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        statuses = list(pool.map(one, images))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    client.stop()
    assert set(statuses) == {200}, "some requests failed"
    return wall, cpu, len(images)


def main() -> None:
    if "--fleet" in sys.argv[1:]:  # its own options and table; bench/ is on the path when run as a script
        from vlm_fleet import main as fleet

        sys.exit(fleet([a for a in sys.argv[1:] if a != "--fleet"]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=2048)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", default="64,256")
    args = parser.parse_args()

    proc, base_url = start_server(args.latency)
    crops = make_crops(args.regions)
    rows = []
    try:
        run_ours(base_url, crops.slice(0, 64), 64)  # warm-up: imports, connections
        for c in (int(x) for x in args.concurrency.split(",")):
            ideal = math.ceil(args.regions / c) * args.latency
            for side, run in (("ours", run_ours), ("glmocr 0.1.5", run_glm)):
                wall, cpu, requests = run(base_url, crops, c)
                rows.append((c, side, f"{wall:.2f}", f"{ideal:.2f}", f"{ideal / wall:.3f}",
                             f"{1000 * cpu / requests:.2f}", f"{requests / wall:.0f}"))
    finally:
        proc.terminate()
    header = ("concurrency", "client", "wall s", "ideal s", "efficiency", "CPU ms/request", "requests/s")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"\n{args.regions} regions, server latency {args.latency:g} s, {platform.machine()}, "
          f"{os.cpu_count()} cores (goals: efficiency >= 0.9 at 64 and 256, client CPU <= 2 ms/request)\n")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
