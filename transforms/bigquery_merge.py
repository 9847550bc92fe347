"""Idempotent batch writes: stage the rows, then ``MERGE`` them into their table on ``id``.

Re-processing a bucket of captures must not duplicate rows. Every flow row has a deterministic
``id`` (hash of source, flow key and ``first_seen_at``), but neither load jobs nor streaming
inserts de-duplicate on it (insert ids are best effort, for about a minute). So in batch the
rows go first to a staging table of this job (``<table>_staging_<suffix>``, created at start-up
like the target table, expiring after a week in case the job dies), and once the write has
finished one step runs::

    MERGE target USING (staging, one row per id) ON id ... WHEN NOT MATCHED THEN INSERT

and drops the staging table. The step is sequenced after the write inside the pipeline (not
after ``wait_until_finish`` in the launcher: a flex template launcher does not wait for the
job): it takes the write's outputs as side inputs, and a side input is complete only when
the step that produced it has finished every bundle. Beam's streaming-insert DoFn emits its
failed rows, and its load/copy DoFns their job ids, only after the rows are in or the jobs
are done.

The MERGE is safe to retry: rows already merged match and are left alone, and a second run
after the staging table was dropped finds nothing to do. Its ON clause bounds the target by
the staged rows' range of its partitioning column (``first_seen_at`` for flows: the same id
always has the same value there), so BigQuery reads only those day partitions of the target.

Any table whose rows have such an id merges the same way: a ``TableLayout`` says what the
staging and the MERGE need of it (the flow table's is ``FLOW_TABLE``; the VPC pipeline's
``subnet_traffic`` and ``denied_flows`` have their own).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.bigquery import WriteResult
from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from flowbeam.flows.schema import FLOW_COLUMNS, Column
from transforms.bigquery_config import (
    FILE_LOADS,
    INSERT_ID_FIELD,
    STORAGE_WRITE_API,
    BigQueryConfig,
    BigQueryConfigError,
    TableRef,
)
from transforms.bigquery_tables import (
    CLUSTERING_FIELDS,
    PARTITION_FIELD,
    STARTUP_DEADLINE_S,
    cloud_client,
    ensure_table,
    startup_errors,
)

LOG = logging.getLogger(__name__)

MERGE = "merge"
APPEND = "append"
INSERT_MODES = (MERGE, APPEND)
STAGING_INFIX = "_staging_"
STAGING_EXPIRATION = timedelta(days=7)
STAGING_DESCRIPTION = (
    "flowbeam staging table of one batch job: its rows are merged into the table it is named "
    "after on id when the job's write has finished, then this table is dropped. Left over "
    "only by a job that failed; it expires by itself."
)


@dataclass(frozen=True)
class TableLayout:
    """What staging and merging need of a target table besides its name: its columns (the
    staging table's schema, the MERGE's column list), its day-partitioning column (the MERGE
    prunes the target's partitions by the staged rows' range of it, so a row's id must
    determine its value there) and its clustering (copied, so staging is laid out alike)."""

    columns: tuple[Column, ...]
    partition_field: str
    clustering: tuple[str, ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)


FLOW_TABLE = TableLayout(tuple(FLOW_COLUMNS), PARTITION_FIELD, tuple(CLUSTERING_FIELDS))


def resolve_insert_mode(requested: str | None, *, streaming: bool, write_method: str) -> str:
    """How rows reach the flow table: ``merge`` (the batch default, idempotent) or ``append``
    (the streaming default); refuses combinations that cannot work."""
    if requested is None:
        requested = APPEND if streaming else MERGE
    if requested not in INSERT_MODES:
        raise BigQueryConfigError(
            f"--bq_insert_mode {requested!r} is not one of {', '.join(INSERT_MODES)}")
    if requested == MERGE and streaming:
        raise BigQueryConfigError(
            "--bq_insert_mode merge is for batch pipelines (a streaming write never finishes, "
            "so there is no moment to merge); streaming inserts de-duplicate by insert id: "
            "use --bq_insert_mode append")
    if requested == MERGE and write_method == STORAGE_WRITE_API:
        raise BigQueryConfigError(
            "--bq_insert_mode merge needs file_loads or streaming_inserts (the Storage Write "
            "API reports its failed rows before it commits, so the merge could not wait for "
            "the rows); add --bq_insert_mode append to write with storage_write_api")
    return requested


def staging_table(table: TableRef, suffix: str) -> TableRef:
    """The staging table of one job: ``<table>_staging_<suffix>`` beside the flow table."""
    return TableRef(table.project, table.dataset, f"{table.table}{STAGING_INFIX}{suffix}")


def job_suffix(now: datetime | None = None) -> str:
    """A suffix unique to one launch: UTC time (for people listing tables) and a random part
    (two launches in the same second)."""
    moment = now or datetime.now(UTC)
    return f"{moment:%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:8]}"


def prepare_staging_table(config: BigQueryConfig, client: bigquery.Client | None = None,
                          suffix: str | None = None,
                          deadline_s: float = STARTUP_DEADLINE_S,
                          layout: TableLayout = FLOW_TABLE) -> TableRef:
    """Start-up step of a merge write: create this job's staging table of ``config.table``
    like it (``layout``: schema, partitioning, clustering), expiring after
    ``STAGING_EXPIRATION``. Give the tables of one job the same ``suffix``."""
    staging = staging_table(config.table, suffix or job_suffix())
    with startup_errors(f"creating the staging table {staging.spec}", config):
        ensure_table(client or cloud_client(config), staging, layout.columns,
                     STAGING_DESCRIPTION, layout.partition_field, layout.clustering,
                     deadline_s, expires=datetime.now(UTC) + STAGING_EXPIRATION)
    return staging


# --- The MERGE statement and its run ------------------------------------------------------------


def _timestamp_literal(value: datetime) -> str:
    return f"TIMESTAMP '{value.astimezone(UTC).isoformat(sep=' ', timespec='microseconds')}'"


def merge_statement(target: TableRef, staging: TableRef, earliest: datetime,
                    latest: datetime, columns: Sequence[str] = FLOW_TABLE.column_names,
                    partition_field: str = FLOW_TABLE.partition_field) -> str:
    """The MERGE of the staged rows into ``target``: one copy per ``id`` (a retried insert may
    have staged a row twice), inserted only when ``target`` has no row with that ``id``.

    ``earliest``/``latest``: the staged rows' range of ``partition_field``, as constants in
    the ON clause so that BigQuery prunes the target's partitions outside it.
    """
    names = ", ".join(f"`{name}`" for name in columns)
    values = ", ".join(f"staged.`{name}`" for name in columns)
    key = INSERT_ID_FIELD
    return (
        f"MERGE `{target.path}` AS target\n"
        f"USING (\n"
        f"  SELECT {names} FROM (\n"
        f"    SELECT *, ROW_NUMBER() OVER (PARTITION BY `{key}`) AS flowbeam_copy\n"
        f"    FROM `{staging.path}`)\n"
        f"  WHERE flowbeam_copy = 1) AS staged\n"
        f"ON target.`{key}` = staged.`{key}`\n"
        f"  AND target.`{partition_field}` BETWEEN {_timestamp_literal(earliest)} "
        f"AND {_timestamp_literal(latest)}\n"
        f"WHEN NOT MATCHED THEN INSERT ({names}) VALUES ({values})"
    )


def merge_staged_rows(client: bigquery.Client, target: TableRef, staging: TableRef,
                      layout: TableLayout = FLOW_TABLE) -> int:
    """Merge ``staging`` into ``target`` (laid out as ``layout``), then drop ``staging``;
    returns the rows inserted.

    A staging table that no longer exists was merged and dropped by an earlier attempt of
    this step (a retried bundle): nothing is left to do.
    """
    field = layout.partition_field
    bounds_sql = (f"SELECT MIN(`{field}`) AS earliest, MAX(`{field}`) AS latest "
                  f"FROM `{staging.path}`")
    try:
        (bounds,) = list(client.query(bounds_sql).result())
    except api_exceptions.NotFound:
        LOG.warning("flowbeam: staging table %s is gone: already merged", staging.spec)
        return 0
    inserted = 0
    if bounds["earliest"] is not None:  # NULL: the job wrote no rows
        job = client.query(merge_statement(target, staging, bounds["earliest"],
                                           bounds["latest"], layout.column_names, field))
        job.result()
        inserted = job.num_dml_affected_rows or 0
    client.delete_table(staging.path, not_found_ok=True)
    LOG.warning("flowbeam: merged %d new rows from %s into %s", inserted, staging.spec,
                target.spec)
    return inserted


# --- Beam: run the merge once, after the write ---------------------------------------------------


def write_finished_signals(result: WriteResult, write_method: str) -> list[beam.PCollection]:
    """The outputs of ``WriteToBigQuery`` that are complete only once its rows are in: the
    load and copy job ids (Beam waits for each job before emitting it) for file loads, the
    failed rows (emitted after each insert request) for streaming inserts."""
    if write_method == FILE_LOADS:
        return [result.destination_load_jobid_pairs, result.destination_copy_jobid_pairs]
    return [result.failed_rows_with_errors]


class _MergeStagedRowsFn(beam.DoFn):
    """Runs the MERGE once (one input element); the side inputs only sequence it."""

    def __init__(self, config: BigQueryConfig, staging: TableRef, layout: TableLayout) -> None:
        self._config = config
        self._staging = staging
        self._layout = layout

    def process(self, _: Any, *_write_outputs: Any) -> Iterator[int]:
        yield merge_staged_rows(cloud_client(self._config), self._config.table, self._staging,
                                self._layout)


class MergeStagedRows(beam.PTransform):
    """Applied to the pipeline: merge ``staging`` into ``config.table`` (laid out as
    ``layout``) once every PCollection of ``after`` is complete; outputs the number of rows
    inserted.

    ``after`` goes in as unread iterable side inputs: they cost nothing to pass (an iterable
    side input is streamed, never loaded whole) and the runner still waits for them.
    """

    def __init__(self, config: BigQueryConfig, staging: TableRef,
                 after: Sequence[beam.PCollection], layout: TableLayout = FLOW_TABLE) -> None:
        super().__init__()
        self._config = config
        self._staging = staging
        self._after = list(after)
        self._layout = layout

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        waits = [beam.pvalue.AsIter(signal) for signal in self._after]
        return (
            pbegin
            | "Once" >> beam.Create([None])
            | "Merge" >> beam.ParDo(_MergeStagedRowsFn(self._config, self._staging,
                                                            self._layout), *waits)
        )
