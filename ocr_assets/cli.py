"""`ocr-assets`: write the sample dataset, run the pipeline through Dagster from a terminal, or serve
the local recognizer behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

STAGE_ORDER = ("pages", "layout", "crops", "recognition", "documents")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ocr-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="write the sample dataset (with ground truth) to DIR")
    sample.add_argument("dir")
    sample.add_argument("--pages", type=int, default=16)
    sample.add_argument("--shards", type=int, default=2)
    sample.add_argument("--no-documents", action="store_true",
                        help="leave out the two shards of multi-page rows (PDFs, lists of images)")
    sample.add_argument("--no-scans", action="store_true",
                        help="leave out the shard of scanned-looking pages (skewed, noisy, some turned)")

    run = sub.add_parser("run", help="materialize the assets for every shard (or the ones given)")
    run.add_argument("--partition", action="append", default=[], metavar="KEY",
                     help="a shard key to run; repeat for several (default: every shard)")
    run.add_argument("--select", default=",".join(STAGE_ORDER), metavar="ASSET[,ASSET...]",
                     help=f"assets to materialize (default: {','.join(STAGE_ORDER)})")

    serve = sub.add_parser("serve", help="an OpenAI-compatible server backed by the local PP-OCRv6 recognizer")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--model", default="glm-ocr", help="the model name it serves (default: glm-ocr)")
    serve.add_argument("--threads", type=int, default=0, help="CPU threads for the models (default: all)")

    prune = sub.add_parser("prune-cache", help="drop recognition cache entries the current settings no longer reach")
    prune.add_argument("--partition", action="append", default=[], metavar="KEY",
                       help="a shard key whose cache to prune; repeat for several (default: every cached shard)")

    workers = sub.add_parser("layout-workers", help="list, start or stop this host's layout workers (one per GPU)")
    action = workers.add_mutually_exclusive_group()
    action.add_argument("--start", action="store_true",
                        help="start a warm worker on every GPU (the CPU where there is none) with the current settings")
    action.add_argument("--stop", action="store_true", help="stop every worker after its current shard")

    vllm = sub.add_parser(
        "vllm-servers", help="list, start or stop this host's managed vLLM servers (one per GPU)",
        description="The vLLM servers that recognition steps with a vlm_serve_model start and share: one per GPU, "
                    "the i-th on OCR_ASSETS_VLM_SERVE_PORT + i. They keep running after the steps, until stopped "
                    "here; a server a running step uses is not stopped without --force.")
    vllm_action = vllm.add_mutually_exclusive_group()
    vllm_action.add_argument("--start", action="store_true",
                             help="start the servers not running yet, with OCR_ASSETS_VLM_SERVE_MODEL, _PORT, "
                                  "_GPU_MEMORY and OCR_ASSETS_VLM_MODEL (the served name), and print the "
                                  "OCR_ASSETS_VLM_BASE_URL to use")
    vllm_action.add_argument("--stop", action="store_true", help="stop every server no running step uses")
    vllm.add_argument("--force", action="store_true", help="with --stop: stop the servers steps use too")

    args = parser.parse_args(argv)
    if args.command == "vllm-servers":
        if args.force and not args.stop:
            parser.error("--force goes with --stop")
        return vllm_servers(start=args.start, stop=args.stop, force=args.force)
    if args.command == "layout-workers":
        return layout_workers(start=args.start, stop=args.stop)
    if args.command == "prune-cache":
        return prune_cache(args.partition)
    if args.command == "serve":
        from ocr_assets.serve import serve as run_server

        run_server(args.host, args.port, args.model, args.threads or None)
        return 0
    if args.command == "sample":
        from ocr_assets.sample import write_sample

        path = write_sample(args.dir, pages=args.pages, shards=args.shards, documents=not args.no_documents,
                            scans=not args.no_scans)
        extras = ([] if args.no_documents else ["2 shards of multi-page rows (PDFs, lists of images)"]) + (
            [] if args.no_scans else ["a shard of scanned pages, some turned"])
        more = "".join(f" and {extra}" for extra in extras)
        print(f"wrote {args.pages} sample pages in {args.shards} shards{more} to {path}")
        return 0
    return run_pipeline(args.partition, [s.strip() for s in args.select.split(",") if s.strip()])


def layout_workers(start: bool = False, stop: bool = False) -> int:
    """Print this host's layout workers; with ``start``/``stop``, start or stop them first."""
    from ocr_assets import config, layout_worker
    from ocr_assets.gpu_lease import cuda_count, gpu_slot, physical_ids
    from ocr_assets.layout_runner import CPU_SLOT, step_settings

    if stop:
        for info in layout_worker.workers():
            layout_worker.stop_worker(info["slot"])
            print(f"stopped the layout worker for {info['slot']} (pid {info['pid']})")
    if start:
        from ocr_assets.resources import resources_from_env

        settings = step_settings(resources_from_env()["layout_model"].process_config_and_initialize().settings())
        count = cuda_count()
        slots = [(gpu_slot(gid), f"cuda:{i}") for i, gid in enumerate(physical_ids(count))] or [(CPU_SLOT, "cpu")]
        for slot, device in slots:
            if layout_worker.find_worker(slot) is None:
                info = layout_worker.start_worker(slot, device, settings)
                print(f"started the layout worker for {slot} on {device} (pid {info['pid']}, load "
                      f"{info['load_seconds']:.2f} s, warm-up {info['warmup_seconds']:.2f} s)")
    found = layout_worker.workers()
    if any(info["slot"] == CPU_SLOT for info in found) and config.layout_worker_mode() != "on":
        print(f"(steps use the CPU worker only with {config.ENV_LAYOUT_WORKER}=on)")
    if not found:
        print(f"no layout workers on this host (folder {layout_worker.registration('x').parent})")
    for info in found:
        health = info["health"]
        print(f"{info['slot']}: pid {info['pid']} on {info['device']}, port {info['port']}, "
              f"{'busy' if health['busy'] else 'idle ' + str(health['idle_seconds']) + ' s'}, {health['jobs']} shard(s)")
    return 0


