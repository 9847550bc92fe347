"""What the VPC pipeline makes of its records besides flows: subnets on the flow rows,
per-subnet traffic, the denial log, the sinks of the two extra tables, and the positions a
Kinesis back-fill read up to.

Every step reads the subnets as a side input (``transforms.vpc_subnets``), so a streaming job
uses the latest set EC2 returned. The extra tables go where the flows go: Parquet files in the
local sink's directory (``subnet_traffic-*.parquet``, ``denied_flows-*.parquet``) and tables
beside the flow table in BigQuery, created (partitioned, clustered) at start-up, and merged on
their ids in batch like the flow rows (``transforms.bigquery_merge``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window
from google.cloud import bigquery

from flowbeam.vpc.aggregates import (
    MEASURES,
    TrafficCounts,
    TrafficKey,
    add_counts,
    denial_log_line,
    denial_row,
    traffic_keys,
    traffic_row,
)
from flowbeam.vpc.records import VpcRecord
from flowbeam.vpc.schemas import EXTRA_TABLES, ExtraTable
from flowbeam.vpc.subnets import SubnetMatcher
from transforms import counters
from transforms.bigquery_config import BigQueryConfig, TableRef
from transforms.bigquery_merge import TableLayout, prepare_staging_table, staging_table
from transforms.bigquery_tables import (
    ERROR_COLUMNS,
    ERRORS_TABLE_DESCRIPTION,
    STARTUP_DEADLINE_S,
    cloud_client,
    ensure_table,
    startup_errors,
)
from transforms.bigquery_write import WriteFlowsToBigQuery
from transforms.flow_record_coder import FlowRecord
from transforms.kinesis_read import KinesisRecord
from transforms.local_sink import WriteFlowsToParquet

LOG = logging.getLogger(__name__)
# Streaming: per-subnet counts are summed per minute of arrival, then written.
STREAMING_TRAFFIC_WINDOW_S = 60
KINESIS_POSITIONS_FILE = "kinesis_positions.json"


class _AddSubnetsFn(beam.DoFn):
    """A flow row in, the same row with ``src_subnet`` and ``dst_subnet`` out."""

    def process(self, row: dict[str, Any], matcher: SubnetMatcher) -> Iterator[dict[str, Any]]:
        src, dst = matcher.match(row["src_addr"]), matcher.match(row["dst_addr"])
        yield {**row, "src_subnet": src.label if src else None,
               "dst_subnet": dst.label if dst else None}


class AddSubnets(beam.PTransform):
    """Flow rows in, flow rows with their subnets out."""

    def __init__(self, subnets: beam.pvalue.AsSingleton) -> None:
        super().__init__()
        self._subnets = subnets

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "AddSubnets" >> beam.ParDo(_AddSubnetsFn(), self._subnets) \
            .with_output_types(FlowRecord)


class _TrafficKeysFn(beam.DoFn):
    """A flow record in; its (key, counts) per known subnet out, counted as Beam counters."""

    def process(self, record: VpcRecord, matcher: SubnetMatcher) -> Iterator[tuple]:
        for key, counts in traffic_keys(record, matcher):
            for measure in MEASURES:
                counters.subnet_traffic_counter(
                    key.subnet, key.direction, key.action, measure).inc(getattr(counts, measure))
            yield tuple(key), tuple(counts)  # plain tuples: Beam's fast deterministic coder


def _traffic_row(keyed: tuple[tuple, tuple]) -> dict[str, Any]:
    """A key and its summed counts in, a ``subnet_traffic`` row out."""
    key, counts = keyed
    return traffic_row(TrafficKey(*key), TrafficCounts(*counts))


class SubnetTraffic(beam.PTransform):
    """Flow records in, ``subnet_traffic`` rows out (see ``flowbeam.vpc.aggregates``)."""

    def __init__(self, subnets: beam.pvalue.AsSingleton) -> None:
        super().__init__()
        self._subnets = subnets

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        streaming = not records.is_bounded
        keyed = records | "TrafficKeys" >> beam.ParDo(_TrafficKeysFn(), self._subnets)
        if streaming:
            keyed = keyed | "ArrivalMinutes" >> beam.WindowInto(
                window.FixedWindows(STREAMING_TRAFFIC_WINDOW_S))
        return (
            keyed
            | "SumPerKey" >> beam.CombinePerKey(add_counts)
            | "ToRows" >> beam.Map(_traffic_row)
        )


class _DenialsFn(beam.DoFn):
    """A flow record in; its ``denied_flows`` row out when it was rejected."""

    def __init__(self, log_denied: bool) -> None:
        self._log_denied = log_denied
        self._denied = counters.counter(counters.VPC_DENIED)

    def process(self, record: VpcRecord, matcher: SubnetMatcher) -> Iterator[dict[str, Any]]:
        if not record.is_denied:
            return
        self._denied.inc()
        row = denial_row(record, matcher)
        if self._log_denied:
            LOG.warning("%s", denial_log_line(row))
        yield row


class DeniedFlows(beam.PTransform):
    """Flow records in, ``denied_flows`` rows out; ``log_denied``: also one structured log
    line per denial."""

    def __init__(self, subnets: beam.pvalue.AsSingleton, log_denied: bool = False) -> None:
        super().__init__()
        self._subnets = subnets
        self._log_denied = log_denied

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "Denials" >> beam.ParDo(_DenialsFn(self._log_denied), self._subnets)


# --- The extra tables' sinks -------------------------------------------------------------------


def table_config(config: BigQueryConfig, table: ExtraTable) -> BigQueryConfig:
    """The BigQuery settings of an extra table: the flow table's, in the same dataset."""
    ref = config.table
    return dataclasses.replace(config, table=TableRef(ref.project, ref.dataset, table.name))


