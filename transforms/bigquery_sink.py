"""The BigQuery sink: flow rows into a day-partitioned, clustered ``flow_logs`` table.

Three parts, in the order a pipeline uses them:

1. ``BigQueryOptions`` and ``resolve_config``: the flags (each also from ``FLOWBEAM_<NAME>``)
   turned into a validated ``BigQueryConfig``. Every mistake a user can make on the command
   line (a bad table spec, no project, a missing or malformed key file, a write method that
   cannot work here) is a ``BigQueryConfigError`` before anything runs.
2. ``prepare_table``: the start-up step that creates the table (schema derived from
   ``FLOW_COLUMNS`` with descriptions, DAY partitions on ``first_seen_at``, clustering on
   ``src_addr, dst_addr, protocol``) or checks that an existing one is compatible, so a
   schema clash stops the job before any data is read rather than rejecting every row later.
3. ``WriteFlowsToBigQuery``: Beam's own ``WriteToBigQuery`` plus dead letters: every row
   BigQuery rejects becomes a ``dead_letter`` (stage ``bigquery_insert``), is counted
   (``flowbeam/bigquery_rejected_rows``), written to the ``<table>_errors`` table and returned
   so the pipeline can also write it to its local errors file.

Beam's ``WriteToBigQuery`` has no parameter for per-row insert ids (it numbers rows per
bundle) nor for an endpoint or explicit credentials, but it accepts a client through
``test_client``, used both as the apitools client (tables, datasets, jobs) and as the
google-cloud-bigquery client (``insert_rows_json``). ``BigQueryClients`` is that client: it
talks to ``--bq_endpoint`` with anonymous credentials or to BigQuery with the key file or
Application Default Credentials, and sends each flow row's deterministic ``id`` as its
insert id so that a retried bundle or a re-run does not duplicate rows (BigQuery
de-duplicates insert ids on a best-effort basis, for about a minute).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import apache_beam as beam
import google.auth
import httplib2
import requests
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.io.gcp.internal.clients import bigquery as bigquery_api
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)
from apache_beam.utils.timestamp import Timestamp
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import bigquery
from google.oauth2 import service_account
from google_auth_httplib2 import AuthorizedHttp

from flowbeam.flows.schema import FLOW_COLUMNS, Column
from pipelines.options import env_default
from transforms.dead_letters import dead_letter

LOG = logging.getLogger(__name__)

FILE_LOADS = "file_loads"
STREAMING_INSERTS = "streaming_inserts"
STORAGE_WRITE_API = "storage_write_api"
WRITE_METHODS: dict[str, str] = {
    FILE_LOADS: WriteToBigQuery.Method.FILE_LOADS,
    STREAMING_INSERTS: WriteToBigQuery.Method.STREAMING_INSERTS,
    STORAGE_WRITE_API: WriteToBigQuery.Method.STORAGE_WRITE_API,
}
DEFAULT_TABLE = "flow_logs"
ERRORS_TABLE_SUFFIX = "_errors"
PARTITION_FIELD = "first_seen_at"
CLUSTERING_FIELDS = ("src_addr", "dst_addr", "protocol")
INSERT_ID_FIELD = "id"
INSERT_STAGE = "bigquery_insert"
SCOPES = (
    "https://www.googleapis.com/auth/bigquery",
    "https://www.googleapis.com/auth/cloud-platform",
)
STARTUP_DEADLINE_S = 30.0
REQUIRED_ROLES_HINT = (
    "the account needs roles/bigquery.dataEditor on the dataset "
    "(and roles/bigquery.jobUser on the project for file_loads)"
)
FLOWS_TABLE_DESCRIPTION = (
    "flowbeam flow records: one row per flow (or per active-timeout interval of a long flow). "
    "Bytes are IP bytes. Written by flowbeam; the schema is transforms/flow_schema.py."
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

# Lowercase letters, digits and hyphens, starting with a letter (optionally DOMAIN:). Google
# issues 6-30 characters; shorter ids are accepted for emulators and tests.
_PROJECT_RE = re.compile(r"(?:[a-z][a-z0-9.\-]*[a-z0-9]:)?[a-z](?:[a-z0-9\-]{0,28}[a-z0-9])?")
_DATASET_RE = re.compile(r"[A-Za-z0-9_]{1,1024}")
_TABLE_RE = re.compile(r"[\w\-]{1,1024}")
# BigQuery's REST API reports legacy type names; the SQL names are what FLOW_COLUMNS uses.
_TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "RECORD": "STRUCT"}


class BigQueryConfigError(ValueError):
    """A BigQuery setting that cannot work; the pipeline reports it as a usage error (exit 2).

    Messages never contain a key file's content, only its path.
    """


class BigQueryOptions(PipelineOptions):
    """Where and how flow rows go to BigQuery (each flag also from ``FLOWBEAM_<NAME>``)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--output_table", default=env_default("output_table"),
            help="Destination table, PROJECT:DATASET.TABLE or PROJECT.DATASET.TABLE "
                 "(DATASET.TABLE takes the project from --bq_project or --project). "
                 "Alternative to --bq_project/--bq_dataset/--bq_table.")
        parser.add_argument(
            "--bq_project", default=env_default("bq_project"),
            help="Project of the destination table (default: --project).")
        parser.add_argument(
            "--bq_dataset", default=env_default("bq_dataset"),
            help="Dataset of the destination table; it must exist (its location is yours "
                 "to choose). Giving it, or --output_table, turns the BigQuery sink on.")
        parser.add_argument(
            "--bq_table", default=env_default("bq_table", DEFAULT_TABLE),
            help=f"Destination table name (default {DEFAULT_TABLE}); dead letters go to "
                 f"<table>{ERRORS_TABLE_SUFFIX}.")
        parser.add_argument(
            "--bq_write_method", default=env_default("bq_write_method"),
            choices=tuple(WRITE_METHODS),
            help="file_loads (default in batch), streaming_inserts (default in streaming "
                 "and with --bq_endpoint) or storage_write_api (needs Java).")
        parser.add_argument(
            "--bq_endpoint",
            default=env_default("bq_endpoint", os.environ.get("BIGQUERY_EMULATOR_HOST")),
            help="BigQuery REST endpoint URL, e.g. an emulator's http://127.0.0.1:9050 "
                 "(default: $BIGQUERY_EMULATOR_HOST); uses anonymous credentials.")
        parser.add_argument(
            "--service_account_key_file", default=env_default("service_account_key_file"),
            help="Service account JSON key (default: Application Default Credentials). "
                 "Read where the pipeline runs locally; Dataflow workers use their own "
                 "service account (--service_account_email).")