def vllm_servers(start: bool = False, stop: bool = False, force: bool = False) -> int:
    """Print this host's managed vLLM servers; with ``start``/``stop``, start or stop them first."""
    from ocr_assets import config, vllm_server

    try:
        if stop:
            stopped, busy = vllm_server.stop_servers(force=force)
            for info in stopped:
                print(f"stopped the vLLM server for GPU {info['slot']} (pid {info['pid']}, port {info['port']})")
            for info in busy:
                if info.get("starting"):
                    what = "is being started by a running step: not stopped (interrupting that step stops it)"
                elif info.get("checking"):
                    what = "is being checked by a step about to use it: not stopped (run --stop again)"
                else:
                    what = "is used by a running step: not stopped (--force stops it anyway)"
                print(f"error: the vLLM server for GPU {info['slot']} {what}", file=sys.stderr)
            if busy:
                return 1
        if start:
            urls = vllm_server.ensure_servers(vllm_server.settings_from_env())
            print(f"{config.ENV_VLM_BASE_URL}={','.join(urls)}")
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    found = vllm_server.list_servers()
    if not found:
        print(f"no managed vLLM servers run on this host (folder {vllm_server.registration('x').parent})")
    for info in found:
        health = "healthy" if info["healthy"] else "starting" if info.get("state") == "starting" else "NOT answering"
        print(f"GPU {info['slot']}: pid {info['pid']}, port {info['port']}, {info['model']} as "
              f"{info['served_name']!r}, {health}, "
              f"{'in use' if info['in_use'] else 'idle'}; log {info['log']}")
    return 0


def _mention_workers() -> None:
    """Say which layout workers this run left warm (they exit by themselves when idle)."""
    from ocr_assets import config, layout_worker

    found = layout_worker.workers()
    if found:
        idle = config.env(config.ENV_LAYOUT_WORKER_IDLE) or config.DEFAULT_LAYOUT_WORKER_IDLE
        print(f"layout workers stay warm for the next run on {', '.join(i['slot'] for i in found)} "
              f"(they exit after {idle} s idle; `ocr-assets layout-workers --stop` stops them now)")


