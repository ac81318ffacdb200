"""The code location: assets, resources, job, sensor and schedule, wired in one place."""

import dagster as dg

from ocr_assets.assets import ASSETS
from ocr_assets.resources import resources_from_env
from ocr_assets.schedules import catch_up_schedule
from ocr_assets.sensors import ocr_job, shard_sensor

defs = dg.Definitions(
    assets=ASSETS,
    resources=resources_from_env(),
    jobs=[ocr_job],
    sensors=[shard_sensor],
    schedules=[catch_up_schedule],
)
