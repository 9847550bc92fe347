"""BigQuery tables: schemas derived from the flow schema, clients, and the start-up step.

``prepare_table`` runs before any packet is read: it creates the flow table (schema with
descriptions, DAY partitions on ``first_seen_at``, clustering on ``src_addr, dst_addr,
protocol``) or checks that an existing one is compatible, so a schema clash stops the job at
once rather than rejecting every row later.

Beam's ``WriteToBigQuery`` has no parameter for per-row insert ids (it numbers rows per
bundle) nor for an endpoint or explicit credentials, but it accepts a client through
``test_client``, used both as the apitools client (tables, datasets, jobs) and as the
google-cloud-bigquery client (``insert_rows_json``). ``BigQueryClients`` is that client: it
talks to ``--bq_endpoint`` with anonymous credentials or to BigQuery with the key file or
Application Default Credentials, and sends each flow row's deterministic ``id`` as its insert
id so that a retried bundle does not duplicate rows (BigQuery de-duplicates insert ids on a
best-effort basis, for about a minute). Re-runs are de-duplicated by the batch merge
(``transforms.bigquery_merge``), which creates its staging table with ``ensure_table`` too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import google.auth
import httplib2
import requests
from apache_beam.io.gcp.internal.clients import bigquery as bigquery_api
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import bigquery
from google_auth_httplib2 import AuthorizedHttp

from flowbeam.flows.schema import FLOW_COLUMNS, Column
from transforms.bigquery_config import (
    INSERT_ID_FIELD,
    SCOPES,
    BigQueryConfig,
    BigQueryConfigError,
    TableRef,
    load_key_file,
)

LOG = logging.getLogger(__name__)

CLUSTERING_FIELDS = ("src_addr", "dst_addr", "protocol")
PARTITION_FIELD = "first_seen_at"
STARTUP_DEADLINE_S = 30.0
REQUIRED_ROLES_HINT = (
    "the account needs roles/bigquery.dataEditor on the dataset "
    "(and roles/bigquery.jobUser on the project for file_loads and the batch merge)"
)
FLOWS_TABLE_DESCRIPTION = (
    "flowbeam flow records: one row per flow (or per active-timeout interval of a long flow). "
    "Bytes are IP bytes. Written by flowbeam; the schema is flowbeam/flows/schema.py."
)
ERRORS_TABLE_DESCRIPTION = (
    "flowbeam dead letters: rows BigQuery rejected, with BigQuery's error text."
)

# The dead-letter table: the fields of transforms.dead_letters.dead_letter, payload as JSON.
ERROR_COLUMNS: tuple[Column, ...] = (
    Column("stage", "STRING", True, "The step that failed (bigquery_insert)."),
    Column("reason", "STRING", True, "BigQuery's error text for the rejected row."),
    Column("source", "STRING", True, "The table the row was meant for (PROJECT:DATASET.TABLE)."),
    Column("offset", "INT64", False, "Byte offset in the source when there is one; NULL here."),
    Column("payload", "STRING", False, "The rejected row as sent to BigQuery, as JSON text."),
)
# BigQuery's REST API reports legacy type names; the SQL names are what FLOW_COLUMNS uses.
_TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "RECORD": "STRUCT"}


# --- Schemas (derived from FLOW_COLUMNS) --------------------------------------------------------


def _mode(column: Column) -> str:
    return "REQUIRED" if column.required else "NULLABLE"


def bigquery_table_schema(columns: Sequence[Column] = FLOW_COLUMNS) -> bigquery_api.TableSchema:
    """The table schema in Beam's (apitools) form, for ``WriteToBigQuery``."""
    return bigquery_api.TableSchema(fields=[
        bigquery_api.TableFieldSchema(name=c.name, type=c.bigquery_type, mode=_mode(c),
                                      description=c.description)
        for c in columns
    ])


def bigquery_schema_fields(columns: Sequence[Column] = FLOW_COLUMNS) -> list[bigquery.SchemaField]:
    """The table schema in google-cloud-bigquery's form, for creating and checking tables."""
    return [bigquery.SchemaField(c.name, c.bigquery_type, mode=_mode(c), description=c.description)
            for c in columns]


def _canonical_type(type_name: str) -> str:
    upper = type_name.upper()
    return _TYPE_ALIASES.get(upper, upper)


