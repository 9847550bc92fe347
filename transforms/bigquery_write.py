"""``WriteFlowsToBigQuery``: Beam's own ``WriteToBigQuery`` plus dead letters.

Every row BigQuery rejects becomes a ``dead_letter`` (stage ``bigquery_insert``), is counted
(``flowbeam/bigquery_rejected_rows``), written to the ``<table>_errors`` table and returned so
the pipeline can also write it to its local errors file. Given a staging table (the batch
``merge`` insert mode, ``transforms.bigquery_merge``), the rows go there and are merged into
their table once the write has finished.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.utils.timestamp import Timestamp

from transforms import counters
from transforms.bigquery_config import (
    INSERT_ID_FIELD,
    INSERT_STAGE,
    STORAGE_WRITE_API,
    STREAMING_INSERTS,
    WRITE_METHODS,
    BigQueryConfig,
    TableRef,
)
from transforms.bigquery_merge import (
    FLOW_TABLE,
    MergeStagedRows,
    TableLayout,
    write_finished_signals,
)
from transforms.bigquery_tables import BigQueryClients, bigquery_table_schema
from transforms.dead_letters import dead_letter

LOG = logging.getLogger(__name__)


# --- Row conversion and dead letters (pure) -----------------------------------------------------


def _rfc3339(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def to_bigquery_row(row: Mapping[str, Any], beam_timestamps: bool = False) -> dict[str, Any]:
    """A flow row as BigQuery takes it: datetimes as RFC 3339 text (JSON for streaming
    inserts and file loads), or as Beam Timestamps (Beam rows for the Storage Write API).
    Other values, and any unexpected keys, go as they are: BigQuery judges them."""
    def convert(value: Any) -> Any:
        if isinstance(value, datetime):
            return Timestamp.from_utc_datetime(value) if beam_timestamps else _rfc3339(value)
        return value
    return {name: convert(value) for name, value in row.items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, Timestamp):
        return value.to_rfc3339()
    if isinstance(value, datetime):
        return _rfc3339(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def describe_insert_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """BigQuery's per-row errors as one line: ``message (reason: R, location: L); ...``."""
    parts = []
    for error in errors:
        details = [f"reason: {error['reason']}"] if error.get("reason") else []
        if error.get("location"):
            details.append(f"location: {error['location']}")
        message = error.get("message") or "rejected"
        parts.append(f"{message} ({', '.join(details)})" if details else message)
    return "; ".join(parts) or "rejected by BigQuery (no error text)"


def rejected_row_dead_letter(element: Any, table_spec: str) -> dict[str, Any]:
    """The dead letter of one element of ``failed_rows_with_errors``: ``(destination, row,
    errors)`` from streaming inserts, ``{"error_message", "failed_row"}`` from the Storage
    Write API."""
    if isinstance(element, Mapping):
        reason = str(element.get("error_message") or "rejected by BigQuery")
        row = element.get("failed_row")
    else:
        _destination, row, errors = element
        reason = describe_insert_errors(errors)
    return dead_letter(INSERT_STAGE, reason, table_spec, payload=_json_safe(row))


def dead_letter_to_error_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A dead letter as a row of the ``<table>_errors`` table (payload as JSON text)."""
    payload = record.get("payload")
    return {
        "stage": record["stage"],
        "reason": record["reason"],
        "source": record["source"],
        "offset": record.get("offset"),
        "payload": None if payload is None else json.dumps(payload, sort_keys=True, default=str),
    }


# --- Beam transforms ----------------------------------------------------------------------------


class _RejectedRowsToDeadLettersFn(beam.DoFn):
    """Rows BigQuery rejected -> dead letters, counted as ``flowbeam/bigquery_rejected_rows``."""

    def __init__(self, table_spec: str) -> None:
        self._table_spec = table_spec
        self._rejected = counters.counter(counters.BIGQUERY_REJECTED_ROWS)

    def process(self, element: Any) -> Iterator[dict[str, Any]]:
        self._rejected.inc()
        yield rejected_row_dead_letter(element, self._table_spec)


class _LogErrorsTableRejectionsFn(beam.DoFn):
    """Dead letters the errors table itself refused: counted and logged. They are not lost:
    the same records are in the dead letters ``WriteFlowsToBigQuery`` returns."""

    def __init__(self) -> None:
        self._rejected = counters.counter(counters.BIGQUERY_ERRORS_TABLE_REJECTED_ROWS)

    def process(self, element: Any) -> None:
        self._rejected.inc()
        _destination, _row, errors = element
        LOG.error("the errors table refused a dead letter: %s", describe_insert_errors(errors))


def _client_for(config: BigQueryConfig, method: str,
                insert_id_field: str | None) -> BigQueryClients | None:
    """Beam's default clients suffice for ADC without insert ids; otherwise ours."""
    if method == STORAGE_WRITE_API:
        return None  # the Java transform makes its own client
    if config.endpoint or config.key_file or (method == STREAMING_INSERTS and insert_id_field):
        return BigQueryClients(config, insert_id_field)
    return None


