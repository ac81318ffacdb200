"""Dagster resources: the dataset, the Parquet storage, the layout model and the recognizer.

Each is configured from the environment variables of DESIGN.md (see ``resources_from_env``).
Models load once per process: the first materialization in a process pays the load and
reports it as ``model_load_seconds``; later ones reuse the loaded model.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from ocr_assets import config
from ocr_assets.backends import load_once
from ocr_assets.backends.layout import (
    SETTINGS, LayoutBackend, check_settings, load_layout_backend, resolve_layout_backend,
)
from ocr_assets.backends.recognition import RECOGNIZERS, Recognizer, create_recognizer, resolve_recognizer
from ocr_assets.sources import Shard, ShardRef, list_shards, open_shard, source_row_count
from ocr_assets.storage import ParquetStore

_vllm_uses: list = []  # this process's holds on the managed vLLM servers (vllm_server.ServerUse)


class DatasetResource(dg.ConfigurableResource):
    """The Hugging Face dataset whose shards are the partitions (OCR_ASSETS_DATASET)."""

    path: str | None = Field(default=None, description="Dataset folder or fsspec URL; unset = the sample dataset.")
    image_column: str | None = Field(default=None, description="Column holding the page images.")
    id_column: str | None = Field(default=None, description="Column holding a unique page id.")
    sample_dir: str = Field(default=config.DEFAULT_SAMPLE_DIR, description="Where the sample dataset lives.")

    def location(self) -> str:
        """The dataset to read: the configured one, else the sample dataset (written when missing)."""
        if self.path:
            return self.path
        return str(ensure_sample(self.sample_dir))

    def shards(self) -> list[ShardRef]:
        return list_shards(self.location())

    def open(self, key: str) -> Shard:
        return open_shard(self.location(), key, image_column=self.image_column, id_column=self.id_column)

    def source_rows(self, key: str) -> int:
        """Rows of shard ``key`` as its file declares them, read apart from ``open``."""
        return source_row_count(self.location(), key)


def ensure_sample(folder: str) -> Path:
    """The sample dataset folder, generated on first use."""
    from ocr_assets.sample import MULTIPAGE_SHARDS, SCANS_SHARD, write_sample

    path = Path(folder)
    # a sample written before the documents or scans shards existed is written again, whole
    if not all((path / name).exists() for name in ("state.json", *MULTIPAGE_SHARDS, SCANS_SHARD)):
        write_sample(path, documents=True, scans=True)
    return path


class StorageResource(dg.ConfigurableResource):
    """Where the Parquet outputs go (OCR_ASSETS_STORAGE): a folder or an fsspec URL."""

    root: str = Field(default=config.DEFAULT_STORAGE, description="Folder or fsspec URL of the outputs.")

    def store(self) -> ParquetStore:
        return ParquetStore(self.root)


class LayoutResource(dg.ConfigurableResource):
    """The layout model (OCR_ASSETS_LAYOUT_BACKEND, OCR_ASSETS_LAYOUT_MODEL, OCR_ASSETS_DEVICE).

    The device it runs on is part of its configuration: ``auto`` takes the first GPU when CUDA
    works. The `layout` asset sits in the `gpu` concurrency pool, so one layout step per GPU runs.
    """

    backend: str | None = Field(default=None, description="picodet-cdla or pp-doclayout-v3; unset = by model.")
    model: str | None = Field(default=None, description="PP-DocLayoutV3 checkpoint: local folder or hub id.")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N (pp-doclayout-v3; picodet-cdla runs on the CPU).")
    dtype: str = Field(default="auto", description="auto, float32, bfloat16 or float16 (pp-doclayout-v3).")
    threads: int = Field(default=0, description="CPU threads for the model; 0 = all cores.")
    decode_threads: int = Field(default=0, description="Threads decoding pages for pp-doclayout-v3; 0 = min(8, cores).")
    batch_size: int = Field(default=0, description="Pages per model call; 0 = the backend's default for its device.")
    conf_threshold: float | None = Field(default=None, description="Minimum detection score.")
    threshold_by_label: str | None = Field(
        default=None, description='JSON object of per-label minimum scores (pp-doclayout-v3), e.g. {"table": 0.5}.'
    )
    merge_modes: str | None = Field(
        default=None,
        description='JSON object label → large/small/union: which of two nested boxes stands (pp-doclayout-v3).',
    )
    keep_polygons: bool = Field(default=False, description="Add each region's mask outline (pp-doclayout-v3; costs CPU time).")
    recover_text: bool = Field(default=True, description="Turn ink outside every region into text regions.")
    label_tasks: str | None = Field(
        default=None, description='JSON object overriding label → task, e.g. {"figure": "text"}.'
    )

    def backend_name(self) -> str:
        return resolve_layout_backend(self.backend, self.model)

    def preflight(self) -> None:
        """Cheap checks of the configuration, without loading the model: a bad backend name, a
        missing model folder or device is an error naming the setting, before any work starts."""
        name = check_settings(self.settings())
        config.orientation_enabled(), config.deskew_enabled()  # a bad on/off value names its variable
        config.layout_worker_mode(), config.layout_gpu_memory()
        if name == "pp-doclayout-v3":  # the device itself is looked for where layout runs, not here
            if not self.model:
                raise ValueError(f"{config.ENV_LAYOUT_BACKEND}=pp-doclayout-v3 needs {config.ENV_LAYOUT_MODEL}")
            path = Path(self.model).expanduser()
            if (path.is_absolute() or self.model.startswith((".", "~"))) and not (path / "config.json").is_file():
                raise ValueError(f"{config.ENV_LAYOUT_MODEL}={self.model!r}: no config.json in that folder")

    def settings(self) -> dict:
        """The layout settings (``backends.layout.SETTINGS``): what the stage, here or in a worker, runs with."""
        return {name: getattr(self, name) for name in SETTINGS}

    def load(self) -> tuple[LayoutBackend, float]:
        """The layout backend, loaded once per process; returns (backend, seconds spent loading now)."""
        return load_layout_backend(self.settings())


class RecognizerResource(dg.ConfigurableResource):
    """The recognizer (OCR_ASSETS_RECOGNIZER and the OCR_ASSETS_VLM_* server settings).

    With ``openai``, crops are stored resized and JPEG-encoded the way the VLM request needs
    them, and answers are cached next to the outputs so no region is paid for twice.
    """

    kind: str | None = Field(default=None, description="local or openai; unset = openai when a VLM URL is set.")
    threads: int = Field(default=0, description="CPU threads for the local recognizer; 0 = all cores.")
    vlm_base_url: str | None = Field(
        default=None, description="OpenAI-compatible server(s), e.g. http://host:8000/v1; several comma-separated "
                                  "are balanced (least loaded first, a server that stops answering is taken out).")
    vlm_model: str = Field(default="glm-ocr", description="Served model name.")
    vlm_api_key: str | None = Field(default=None, description="API key of the server (from the environment only).")
    vlm_concurrency: int = Field(
        default=config.DEFAULT_VLM_CONCURRENCY,
        description="Most requests in flight to each server, over all recognition steps at once (each step takes "
                    "1/limit of it, the limit of the `vlm` pool); size it against the server's --max-num-seqs.")
    vlm_timeout: float = Field(default=120.0, description="Seconds to wait for one answer before retrying.")
    vlm_max_attempts: int = Field(default=5, description="Attempts per region (429, 5xx, timeouts, bad answers).")
    vlm_verify_tls: bool = Field(default=True, description="Verify the server's TLS certificate (https URLs).")
    vlm_logprobs: bool = Field(default=True, description="Ask for token log-probabilities (each region's "
                               "confidence); false for a server that refuses them, so its answers are cached.")
    vlm_prompts: str | None = Field(
        default=None, description='JSON object task → prompt, e.g. {"table": "Table Recognition:"}.'
    )
    vlm_max_tokens: str | None = Field(default=None, description='JSON object task → max_tokens, e.g. {"text": 4096}.')
    cache: bool = Field(default=True, description="Reuse answers stored next to the outputs (never pay twice).")
    vlm_serve_model: str | None = Field(
        default=None, description="Serve this model with one `vllm serve` per GPU of the host, started by the first "
                                  "step that needs it and shared by every step; the servers keep running after the "
                                  "steps, until `ocr-assets vllm-servers --stop`.")
    vlm_serve_port: int = Field(default=8000, description="Port of the first GPU's managed vLLM server; "
                                                          "GPU i's (by physical id) listens on port + i.")
    vlm_serve_gpu_memory: float = Field(default=0.7, description="GPU memory share of each managed vLLM server.")
    vlm_serve_flags: str | None = Field(
        default=None, description="Flags for `vllm serve`, replacing the defaults (the throughput flags)."
    )
    crop_format: str = Field(default="png", description="How crops are stored for the local recognizer: png or jpeg.")

    def preflight(self) -> None:
        """Cheap checks before any work starts: an unknown recognizer, or a VLM server that does not
        answer (or does not serve the model), fails here, naming the setting to change."""
        name = self.kind_name()
        if name not in RECOGNIZERS:
            raise ValueError(f"{config.ENV_RECOGNIZER}={name!r} is not a recognizer; choose one of "
                             f"{', '.join(RECOGNIZERS)}")
        if name == "openai" and self.vlm_serve_model:  # the servers start with the step, not here
            from ocr_assets.vllm_server import require_vllm

            require_vllm()
        elif name == "openai":
            from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer

            options = self._vlm_options(self.vlm_base_url)
            OpenAIRecognizer(options.pop("base_url"), **options)  # probes GET /models

    def stored_crop_format(self) -> str:
        """How the crops stage stores crops: as the VLM request needs them, or as configured."""
        return "vlm-jpeg" if self.kind_name() == "openai" else self.crop_format

    def kind_name(self) -> str:
        return resolve_recognizer(self.kind, self.vlm_base_url or self.vlm_serve_model)

    def load(self, steps: int = 1) -> tuple[Recognizer, float]:
        """The recognizer, loaded once per process; returns (recognizer, seconds spent loading now).
        ``steps``: the recognition steps that may run at once, which share each server's bound.

        With ``vlm_serve_model``, the host's managed vLLM servers (one per GPU) are reused, or
        started when none runs (their start-up counts as loading); the step holds them until it
        ends, so they are not stopped under it, and leaves them running for the next step.
        """
        name = self.kind_name()
        options: dict[str, Any] = {}
        base_url = self.vlm_base_url
        if name == "openai" and self.vlm_serve_model:
            start = time.perf_counter()
            base_url = ",".join(self._ensure_vllm())
            recognizer = create_recognizer(name, **self._vlm_options(base_url, steps))
            return recognizer, time.perf_counter() - start
        if name == "openai":
            options = self._vlm_options(base_url, steps)
        key = ("recognizer", name, self.threads, json.dumps(options, sort_keys=True, default=str))
        return load_once(key, lambda: create_recognizer(name, threads=self.threads or None, **options))

    def for_cache_keys(self) -> Recognizer:
        """The configured recognizer, to compute cache keys only: no server is probed or started."""
        name = self.kind_name()
        if name == "openai":  # the key holds no URL: any server serving the model reads alike
            options = self._vlm_options(self.vlm_base_url or "http://unused/v1")
            return create_recognizer(name, probe=False, **options)
        return create_recognizer(name, threads=self.threads or None)

    def _vlm_options(self, base_url: str | None, steps: int = 1) -> dict[str, Any]:
        return {
            "base_url": base_url, "model": self.vlm_model, "api_key": self.vlm_api_key,
            "concurrency": config.vlm_share(self.vlm_concurrency, steps), "timeout": self.vlm_timeout,
            "max_attempts": self.vlm_max_attempts, "verify_tls": self.vlm_verify_tls, "logprobs": self.vlm_logprobs,
            "prompts": config.parse_json_object("vlm_prompts", self.vlm_prompts),
            "max_tokens": config.parse_json_object("vlm_max_tokens", self.vlm_max_tokens),
        }

    def _ensure_vllm(self) -> list[str]:
        """The managed servers' URLs, held by this process until ``teardown_after_execution``."""
        from ocr_assets.vllm_server import DEFAULT_FLAGS, ServerUse, VllmSettings, ensure_servers

        flags = tuple(shlex.split(self.vlm_serve_flags)) if self.vlm_serve_flags else DEFAULT_FLAGS
        settings = VllmSettings(self.vlm_serve_model, served_name=self.vlm_model, port=self.vlm_serve_port,
                                gpu_memory_utilization=self.vlm_serve_gpu_memory, flags=flags)
        use = ServerUse()
        _vllm_uses.append(use)  # released in teardown, whatever happens next
        return ensure_servers(settings, use=use)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Let go of the managed vLLM servers this step used; they keep running for the next step."""
        while _vllm_uses:
            _vllm_uses.pop().release()


def _from_env(name: str, default: Any = None) -> Any:
    """An EnvVar when the variable is set (so the UI shows where the value came from), else the default."""
    return dg.EnvVar(name) if config.env(name) else default


def resources_from_env() -> dict[str, dg.ConfigurableResource]:
    """The four resources, configured from the OCR_ASSETS_* environment variables."""
    concurrency = config.env(config.ENV_VLM_CONCURRENCY)
    return {
        "dataset": DatasetResource(
            path=_from_env(config.ENV_DATASET),
            image_column=_from_env(config.ENV_IMAGE_COLUMN),
            id_column=_from_env(config.ENV_ID_COLUMN),
        ),
        "storage": StorageResource(root=_from_env(config.ENV_STORAGE, config.DEFAULT_STORAGE)),
        "layout_model": LayoutResource(
            backend=_from_env(config.ENV_LAYOUT_BACKEND),
            model=_from_env(config.ENV_LAYOUT_MODEL),
            device=_from_env(config.ENV_DEVICE, "auto"),
            dtype=_from_env(config.ENV_LAYOUT_DTYPE, "auto"),
            batch_size=dg.EnvVar.int(config.ENV_LAYOUT_BATCH_SIZE) if config.env(config.ENV_LAYOUT_BATCH_SIZE) else 0,
        ),
        "recognizer": RecognizerResource(
            kind=_from_env(config.ENV_RECOGNIZER),
            vlm_base_url=_from_env(config.ENV_VLM_BASE_URL),
            vlm_model=_from_env(config.ENV_VLM_MODEL, "glm-ocr"),
            vlm_api_key=_from_env(config.ENV_VLM_API_KEY),
            vlm_concurrency=dg.EnvVar.int(config.ENV_VLM_CONCURRENCY) if concurrency else config.DEFAULT_VLM_CONCURRENCY,
            vlm_serve_model=_from_env(config.ENV_VLM_SERVE_MODEL),
            vlm_serve_port=dg.EnvVar.int(config.ENV_VLM_SERVE_PORT) if config.env(config.ENV_VLM_SERVE_PORT) else 8000,
            # no float EnvVar in Dagster: the share is read (and checked) here
            vlm_serve_gpu_memory=config.env_number(config.ENV_VLM_SERVE_GPU_MEMORY, 0.7, float, low=0.01, high=1.0),
        ),
    }
