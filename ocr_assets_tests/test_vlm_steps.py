"""Recognition steps running at once share each VLM server's bound: two steps, in two processes
on one Dagster instance, against a server on localhost that counts what it has in flight.

The server holds every answer until requests of both steps are in flight (each step sends its
own API key), so the two steps are measured while they overlap; after that it answers each
request after a fixed delay. Each step's share is OCR_ASSETS_VLM_CONCURRENCY split by the `vlm`
pool's limit: with a bound of 4 and a limit of 2, the server must never hold more than 4, nor
more than 2 of one step.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import dagster as dg
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource

BOUND, STEPS = 4, 2


class CountingServer:
    """An OpenAI-compatible server on 127.0.0.1 that counts requests in flight, in all and per API key."""

    def __init__(self, latency: float = 0.3, gate_keys: int = 2, gate_timeout: float = 60.0,
                 hold: threading.Event | None = None) -> None:
        self.latency, self.gate_keys, self.gate_timeout = latency, gate_keys, gate_timeout
        self.hold = hold  # answers wait for it, where given
        self.marked = False  # from mark() on, the count in flight at each arrival is kept
        self.arrivals_after_mark: list[int] = []
        self.in_flight, self.peak = 0, 0
        self.by_key: Counter = Counter()
        self.peak_by_key: Counter = Counter()
        self.answered: Counter = Counter()
        self.seen: set[str] = set()
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "glm-ocr", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "")
        await request.read()
        self.in_flight += 1
        self.by_key[key] += 1
        self.seen.add(key)
        self.peak = max(self.peak, self.in_flight)
        self.peak_by_key[key] = max(self.peak_by_key[key], self.by_key[key])
        if self.marked:
            self.arrivals_after_mark.append(self.in_flight)
        try:
            deadline = time.monotonic() + self.gate_timeout
            while len(self.seen) < self.gate_keys and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # hold until both steps are in flight
            while self.hold is not None and not self.hold.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
            self.by_key[key] -= 1
        self.answered[key] += 1
        return web.json_response({
            "id": "x", "object": "chat.completion", "model": "glm-ocr",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "a few words"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        })

    def start(self) -> "CountingServer":
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            self._ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())

        threading.Thread(target=run, daemon=True).start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop:
            self._loop.call_soon_threadsafe(self._loop.stop)


STEP = """
import json, sys
import dagster as dg
from ocr_assets.assets import recognition
from ocr_assets.resources import RecognizerResource, StorageResource
key, storage, url = sys.argv[1:4]
result = dg.materialize([recognition], partition_key=key, instance=dg.DagsterInstance.get(),
                        resources={"storage": StorageResource(root=storage),
                                   "recognizer": RecognizerResource(vlm_base_url=url, vlm_concurrency=%d,
                                                                    vlm_api_key=dg.EnvVar("OCR_ASSETS_VLM_API_KEY"))},
                        selection=[recognition])
(event,) = result.get_asset_materialization_events()
meta = event.materialization.metadata
print("META " + json.dumps({k: meta[k].value for k in ("requests", "peak_in_flight", "vlm_pool_limit",
                                                      "vlm_concurrency_per_server")}))