@dataclass(frozen=True)
class TableRef:
    """A fully qualified BigQuery table."""

    project: str
    dataset: str
    table: str

    @property
    def spec(self) -> str:
        """``PROJECT:DATASET.TABLE``, the form Beam and the bq tool take."""
        return f"{self.project}:{self.dataset}.{self.table}"

    @property
    def path(self) -> str:
        """``PROJECT.DATASET.TABLE``, the form SQL and google-cloud-bigquery take."""
        return f"{self.project}.{self.dataset}.{self.table}"

    def errors_table(self) -> TableRef:
        """The table that keeps the rows this one rejected."""
        return TableRef(self.project, self.dataset, self.table + ERRORS_TABLE_SUFFIX)


@dataclass(frozen=True)
class BigQueryConfig:
    """The validated BigQuery settings a pipeline is built with (picklable, no secrets)."""

    table: TableRef
    write_method: str
    endpoint: str | None = None
    key_file: str | None = None

    @property
    def errors_table(self) -> TableRef:
        return self.table.errors_table()

    @property
    def reports_rejected_rows(self) -> bool:
        """Whether the write method reports rejected rows one by one (file loads fail whole)."""
        return self.write_method != FILE_LOADS


# --- Table spec and option validation (pure) --------------------------------------------------


def _check_part(value: str, pattern: re.Pattern[str], what: str, rule: str, origin: str) -> str:
    if not pattern.fullmatch(value):
        raise BigQueryConfigError(f"invalid {what} {value!r} in {origin}: {rule}")
    return value


