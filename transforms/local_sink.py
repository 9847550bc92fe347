"""The embedded local sink: flows as Parquet files, dead letters as JSON lines, in one directory.

It needs no cloud account: ``DIR/flows-*.parquet`` is read with DuckDB or pandas, and
``DIR/errors-*.jsonl`` holds one dead letter per line. Flows are written as Arrow tables
(Beam's ``WriteToParquetBatched``): Arrow converts a batch of rows column-wise in one call
(~0.3 s per 100,000 rows, ``benchmarks/pcap_stages.py``) instead of value by value.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa

from flowbeam.flows.schema import arrow_schema, records_to_arrow
from transforms.dead_letters import to_json_line

FLOWS_PREFIX = "flows"
ERRORS_PREFIX = "errors"


class _RecordsToArrowFn(beam.DoFn):
    """A list of flow records to one Arrow table with the flow schema."""

    def setup(self) -> None:
        self._schema = arrow_schema()

    def process(self, records: list[dict[str, Any]]) -> Iterator[pa.Table]:
        yield records_to_arrow(records, self._schema)


class WriteFlowsToParquet(beam.PTransform):
    """Flow rows to ``DIR/flows-SSSSS-of-NNNNN.parquet``."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self._prefix = posixpath.join(directory, FLOWS_PREFIX)

    def expand(self, rows: beam.PCollection) -> beam.pvalue.PDone:
        return (
            rows
            | "BatchRows" >> beam.BatchElements(min_batch_size=1024, max_batch_size=65536)
            | "ToArrow" >> beam.ParDo(_RecordsToArrowFn())
            | "WriteParquet" >> beam.io.WriteToParquetBatched(
                self._prefix, arrow_schema(), file_name_suffix=".parquet")
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
