"""The code location: assets, resources, job, sensor and schedule, wired in one place."""

import dagster as dg

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.resources import resources_from_env
from ocr_assets.schedules import catch_up_schedule
from ocr_assets.sensors import ocr_job, shard_sensor


def run_executor() -> dg.ExecutorDefinition | None:
    """How every run's steps execute, the job's, the sensor's and backfills' alike (OCR_ASSETS_EXECUTOR):
    None keeps Dagster's default (a process per step); k8s runs each step in its own Kubernetes pod,
    with what the asset's `dagster-k8s/config` tag asks for (a GPU for layout only)."""
    if config.executor() != "k8s":
        return None
    try:  # only the image for Kubernetes has dagster-k8s
        from dagster_k8s import k8s_job_executor
    except ImportError as exc:
        raise ImportError(f"{config.ENV_EXECUTOR}=k8s needs dagster-k8s: pip install \".[k8s]\", "
                          f"or unset {config.ENV_EXECUTOR} to run the steps as local processes") from exc
    return k8s_job_executor


defs = dg.Definitions(
    assets=ASSETS,
    resources=resources_from_env(),
    jobs=[ocr_job],
    sensors=[shard_sensor],
    schedules=[catch_up_schedule],
    executor=run_executor(),  # on the Definitions: the asset job and backfill runs both take it
)