def table_ref(project: str | None, dataset: str, table: str, origin: str) -> TableRef:
    """A validated ``TableRef``; ``origin`` names the flag(s) the parts came from."""
    if not project:
        raise BigQueryConfigError(
            f"no BigQuery project for {origin}: give PROJECT:DATASET.TABLE in --output_table, "
            "or --bq_project, or --project")
    return TableRef(
        _check_part(project, _PROJECT_RE, "project id", "lowercase letters, digits and hyphens, "
                    "starting with a letter (optionally DOMAIN:)", origin),
        _check_part(dataset, _DATASET_RE, "dataset id",
                    "letters, digits and underscores", origin),
        _check_part(table, _TABLE_RE, "table id",
                    "letters, digits, underscores and hyphens", origin),
    )


def parse_table_spec(spec: str, default_project: str | None = None) -> TableRef:
    """Parse ``PROJECT:DATASET.TABLE``, ``PROJECT.DATASET.TABLE`` or ``DATASET.TABLE``."""
    text = spec.strip()
    origin = f"--output_table {spec!r}"
    usage = "use PROJECT:DATASET.TABLE or PROJECT.DATASET.TABLE"
    if ":" in text:
        project, _, rest = text.rpartition(":")
        parts = rest.split(".")
        if len(parts) != 2:
            raise BigQueryConfigError(f"{origin} is not a table spec: {usage}")
        return table_ref(project, parts[0], parts[1], origin)
    parts = text.split(".")
    if len(parts) == 3:
        return table_ref(parts[0], parts[1], parts[2], origin)
    if len(parts) == 2:
        return table_ref(default_project, parts[0], parts[1], origin)
    raise BigQueryConfigError(f"{origin} is not a table spec: {usage}")


def resolve_table(
    output_table: str | None,
    bq_project: str | None = None,
    bq_dataset: str | None = None,
    bq_table: str | None = DEFAULT_TABLE,
    default_project: str | None = None,
) -> TableRef:
    """The destination table from ``--output_table`` or the ``--bq_*`` parts.

    ``--output_table`` is the whole destination; a ``--bq_project``/``--bq_dataset`` that
    contradicts it is an error rather than a silent choice. ``default_project`` is Beam's
    ``--project``, the last resort for the project.
    """
    project = bq_project or default_project
    if output_table:
        ref = parse_table_spec(output_table, project)
        for flag, given, parsed in (("--bq_project", bq_project, ref.project),
                                    ("--bq_dataset", bq_dataset, ref.dataset)):
            if given and given != parsed:
                raise BigQueryConfigError(
                    f"--output_table {output_table!r} and {flag} {given!r} disagree: "
                    "give one destination")
        return ref
    if not bq_dataset:
        raise BigQueryConfigError("no BigQuery table: give --output_table or --bq_dataset")
    return table_ref(project, bq_dataset, bq_table or DEFAULT_TABLE,
                     "--bq_project/--bq_dataset/--bq_table")


def normalize_endpoint(endpoint: str) -> str:
    """An endpoint URL without a trailing slash; ``host:port`` (as in
    ``BIGQUERY_EMULATOR_HOST``) means ``http://host:port``."""
    text = endpoint.strip().rstrip("/")
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BigQueryConfigError(
            f"--bq_endpoint {endpoint!r} is not an http(s) URL (e.g. http://127.0.0.1:9050)")
    return text


