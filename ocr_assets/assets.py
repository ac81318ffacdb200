"""The five partitioned assets. Each is thin: open its inputs, call its stage with the partition's
Parquet writer as the sink (row groups written as they come), check and report."""

import contextlib
import logging
import warnings

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets import checks, config
from ocr_assets.imaging import decode_page
from ocr_assets.layout_runner import LayoutJob, LayoutOutcome, gpu_count, run_partition
from ocr_assets.preview import layout_picture, markdown_excerpt, markdown_image
from ocr_assets.partitions import shards_partitions
from ocr_assets.recognition_cache import RecognitionCache
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.schemas import CROPS, DOCUMENTS, PAGES, RECOGNITION
from ocr_assets.sources import Shard
from ocr_assets.stages.crops import make_crops
from ocr_assets.stages.documents import LAYOUT_COLUMNS, RECOGNITION_COLUMNS, assemble_documents
from ocr_assets.stages.pages import extract_pages
from ocr_assets.stages.recognition import run_recognition
from ocr_assets.storage import ParquetStore, PartitionWriter
from ocr_assets.timing import StageReport
from ocr_assets.upright import Turn, turn_page
from ocr_assets.versions import code_version
from ocr_assets.vlm_pool import WATCH_SECONDS, ShareWatch

progress = logging.getLogger("ocr_assets.progress")
# backfill_policy is marked beta in this Dagster; it is chosen on purpose (see COMMON below)
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

GROUP = "ocr"
FAILED_BLOCKING_CHECKS = "failed_blocking_checks"
OWNERS = ["team:ocr"]
# what crops reads of each layout row: the polygons, where kept, are not needed to cut
# rotation/skew: the crops stage turns each page as layout did (a layout file from before they
# existed was laid out on pages as stored: read without them, it turns nothing)
CROP_LAYOUT_COLUMNS = ["page_id", "region", "task", "x0", "y0", "x1", "y1", "rotation", "skew", "status", "error"]


def publish(
    context: dg.AssetExecutionContext,
    written: PartitionWriter | LayoutOutcome,
    report: StageReport,
    model_load_seconds: float | None = None,
    checks: dict[str, tuple[bool, dict]] | None = None,
    extra: dict[str, object] | None = None,
) -> dg.MaterializeResult:
    """Describe the partition's file, written by ``written``, with the timing metadata of DESIGN.md."""
    asset = context.asset_key.to_user_string()
    partition = context.partition_key
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
    metadata["dagster/row_count"] = written.rows
    metadata["dagster/column_schema"] = dg.TableSchema(
        columns=[dg.TableColumn(field.name, str(field.type)) for field in written.schema]
    )
    metadata["uri"] = dg.MetadataValue.path(written.uri)
    metadata.update(extra or {})
    progress.info(
        "%-11s %s: %d rows, %d pages in %.2fs (%.1f pages/s)",
        asset, partition, written.rows, report.pages, report.stage_seconds, report.pages_per_second,
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


def _columns(store: ParquetStore, asset: str, key: str, wanted: list[str]) -> list[str]:
    """Those of ``wanted`` that the partition's file has: a file written before a column was added
    is still read (the stage reads the missing column as null)."""
    names = store.schema(asset, key).names
    return [name for name in wanted if name in names]


def _texts(store: ParquetStore, asset: str, key: str, column: str, wanted: int) -> list[str]:
    """The first ``wanted`` non-blank values of a text column, read a batch at a time."""
    found: list[str] = []
    for batch in store.batches(asset, key, columns=[column]):
        found += [t for t in batch.column(0).to_pylist() if t and t.strip()][: wanted - len(found)]
        if len(found) >= wanted:
            break
    return found


# One partition per run, in backfills too: per-partition retries, metadata and parallel runs;
# model loading is 0.1-0.9 s against 10-50 s of work per partition (see the README).
COMMON = dict(
    partitions_def=shards_partitions, group_name=GROUP, owners=OWNERS,
    backfill_policy=dg.BackfillPolicy.multi_run(1),
)
GPU_POOL = "gpu"
# What each step's pod asks of Kubernetes (read by the k8s_job_executor, ignored by other executors):
# the layout step alone takes a GPU; the others are CPU/IO work, recognition an HTTP client.
K8S_CONFIG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
# GPU nodes usually carry this taint (the NVIDIA GPU operator, GKE, EKS) so only GPU pods land there
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def _pod_tags(cpu: str, memory: str, gpu: bool = False) -> dict:
    """The op tag giving a step's pod its CPU/memory requests and, with ``gpu``, one GPU and the toleration."""
    resources: dict = {"requests": {"cpu": cpu, "memory": memory}}
    pod = {"container_config": {"resources": resources}}
    if gpu:  # an extended resource: its request must equal its limit
        resources["requests"][GPU_RESOURCE] = "1"
        resources["limits"] = {GPU_RESOURCE: "1"}
        pod["pod_spec_config"] = {"tolerations": [GPU_TOLERATION]}
    return {K8S_CONFIG: pod}


PAGES_POD = _pod_tags("500m", "1Gi")  # reads headers and page boxes, no decoding
LAYOUT_POD = _pod_tags("4", "8Gi", gpu=True)  # decode threads + a batch of pages fed to the GPU
CROPS_POD = _pod_tags("2", "4Gi")  # decodes each page once, encodes its crops
RECOGNITION_POD = _pod_tags("1", "2Gi")  # requests in flight to the vLLM services, answers cached
DOCUMENTS_POD = _pod_tags("500m", "2Gi")  # joins the Parquet files a batch at a time


def _check(name: str, asset: str, description: str, blocking: bool = False) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, description=description, blocking=blocking)


