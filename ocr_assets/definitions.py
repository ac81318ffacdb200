"""The code location: assets, resources, job and sensor, wired in one place."""

import dagster as dg

from ocr_assets.assets import ASSETS
from ocr_assets.resources import resources_from_env
from ocr_assets.sensors import ocr_job, shard_sensor

defs = dg.Definitions(
    assets=ASSETS,
    resources=resources_from_env(),
    jobs=[ocr_job],
    sensors=[shard_sensor],
)