def resolve_write_method(requested: str | None, *, streaming: bool, emulated: bool) -> str:
    """The write method: the one asked for, else file loads in batch and streaming inserts
    in streaming or against an endpoint; refuses combinations that cannot work."""
    if requested is None:
        return STREAMING_INSERTS if streaming or emulated else FILE_LOADS
    if requested not in WRITE_METHODS:
        raise BigQueryConfigError(
            f"--bq_write_method {requested!r} is not one of {', '.join(WRITE_METHODS)}")
    if emulated and requested != STREAMING_INSERTS:
        raise BigQueryConfigError(
            f"--bq_write_method {requested} cannot write to --bq_endpoint: file_loads needs "
            "a gs:// bucket and storage_write_api a Java expansion service; use "
            "streaming_inserts")
    if streaming and requested == FILE_LOADS:
        raise BigQueryConfigError(
            "--bq_write_method file_loads is for batch pipelines; use streaming_inserts or "
            "storage_write_api with --streaming")
    return requested


def check_file_loads_location(temp_location: str | None) -> None:
    """File loads stage files in Cloud Storage: require a gs:// ``--temp_location``."""
    if not (temp_location or "").startswith("gs://"):
        raise BigQueryConfigError(
            "--bq_write_method file_loads stages files in Cloud Storage: give "
            f"--temp_location gs://BUCKET/PATH (got {temp_location!r})")


def load_key_file(path: str) -> service_account.Credentials:
    """Service account credentials from a JSON key file.

    The error never includes the file's content or the parser's message (a JSON error keeps
    the whole document; a key error may quote it): only the path and the error's type.
    """
    if not os.path.isfile(path):
        raise BigQueryConfigError(f"--service_account_key_file {path!r}: no such file")
    try:
        return service_account.Credentials.from_service_account_file(path, scopes=SCOPES)
    except (ValueError, TypeError, KeyError, OSError, auth_exceptions.GoogleAuthError) as error:
        kind = type(error).__name__
        raise BigQueryConfigError(
            f"--service_account_key_file {path!r} is not a usable service account key "
            f"({kind}; expected the JSON key downloaded from IAM, content not shown)") from None


def resolve_config(options: PipelineOptions) -> BigQueryConfig | None:
    """The validated BigQuery settings, or None when no BigQuery output was asked for
    (neither ``--output_table`` nor ``--bq_dataset``). Raises ``BigQueryConfigError``."""
    opts = options.view_as(BigQueryOptions)
    if not opts.output_table and not opts.bq_dataset:
        return None
    cloud = options.view_as(GoogleCloudOptions)
    table = resolve_table(opts.output_table, opts.bq_project, opts.bq_dataset, opts.bq_table,
                          cloud.project)
    endpoint = normalize_endpoint(opts.bq_endpoint) if opts.bq_endpoint else None
    method = resolve_write_method(
        opts.bq_write_method, streaming=bool(options.view_as(StandardOptions).streaming),
        emulated=endpoint is not None)
    if method == FILE_LOADS:
        check_file_loads_location(cloud.temp_location)
    if opts.service_account_key_file:
        load_key_file(opts.service_account_key_file)
    return BigQueryConfig(table, method, endpoint, opts.service_account_key_file)


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
def _startup_errors(action: str, config: BigQueryConfig) -> Iterator[None]:
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
               partition_field: str | None, clustering: Sequence[str]) -> bigquery.Table:
    table = bigquery.Table(ref.path, schema=bigquery_schema_fields(columns))
    table.description = description
    if partition_field:
        table.time_partitioning = bigquery.TimePartitioning(
            type_=bigquery.TimePartitioningType.DAY, field=partition_field)
    if clustering:
        table.clustering_fields = list(clustering)
    return table