sys.exit(0 if result.success else 1)
""" % BOUND


@pytest.fixture
def server():
    served = CountingServer().start()
    yield served
    served.stop()


def _crops_for_two_shards(small_dataset, storage, home, url) -> list[str]:
    """pages, layout and crops (VLM-ready JPEGs) of both shards, materialized on the instance in ``home``."""
    resources = {"dataset": DatasetResource(path=small_dataset), "storage": StorageResource(root=storage),
                 "layout_model": LayoutResource(), "recognizer": RecognizerResource(vlm_base_url=url)}
    keys = [ref.key for ref in DatasetResource(path=small_dataset).shards()]
    with dg.DagsterInstance.from_config(home) as instance:
        instance.add_dynamic_partitions(SHARDS, keys)
        for key in keys:
            assert dg.materialize(ASSETS[:3], partition_key=key, instance=instance, resources=resources).success
        instance.event_log_storage.set_concurrency_slots(config.VLM_POOL, STEPS)
    return keys


def test_two_recognition_steps_never_pass_a_servers_bound(small_dataset, tmp_path, server):
    home, storage = tmp_path / "home", str(tmp_path / "out")
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    keys = _crops_for_two_shards(small_dataset, storage, str(home), server.base_url)
    regions = {key: sum(1 for c in pq.read_table(f"{storage}/crops/{key}.parquet").to_pylist()
                        if c["status"] == "ok" and c["task"] != "skip") for key in keys}
    assert all(n > BOUND // STEPS for n in regions.values()), regions  # each step can fill its share

    steps = [subprocess.Popen([sys.executable, "-c", STEP, key, storage, server.base_url],
                              env={**os.environ, "DAGSTER_HOME": str(home), "OCR_ASSETS_VLM_API_KEY": f"step-{i}"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, key in enumerate(keys)]
    outputs = [step.communicate(timeout=300)[0] for step in steps]
    for step, output in zip(steps, outputs):
        assert step.returncode == 0, output[-3000:]
    metas = [json.loads(next(line[5:] for line in out.splitlines() if line.startswith("META "))) for out in outputs]

    # both steps were in flight together, each with its whole share, and never more
    assert server.peak == BOUND, (server.peak, dict(server.peak_by_key))
    assert sorted(server.peak_by_key.values()) == [BOUND // STEPS] * STEPS
    assert sum(server.answered.values()) == sum(regions.values())
    for meta in metas:
        assert meta["vlm_pool_limit"] == STEPS and meta["vlm_concurrency_per_server"] == BOUND // STEPS
        assert meta["peak_in_flight"] <= BOUND // STEPS


def test_a_step_alone_on_an_instance_without_a_pool_limit_takes_the_whole_bound(small_dataset, tmp_path):
    """No limit on the `vlm` pool (an instance whose pools have no default): one step, the whole
    bound, and a warning that names the command setting a limit."""
    served = CountingServer(gate_keys=1).start()
    try:
        storage = str(tmp_path / "out")
        (tmp_path / "home").mkdir()
        resources = {"dataset": DatasetResource(path=small_dataset), "storage": StorageResource(root=storage),
                     "layout_model": LayoutResource(),
                     "recognizer": RecognizerResource(vlm_base_url=served.base_url, vlm_concurrency=BOUND)}
        with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
            key = DatasetResource(path=small_dataset).shards()[0].key
            instance.add_dynamic_partitions(SHARDS, [key])
            result = dg.materialize(ASSETS[:4], partition_key=key, instance=instance, resources=resources)
            assert result.success
            meta = {e.asset_key.to_user_string(): e.materialization.metadata
                    for e in result.get_asset_materialization_events()}["recognition"]
            warnings = [e.message for e in instance.all_logs(result.run_id)
                        if e.level == 30 and "concurrency set vlm" in (e.message or "")]
    finally:
        served.stop()
    assert meta["vlm_pool_limit"].value == 1 and meta["vlm_concurrency_per_server"].value == BOUND
    assert served.peak == BOUND and warnings  # alone, the whole bound: the share is not split without a limit


def test_a_pool_limit_above_the_bound_fails_the_step_naming_both(small_dataset, tmp_path, server):
    """Eight steps cannot share four requests per server: the step fails before sending any."""
    home, storage = tmp_path / "home", str(tmp_path / "out")
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    keys = _crops_for_two_shards(small_dataset, storage, str(home), server.base_url)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots(config.VLM_POOL, 2 * BOUND)
        from ocr_assets.assets import recognition

        result = dg.materialize([recognition], partition_key=keys[0], instance=instance, raise_on_error=False,
                                resources={"storage": StorageResource(root=storage),
                                           "recognizer": RecognizerResource(vlm_base_url=server.base_url,
                                                                            vlm_concurrency=BOUND)})
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        message = str(failure.event_specific_data.error)
    assert config.ENV_VLM_CONCURRENCY in message and "concurrency set vlm" in message
    assert sum(server.answered.values()) == 0


def test_a_limit_raised_while_a_step_reads_lowers_its_share(small_dataset, tmp_path, monkeypatch):
    """An operator opens the pool from 1 to 2 during a shard: the running step drops from the whole
    bound to half within the watch's interval, and sends no request above it from then on."""
    from ocr_assets import assets
    from ocr_assets.assets import recognition
    from ocr_assets.vlm_pool import ShareWatch

    hold, applied = threading.Event(), threading.Event()
    served = CountingServer(gate_keys=1, hold=hold).start()
    original = ShareWatch.check

    def check(self) -> None:  # the watch itself, telling the test when it changed the share
        before = self.limit
        original(self)
        if self.limit != before:
            applied.set()

    monkeypatch.setattr(ShareWatch, "check", check)
    monkeypatch.setattr(assets, "WATCH_SECONDS", 0.1)
    home, storage = tmp_path / "home", str(tmp_path / "out")
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    hold.set()  # layout and crops' preflight probes pass the gate
    try:
        keys = _crops_for_two_shards(small_dataset, storage, str(home), served.base_url)
        hold.clear()
        regions = sum(1 for c in pq.read_table(f"{storage}/crops/{keys[0]}.parquet").to_pylist()
                      if c["status"] == "ok" and c["task"] != "skip")
        assert regions > BOUND + 2, regions
        outcome: dict = {}
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.event_log_storage.set_concurrency_slots(config.VLM_POOL, 1)

            def step() -> None:
                outcome["result"] = dg.materialize(
                    [recognition], partition_key=keys[0], instance=instance,
                    resources={"storage": StorageResource(root=storage),
                               "recognizer": RecognizerResource(vlm_base_url=served.base_url, vlm_concurrency=BOUND)})

            runner = threading.Thread(target=step)
            runner.start()
            deadline = time.monotonic() + 120
            while served.in_flight < BOUND and runner.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert served.in_flight == BOUND  # the step alone holds the whole bound
            instance.event_log_storage.set_concurrency_slots(config.VLM_POOL, 2)
            assert applied.wait(60)
            served.marked = True
            hold.set()
            runner.join(120)
        result = outcome["result"]
    finally:
        hold.set()
        served.stop()
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["vlm_pool_limit"].value == 2 and meta["vlm_concurrency_per_server"].value == BOUND // 2
    assert served.arrivals_after_mark and max(served.arrivals_after_mark) <= BOUND // 2, served.arrivals_after_mark


def test_a_lowered_limit_counts_the_steps_still_running_above_it(tmp_path):
    """Lowering the pool from 4 to 2 stops none of the 4 running steps: the share stays a quarter
    until they finish; removing the limit keeps it too."""
    from types import SimpleNamespace

    from ocr_assets.assets import vlm_pool_limit

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots(config.VLM_POOL, 4)
        for step in range(4):
            assert storage.claim_concurrency_slot(config.VLM_POOL, "run", f"step{step}").is_claimed
        context = SimpleNamespace(instance=instance)
        storage.set_concurrency_slots(config.VLM_POOL, 2)
        assert vlm_pool_limit(context) == 4
        storage.free_concurrency_slot_for_step("run", "step0")
        storage.free_concurrency_slot_for_step("run", "step1")
        assert vlm_pool_limit(context) == 2  # the two left fit the new limit