@dg.asset(**COMMON, kinds={"parquet", "python"}, code_version=code_version("pages"), op_tags=PAGES_POD,
          check_specs=[
    _check("every_source_row", "pages", "Every source row of the shard has its pages, and no page lies outside "
           "the shard (blocks the GPU stages).", True),
])
def pages(
    context: dg.AssetExecutionContext,
    dataset: DatasetResource,
    storage: StorageResource,
    layout_model: LayoutResource,
    recognizer: RecognizerResource,
):
    """One row per page of every source row (a PDF's pages, a list's images): format and size read
    from headers and page boxes, without decoding, status, error.

    Runs first, so it checks the whole configuration first: a bad layout backend or model
    folder, or a VLM server that does not answer, fails here, before any GPU work.
    """
    layout_model.preflight()
    recognizer.preflight()
    store, key = storage.store(), context.partition_key
    shard = dataset.open(key)
    try:
        with store.writer("pages", key, PAGES) as written:
            _, report = extract_pages(shard, sink=written.write, report=StageReport(label=f"pages {key}"))
    finally:
        shard.close()
    rows = store.read("pages", key, columns=["row", "page"])
    return publish(context, written, report, checks={
        "every_source_row": checks.every_source_row_has_pages(rows, dataset.source_rows(key))})


