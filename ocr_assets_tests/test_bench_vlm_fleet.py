"""bench/vlm_fleet.py, the fleet load test, at its smallest size: real servers in their own processes,
one of them killed part-way through, and the checker that fails the bench when a bound is broken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "vlm_fleet.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def table(output: str) -> list[dict[str, str]]:
    """The markdown table's rows, by column name."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def bench_module():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import vlm_fleet
    finally:
        sys.path.remove(str(BENCH.parent))
    return vlm_fleet


def test_two_servers_one_killed_lose_no_region():  # after a baseline with none killed
    done = run_bench("--servers", "2", "--regions", "120", "--latency", "0.05", "--concurrency", "4",
                     "--fail-at", "0.3")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    baseline, row = table(done.stdout)
    assert baseline["failing server"] == "none" and baseline["lost"] == "0", baseline
    assert (row["servers"], row["regions"], row["ok"], row["lost"]) == ("2", "120", "120", "0")
    assert row["failing server"].startswith("#1 killed at"), row
    peaks = [int(p) for p in row["peak in flight at each server"].split(" / ")]
    assert len(peaks) == 2 and max(peaks) <= 4, row
    answered = [int(a) for a in row["answered by each server"].split(" / ")]
    assert answered[1] >= 18 and sum(answered) >= 120, row  # 30% of its 60 before the kill; every region answered
    assert float(row["ideal s"]) > 0 and float(row["wall/ideal"]) > 0


def test_the_bench_fails_when_a_server_sees_more_than_the_bound():
    # the servers hold 4 requests at once; the checker is told the bound is 2
    done = run_bench("--servers", "2", "--regions", "40", "--latency", "0.2", "--concurrency", "4",
                     "--fail-at", "0", "--bound-check", "2")
    assert done.returncode != 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "above the bound of 2 per server" in done.stdout
    (row,) = table(done.stdout)
    assert row["lost"] == "0" and row["failing server"] == "none"


def test_the_checker_names_each_broken_promise():
    fleet = bench_module()
    failure = fleet.Failure(server=1, mode="kill", threshold=300, at_seconds=2.0, fleet_answered=600, cut=32)
    clean = fleet.FleetResult(servers=2, regions=2000, ok=2000, wall=11.0, ideal=10.0, peaks=[32, 32],
                              answered=[1700, 300], retries=32, failure=failure)
    assert fleet.violations(clean, 32) == []
    over = fleet.FleetResult(**{**vars(clean), "peaks": [32, 33]})
    (message,) = fleet.violations(over, 32)
    assert "server #1 saw 33" in message
    lost = fleet.FleetResult(**{**vars(clean), "ok": 1990, "first_error": "connection refused"})
    (message,) = fleet.violations(lost, 32)
    assert "10 of 2000 regions lost" in message and "connection refused" in message
    never = fleet.Failure(server=1, mode="kill", threshold=300)
    (message,) = fleet.violations(fleet.FleetResult(**{**vars(clean), "failure": never, "answered": [1900, 100]}), 32)
    assert "not injected" in message and "answered 100" in message


def test_the_ideal_counts_the_capacity_lost_after_the_failure():
    fleet = bench_module()
    assert fleet.ideal_seconds(2000, 0.2, 32, 2, None) == 2000 * 0.2 / 64
    failure = fleet.Failure(server=1, mode="kill", threshold=300, at_seconds=2.0, fleet_answered=600)
    # 600 answers at two servers' bound, the other 1400 at one server's
    assert abs(fleet.ideal_seconds(2000, 0.2, 32, 2, failure) - (600 * 0.2 / 64 + 1400 * 0.2 / 32)) < 1e-9
