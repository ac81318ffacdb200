"""The shard sensor: new shards in the dataset become partitions, and a run for each."""

import dagster as dg

from ocr_assets import config
from ocr_assets.partitions import SHARDS, shards_partitions
from ocr_assets.resources import DatasetResource

ocr_job = dg.define_asset_job(
    "ocr_pipeline",
    selection=dg.AssetSelection.groups("ocr"),
    description="Every stage, pages → documents, for one shard.",
)


@dg.sensor(
    job=ocr_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=("Registers every new shard of OCR_ASSETS_DATASET as a partition and runs the pipeline on it "
                 "(OCR_ASSETS_SENSOR_RUNS=0: register only)."),
)
def shard_sensor(context: dg.SensorEvaluationContext, dataset: DatasetResource) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    new = [ref.key for ref in dataset.shards() if ref.key not in known]
    if not new:
        return dg.SensorResult(skip_reason="no new shards")
    # OCR_ASSETS_SENSOR_RUNS=0: register the shards only (run them by backfill or the schedule)
    runs = (config.env(config.ENV_SENSOR_RUNS) or "1").lower() not in ("0", "false", "no", "off")
    return dg.SensorResult(
        dynamic_partitions_requests=[shards_partitions.build_add_request(new)],
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"shard:{key}") for key in new] if runs else [],
    )