def schema_differences(existing: Sequence[bigquery.SchemaField],
                       columns: Sequence[Column] = FLOW_COLUMNS) -> list[str]:
    """Why rows of ``columns`` cannot go into a table of schema ``existing`` (empty: they can).

    Compatible means every row flowbeam writes is accepted: each column exists with the same
    type; a column flowbeam may leave NULL is not REQUIRED in the table; the table has no
    REQUIRED column flowbeam does not write. Descriptions and extra NULLABLE columns are fine.
    """
    found = {field.name: field for field in existing}
    problems = []
    for column in columns:
        field = found.pop(column.name, None)
        if field is None:
            problems.append(f"missing column {column.name} ({column.bigquery_type})")
            continue
        if _canonical_type(field.field_type) != _canonical_type(column.bigquery_type):
            problems.append(f"column {column.name} is {field.field_type}, "
                            f"flowbeam writes {column.bigquery_type}")
        if field.mode == "REPEATED":
            problems.append(f"column {column.name} is REPEATED, flowbeam writes one value")
        elif field.mode == "REQUIRED" and not column.required:
            problems.append(f"column {column.name} is REQUIRED, flowbeam writes NULLs in it")
    problems.extend(f"extra REQUIRED column {name} that flowbeam does not write"
                    for name, field in found.items() if field.mode == "REQUIRED")
    return problems


# --- Clients ------------------------------------------------------------------------------------


def credentials_for(config: BigQueryConfig) -> Credentials | None:
    """Anonymous against an endpoint, the key file's account, or None (Application Default
    Credentials, resolved by the client library)."""
    if config.endpoint:
        return AnonymousCredentials()
    if config.key_file:
        return load_key_file(config.key_file)
    return None


def cloud_client(config: BigQueryConfig) -> bigquery.Client:
    """A google-cloud-bigquery client for the configured endpoint and credentials."""
    client_options = ClientOptions(api_endpoint=config.endpoint) if config.endpoint else None
    try:
        return bigquery.Client(project=config.table.project, credentials=credentials_for(config),
                               client_options=client_options)
    except auth_exceptions.DefaultCredentialsError as error:
        raise BigQueryConfigError(
            "no Google credentials: run `gcloud auth application-default login`, or give "
            "--service_account_key_file") from error


def apitools_client(config: BigQueryConfig) -> bigquery_api.BigqueryV2:
    """The apitools client Beam's BigQueryWrapper uses for tables, datasets and jobs."""
    http = httplib2.Http(timeout=60)
    credentials = credentials_for(config)
    if not config.endpoint:
        if credentials is None:
            credentials, _ = google.auth.default(scopes=SCOPES)
        http = AuthorizedHttp(credentials, http=http)
    url = f"{config.endpoint}/bigquery/v2/" if config.endpoint else ""
    return bigquery_api.BigqueryV2(url=url, http=http, get_credentials=False,
                                   response_encoding="utf8")


def insert_ids(rows: Sequence[Mapping[str, Any]], given: Any,
               field: str | None = INSERT_ID_FIELD) -> list[str | None]:
    """One insert id per row: the row's ``field`` (the deterministic flow id) when it has
    one, else the id Beam gave (Beam numbers rows per bundle, which a re-run changes)."""
    fallback = list(given) if isinstance(given, list | tuple) else [None] * len(rows)
    return [
        str(row[field]) if field and isinstance(row, Mapping) and row.get(field) else fallback[i]
        for i, row in enumerate(rows)
    ]


class BigQueryClients:
    """The ``test_client`` for Beam's ``WriteToBigQuery``: both clients it needs, in one object.

    Beam's BigQueryWrapper uses the object it is given as its apitools client (``tables``,
    ``datasets``, ``jobs``, ``tabledata``) and as its google-cloud-bigquery client
    (``insert_rows_json``), and pickles it with the DoFn. So this class keeps only the
    (secret-free) config when pickled and builds the real clients lazily where it runs;
    ``insert_rows_json`` replaces Beam's per-bundle insert ids with the rows' own ids.
    """

    def __init__(self, config: BigQueryConfig, insert_id_field: str | None = INSERT_ID_FIELD):
        self.config = config
        self.insert_id_field = insert_id_field
        self._cloud: bigquery.Client | None = None
        self._apitools: bigquery_api.BigqueryV2 | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "insert_id_field": self.insert_id_field}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["insert_id_field"])

    def _api(self) -> bigquery_api.BigqueryV2:
        if self._apitools is None:
            self._apitools = apitools_client(self.config)
        return self._apitools

    @property
    def tables(self) -> Any:
        return self._api().tables

    @property
    def datasets(self) -> Any:
        return self._api().datasets

    @property
    def jobs(self) -> Any:
        return self._api().jobs

    @property
    def tabledata(self) -> Any:
        return self._api().tabledata

    def insert_rows_json(self, table: Any, json_rows: Iterable[Mapping[str, Any]],
                         row_ids: Any = None, **kwargs: Any) -> Sequence[dict]:
        """``Client.insert_rows_json`` with the rows' own ids as insert ids."""
        if self._cloud is None:
            self._cloud = cloud_client(self.config)
        rows = list(json_rows)
        ids = insert_ids(rows, row_ids, self.insert_id_field)
        return self._cloud.insert_rows_json(table, rows, row_ids=ids, **kwargs)