def ensure_table(client: bigquery.Client, ref: TableRef, columns: Sequence[Column],
                 description: str, partition_field: str | None = None,
                 clustering: Sequence[str] = (),
                 deadline_s: float = STARTUP_DEADLINE_S) -> bigquery.Table:
    """Create the table, or return the existing one if rows of ``columns`` fit in it;
    raise ``BigQueryConfigError`` listing the differences if they do not."""
    retry = bigquery.DEFAULT_RETRY.with_deadline(deadline_s)
    try:
        existing = client.get_table(ref.path, retry=retry, timeout=deadline_s)
    except api_exceptions.NotFound:
        new = _new_table(ref, columns, description, partition_field, clustering)
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
    with _startup_errors(f"preparing {config.table.spec}", config):
        client = client or cloud_client(config)
        _check_dataset(client, config.table, deadline_s)
        table = ensure_table(client, config.table, FLOW_COLUMNS, FLOWS_TABLE_DESCRIPTION,
                             PARTITION_FIELD, CLUSTERING_FIELDS, deadline_s)
        if config.reports_rejected_rows:
            ensure_table(client, config.errors_table, ERROR_COLUMNS, ERRORS_TABLE_DESCRIPTION,
                         deadline_s=deadline_s)
    return table


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


class RejectedRowsToDeadLetters(beam.DoFn):
    """Rows BigQuery rejected -> dead letters, counted as ``flowbeam/bigquery_rejected_rows``."""

    def __init__(self, table_spec: str) -> None:
        self._table_spec = table_spec
        self._rejected = Metrics.counter("flowbeam", "bigquery_rejected_rows")

    def process(self, element: Any) -> Iterator[dict[str, Any]]:
        self._rejected.inc()
        yield rejected_row_dead_letter(element, self._table_spec)


class LogErrorsTableRejections(beam.DoFn):
    """Dead letters the errors table itself refused: counted and logged. They are not lost:
    the same records are in the dead letters ``WriteFlowsToBigQuery`` returns."""

    def __init__(self) -> None:
        self._rejected = Metrics.counter("flowbeam", "bigquery_errors_table_rejected_rows")

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
            LogErrorsTableRejections())


class WriteFlowsToBigQuery(beam.PTransform):
    """Flow rows -> the prepared BigQuery table; returns the dead letters of rejected rows.

    The tables must exist (``prepare_table`` at start-up): the write never creates them, so
    partitioning, clustering and descriptions are defined in one place and a table deleted
    mid-run is not re-created without them. File loads succeed or fail as a whole job, so
    with them the returned PCollection is empty; streaming inserts and the Storage Write API
    report each rejected row, which also goes to ``<table>_errors``.
    """

    def __init__(self, config: BigQueryConfig, batch_size: int | None = None) -> None:
        super().__init__()
        self._config = config
        self._batch_size = batch_size

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        config = self._config
        storage_api = config.write_method == STORAGE_WRITE_API
        result = (
            rows
            | "ToBigQueryRows" >> beam.Map(to_bigquery_row, beam_timestamps=storage_api)
            | "WriteToBigQuery" >> WriteToBigQuery(
                table=config.table.spec,
                # Only the Storage Write API needs it (to build Beam rows); file loads must
                # not send it: an existing compatible table may differ in modes.
                schema=bigquery_table_schema() if storage_api else None,
                method=WRITE_METHODS[config.write_method],
                create_disposition=BigQueryDisposition.CREATE_NEVER,
                write_disposition=BigQueryDisposition.WRITE_APPEND,
                insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
                batch_size=self._batch_size,
                test_client=_client_for(config, config.write_method, INSERT_ID_FIELD))
        )
        if not config.reports_rejected_rows:
            return rows.pipeline | "NoRejectedRows" >> beam.Create([])
        dead_letters = result.failed_rows_with_errors | "ToDeadLetters" >> beam.ParDo(
            RejectedRowsToDeadLetters(config.table.spec))
        _ = dead_letters | "WriteErrorsTable" >> WriteDeadLettersToBigQuery(config)
        return dead_letters