@dg.asset(**COMMON, kinds={"parquet", "pytorch", "onnx"}, code_version=code_version("layout"), deps=[pages],
          pool=GPU_POOL, op_tags=LAYOUT_POD, check_specs=[
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
    Runs in the `gpu` concurrency pool, on a GPU no other layout step holds, in the host's warm
    layout worker for that GPU (``layout_runner``); its metadata shows one page with its boxes drawn.
    """
    store, key = storage.store(), context.partition_key
    job = LayoutJob.for_step(dataset=dataset.location(), storage=storage.root, partition=key,
                             settings=layout_model.settings(), image_column=dataset.image_column,
                             id_column=dataset.id_column)
    outcome = run_partition(job, StageReport(label=f"layout {key}"))
    if outcome.report.info.get("gpu") != "cpu":
        raise_gpu_pool_limit(context)
    pages_table = store.read("pages", key, columns=["page_id", "row", "page", "status"])
    shard = dataset.open(key)
    try:
        preview = _layout_preview(context, store, shard, pages_table)
    finally:
        shard.close()
    regions = store.read("layout", key, columns=["page_id", "region", "status"])
    # the runner's report carries model_load_seconds with where it ran (gpu, startup_seconds, ...)
    return publish(context, outcome, outcome.report,
                   checks={"page_error_rate": checks.layout_page_error_rate(pages_table, regions)},
                   extra=preview)


def raise_gpu_pool_limit(context: dg.AssetExecutionContext) -> None:
    """Raise the `gpu` pool's limit to the number of GPUs this step sees (never lower it), so every
    GPU gets a layout step without anyone setting the pool by hand."""
    count = gpu_count()
    if count < 2:
        return
    storage = context.instance.event_log_storage
    try:
        info = storage.get_concurrency_info(GPU_POOL)
        if info.slot_count < count:
            storage.set_concurrency_slots(GPU_POOL, count)
            context.log.info(f"concurrency pool {GPU_POOL!r}: limit raised from {info.slot_count} to {count}, "
                             f"one layout step per GPU")
    except Exception as exc:  # an instance without pools: the lease still keeps one step per GPU
        context.log.warning(f"could not set the {GPU_POOL!r} pool's limit to {count}: {exc}")


def _first_page_regions(store: ParquetStore, key: str) -> tuple[str, list[dict]] | None:
    """The first page with ok regions and those regions, read from the layout file a batch at a time."""
    columns = _columns(store, "layout", key, ["page_id", "task", "source", "x0", "y0", "x1", "y1", "status",
                                              "rotation", "skew"])
    page_id, regions = None, []
    for batch in store.batches("layout", key, columns=columns):
        for row in batch.filter(pc.equal(batch.column("status"), "ok")).to_pylist():
            if page_id is None:
                page_id = row["page_id"]
            elif row["page_id"] != page_id:  # a page's rows are contiguous: this page is complete
                return page_id, regions
            regions.append(row)
    return (page_id, regions) if page_id is not None else None


def _layout_preview(context, store: ParquetStore, shard: Shard, pages_table: pa.Table) -> dict:
    """The first page that has regions, drawn with its boxes, saved beside the outputs and shown inline."""
    try:
        found = _first_page_regions(store, context.partition_key)
        if found is None:
            return {}
        page_id, regions = found
        where = pages_table.filter(pc.equal(pages_table.column("page_id"), page_id))
        (pixels,) = shard.read_pages([(where.column("row")[0].as_py(), where.column("page")[0].as_py())])
        if isinstance(pixels, Exception):
            raise pixels
        # the boxes are in the upright page's pixels: the page is turned as layout turned it
        page = turn_page(decode_page(pixels), Turn.recorded(regions[0].get("rotation"), regions[0].get("skew")))
        picture = layout_picture(page, [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in regions],
                                 [r["task"] for r in regions], [r["source"] for r in regions])
        uri = store.write_file("layout_previews", context.partition_key, picture, ".jpg")
    except Exception as exc:  # a preview must never fail the stage
        context.log.warning(f"no layout preview: {type(exc).__name__}: {exc}")
        return {}
    return {"preview": dg.MetadataValue.md(f"**{page_id}**\n\n" + markdown_image(picture, page_id)),
            "preview_uri": dg.MetadataValue.path(uri)}


@dg.asset(**COMMON, kinds={"parquet", "opencv"}, code_version=code_version("crops"), deps=[layout],
          op_tags=CROPS_POD)
def crops(
    context: dg.AssetExecutionContext,
    dataset: DatasetResource,
    storage: StorageResource,
    recognizer: RecognizerResource,
):
    """One row per region: the region's image, sliced from the page decoded once, encoded once."""
    store, key = storage.store(), context.partition_key
    pages_table = store.read("pages", key, columns=["page_id", "row", "page"])
    shard = dataset.open(key)
    try:
        with store.writer("crops", key, CROPS) as written:
            layout = store.batches("layout", key, columns=_columns(store, "layout", key, CROP_LAYOUT_COLUMNS))
            _, report = make_crops(layout, shard, pages_table,
                                   fmt=recognizer.stored_crop_format(), report=StageReport(label=f"crops {key}"),
                                   sink=written.write)
    finally:
        shard.close()
    return publish(context, written, report)


@dg.asset(**COMMON, kinds={"parquet", "onnx"}, code_version=code_version("recognition"), deps=[crops],
          pool=config.VLM_POOL, op_tags=RECOGNITION_POD, check_specs=[
    _check("error_rate", "recognition", "Regions whose recognition failed, under OCR_ASSETS_MAX_ERROR_RATE."),
    _check("empty_text_rate", "recognition", "Non-empty crops read as no text, under OCR_ASSETS_MAX_EMPTY_RATE."),
])
def recognition(context: dg.AssetExecutionContext, storage: StorageResource, recognizer: RecognizerResource):
    """One row per region: the text read from its crop with the prompt of its task.

    Answers are cached next to the outputs: a re-run (after a crash, or a backfill over the
    same data) reads only the regions not read before. Runs in the `vlm` concurrency pool: with a
    VLM, each step keeps 1/limit of every server's bound in flight, so the steps together never pass it.
    """
    store, key = storage.store(), context.partition_key
    vlm = recognizer.kind_name() == "openai"
    steps = vlm_steps(context, recognizer.vlm_concurrency) if vlm else 1
    backend, load_seconds = recognizer.load(steps)
    cache = RecognitionCache(store, key) if recognizer.cache else None
    # a pool limit changed while the step reads changes its share within WATCH_SECONDS
    watch = ShareWatch(lambda: vlm_pool_limit(context), backend, recognizer.vlm_concurrency, steps,
                       context.log, WATCH_SECONDS) if vlm else contextlib.nullcontext()
    with watch, store.writer("recognition", key, RECOGNITION) as written:
        _, report = run_recognition(
            store.batches("crops", key), backend, cache=cache, rows=store.num_rows("crops", key),
            report=StageReport(label=f"recognition {key}"), sink=written.write,
        )
    report.info.update(backend.run_metadata())
    if vlm:
        report.info.update(vlm_pool_limit=watch.limit,
                           vlm_concurrency_per_server=config.vlm_share(recognizer.vlm_concurrency, watch.limit))
    texts = _texts(store, "recognition", key, "text", 12)
    return publish(
        context, written, report, model_load_seconds=load_seconds,
        checks={"error_rate": checks.error_rate(store.read("recognition", key, columns=["region", "status"])),
                "empty_text_rate": checks.empty_text_rate(report.counts.get("recognized", 0),
                                                          report.counts.get("empty_text", 0))},
        extra={"preview": dg.MetadataValue.md("\n\n".join(f"- {markdown_excerpt(t, 300)}" for t in texts))}
        if texts else None,
    )


def vlm_pool_limit(context: dg.AssetExecutionContext) -> int | None:
    """The recognition steps that may hold the `vlm` pool at once: its limit, or its claimed slots
    while more steps run than a lowered limit allows (lowering it stops none); None without a limit."""
    info = context.instance.event_log_storage.get_concurrency_info(config.VLM_POOL)
    limit = info.limit if getattr(info, "limit", None) is not None else info.slot_count
    if not limit or limit <= 0:
        return None
    return max(int(limit), len(getattr(info, "claimed_slots", None) or ()))


def vlm_steps(context: dg.AssetExecutionContext, bound: int) -> int:
    """The recognition steps that may run at once: the `vlm` pool's limit. Without one (an instance
    whose pools have no default limit), 1, with a warning: the bound then holds for one step only.
    An instance that cannot say fails the step: guessing could pass every server's bound."""
    try:
        limit = vlm_pool_limit(context)
    except Exception as exc:
        raise RuntimeError(f"could not read the {config.VLM_POOL!r} concurrency pool's limit, which splits "
                           f"{config.ENV_VLM_CONCURRENCY} between recognition steps: {type(exc).__name__}: {exc}") from exc
    if limit is None:
        context.log.warning(f"concurrency pool {config.VLM_POOL!r}: no limit is set; each recognition step keeps the "
                            f"whole {config.ENV_VLM_CONCURRENCY} in flight to each server: set a limit "
                            f"(dagster instance concurrency set {config.VLM_POOL} N) so the steps share it")
        return 1
    config.vlm_share(bound, limit)  # more steps than the bound: an error naming both, before any server starts
    return limit


@dg.asset(**COMMON, kinds={"parquet", "markdown"}, code_version=code_version("documents"),
          deps=[pages, layout, recognition], op_tags=DOCUMENTS_POD, check_specs=[
    _check("every_source_row", "documents", "One document per source row of the shard, each row once."),
    _check("page_error_rate", "documents", "Documents whose status is error, under OCR_ASSETS_MAX_PAGE_ERROR_RATE."),
    _check("suspect_page_rate", "documents", "Pages read with a confidence below OCR_ASSETS_MIN_PAGE_CONFIDENCE "
           "(flag low_confidence), under OCR_ASSETS_MAX_SUSPECT_PAGE_RATE."),
])
def documents(context: dg.AssetExecutionContext, dataset: DatasetResource, storage: StorageResource):
    """One row per source row: its pages' Markdown in order (a `<!-- page N -->` line between pages),
    each page's Markdown, status, confidence and flags, its regions as JSON, and a status over its
    pages. The metadata plots the partition's mean confidence and counts suspect and flagged pages."""
    store, key = storage.store(), context.partition_key
    with store.writer("documents", key, DOCUMENTS) as written:
        _, report = assemble_documents(
            store.read("pages", key),
            store.batches("layout", key, columns=_columns(store, "layout", key, LAYOUT_COLUMNS)),
            store.batches("recognition", key, columns=_columns(store, "recognition", key, RECOGNITION_COLUMNS)),
            report=StageReport(label=f"documents {key}"), sink=written.write,
        )
    rows = store.read("documents", key, columns=["row", "status", "page_status", "page_flags"])
    first = _texts(store, "documents", key, "markdown", 1)
    return publish(
        context, written, report,
        checks={"every_source_row": checks.one_row_per_source_row(rows, dataset.source_rows(key)),
                "page_error_rate": checks.documents_page_error_rate(rows),
                "suspect_page_rate": checks.suspect_page_rate(rows)},
        extra={"preview": dg.MetadataValue.md(markdown_excerpt(first[0]))} if first else None,
    )


ASSETS = [pages, layout, crops, recognition, documents]
