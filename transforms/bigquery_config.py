"""BigQuery sink settings: table specs, write methods and key files, validated before any work.

Every mistake a user can make on the command line (a bad table spec, no project, a missing or
malformed key file, a write method that cannot work here) is a ``BigQueryConfigError`` (a usage
error, exit 2) before anything runs. The flags themselves are ``pipelines.options``'s.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from apache_beam.io.gcp.bigquery import WriteToBigQuery
from google.auth import exceptions as auth_exceptions
from google.oauth2 import service_account

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
INSERT_ID_FIELD = "id"
INSERT_STAGE = "bigquery_insert"
SCOPES = (
    "https://www.googleapis.com/auth/bigquery",
    "https://www.googleapis.com/auth/cloud-platform",
)
# Lowercase letters, digits and hyphens, starting with a letter (optionally DOMAIN:). Google
# issues 6-30 characters; shorter ids are accepted for emulators and tests.
_PROJECT_RE = re.compile(r"(?:[a-z][a-z0-9.\-]*[a-z0-9]:)?[a-z](?:[a-z0-9\-]{0,28}[a-z0-9])?")
_DATASET_RE = re.compile(r"[A-Za-z0-9_]{1,1024}")
_TABLE_RE = re.compile(r"[\w\-]{1,1024}")


class BigQueryConfigError(ValueError):
    """A BigQuery setting that cannot work; the pipeline reports it as a usage error (exit 2).

    Messages never contain a key file's content, only its path.
    """


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
