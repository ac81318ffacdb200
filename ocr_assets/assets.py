"""The five partitioned assets. Each is thin: read upstream Parquet, call its stage, write Parquet, report."""

import logging
import warnings

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets import checks
from ocr_assets.imaging import decode_page
from ocr_assets.preview import layout_picture, markdown_excerpt, markdown_image
from ocr_assets.partitions import shards_partitions
from ocr_assets.recognition_cache import RecognitionCache
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.stages.crops import make_crops
from ocr_assets.stages.documents import assemble_documents
from ocr_assets.stages.layout import run_layout
from ocr_assets.stages.pages import extract_pages
from ocr_assets.stages.recognition import run_recognition
from ocr_assets.timing import StageReport
from ocr_assets.versions import code_version

progress = logging.getLogger("ocr_assets.progress")
# backfill_policy is marked beta in this Dagster; it is chosen on purpose (see COMMON below)
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

GROUP = "ocr"
FAILED_BLOCKING_CHECKS = "failed_blocking_checks"
OWNERS = ["team:ocr"]


def publish(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    table: pa.Table,
    report: StageReport,
    model_load_seconds: float | None = None,
    checks: dict[str, tuple[bool, dict]] | None = None,
    extra: dict[str, object] | None = None,
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
    metadata.update(extra or {})
    progress.info(
        "%-11s %s: %d rows, %d pages in %.2fs (%.1f pages/s)",
        asset, partition, table.num_rows, report.pages, report.stage_seconds, report.pages_per_second,
    )
    check_results = [
        dg.AssetCheckResult(check_name=name, passed=bool(passed), metadata=meta)
        for name, (passed, meta) in (checks or {}).items()
    ]
    if checks:  # the catch-up schedule reruns a partition whose blocking check failed
        blocking = {spec.name for spec in context.assets_def.check_specs if spec.blocking}
        metadata[FAILED_BLOCKING_CHECKS] = sum(1 for name, (passed, _) in checks.items()
                                               if name in blocking and not passed)
    return dg.MaterializeResult(metadata=metadata, check_results=check_results)


# One partition per run, in backfills too: per-partition retries, metadata and parallel runs;
# model loading is 0.1-0.9 s against 10-50 s of work per partition (see the README).
COMMON = dict(
    partitions_def=shards_partitions, group_name=GROUP, owners=OWNERS,
    backfill_policy=dg.BackfillPolicy.multi_run(1),
)
GPU_LIMIT = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}


def _check(name: str, asset: str, description: str, blocking: bool = False) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, description=description, blocking=blocking)


@dg.asset(**COMMON, kinds={"parquet", "python"}, code_version=code_version("pages"), check_specs=[
    _check("every_source_row", "pages", "One row per source row of the shard (blocks the GPU stages).", True),
])
def pages(
    context: dg.AssetExecutionContext,
    dataset: DatasetResource,
    storage: StorageResource,
    layout_model: LayoutResource,
    recognizer: RecognizerResource,
):
    """One row per source row of the shard: image format and size read from the header bytes, status, error.

    Runs first, so it checks the whole configuration first: a bad layout backend or model
    folder, or a VLM server that does not answer, fails here, before any GPU work.
    """
    layout_model.preflight()
    recognizer.preflight()
    shard = dataset.open(context.partition_key)
    table, report = extract_pages(shard)
    source_rows = dataset.source_rows(context.partition_key)
    return publish(context, storage, table, report,
                   checks={"every_source_row": checks.every_source_row(table, source_rows)})


@dg.asset(**COMMON, kinds={"parquet", "pytorch", "onnx"}, code_version=code_version("layout"), deps=[pages],
          pool="gpu", op_tags=GPU_LIMIT, check_specs=[
    _check("page_error_rate", "layout", "Pages without a layout (failed in pages or layout), under "
           "OCR_ASSETS_MAX_PAGE_ERROR_RATE (blocks crops, recognition and documents).", True),
])
def layout(
    context: dg.AssetExecutionContext,
    dataset: DatasetResource,
    storage: StorageResource,
    layout_model: LayoutResource,
):
    """One row per region: label, task, score and box in page pixels, in reading order.

    Ink that no layout box covers is recovered as extra text regions, so no text is lost.
    Runs in the `gpu` concurrency pool; its metadata shows one page with its boxes drawn.
    """
    store = storage.store()
    pages_table = store.read("pages", context.partition_key)
    backend, load_seconds = layout_model.load()
    shard = dataset.open(context.partition_key)
    table, report = run_layout(
        pages_table, shard.image_at, backend, recover_text=layout_model.recover_text,
        report=StageReport(label=f"layout {context.partition_key}"),
    )
    return publish(context, storage, table, report, model_load_seconds=load_seconds,
                   checks={"page_error_rate": checks.layout_page_error_rate(pages_table, table)},
                   extra=_layout_preview(context, store, shard, pages_table, table))