# --- Start-up: create or check the tables -------------------------------------------------------


@contextlib.contextmanager
def startup_errors(action: str, config: BigQueryConfig) -> Iterator[None]:
    """Turn the failures a user can fix (access, credentials, reachability) into
    ``BigQueryConfigError`` naming the action; anything else propagates unchanged."""
    where = config.endpoint or "bigquery.googleapis.com"
    try:
        yield
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as error:
        raise BigQueryConfigError(
            f"{action}: permission denied ({error.message}); {REQUIRED_ROLES_HINT}") from error
    except api_exceptions.BadRequest as error:
        raise BigQueryConfigError(f"{action}: BigQuery refused: {error.message}") from error
    except (auth_exceptions.RefreshError, auth_exceptions.TransportError) as error:
        raise BigQueryConfigError(
            f"{action}: the credentials were refused or could not be refreshed "
            f"({type(error).__name__})") from error
    except (api_exceptions.RetryError, requests.exceptions.ConnectionError) as error:
        raise BigQueryConfigError(f"{action}: cannot reach BigQuery at {where}") from error


def _check_dataset(client: bigquery.Client, ref: TableRef, deadline_s: float) -> None:
    """The dataset must exist: its location is a decision flowbeam does not make for you."""
    try:
        client.get_dataset(f"{ref.project}.{ref.dataset}",
                           retry=bigquery.DEFAULT_RETRY.with_deadline(deadline_s),
                           timeout=deadline_s)
    except api_exceptions.NotFound:
        raise BigQueryConfigError(
            f"dataset {ref.project}:{ref.dataset} does not exist: create it first, e.g. "
            f"`bq mk --dataset --location=EU {ref.project}:{ref.dataset}`") from None


def _new_table(ref: TableRef, columns: Sequence[Column], description: str,
               partition_field: str | None, clustering: Sequence[str],
               expires: datetime | None) -> bigquery.Table:
    table = bigquery.Table(ref.path, schema=bigquery_schema_fields(columns))
    table.description = description
    table.expires = expires
    if partition_field:
        table.time_partitioning = bigquery.TimePartitioning(
            type_=bigquery.TimePartitioningType.DAY, field=partition_field)
    if clustering:
        table.clustering_fields = list(clustering)
    return table


def ensure_table(client: bigquery.Client, ref: TableRef, columns: Sequence[Column],
                 description: str, partition_field: str | None = None,
                 clustering: Sequence[str] = (),
                 deadline_s: float = STARTUP_DEADLINE_S,
                 expires: datetime | None = None) -> bigquery.Table:
    """Create the table (deleted by BigQuery at ``expires`` when given), or return the
    existing one if rows of ``columns`` fit in it; raise ``BigQueryConfigError`` listing the
    differences if they do not."""
    retry = bigquery.DEFAULT_RETRY.with_deadline(deadline_s)
    try:
        existing = client.get_table(ref.path, retry=retry, timeout=deadline_s)
    except api_exceptions.NotFound:
        new = _new_table(ref, columns, description, partition_field, clustering, expires)
        try:
            created = client.create_table(new, retry=retry, timeout=deadline_s)
        except api_exceptions.Conflict:  # created meanwhile by another job: check it
            existing = client.get_table(ref.path, retry=retry, timeout=deadline_s)
        else:
            LOG.info("created BigQuery table %s", ref.spec)
            return created
    differences = schema_differences(existing.schema, columns)
    if differences:
        raise BigQueryConfigError(
            f"table {ref.spec} exists with a schema flowbeam cannot write to: "
            + "; ".join(differences))
    return existing


def prepare_table(config: BigQueryConfig, client: bigquery.Client | None = None,
                  deadline_s: float = STARTUP_DEADLINE_S) -> bigquery.Table:
    """Start-up step, before any data is read: create the flow table (and the errors table
    when the write method reports rejected rows) or check that the existing ones fit."""
    with startup_errors(f"preparing {config.table.spec}", config):
        client = client or cloud_client(config)
        _check_dataset(client, config.table, deadline_s)
        table = ensure_table(client, config.table, FLOW_COLUMNS, FLOWS_TABLE_DESCRIPTION,
                             PARTITION_FIELD, CLUSTERING_FIELDS, deadline_s)
        if config.reports_rejected_rows:
            ensure_table(client, config.errors_table, ERROR_COLUMNS, ERRORS_TABLE_DESCRIPTION,
                         deadline_s=deadline_s)
    return table
