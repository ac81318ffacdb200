"""The five partitioned assets. Each is thin: read upstream Parquet, call its stage, write Parquet, report."""

import logging

import dagster as dg
import pyarrow as pa

from ocr_assets.partitions import shards_partitions
from ocr_assets.recognition_cache import RecognitionCache
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.stages.crops import make_crops
from ocr_assets.stages.documents import assemble_documents
from ocr_assets.stages.layout import run_layout
from ocr_assets.stages.pages import extract_pages
from ocr_assets.stages.recognition import run_recognition
from ocr_assets.timing import StageReport

progress = logging.getLogger("ocr_assets.progress")

GROUP = "ocr"


def publish(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    table: pa.Table,
    report: StageReport,
    model_load_seconds: float | None = None,
) -> dg.MaterializeResult:
    """Write the partition's table atomically and describe it with the timing metadata of DESIGN.md."""
    asset = context.asset_key.to_user_string()
    partition = context.partition_key
    uri = storage.store().write(asset, partition, table)
    metadata: dict[str, object] = {
        "stage_seconds": round(report.stage_seconds, 4),
        "pages_per_second": round(report.pages_per_second, 2),
        "pages": report.pages,
    }
    if model_load_seconds is not None:
        metadata["model_load_seconds"] = round(model_load_seconds, 4)
    metadata.update({f"{part}_seconds": round(sec, 4) for part, sec in sorted(report.parts.items())})
    metadata.update({name: int(n) for name, n in sorted(report.counts.items())})
    metadata.update(report.info)
    metadata["dagster/row_count"] = table.num_rows
    metadata["dagster/column_schema"] = dg.TableSchema(
        columns=[dg.TableColumn(field.name, str(field.type)) for field in table.schema]
    )
    metadata["uri"] = dg.MetadataValue.path(uri)
    progress.info(
        "%-11s %s: %d rows, %d pages in %.2fs (%.1f pages/s)",
        asset, partition, table.num_rows, report.pages, report.stage_seconds, report.pages_per_second,
    )
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(partitions_def=shards_partitions, group_name=GROUP, kinds={"parquet"})
def pages(context: dg.AssetExecutionContext, dataset: DatasetResource, storage: StorageResource):
    """One row per source row of the shard: image format and size read from the header bytes, status, error."""
    shard = dataset.open(context.partition_key)
    table, report = extract_pages(shard)
    return publish(context, storage, table, report)


@dg.asset(partitions_def=shards_partitions, group_name=GROUP, kinds={"parquet"}, deps=[pages], pool="gpu")
def layout(
    context: dg.AssetExecutionContext,
    dataset: DatasetResource,
    storage: StorageResource,
    layout_model: LayoutResource,
):
    """One row per region: label, task, score and box in page pixels, in reading order.

    Ink that no layout box covers is recovered as extra text regions, so no text is lost.
    """
    pages_table = storage.store().read("pages", context.partition_key)
    backend, load_seconds = layout_model.load()
    shard = dataset.open(context.partition_key)
    table, report = run_layout(
        pages_table, shard.image_at, backend, recover_text=layout_model.recover_text,
        report=StageReport(label=f"layout {context.partition_key}"),
    )
    return publish(context, storage, table, report, model_load_seconds=load_seconds)


@dg.asset(partitions_def=shards_partitions, group_name=GROUP, kinds={"parquet"}, deps=[layout])
def crops(
    context: dg.AssetExecutionContext,
    dataset: DatasetResource,
    storage: StorageResource,
    recognizer: RecognizerResource,
):
    """One row per region: the region's image, sliced from the page decoded once, encoded once."""
    store = storage.store()
    layout_table = store.read("layout", context.partition_key)
    pages_table = store.read("pages", context.partition_key)
    shard = dataset.open(context.partition_key)
    table, report = make_crops(layout_table, shard.image_at, pages_table, fmt=recognizer.stored_crop_format())
    return publish(context, storage, table, report)


@dg.asset(partitions_def=shards_partitions, group_name=GROUP, kinds={"parquet"}, deps=[crops], pool="vlm")
def recognition(context: dg.AssetExecutionContext, storage: StorageResource, recognizer: RecognizerResource):
    """One row per region: the text read from its crop with the prompt of its task.

    Answers are cached next to the outputs: a re-run (after a crash, or a backfill over the
    same data) reads only the regions not read before.
    """
    store = storage.store()
    crops_table = store.read("crops", context.partition_key)
    backend, load_seconds = recognizer.load()
    cache = RecognitionCache(store, context.partition_key) if recognizer.cache else None
    table, report = run_recognition(
        crops_table, backend, cache=cache, report=StageReport(label=f"recognition {context.partition_key}")
    )
    report.info.update(backend.run_metadata())
    return publish(context, storage, table, report, model_load_seconds=load_seconds)


@dg.asset(partitions_def=shards_partitions, group_name=GROUP, kinds={"parquet"}, deps=[pages, layout, recognition])
def documents(context: dg.AssetExecutionContext, storage: StorageResource):
    """One row per source row: the page's Markdown in reading order, its regions as JSON, and a status."""
    store = storage.store()
    key = context.partition_key
    table, report = assemble_documents(
        store.read("pages", key), store.read("layout", key), store.read("recognition", key)
    )
    return publish(context, storage, table, report)


ASSETS = [pages, layout, crops, recognition, documents]