def table_layout(table: ExtraTable) -> TableLayout:
    """What staging and merging need of an extra table."""
    return TableLayout(table.columns, table.partition_field, table.clustering)


def prepare_extra_tables(config: BigQueryConfig, client: bigquery.Client | None = None,
                         deadline_s: float = STARTUP_DEADLINE_S) -> None:
    """Start-up step after ``prepare_table``: create (or check) ``subnet_traffic`` and
    ``denied_flows`` (and their errors tables when rejected rows are reported one by one)."""
    with startup_errors(f"preparing the VPC tables beside {config.table.spec}", config):
        client = client or cloud_client(config)
        for table in EXTRA_TABLES:
            extra = table_config(config, table)
            ensure_table(client, extra.table, table.columns, table.description,
                         table.partition_field, table.clustering, deadline_s)
            if extra.reports_rejected_rows:
                ensure_table(client, extra.errors_table, ERROR_COLUMNS,
                             ERRORS_TABLE_DESCRIPTION, deadline_s=deadline_s)


def prepare_extra_staging_tables(config: BigQueryConfig, suffix: str,
                                 client: bigquery.Client | None = None,
                                 deadline_s: float = STARTUP_DEADLINE_S) -> None:
    """Start-up step of a merge write, after ``prepare_extra_tables``: this job's staging
    tables of ``subnet_traffic`` and ``denied_flows`` (``<table>_staging_<suffix>``)."""
    client = client or cloud_client(config)
    for table in EXTRA_TABLES:
        prepare_staging_table(table_config(config, table), client, suffix, deadline_s,
                              table_layout(table))


class WriteExtraTable(beam.PTransform):
    """Rows of an extra table to the local sink (``directory``) and/or BigQuery; returns the
    dead letters of rows BigQuery rejected.

    BigQuery: with ``staging_suffix`` (the batch ``merge`` insert mode; the staging table made
    by ``prepare_extra_staging_tables``) the rows are staged and merged on their ids, so a
    re-run adds none twice; without, appended with their ids as insert ids (streaming).
    ``window_s`` (streaming): local files per window of that many seconds of the rows'
    timestamps, which are arrival times here (Kinesis stamps each record with its arrival).
    """

    def __init__(self, table: ExtraTable, directory: str | None,
                 bigquery_config: BigQueryConfig | None, window_s: float | None = None,
                 staging_suffix: str | None = None) -> None:
        super().__init__()
        self._table = table
        self._directory = directory
        self._bigquery = bigquery_config
        self._window_s = window_s
        self._staging_suffix = staging_suffix

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        if self._directory:
            local = rows
            if self._window_s:
                local = rows | "Windows" >> beam.WindowInto(window.FixedWindows(self._window_s))
            _ = local | "WriteParquet" >> WriteFlowsToParquet(
                self._directory, self._table.name, self._table.columns)
        if self._bigquery is None:
            return rows.pipeline | "NoRejectedRows" >> beam.Create([])
        config = table_config(self._bigquery, self._table)
        staging = (staging_table(config.table, self._staging_suffix)
                   if self._staging_suffix else None)
        return rows | "WriteBigQuery" >> WriteFlowsToBigQuery(
            config, staging=staging, layout=table_layout(self._table))


# --- Where a Kinesis back-fill stopped ---------------------------------------------------------


def last_sequence_number(sequence_numbers: Iterable[str]) -> str:
    """The latest of one shard's sequence numbers (decimal strings: compared as numbers, and
    kept as text, since they exceed 64 bits and Beam's integer coder)."""
    return max(sequence_numbers, key=int)


def last_positions(read: Mapping[str, str], resume_after: Mapping[str, str]) -> dict[str, str]:
    """Shard id -> the last sequence number read, for each shard read or resumed: a shard
    that gave nothing new keeps its earlier position, so the next run does not read it again
    from its start position."""
    positions = dict(resume_after)
    for shard_id, seq in read.items():
        positions[shard_id] = last_sequence_number([seq, positions.get(shard_id, seq)])
    return dict(sorted(positions.items()))


def _write_positions(read: Mapping[str, str], path: str, resume_after: Mapping[str, str]) -> str:
    with FileSystems.create(path) as stream:
        stream.write(json.dumps(last_positions(read, resume_after), indent=1).encode() + b"\n")
    return path


class WriteKinesisPositions(beam.PTransform):
    """The records of a bounded Kinesis read in; ``DIR/kinesis_positions.json`` out: the last
    sequence number read per shard (``last_positions``), what ``--kinesis_resume_after @FILE``
    takes, so the next back-fill reads only what arrived since.

    A batch pipeline ends once every record read is processed, so these are the positions of
    what this run's outputs hold. The file is written once, after the read is complete (a
    global combine); also when nothing was read. Not sequenced after the sinks: a job that
    fails may leave it written, so re-run a failed back-fill with the resume point it had.
    """

    def __init__(self, directory: str, resume_after: Mapping[str, str]) -> None:
        super().__init__()
        self._path = FileSystems.join(directory, KINESIS_POSITIONS_FILE)
        self._resume_after = dict(resume_after)

    def expand(self, records: beam.PCollection[KinesisRecord]) -> beam.PCollection[str]:
        return (
            records
            | "ShardPositions" >> beam.Map(
                lambda record: (record.shard_id, record.sequence_number))
            | "LastPerShard" >> beam.CombinePerKey(last_sequence_number)
            | "AllShards" >> beam.combiners.ToDict()
            | "WriteFile" >> beam.Map(_write_positions, self._path, self._resume_after)
        )