def _layout_preview(context, store, shard, pages_table: pa.Table, layout_table: pa.Table) -> dict:
    """The first page that has regions, drawn with its boxes, saved beside the outputs and shown inline."""
    try:
        ok = layout_table.filter(pc.equal(layout_table.column("status"), "ok"))
        if not ok.num_rows:
            return {}
        page_id = ok.column("page_id")[0].as_py()
        regions = ok.filter(pc.equal(ok.column("page_id"), page_id)).to_pylist()
        row = pages_table.filter(pc.equal(pages_table.column("page_id"), page_id)).column("row")[0].as_py()
        picture = layout_picture(decode_page(shard.image_at(row)), [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in regions],
                                 [r["task"] for r in regions], [r["source"] for r in regions])
        uri = store.write_file("layout_previews", context.partition_key, picture, ".jpg")
    except Exception as exc:  # a preview must never fail the stage
        context.log.warning(f"no layout preview: {type(exc).__name__}: {exc}")
        return {}
    return {"preview": dg.MetadataValue.md(f"**{page_id}**\n\n" + markdown_image(picture, page_id)),
            "preview_uri": dg.MetadataValue.path(uri)}


@dg.asset(**COMMON, kinds={"parquet", "opencv"}, code_version=code_version("crops"), deps=[layout])
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


@dg.asset(**COMMON, kinds={"parquet", "onnx"}, code_version=code_version("recognition"), deps=[crops], pool="vlm",
          check_specs=[
    _check("error_rate", "recognition", "Regions whose recognition failed, under OCR_ASSETS_MAX_ERROR_RATE."),
    _check("empty_text_rate", "recognition", "Non-empty crops read as no text, under OCR_ASSETS_MAX_EMPTY_RATE."),
])
def recognition(context: dg.AssetExecutionContext, storage: StorageResource, recognizer: RecognizerResource):
    """One row per region: the text read from its crop with the prompt of its task.

    Answers are cached next to the outputs: a re-run (after a crash, or a backfill over the
    same data) reads only the regions not read before. Runs in the `vlm` concurrency pool.
    """
    store = storage.store()
    crops_table = store.read("crops", context.partition_key)
    backend, load_seconds = recognizer.load()
    cache = RecognitionCache(store, context.partition_key) if recognizer.cache else None
    table, report = run_recognition(
        crops_table, backend, cache=cache, report=StageReport(label=f"recognition {context.partition_key}")
    )
    report.info.update(backend.run_metadata())
    texts = [t for t in table.column("text").to_pylist() if t and t.strip()][:12]
    return publish(
        context, storage, table, report, model_load_seconds=load_seconds,
        checks={"error_rate": checks.error_rate(table),
                "empty_text_rate": checks.empty_text_rate(report.counts.get("recognized", 0),
                                                          report.counts.get("empty_text", 0))},
        extra={"preview": dg.MetadataValue.md("\n\n".join(f"- {markdown_excerpt(t, 300)}" for t in texts))}
        if texts else None,
    )


@dg.asset(**COMMON, kinds={"parquet", "markdown"}, code_version=code_version("documents"),
          deps=[pages, layout, recognition], check_specs=[
    _check("every_source_row", "documents", "One document per source row of the shard."),
    _check("page_error_rate", "documents", "Documents whose status is error, under OCR_ASSETS_MAX_PAGE_ERROR_RATE."),
])
def documents(context: dg.AssetExecutionContext, dataset: DatasetResource, storage: StorageResource):
    """One row per source row: the page's Markdown in reading order, its regions as JSON, and a status."""
    store = storage.store()
    key = context.partition_key
    pages_table = store.read("pages", key)
    table, report = assemble_documents(pages_table, store.read("layout", key), store.read("recognition", key))
    first = next((m for m in table.column("markdown").to_pylist() if m and m.strip()), None)
    return publish(
        context, storage, table, report,
        checks={"every_source_row": checks.every_source_row(table, dataset.source_rows(key)),
                "page_error_rate": checks.documents_page_error_rate(table)},
        extra={"preview": dg.MetadataValue.md(markdown_excerpt(first))} if first else None,
    )


ASSETS = [pages, layout, crops, recognition, documents]
