"""The UI the way users drive it: `dagster dev` on the project's own workspace.yaml and dagster.yaml,
the sensor registering the shards, a partition backfill launched through GraphQL exactly as the
UI launches it, the timing metadata read back through GraphQL, then a real browser (Debian's
chromium, headless, driven by Playwright) finding that metadata on the asset's page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ["pages", "layout", "crops", "recognition", "documents"]

LAUNCH = """mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on InvalidSubsetError { message }
  }
}"""
BACKFILL = """query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs(limit: 10) { runId status } }
    ... on PythonError { message }
  }
}"""
PARTITIONS = """query Partitions($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { __typename ... on AssetNode { partitionKeys } }
}"""
MATERIALIZATIONS = """query Materializations($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: $partitions, limit: 10) {
        partition
        metadataEntries {
          label
          ... on FloatMetadataEntry { floatValue }
          ... on IntMetadataEntry { intValue }
          ... on TextMetadataEntry { text }
        }
      }
    }
  }
}"""


class DagsterDev:
    """`dagster dev` (webserver and daemon) in its own process group, and a GraphQL client for it."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = home / "dagster-dev.log"
        exe = shutil.which("dagster") or str(Path(sys.executable).with_name("dagster"))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [exe, "dev", "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert "errors" not in answer, answer["errors"]
        return answer["data"]

    def wait(self, what: str, check, timeout: float, every: float = 2.0):
        """Poll ``check()`` until it returns something truthy; fail with the log's tail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dagster dev exited:\n{self.tail()}"
            try:
                value = check()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                value = None
            if value:
                return value
            time.sleep(every)
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def backfilled(small_dataset, tmp_path_factory):
    """A running `dagster dev` after a backfill of both shards launched through GraphQL."""
    home = tmp_path_factory.mktemp("ui_home")
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCR_ASSETS_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), OCR_ASSETS_DATASET=small_dataset,
               OCR_ASSETS_STORAGE=str(tmp_path_factory.mktemp("ui_out")),
               OCR_ASSETS_SENSOR_RUNS="0")  # the sensor registers the shards; the backfill runs them
    dev = DagsterDev(home, env)
    try:
        dev.wait("the webserver", lambda: dev.query("{ version }"), timeout=240)
        partitions = dev.wait(
            "the sensor to register both shards",
            lambda: (lambda keys: keys if len(keys) == 2 else None)(
                dev.query(PARTITIONS, {"key": {"path": ["pages"]}})["assetNodeOrError"].get("partitionKeys") or []),
            timeout=180,
        )
        launched = dev.query(LAUNCH, {"params": {
            "assetSelection": [{"path": [name]} for name in ASSETS], "partitionNames": partitions, "fromFailure": False,
        }})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]

        def finished():
            state = dev.query(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
            return state if state.get("status") not in (None, "REQUESTED") else None

        state = dev.wait("the backfill to finish", finished, timeout=900, every=5)
        assert state["status"] == "COMPLETED_SUCCESS", (state, dev.tail())
        assert len(state["runs"]) == 2 and {r["status"] for r in state["runs"]} == {"SUCCESS"}  # one run per shard
        yield dev, partitions
    finally:
        dev.stop()


def _metadata(dev: DagsterDev, asset: str, partition: str) -> dict:
    found = dev.query(MATERIALIZATIONS, {"key": {"path": [asset]}, "partitions": [partition]})["assetOrError"]
    (latest, *_) = found["assetMaterializations"]
    assert latest["partition"] == partition
    return {e["label"]: e.get("floatValue", e.get("intValue", e.get("text"))) for e in latest["metadataEntries"]}


def test_backfill_timing_metadata_through_graphql(backfilled):
    dev, partitions = backfilled
    for partition in partitions:
        for asset in ASSETS:
            meta = _metadata(dev, asset, partition)
            assert meta["stage_seconds"] > 0 and meta["pages"] == 2, (asset, meta)
        layout = _metadata(dev, "layout", partition)
        for part in ("decode", "preprocess", "inference", "postprocess"):
            assert layout[f"{part}_seconds"] > 0
        assert layout["model_load_seconds"] >= 0 and layout["backend"] == "picodet-cdla"


def test_browser_finds_the_partition_timing(backfilled, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here: install Debian's chromium package (.ci/run does)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    dev, partitions = backfilled
    partition = partitions[0]
    inference = _metadata(dev, "layout", partition)["inference_seconds"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{dev.url}/assets/layout?view=partitions&partition={partition}", timeout=120_000)
            row = page.locator("tr", has_text="inference_seconds").first
            row.wait_for(timeout=120_000)
            assert str(inference) in row.inner_text()
            assert page.get_by_text(partition).first.is_visible()
            assert page.locator("tr", has_text="stage_seconds").first.is_visible()
        finally:
            page.screenshot(path=str(tmp_path / "layout.png"), full_page=True)
            browser.close()
