"""The embedded local sink: flows as Parquet files, dead letters as JSON lines, in one directory.

It needs no cloud account: ``DIR/flows-*.parquet`` is read with DuckDB or pandas, and
``DIR/errors-*.jsonl`` holds one dead letter per line. Flows are written as Arrow tables
(Beam's ``WriteToParquetBatched``): Arrow converts a batch of rows column-wise in one call
(~0.3 s per 100,000 rows, ``benchmarks/pcap_stages.py``) instead of value by value.
"""

from __future__ import annotations

import collections
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from flowbeam.flows.schema import FLOW_COLUMNS, Column, arrow_schema, records_to_arrow
from transforms import counters
from transforms.dead_letters import to_json_line

FLOWS_PREFIX = "flows"
ERRORS_PREFIX = "errors"
# What the two sinks write: Beam's shard names, PREFIX-SSSSS-of-NNNNN.SUFFIX.
OUTPUT_PATTERNS = (f"{FLOWS_PREFIX}-*-of-*.parquet", f"{ERRORS_PREFIX}-*-of-*.jsonl")


def remove_earlier_outputs(directory: str, extra_tables: Sequence[str] = ()) -> list[str]:
    """Delete the flow and dead-letter files an earlier run left in ``directory`` (and the
    Parquet files of ``extra_tables``, other tables a pipeline writes there); return their
    paths.

    Beam replaces only the files of the shard count it writes now (and logs two puzzling
    warnings about it), so an earlier run's ``flows-00000-of-00002.parquet`` would stay beside
    this run's ``flows-00000-of-00001.parquet`` and ``flows-*.parquet`` would read both.
    """
    patterns = [FileSystems.join(directory, pattern) for pattern in (
        *OUTPUT_PATTERNS, *(f"{table}-*-of-*.parquet" for table in extra_tables))]
    paths = sorted(metadata.path for result in FileSystems.match(patterns)
                   for metadata in result.metadata_list)
    if paths:
        FileSystems.delete(paths)
    return paths


class _RecordsToArrowFn(beam.DoFn):
    """A list of rows to one Arrow table with the schema of ``columns``; flow rows are
    counted per status (``counters.PARQUET_ROWS_PREFIX``) for the run summary."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self._columns = tuple(columns)
        self._count_statuses = self._columns == tuple(FLOW_COLUMNS)

    def setup(self) -> None:
        self._schema = arrow_schema(self._columns)

    def process(self, records: list[dict[str, Any]]) -> Iterator[pa.Table]:
        if self._count_statuses:
            for status, count in collections.Counter(r["status"] for r in records).items():
                counters.counter(counters.PARQUET_ROWS_PREFIX + status).inc(count)
        yield records_to_arrow(records, self._schema)


class WriteFlowsToParquet(beam.PTransform):
    """Flow rows to ``DIR/flows-SSSSS-of-NNNNN.parquet``; or the rows of another table
    (``columns``) to ``DIR/<prefix>-SSSSS-of-NNNNN.parquet``."""

    def __init__(self, directory: str, prefix: str = FLOWS_PREFIX,
                 columns: Sequence[Column] = FLOW_COLUMNS) -> None:
        super().__init__()
        self._prefix = posixpath.join(directory, prefix)
        self._columns = tuple(columns)

    def expand(self, rows: beam.PCollection) -> beam.pvalue.PDone:
        return (
            rows
            | "BatchRows" >> beam.BatchElements(min_batch_size=1024, max_batch_size=65536)
            | "ToArrow" >> beam.ParDo(_RecordsToArrowFn(self._columns))
            | "WriteParquet" >> beam.io.WriteToParquetBatched(
                self._prefix, arrow_schema(self._columns), file_name_suffix=".parquet")
        )


class _DeadLetterToJsonLineFn(beam.DoFn):
    """One dead letter as one line of JSON."""

    def process(self, record: dict[str, Any]) -> Iterator[str]:
        yield to_json_line(record)


class WriteDeadLetters(beam.PTransform):
    """Dead letters to ``DIR/errors-SSSSS-of-NNNNN.jsonl``."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self._prefix = posixpath.join(directory, ERRORS_PREFIX)

    def expand(self, dead_letters: beam.PCollection) -> beam.pvalue.PDone:
        return (
            dead_letters
            | "ToJsonLines" >> beam.ParDo(_DeadLetterToJsonLineFn())
            | "WriteJsonLines" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl")
        )
