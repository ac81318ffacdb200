"""Bad configuration fails fast, in the first step, naming the setting to change, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource

KEY = "data-00000-of-00002"


def _run(tmp_path: Path, small_dataset: str, **overrides):
    resources = {"dataset": DatasetResource(path=small_dataset), "storage": StorageResource(root=str(tmp_path / "out")),
                 "layout_model": LayoutResource(), "recognizer": RecognizerResource()}
    resources.update(overrides)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(SHARDS, [KEY])
        result = dg.materialize(ASSETS, partition_key=KEY, instance=instance, resources=resources,
                                raise_on_error=False)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    error = failure.step_failure_data.error
    while error.cls_name.startswith("Dagster") and error.cause is not None:  # under Dagster's wrapper
        error = error.cause
    return failure.step_key, error.message


@pytest.mark.parametrize("name, overrides, setting", [
    ("unknown layout backend", {"layout_model": LayoutResource(backend="bogus")}, config.ENV_LAYOUT_BACKEND),
    ("missing model folder", {"layout_model": LayoutResource(model="/nonexistent/pp-doclayout-v3")},
     config.ENV_LAYOUT_MODEL),
    ("unknown device", {"layout_model": LayoutResource(model="", backend="pp-doclayout-v3")}, config.ENV_LAYOUT_MODEL),
    ("unreachable VLM server", {"recognizer": RecognizerResource(vlm_base_url="http://127.0.0.1:9/v1")},
     config.ENV_VLM_BASE_URL),
    ("unknown recognizer", {"recognizer": RecognizerResource(kind="tesseract")}, config.ENV_RECOGNIZER),
    ("missing dataset", {"dataset": DatasetResource(path="/nonexistent/dataset")}, config.ENV_DATASET),
    ("missing image column", "image_column", config.ENV_IMAGE_COLUMN),
    ("unwritable storage", {"storage": StorageResource(root="/proc/ocr_assets_out")}, config.ENV_STORAGE),
])
def test_bad_configuration_fails_in_the_first_step(name, overrides, setting, small_dataset, tmp_path):
    if overrides == "image_column":
        overrides = {"dataset": DatasetResource(path=small_dataset, image_column="no_such_column")}
    step, message = _run(tmp_path, small_dataset, **overrides)
    assert step == "pages", (name, step)
    assert setting in message, (name, message)
    assert not list((tmp_path / "out").rglob("*.parquet")) if (tmp_path / "out").exists() else True