class WriteDeadLettersToBigQuery(beam.PTransform):
    """Dead letters into ``<table>_errors`` with streaming inserts (created by prepare_table)."""

    def __init__(self, config: BigQueryConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, dead_letters: beam.PCollection) -> beam.PCollection:
        result = (
            dead_letters
            | "ToErrorRows" >> beam.Map(dead_letter_to_error_row)
            | "InsertErrorRows" >> WriteToBigQuery(
                table=self._config.errors_table.spec,
                method=WriteToBigQuery.Method.STREAMING_INSERTS,
                create_disposition=BigQueryDisposition.CREATE_NEVER,
                write_disposition=BigQueryDisposition.WRITE_APPEND,
                insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
                test_client=_client_for(self._config, STREAMING_INSERTS, None))
        )
        return result.failed_rows_with_errors | "LogRefused" >> beam.ParDo(
            _LogErrorsTableRejectionsFn())


class WriteFlowsToBigQuery(beam.PTransform):
    """Flow rows -> the prepared BigQuery table; returns the dead letters of rejected rows.

    The tables must exist (``prepare_table`` at start-up): the write never creates them, so
    partitioning, clustering and descriptions are defined in one place and a table deleted
    mid-run is not re-created without them. File loads succeed or fail as a whole job, so
    with them the returned PCollection is empty; streaming inserts and the Storage Write API
    report each rejected row, which also goes to ``<table>_errors``.

    ``staging``: write into this job's staging table (``prepare_staging_table``) and merge it
    into ``config.table`` on ``id`` when the write has finished, so a re-run adds no
    duplicate. Dead letters still name, and go beside, ``config.table``.

    ``layout``: the table's when it is not the flow table (``config.table`` then names
    another prepared table, e.g. the VPC pipeline's ``subnet_traffic``).
    """

    def __init__(self, config: BigQueryConfig, batch_size: int | None = None,
                 staging: TableRef | None = None, layout: TableLayout = FLOW_TABLE) -> None:
        super().__init__()
        self._config = config
        self._batch_size = batch_size
        self._staging = staging
        self._layout = layout

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        config = self._config
        storage_api = config.write_method == STORAGE_WRITE_API
        result = (
            rows
            | "ToBigQueryRows" >> beam.Map(to_bigquery_row, beam_timestamps=storage_api)
            | "WriteToBigQuery" >> WriteToBigQuery(
                table=(self._staging or config.table).spec,
                # Only the Storage Write API needs it (to build Beam rows); file loads must
                # not send it: an existing compatible table may differ in modes.
                schema=bigquery_table_schema(self._layout.columns) if storage_api else None,
                method=WRITE_METHODS[config.write_method],
                create_disposition=BigQueryDisposition.CREATE_NEVER,
                write_disposition=BigQueryDisposition.WRITE_APPEND,
                insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
                batch_size=self._batch_size,
                test_client=_client_for(config, config.write_method, INSERT_ID_FIELD))
        )
        if self._staging is not None:
            _ = rows.pipeline | "MergeStagedRows" >> MergeStagedRows(
                config, self._staging, write_finished_signals(result, config.write_method),
                self._layout)
        if not config.reports_rejected_rows:
            return rows.pipeline | "NoRejectedRows" >> beam.Create([])
        dead_letters = result.failed_rows_with_errors | "ToDeadLetters" >> beam.ParDo(
            _RejectedRowsToDeadLettersFn(config.table.spec))
        _ = dead_letters | "WriteErrorsTable" >> WriteDeadLettersToBigQuery(config)
        return dead_letters
