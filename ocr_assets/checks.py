"""Per-partition data checks: plain functions over the stage tables, reported as Dagster asset checks.

Each returns (passed, metadata). The thresholds come from the environment so operators can
tighten or loosen them without a code change.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ocr_assets import config

DEFAULT_MAX_ERROR_RATE = 0.05  # regions that failed recognition
DEFAULT_MAX_EMPTY_RATE = 0.10  # non-empty crops read as no text


def _rate(name: str, default: float) -> float:
    return config.env_number(name, default, float, low=0, high=1)


def every_source_row(table: pa.Table, source_rows: int) -> tuple[bool, dict]:
    """One row per source row of the shard, each row number exactly once."""
    rows = table.column("row")
    distinct = pc.count_distinct(rows).as_py() if table.num_rows else 0
    missing = source_rows - distinct
    return table.num_rows == source_rows == distinct, {
        "source_rows": source_rows, "rows": table.num_rows, "missing_rows": missing,
    }


def error_rate(recognition: pa.Table) -> tuple[bool, dict]:
    """Share of regions (failed pages' rows excluded) whose recognition failed, under the threshold."""
    limit = _rate(config.ENV_MAX_ERROR_RATE, DEFAULT_MAX_ERROR_RATE)
    regions = recognition.filter(pc.greater_equal(recognition.column("region"), 0))
    errors = pc.sum(pc.equal(regions.column("status"), "error")).as_py() or 0
    rate = errors / regions.num_rows if regions.num_rows else 0.0
    return rate <= limit, {"error_rate": round(rate, 4), "errors": errors, "regions": regions.num_rows,
                           "max_error_rate": limit}


def empty_text_rate(recognized: int, empty_text: int) -> tuple[bool, dict]:
    """Share of read crops that came back with no text, under the threshold."""
    limit = _rate(config.ENV_MAX_EMPTY_RATE, DEFAULT_MAX_EMPTY_RATE)
    rate = empty_text / recognized if recognized else 0.0
    return rate <= limit, {"empty_text_rate": round(rate, 4), "empty_text": empty_text, "recognized": recognized,
                           "max_empty_text_rate": limit}
