"""The catch-up schedule: nightly, run every partition that is missing a stage or out of date.

A partition is out of date when a stage was never materialized, was materialized by another
code version of its asset (``versions.py``: the code and every setting that changes its output),
failed a blocking check, or is older than the stage it reads from. Only that stage and the ones below it run again: a
shard missing only `documents` does not go back to the GPU. Partitions already up to date, or
with a run of any job queued or in progress (asset backfills and UI materializations too), or
targeted by a backfill that is still going, are left alone.
"""

from __future__ import annotations

from typing import NamedTuple

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus

from ocr_assets import config
from ocr_assets.assets import ASSETS, FAILED_BLOCKING_CHECKS
from ocr_assets.partitions import SHARDS
from ocr_assets.sensors import ocr_job

DEFAULT_CRON = "0 2 * * *"  # 02:00 every night
PAGE_SIZE = 1000
CODE_VERSION_TAG = "dagster/code_version"


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partitions: list[str]) -> dict[str, tuple]:
    """partition → (timestamp, code version, failed blocking checks) of the latest materialization of ``key``."""
    latest: dict[str, tuple] = {}
    cursor = None
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions), limit=PAGE_SIZE, cursor=cursor
        )
        for record in result.records:  # newest first: the first seen per partition is the latest
            event = record.asset_materialization
            if event is not None and event.partition is not None and event.partition not in latest:
                failed = event.metadata.get(FAILED_BLOCKING_CHECKS)
                latest[event.partition] = (record.timestamp, (event.tags or {}).get(CODE_VERSION_TAG),
                                           int(failed.value) if failed is not None else 0)
        if not result.has_more:
            return latest
        cursor = result.cursor


class Stale(NamedTuple):
    """Why a partition needs a run, and the assets to run: the first stale one and all below it."""

    reason: str
    assets: tuple[dg.AssetKey, ...]


def _downstream(first: dg.AssetKey, specs: dict) -> tuple[dg.AssetKey, ...]:
    """``first`` and every asset that depends on it, directly or not, in pipeline order."""
    chosen = {first}
    for key, asset in specs.items():  # specs are in pipeline order: parents come first
        if chosen & set(asset.asset_deps.get(key, set())):
            chosen.add(key)
    return tuple(key for key in specs if key in chosen)


def stale_partitions(instance: dg.DagsterInstance, partitions: list[str], assets=ASSETS) -> dict[str, Stale]:
    """partition → why it needs a run (missing stage, other code version, older than its input) and
    which assets to run (the stale one and those below it; the stages above are left alone)."""
    specs = {a.key: a for a in assets}
    latest = {key: _latest(instance, key, partitions) for key in specs}
    stale: dict[str, Stale] = {}
    for partition in partitions:
        for key, asset in specs.items():
            name = key.to_user_string()
            record = latest[key].get(partition)
            reason = None
            if record is None:
                reason = f"{name} never materialized"
            else:
                version = asset.code_versions_by_key.get(key)
                parents = [p for p in asset.asset_deps.get(key, set()) if p in latest]
                if version is not None and record[1] is not None and record[1] != version:
                    reason = f"{name} made by code version {record[1]}, now {version}"
                elif record[2]:
                    reason = f"{name} failed a blocking check"
                elif any(latest[p].get(partition, (0.0,))[0] > record[0] for p in parents):
                    reason = f"{name} is older than its input"
            if reason is not None:
                stale[partition] = Stale(reason, _downstream(key, specs))
                break
    return stale


IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def _backfill_partitions(backfill) -> set[str]:
    """Partitions a backfill targets, read from its stored data (asset or job backfill)."""
    names = set(backfill.partition_names or [])
    data = backfill.asset_backfill_data
    if data is not None:
        for subset in data.target_subset.partitions_subsets_by_asset_key.values():
            names.update(subset.get_partition_keys())
    return names


def _busy(instance: dg.DagsterInstance) -> set[str]:
    """Partitions with a run of any job (the pipeline, a UI materialization, an asset backfill) queued,
    starting or running, and those a backfill that is still going will run."""
    busy = {run.tags.get("dagster/partition") for run in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS))}
    for backfill in instance.get_backfills(status=BulkActionStatus.REQUESTED):
        try:
            busy |= _backfill_partitions(backfill)
        except Exception:  # a backfill stored by another Dagster version: its runs still count above
            continue
    return busy - {None}


@dg.schedule(
    job=ocr_job,
    cron_schedule=config.env(config.ENV_SCHEDULE_CRON, DEFAULT_CRON),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly (OCR_ASSETS_SCHEDULE_CRON): runs the stale stages of every shard that is missing "
                "a stage or out of date.",
)
def catch_up_schedule(context: dg.ScheduleEvaluationContext):
    partitions = context.instance.get_dynamic_partitions(SHARDS)
    stale = stale_partitions(context.instance, partitions)
    busy = _busy(context.instance)
    todo = {k: why for k, why in stale.items() if k not in busy}
    if not todo:
        return dg.SkipReason(f"all {len(partitions)} shards are up to date or already running")
    day = context.scheduled_execution_time.strftime("%Y%m%d%H%M")  # one run per shard per tick
    return [dg.RunRequest(partition_key=k, run_key=f"catch-up:{k}:{day}", asset_selection=list(why.assets),
                          tags={"ocr_assets/reason": why.reason})
            for k, why in sorted(todo.items())]