def _instance_home() -> Path:
    """$DAGSTER_HOME, else ./.dagster_home, set up so that `dagster dev` there shows the same runs."""
    home = Path(os.environ.get("DAGSTER_HOME") or ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    target = home / "dagster.yaml"
    if not target.exists():
        project_yaml = Path(__file__).resolve().parent.parent / "dagster.yaml"
        if project_yaml.exists():
            shutil.copyfile(project_yaml, target)
        else:
            target.write_text("telemetry:\n  enabled: false\n")
    return home


def run_pipeline(partitions: list[str], select: list[str]) -> int:
    """Materialize ``select`` for each partition in a persistent instance; print progress and a summary."""
    import dagster as dg

    from ocr_assets.definitions import defs
    from ocr_assets.partitions import SHARDS

    unknown = [name for name in select if name not in STAGE_ORDER]
    if unknown:
        print(f"error: --select names unknown assets {unknown}; choose from {', '.join(STAGE_ORDER)}",
              file=sys.stderr)
        return 2

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    progress = logging.getLogger("ocr_assets.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False

    home = _instance_home()
    resources = defs.resources
    try:
        dataset = resources["dataset"].process_config_and_initialize()  # resolves its EnvVars
        location = dataset.location()
        shards = [ref.key for ref in dataset.shards()]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [key for key in partitions if key not in shards]
    if missing:
        print(f"error: --partition {missing} not in {location}; shards there: {', '.join(shards)}",
              file=sys.stderr)
        return 2
    keys = partitions or shards

    with dg.DagsterInstance.get() as instance:
        known = set(instance.get_dynamic_partitions(SHARDS))
        new = [key for key in shards if key not in known]
        if new:
            instance.add_dynamic_partitions(SHARDS, new)
        print(f"dataset {location}: {len(shards)} shards ({len(new)} new); running {len(keys)}; "
              f"instance {home}")
        for run_id in release_dead_runs(instance):
            print(f"  run {run_id[:8]} was left running by an ocr-assets process that died: marked failed, "
                  f"its concurrency slots freed")
        assets = [a for a in defs.assets if a.key.to_user_string() in select]
        quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
        summary: dict[str, dict[str, float]] = {}
        failed: list[str] = []
        start = time.perf_counter()
        for index, key in enumerate(keys, 1):
            print(f"[{index}/{len(keys)}] shard {key}")
            result = dg.materialize(
                assets, partition_key=key, instance=instance, resources=resources,
                raise_on_error=False, run_config=quiet, tags=_run_tags(),
            )
            for event in result.get_asset_materialization_events():
                _add_to_summary(summary, event.asset_key.to_user_string(), event.materialization.metadata)
            blocked = _report_failed_checks(result)
            if blocked or not result.success:
                failed.append(key)
                for failure in result.get_step_failure_events():
                    error = failure.step_failure_data.error
                    # the pipeline's own error, not Dagster's "error occurred while executing" wrapper
                    while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
                        error = error.cause
                    message = error.message.strip() if error else "unknown error"
                    print(f"  FAILED {failure.step_key}: {message}", file=sys.stderr)
        _print_summary(summary, time.perf_counter() - start)
    _mention_workers()
    if failed:
        print(f"{len(failed)} partition(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def prune_cache(partitions: list[str]) -> int:
    """Keep, per partition, only the cache entries that the current recognizer settings would look
    up for its current crops; a partition whose crops are gone keeps nothing."""
    from ocr_assets.definitions import defs
    from ocr_assets.recognition_cache import cached_partitions, prune
    from ocr_assets.stages.recognition import reachable_keys
    from ocr_assets.storage import StorageError

    try:
        store = defs.resources["storage"].process_config_and_initialize().store()
        with defs.resources["recognizer"].process_config_and_initialize_cm() as settings:
            recognizer = settings.for_cache_keys()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = partitions or cached_partitions(store)
    total_kept = total_dropped = 0
    for key in keys:
        try:
            reachable = reachable_keys(store.batches("crops", key), recognizer)  # a batch of crops at a time
        except StorageError:
            reachable = set()  # no crops any more: nothing can reach these answers
        kept, dropped = prune(store, key, reachable)
        total_kept, total_dropped = total_kept + kept, total_dropped + dropped
        print(f"{key}: kept {kept}, dropped {dropped}")
    print(f"recognition cache ({recognizer.name}, {store.root}): {len(keys)} partition(s), "
          f"kept {total_kept}, dropped {total_dropped}")
    return 0


def _report_failed_checks(result) -> bool:
    """Print every failed asset check of a run; whether one of them was blocking (the run is then red)."""
    blocked = False
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        blocked = blocked or evaluation.blocking
        shown = ", ".join(f"{k}={v.value}" for k, v in evaluation.metadata.items())
        kind = "blocking check" if evaluation.blocking else "check"
        print(f"  FAILED {kind} {evaluation.asset_key.to_user_string()}/{evaluation.check_name}: {shown}",
              file=sys.stderr)
    return blocked


def _run_tags() -> dict[str, str]:
    """Who runs it: so a later `ocr-assets run` can tell a run whose process died (kill -9)."""
    return {"ocr_assets/launched_by": "cli", "ocr_assets/host": socket.gethostname(),
            "ocr_assets/pid": str(os.getpid())}


def release_dead_runs(instance) -> list[str]:
    """Runs of this command on this host whose process is gone: mark them failed and free their
    concurrency slots, which they would otherwise hold for ever (the `gpu` and `vlm` pools)."""
    import dagster as dg

    alive = (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)
    released = []
    for run in instance.get_runs(dg.RunsFilter(statuses=list(alive), tags={"ocr_assets/launched_by": "cli"})):
        if run.tags.get("ocr_assets/host") != socket.gethostname():
            continue
        try:
            os.kill(int(run.tags.get("ocr_assets/pid", "0")), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, ValueError):
            continue
        instance.report_run_failed(run, "the ocr-assets process running it died (killed or crashed)")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released


def _add_to_summary(summary: dict[str, dict[str, float]], asset: str, metadata) -> None:
    row = summary.setdefault(asset, {})
    row["partitions"] = row.get("partitions", 0) + 1
    for name in ("stage_seconds", "model_load_seconds", "pages", "regions", "errors", "dagster/row_count",
                 "source_rows"):
        if name in metadata:
            row[name] = row.get(name, 0) + float(metadata[name].value)


def _print_summary(summary: dict[str, dict[str, float]], wall: float) -> None:
    header = f"{'stage':<12}{'parts':>6}{'pages':>8}{'rows':>9}{'errors':>8}{'seconds':>10}{'pages/s':>10}{'load s':>8}"
    print()
    print(header)
    print("-" * len(header))
    for asset in STAGE_ORDER:
        row = summary.get(asset)
        if not row:
            continue
        seconds = row.get("stage_seconds", 0.0)
        pages = row.get("pages", 0)
        rate = pages / seconds if seconds > 0 else 0.0
        print(f"{asset:<12}{int(row['partitions']):>6}{int(pages):>8}{int(row.get('dagster/row_count', 0)):>9}"
              f"{int(row.get('errors', 0)):>8}{seconds:>10.2f}{rate:>10.1f}{row.get('model_load_seconds', 0.0):>8.2f}")
    counts = []
    if "pages" in summary:  # a source row may hold many pages (a PDF, a list of images)
        pages = summary["pages"]
        counts.append(f"{int(pages.get('dagster/row_count', 0))} pages from "
                      f"{int(pages.get('source_rows', 0))} source rows")
    if "documents" in summary:  # one document per source row
        counts.append(f"{int(summary['documents'].get('dagster/row_count', 0))} documents")
    if counts:
        print("; ".join(counts))
    print(f"wall time {wall:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
