"""bench/gpu_check.py, the device check, run here as CI runs it: on the CPU at its smallest size.

The checkpoint is a randomly initialised PP-DocLayoutV3 whose processor resizes pages to 256x256
(the real architecture, a tenth of the pixels), so that both layout models run in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ocr_assets.backends.layout.pp_doclayout_v3 import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "bench" / "gpu_check.py"
SECTIONS = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> str:
    folder = write_random_checkpoint(tmp_path_factory.mktemp("ppdl3-256"))
    processor = folder / "preprocessor_config.json"
    settings = json.loads(processor.read_text())
    settings["size"] = {"height": 256, "width": 256}
    processor.write_text(json.dumps(settings))
    return str(folder)


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), "--device", "cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def table(output: str) -> dict[tuple[str, str], dict[str, str]]:
    """The final table's rows by (section, measure): cells cut at the header's column starts."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("section  measure"))
    header = lines[start]
    names = ["section", "measure", "ours", "glmocr 0.1.5", "ratio", "goal", "status"]
    cuts = [header.index(name) for name in names] + [None]
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("failed:"):
            break
        cells = {n: line[cuts[i]:cuts[i + 1]].strip() for i, n in enumerate(names)}
        rows[(cells["section"], cells["measure"])] = cells
    return rows


def test_the_check_runs_every_section_on_the_cpu(small_checkpoint):
    done = run_check("--pages", "1", "--formats", "png", "--checkpoint", small_checkpoint, "--without", "dagster")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = table(done.stdout)
    assert {section for section, _ in rows} == set(SECTIONS)
    assert not [r for r in rows.values() if r["status"] == "FAILED"]
    # a: without CUDA the tests that need it are collected, not run, here without dagster
    (tests,) = [r for (s, _), r in rows.items() if s == "a"]
    assert tests["status"] == "skipped: no CUDA here" and int(tests["ours"].split()[0]) >= 1
    assert "imported without: dagster" in done.stdout
    # b: the stage against the SDK's detector on the same page, and its two lanes
    speed = rows[("b", "layout, 1 png pages, pages/s")]
    assert float(speed["ours"]) > 0 and float(speed["glmocr 0.1.5"]) > 0 and speed["ratio"].endswith("x")
    assert rows[("b", "decode lane / model lane, png")]["status"] in ("ok", "decode-bound")
    assert ("b", "stage wall / sum of lanes, png") in rows
    # c: on a CPU whose default is float32 there is nothing to compare; elsewhere one row per format
    assert any(s == "c" for s, _ in rows)
    # d: a fresh process's start-up, phase by phase, and the partition cold and warm
    assert rows[("d", "cold start-up, share of a 1,000-page shard")]["goal"] == "<= 5%"
    assert rows[("d", "partition of 1 pages: cold / warm")]["ratio"].endswith("x")
    assert ("d", "cold: process + imports / CUDA init / load / warm-up") in rows
    assert "cpu" in rows[("e", "device")]["ours"]


def test_a_tiny_budget_skips_the_sections_and_says_so():
    done = run_check("--budget", "1", "--pages", "1")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = table(done.stdout)
    for section in ("a", "b", "c", "d"):
        (row,) = [r for (s, _), r in rows.items() if s == section]
        assert row["status"] == "skipped: budget"
    assert "left of --budget 1" in done.stdout
    assert ("e", "device") in rows  # the facts come whatever the budget


def test_a_failing_section_fails_the_check_and_the_rest_goes_on(tmp_path):
    done = run_check("--only", "b", "--checkpoint", str(tmp_path / "no-checkpoint"))
    assert done.returncode == 1
    rows = table(done.stdout)
    (failed,) = [r for (s, _), r in rows.items() if s == "b"]
    assert failed["status"] == "FAILED" and "no-checkpoint" in done.stdout
    assert ("e", "device") in rows and "failed: b" in done.stdout
