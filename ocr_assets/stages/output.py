"""Where a stage's output tables go: the caller's sink (the partition's Parquet writer), or, with
no sink, one table returned to the caller (tests, bench)."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

Sink = Callable[[pa.Table], None]


class StageOutput:
    """``write`` hands each table to ``sink``, or keeps it; ``result`` is None when a sink took
    the tables, else all of them as one table of ``schema``."""

    def __init__(self, sink: Sink | None, schema: pa.Schema) -> None:
        self.schema = schema
        self._kept: list[pa.Table] | None = [] if sink is None else None
        self.write: Sink = sink if sink is not None else self._kept.append

    def result(self) -> pa.Table | None:
        if self._kept is None:
            return None
        return pa.concat_tables(self._kept) if self._kept else self.schema.empty_table()
