"""The catch-up schedule: nightly, run every partition that is missing a stage or out of date.

A partition is out of date when a stage was never materialized, was materialized by another
code version of its asset, or is older than the stage it reads from. Partitions already up to
date, or with a run queued or in progress, are left alone.
"""

from __future__ import annotations

import dagster as dg

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.partitions import SHARDS
from ocr_assets.sensors import ocr_job

DEFAULT_CRON = "0 2 * * *"  # 02:00 every night
PAGE_SIZE = 1000
CODE_VERSION_TAG = "dagster/code_version"


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partitions: list[str]) -> dict[str, tuple[float, str | None]]:
    """partition → (timestamp, code version) of the latest materialization of ``key``."""
    latest: dict[str, tuple[float, str | None]] = {}
    cursor = None
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions), limit=PAGE_SIZE, cursor=cursor
        )
        for record in result.records:  # newest first: the first seen per partition is the latest
            event = record.asset_materialization
            if event is not None and event.partition is not None and event.partition not in latest:
                latest[event.partition] = (record.timestamp, (event.tags or {}).get(CODE_VERSION_TAG))
        if not result.has_more:
            return latest
        cursor = result.cursor


def stale_partitions(instance: dg.DagsterInstance, partitions: list[str], assets=ASSETS) -> dict[str, str]:
    """partition → why it needs a run (missing stage, other code version, older than its input)."""
    specs = {a.key: a for a in assets}
    latest = {key: _latest(instance, key, partitions) for key in specs}
    reasons: dict[str, str] = {}
    for partition in partitions:
        for key, asset in specs.items():
            name = key.to_user_string()
            record = latest[key].get(partition)
            if record is None:
                reasons[partition] = f"{name} never materialized"
                break
            version = asset.code_versions_by_key.get(key)
            if version is not None and record[1] is not None and record[1] != version:
                reasons[partition] = f"{name} made by code version {record[1]}, now {version}"
                break
            parents = [p for p in asset.asset_deps.get(key, set()) if p in latest]
            if any(latest[p].get(partition, (0.0, None))[0] > record[0] for p in parents):
                reasons[partition] = f"{name} is older than its input"
                break
    return reasons


def _busy(instance: dg.DagsterInstance) -> set[str]:
    """Partitions with a run of the pipeline queued, starting or running."""
    runs = instance.get_runs(dg.RunsFilter(job_name=ocr_job.name, statuses=[
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED]))
    return {run.tags.get("dagster/partition") for run in runs}


@dg.schedule(
    job=ocr_job,
    cron_schedule=config.env(config.ENV_SCHEDULE_CRON, DEFAULT_CRON),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly (OCR_ASSETS_SCHEDULE_CRON): runs every shard that is missing a stage or out of date.",
)
def catch_up_schedule(context: dg.ScheduleEvaluationContext):
    partitions = context.instance.get_dynamic_partitions(SHARDS)
    stale = stale_partitions(context.instance, partitions)
    busy = _busy(context.instance)
    todo = {k: why for k, why in stale.items() if k not in busy}
    if not todo:
        return dg.SkipReason(f"all {len(partitions)} shards are up to date or already running")
    day = context.scheduled_execution_time.strftime("%Y%m%d%H%M")  # one run per shard per tick
    return [dg.RunRequest(partition_key=k, run_key=f"catch-up:{k}:{day}", tags={"ocr_assets/reason": why})
            for k, why in sorted(todo.items())]
