"""The BigQuery sink: pure tests of its configuration and conversions, then tests over the wire
against a real bqemulator server (tests/bigquery_emulator.py; skipped when it cannot start).

What the emulator (bqemulator 1.4.0) does not do, found while writing these tests and so not
tested here: it ignores insert ids (the same insertId twice gives two rows: de-duplication is
real BigQuery's, best effort), accepts a row without a REQUIRED value or with an unknown field,
names the first column of the row (not the bad one) in a per-row error, and has no GEOGRAPHY
(its spatial extension is skipped offline). File loads (gs:// staging) and the Storage Write
API (a Java expansion service) cannot run offline at all.
"""

from __future__ import annotations

import http.client
import json
import logging
import pickle
import socket
import threading
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import apache_beam as beam
import pytest
from apache_beam.io.gcp.bigquery_tools import BigQueryWrapper
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline as beam_testing
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp
from google.cloud import bigquery

from flowbeam.flows.schema import FLOW_COLUMN_NAMES, FLOW_COLUMNS
from pipelines.options import resolve_bigquery_config
from tests.bigquery_emulator import EmulatorEndpoint
from transforms.bigquery_config import (
    FILE_LOADS,
    STORAGE_WRITE_API,
    STREAMING_INSERTS,
    BigQueryConfig,
    BigQueryConfigError,
    TableRef,
    load_key_file,
    normalize_endpoint,
    parse_table_spec,
    resolve_table,
    resolve_write_method,
)
from transforms.bigquery_tables import (
    ERROR_COLUMNS,
    BigQueryClients,
    bigquery_schema_fields,
    bigquery_table_schema,
    cloud_client,
    insert_ids,
    prepare_table,
    schema_differences,
)
from transforms.bigquery_write import (
    WriteFlowsToBigQuery,
    dead_letter_to_error_row,
    describe_insert_errors,
    rejected_row_dead_letter,
    to_bigquery_row,
)
from transforms.dead_letters import dead_letter

SECRET = "SECRET-KEY-MATERIAL-7f3a9c"


def flow_row(n: int, **changes: object) -> dict:
    """A flow row as the flow engine emits it (datetimes in UTC, NULLs where allowed)."""
    row = {
        "id": f"{n:032x}",
        "community_id": f"1:flow{n}=",
        "protocol": "tcp",
        "ip_protocol": 6,
        "ip_version": 4,
        "src_addr": "10.0.0.1",
        "dst_addr": "192.0.2.7",
        "src_port": 40000 + n,
        "dst_port": 443,
        "first_seen_at": datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        "last_seen_at": datetime(2024, 5, 6, 7, 9, 0, tzinfo=UTC),
        "src_bytes": 1200 + n,
        "dst_bytes": 48000,
        "src_packets": 10,
        "dst_packets": 40,
        "src_tcp_flags": 0x1B,
        "dst_tcp_flags": 0x1A,
        "vlan_id": None,
        "status": "end_of_flow",
        "source": "pcap",
        "sensor": None,
        "action": None,
        "account_id": None,
        "vpc_id": None,
        "subnet_id": None,
        "instance_id": None,
        "flow_direction": None,
        "src_subnet": None,
        "dst_subnet": None,
    }
    row.update(changes)
    assert tuple(row) == FLOW_COLUMN_NAMES
    return row


KNOWN_ROWS = [
    flow_row(1),
    flow_row(2, protocol="udp", ip_protocol=17, dst_port=53, src_tcp_flags=None,
             dst_tcp_flags=None, vlan_id=100, status="idle_timeout"),
    flow_row(3, protocol="icmpv6", ip_protocol=58, ip_version=6, src_addr="2001:db8::1",
             dst_addr="2001:db8::2", src_port=128, dst_port=129, src_tcp_flags=None,
             dst_tcp_flags=None, first_seen_at=datetime(2024, 5, 7, 0, 0, 0, 1, tzinfo=UTC),
             last_seen_at=datetime(2024, 5, 7, 0, 0, 0, 1, tzinfo=UTC), status="forced_end"),
]


# --- Table specs and options --------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("my-project:net.flow_logs", TableRef("my-project", "net", "flow_logs")),
    ("my-project.net.flow_logs", TableRef("my-project", "net", "flow_logs")),
    ("proj:ds.flow_logs", TableRef("proj", "ds", "flow_logs")),
    (" my-project:net.flows-2024 ", TableRef("my-project", "net", "flows-2024")),
    ("example.com:my-project:net.flow_logs", TableRef("example.com:my-project", "net",
                                                      "flow_logs")),
])
def test_table_specs_in_both_forms_parse(spec, expected):
    assert parse_table_spec(spec) == expected
    assert expected.spec == f"{expected.project}:{expected.dataset}.{expected.table}"
    assert expected.path == f"{expected.project}.{expected.dataset}.{expected.table}"


@pytest.mark.parametrize(("spec", "message"), [
    ("flow_logs", "--output_table 'flow_logs' is not a table spec: "
                  "use PROJECT:DATASET.TABLE or PROJECT.DATASET.TABLE"),
    ("a.b.c.d", "--output_table 'a.b.c.d' is not a table spec: "
                "use PROJECT:DATASET.TABLE or PROJECT.DATASET.TABLE"),
    ("my-project:net", "--output_table 'my-project:net' is not a table spec: "
                       "use PROJECT:DATASET.TABLE or PROJECT.DATASET.TABLE"),
    ("My_Project:net.flow_logs", "invalid project id 'My_Project' in --output_table "
                                 "'My_Project:net.flow_logs': lowercase letters, digits "
                                 "and hyphens, starting with a letter (optionally DOMAIN:)"),
    ("1proj.net.flow_logs", "invalid project id '1proj' in --output_table "
                            "'1proj.net.flow_logs': lowercase letters, digits "
                            "and hyphens, starting with a letter (optionally DOMAIN:)"),
    ("proj-:net.flow_logs", "invalid project id 'proj-' in --output_table "
                            "'proj-:net.flow_logs': lowercase letters, digits "
                            "and hyphens, starting with a letter (optionally DOMAIN:)"),
    ("my-project:net-1.flow_logs", "invalid dataset id 'net-1' in --output_table "
                                   "'my-project:net-1.flow_logs': letters, digits and "
                                   "underscores"),
    ("my-project:net.flow logs", "invalid table id 'flow logs' in --output_table "
                                 "'my-project:net.flow logs': letters, digits, underscores "
                                 "and hyphens"),
    ("net.flow_logs", "no BigQuery project for --output_table 'net.flow_logs': give "
                      "PROJECT:DATASET.TABLE in --output_table, or --bq_project, or --project"),
])
def test_invalid_table_specs_say_what_is_wrong(spec, message):
    with pytest.raises(BigQueryConfigError) as error:
        parse_table_spec(spec)
    assert str(error.value) == message


def test_dataset_table_spec_takes_the_project_from_flags():
    assert parse_table_spec("net.flow_logs", "my-project") == TableRef("my-project", "net",
                                                                       "flow_logs")
    assert resolve_table("net.t", bq_project="proj-a", default_project="proj-b") == TableRef(
        "proj-a", "net", "t")
    assert resolve_table("net.t", default_project="proj-b") == TableRef("proj-b", "net", "t")


def test_parts_give_the_table_with_flow_logs_by_default():
    assert resolve_table(None, "my-project", "net") == TableRef("my-project", "net", "flow_logs")
    assert resolve_table(None, "my-project", "net", "flows") == TableRef("my-project", "net",
                                                                         "flows")
    assert resolve_table(None, None, "net", default_project="beam-proj") == TableRef(
        "beam-proj", "net", "flow_logs")


@pytest.mark.parametrize(("args", "message"), [
    ((None, None, "net"), "no BigQuery project for --bq_project/--bq_dataset/--bq_table: give "
                          "PROJECT:DATASET.TABLE in --output_table, or --bq_project, or --project"),
    ((None, "my-project", None), "no BigQuery table: give --output_table or --bq_dataset"),
    (("my-project:net.t", None, "other"), "--output_table 'my-project:net.t' and --bq_dataset "
                                          "'other' disagree: give one destination"),
    (("my-project:net.t", "proj-two", None), "--output_table 'my-project:net.t' and "
                                             "--bq_project 'proj-two' disagree: give one "
                                             "destination"),
])
def test_conflicting_or_missing_parts_are_errors(args, message):
    with pytest.raises(BigQueryConfigError) as error:
        resolve_table(*args)
    assert str(error.value) == message


def test_write_method_defaults_follow_the_pipeline_mode():
    assert resolve_write_method(None, streaming=False, emulated=False) == FILE_LOADS
    assert resolve_write_method(None, streaming=True, emulated=False) == STREAMING_INSERTS
    assert resolve_write_method(None, streaming=False, emulated=True) == STREAMING_INSERTS
    assert resolve_write_method(STORAGE_WRITE_API, streaming=True,
                                emulated=False) == STORAGE_WRITE_API


@pytest.mark.parametrize(("requested", "streaming", "emulated", "message"), [
    ("bulk", False, False, "--bq_write_method 'bulk' is not one of file_loads, "
                           "streaming_inserts, storage_write_api"),
    ("file_loads", False, True, "--bq_write_method file_loads cannot write to --bq_endpoint: "
                                "file_loads needs a gs:// bucket and storage_write_api a Java "
                                "expansion service; use streaming_inserts"),
    ("file_loads", True, False, "--bq_write_method file_loads is for batch pipelines; use "
                                "streaming_inserts or storage_write_api with --streaming"),
])
def test_write_methods_that_cannot_work_are_refused(requested, streaming, emulated, message):
    with pytest.raises(BigQueryConfigError) as error:
        resolve_write_method(requested, streaming=streaming, emulated=emulated)
    assert str(error.value) == message


def test_endpoints_are_urls():
    assert normalize_endpoint("127.0.0.1:9050") == "http://127.0.0.1:9050"
    assert normalize_endpoint("http://localhost:9050/") == "http://localhost:9050"
    with pytest.raises(BigQueryConfigError) as error:
        normalize_endpoint("ftp://host")
    assert str(error.value) == ("--bq_endpoint 'ftp://host' is not an http(s) URL "
                                "(e.g. http://127.0.0.1:9050)")


@pytest.fixture
def clean_env(monkeypatch):
    """No FLOWBEAM_* or emulator variable from the developer's shell leaks into a test."""
    for name in ("FLOWBEAM_OUTPUT_TABLE", "FLOWBEAM_BQ_PROJECT", "FLOWBEAM_BQ_DATASET",
                 "FLOWBEAM_BQ_TABLE", "FLOWBEAM_BQ_WRITE_METHOD", "FLOWBEAM_BQ_ENDPOINT",
                 "FLOWBEAM_SERVICE_ACCOUNT_KEY_FILE", "BIGQUERY_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_table_means_no_bigquery_output(clean_env):
    assert resolve_bigquery_config(PipelineOptions(["--bq_project", "my-project"])) is None


def test_config_from_flags(clean_env):
    options = PipelineOptions(["--output_table", "my-project:net.flow_logs",
                               "--temp_location", "gs://bucket/tmp"])
    assert resolve_bigquery_config(options) == BigQueryConfig(
        TableRef("my-project", "net", "flow_logs"), FILE_LOADS)
    streaming = PipelineOptions(["--bq_dataset", "net", "--project", "my-project", "--streaming"])
    assert resolve_bigquery_config(streaming) == BigQueryConfig(
        TableRef("my-project", "net", "flow_logs"), STREAMING_INSERTS)


def test_config_from_environment(clean_env):
    clean_env.setenv("FLOWBEAM_BQ_PROJECT", "env-project")
    clean_env.setenv("FLOWBEAM_BQ_DATASET", "envds")
    clean_env.setenv("FLOWBEAM_BQ_TABLE", "envtable")
    clean_env.setenv("BIGQUERY_EMULATOR_HOST", "127.0.0.1:9050")
    assert resolve_bigquery_config(PipelineOptions([])) == BigQueryConfig(
        TableRef("env-project", "envds", "envtable"), STREAMING_INSERTS, "http://127.0.0.1:9050")
    clean_env.setenv("FLOWBEAM_BQ_ENDPOINT", "http://127.0.0.1:9999")
    clean_env.setenv("FLOWBEAM_BQ_WRITE_METHOD", "file_loads")
    with pytest.raises(BigQueryConfigError, match="file_loads cannot write to --bq_endpoint"):
        resolve_bigquery_config(PipelineOptions([]))
    # The command line wins over the environment.
    config = resolve_bigquery_config(PipelineOptions(["--bq_write_method", "streaming_inserts",
                                             "--bq_table", "cli"]))
    assert config == BigQueryConfig(TableRef("env-project", "envds", "cli"), STREAMING_INSERTS,
                                    "http://127.0.0.1:9999")


def test_file_loads_need_a_cloud_storage_temp_location(clean_env):
    with pytest.raises(BigQueryConfigError) as error:
        resolve_bigquery_config(PipelineOptions(["--output_table", "my-project:net.t",
                                        "--temp_location", "/tmp/x"]))
    assert str(error.value) == ("--bq_write_method file_loads stages files in Cloud Storage: "
                                "give --temp_location gs://BUCKET/PATH (got '/tmp/x')")


# --- Service account key files ------------------------------------------------------------------


def write_key(path: Path, private_key: str) -> Path:
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "my-project", "private_key_id": "k1",
        "private_key": private_key, "client_email": "flows@my-project.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}))
    return path


def test_a_valid_key_file_gives_its_service_account(tmp_path, clean_env):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    key = write_key(tmp_path / "key.json", pem)
    assert load_key_file(str(key)).service_account_email == (
        "flows@my-project.iam.gserviceaccount.com")
    options = PipelineOptions(["--output_table", "my-project:net.t", "--bq_write_method",
                               "streaming_inserts", "--service_account_key_file", str(key)])
    assert resolve_bigquery_config(options).key_file == str(key)
    clients = BigQueryClients(resolve_bigquery_config(options))
    assert pem not in pickle.dumps(clients).decode("latin-1")


def test_a_missing_key_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(BigQueryConfigError) as error:
        load_key_file(str(missing))
    assert str(error.value) == f"--service_account_key_file '{missing}': no such file"


@pytest.mark.parametrize("content", [
    # Truncated JSON: the decoder's error object keeps the whole document.
    '{"type": "service_account", "private_key": "' + SECRET,
    # Well-formed JSON, unusable private key: the key parser may quote it.
    json.dumps({"type": "service_account", "private_key": f"-----BEGIN PRIVATE KEY-----\n"
                f"{SECRET}\n-----END PRIVATE KEY-----\n", "client_email": "a@b.c",
                "token_uri": "https://oauth2.googleapis.com/token"}),
    # Missing fields.
    json.dumps({"private_key": SECRET}),
])
def test_a_malformed_key_never_shows_its_content(tmp_path, caplog, clean_env, content):
    key = tmp_path / "key.json"
    key.write_text(content)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BigQueryConfigError) as error:
        resolve_bigquery_config(PipelineOptions(["--output_table", "my-project:net.t",
                                        "--bq_write_method", "streaming_inserts",
                                        "--service_account_key_file", str(key)]))
    message = str(error.value)
    assert message.startswith(f"--service_account_key_file '{key}' is not a usable service "
                              "account key (")
    assert message.endswith("; expected the JSON key downloaded from IAM, content not shown)")
    printed = "".join(traceback.format_exception(error.value))
    assert SECRET not in message and SECRET not in repr(error.value) and SECRET not in printed
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert SECRET not in caplog.text


# --- Schema -------------------------------------------------------------------------------------


def test_bigquery_schema_is_derived_from_flow_columns():
    schema = bigquery_table_schema()
    assert [(f.name, f.type, f.mode, f.description) for f in schema.fields] == [
        (c.name, c.bigquery_type, "REQUIRED" if c.required else "NULLABLE", c.description)
        for c in FLOW_COLUMNS]
    assert all(f.description for f in schema.fields)
    fields = bigquery_schema_fields()
    assert [(f.name, f.field_type, f.mode, f.description) for f in fields] == [
        (f.name, f.type, f.mode, f.description) for f in schema.fields]
    assert [f.name for f in fields] == list(FLOW_COLUMN_NAMES)
    assert {f.name: f.mode for f in fields if f.mode == "NULLABLE"} == {
        "src_tcp_flags": "NULLABLE", "dst_tcp_flags": "NULLABLE", "vlan_id": "NULLABLE",
        "sensor": "NULLABLE", "action": "NULLABLE", "account_id": "NULLABLE",
        "vpc_id": "NULLABLE", "subnet_id": "NULLABLE", "instance_id": "NULLABLE",
        "flow_direction": "NULLABLE", "src_subnet": "NULLABLE", "dst_subnet": "NULLABLE"}


def test_error_table_columns_are_the_dead_letter_fields():
    assert [c.name for c in ERROR_COLUMNS] == list(dead_letter("s", "r", "x"))
    assert all(c.description for c in ERROR_COLUMNS)


def test_compatible_schemas_have_no_differences():
    legacy_and_relaxed = [
        bigquery.SchemaField(c.name, {"INT64": "INTEGER"}.get(c.bigquery_type, c.bigquery_type),
                             mode="NULLABLE", description="theirs")
        for c in FLOW_COLUMNS
    ] + [bigquery.SchemaField("note", "STRING")]
    assert schema_differences(bigquery_schema_fields()) == []
    assert schema_differences(legacy_and_relaxed) == []


def test_incompatible_schemas_list_every_difference():
    fields = {f.name: f for f in bigquery_schema_fields()}
    fields.pop("vlan_id")
    fields["src_port"] = bigquery.SchemaField("src_port", "STRING", mode="REQUIRED")
    fields["dst_tcp_flags"] = bigquery.SchemaField("dst_tcp_flags", "INTEGER", mode="REQUIRED")
    fields["status"] = bigquery.SchemaField("status", "STRING", mode="REPEATED")
    fields["tenant"] = bigquery.SchemaField("tenant", "STRING", mode="REQUIRED")
    assert schema_differences(list(fields.values())) == [
        "column src_port is STRING, flowbeam writes INT64",
        "column dst_tcp_flags is REQUIRED, flowbeam writes NULLs in it",
        "missing column vlan_id (INT64)",
        "column status is REPEATED, flowbeam writes one value",
        "extra REQUIRED column tenant that flowbeam does not write",
    ]


# --- Row conversion, insert ids, dead letters ---------------------------------------------------


def test_rows_become_bigquery_json_with_rfc3339_timestamps():
    converted = to_bigquery_row(KNOWN_ROWS[2])
    assert converted == {**KNOWN_ROWS[2],
                         "first_seen_at": "2024-05-07T00:00:00.000001+00:00",
                         "last_seen_at": "2024-05-07T00:00:00.000001+00:00"}
    assert json.loads(json.dumps(converted)) == converted


def test_storage_write_api_rows_carry_beam_timestamps():
    converted = to_bigquery_row(KNOWN_ROWS[0], beam_timestamps=True)
    assert converted["first_seen_at"] == Timestamp(micros=1714979289123456)
    assert converted["last_seen_at"] == Timestamp(seconds=1714979340)


def test_insert_ids_are_the_flow_ids():
    rows = [to_bigquery_row(r) for r in KNOWN_ROWS] + [{"no_id": 1}]
    assert insert_ids(rows, ["b-0", "b-1", "b-2", "b-3"]) == [
        f"{1:032x}", f"{2:032x}", f"{3:032x}", "b-3"]
    assert insert_ids(rows[:1], ["b-0"], None) == ["b-0"]


def test_clients_pickle_as_their_config_only():
    config = BigQueryConfig(TableRef("my-project", "net", "t"), STREAMING_INSERTS,
                            key_file="/keys/k.json")
    clients = BigQueryClients(config)
    clients._cloud = object()  # a live client must not travel with the DoFn
    copy = pickle.loads(pickle.dumps(clients))
    assert (copy.config, copy.insert_id_field, copy._cloud, copy._apitools) == (
        config, "id", None, None)


def test_rejected_rows_become_dead_letters():
    errors = [{"reason": "invalid", "location": "src_port", "debugInfo": "",
               "message": "Cannot convert value to integer: x"},
              {"reason": "stopped", "location": "", "message": ""}]
    row = to_bigquery_row(KNOWN_ROWS[0])
    assert rejected_row_dead_letter(("p:d.t", row, errors), "p:d.t") == {
        "stage": "bigquery_insert",
        "reason": "Cannot convert value to integer: x (reason: invalid, location: src_port); "
                  "rejected (reason: stopped)",
        "source": "p:d.t", "offset": None, "payload": row}
    storage = {"error_message": "Row has an invalid value",
               "failed_row": to_bigquery_row(KNOWN_ROWS[0], beam_timestamps=True)}
    assert rejected_row_dead_letter(storage, "p:d.t") == {
        "stage": "bigquery_insert", "reason": "Row has an invalid value", "source": "p:d.t",
        "offset": None, "payload": {**row, "first_seen_at": "2024-05-06T07:08:09.123456Z",
                                    "last_seen_at": "2024-05-06T07:09:00Z"}}
    assert describe_insert_errors([]) == "rejected by BigQuery (no error text)"


def test_dead_letters_become_error_table_rows():
    record = dead_letter("bigquery_insert", "bad", "p:d.t", payload={"b": 1, "a": [2]})
    assert dead_letter_to_error_row(record) == {
        "stage": "bigquery_insert", "reason": "bad", "source": "p:d.t", "offset": None,
        "payload": '{"a": [2], "b": 1}'}
    assert dead_letter_to_error_row(dead_letter("x", "y", "z"))["payload"] is None


def test_file_loads_return_no_dead_letters_and_write_no_errors_table():
    """Load jobs fail whole, so nothing reports single rows (graph only: loads need gs://)."""
    config = BigQueryConfig(TableRef("my-project", "net", "flow_logs"), FILE_LOADS)
    pipeline = beam.Pipeline(options=PipelineOptions(["--temp_location", "gs://bucket/tmp"]))
    dead_letters = pipeline | beam.Create(KNOWN_ROWS) | "ToBigQuery" >> WriteFlowsToBigQuery(config)
    assert dead_letters.producer.full_label == "ToBigQuery/NoRejectedRows/Map(decode)"
    labels = {t.full_label for t in pipeline.transforms_stack[0].parts[-1].parts}
    assert labels == {"ToBigQuery/ToBigQueryRows", "ToBigQuery/WriteToBigQuery",
                      "ToBigQuery/NoRejectedRows"}


# --- Against the emulator, over the wire --------------------------------------------------------


@pytest.fixture
def dataset(bigquery_emulator: EmulatorEndpoint) -> str:
    """A fresh dataset per test, so tests share one server without sharing tables."""
    name = f"ds_{uuid.uuid4().hex[:12]}"
    emulator_client(bigquery_emulator).create_dataset(name)
    return name


def emulator_client(endpoint: EmulatorEndpoint) -> bigquery.Client:
    config = BigQueryConfig(TableRef(endpoint.project, "unused", "unused"), STREAMING_INSERTS,
                            endpoint.url)
    return cloud_client(config)


def emulator_config(endpoint: EmulatorEndpoint, dataset: str,
                    table: str = "flow_logs") -> BigQueryConfig:
    return BigQueryConfig(TableRef(endpoint.project, dataset, table), STREAMING_INSERTS,
                          endpoint.url)


def read_table(client: bigquery.Client, ref: TableRef) -> list[dict]:
    return [dict(row) for row in client.query(f"SELECT * FROM `{ref.path}` ORDER BY 1").result()]


def schema_of(table: bigquery.Table) -> list[tuple]:
    return [(f.name, f.field_type, f.mode, f.description) for f in table.schema]


@pytest.mark.emulator
def test_start_up_creates_the_partitioned_clustered_table(bigquery_emulator, dataset, clean_env):
    options = PipelineOptions(["--output_table", f"{bigquery_emulator.project}:{dataset}.flows",
                               "--bq_endpoint", bigquery_emulator.url])
    config = resolve_bigquery_config(options)
    prepare_table(config)
    assert config == emulator_config(bigquery_emulator, dataset, "flows")
    client = emulator_client(bigquery_emulator)
    table = client.get_table(config.table.path)
    assert schema_of(table) == [(f.name, f.field_type, f.mode, f.description)
                                for f in bigquery_schema_fields()]
    assert (table.time_partitioning.type_, table.time_partitioning.field) == ("DAY",
                                                                              "first_seen_at")
    # The emulator stores and reports the clustering spec (whether it clusters is its affair).
    assert table.clustering_fields == ["src_addr", "dst_addr", "protocol"]
    assert table.description.startswith("flowbeam flow records")
    errors = client.get_table(config.errors_table.path)
    assert schema_of(errors) == [(c.name, c.bigquery_type, "REQUIRED" if c.required else
                                  "NULLABLE", c.description) for c in ERROR_COLUMNS]
    assert errors.time_partitioning is None


@pytest.mark.emulator
def test_an_existing_compatible_table_is_used_as_is(bigquery_emulator, dataset):
    config = emulator_config(bigquery_emulator, dataset)
    client = emulator_client(bigquery_emulator)
    theirs = [bigquery.SchemaField(c.name, {"INT64": "INTEGER"}.get(c.bigquery_type,
                                                                     c.bigquery_type))
              for c in FLOW_COLUMNS] + [bigquery.SchemaField("note", "STRING")]
    client.create_table(bigquery.Table(config.table.path, schema=theirs))
    prepare_table(config)
    table = client.get_table(config.table.path)
    assert [f.name for f in table.schema] == [*FLOW_COLUMN_NAMES, "note"]
    assert {f.mode for f in table.schema} == {"NULLABLE"}
    assert table.time_partitioning is None and table.clustering_fields is None


@pytest.mark.emulator
def test_an_incompatible_table_stops_the_start_up(bigquery_emulator, dataset, clean_env):
    config = emulator_config(bigquery_emulator, dataset)
    client = emulator_client(bigquery_emulator)
    theirs = [f for f in bigquery_schema_fields() if f.name != "community_id"]
    theirs[6] = bigquery.SchemaField("src_port", "STRING", mode="REQUIRED")
    client.create_table(bigquery.Table(config.table.path, schema=theirs))
    options = PipelineOptions(["--output_table", config.table.spec,
                               "--bq_endpoint", bigquery_emulator.url])
    with pytest.raises(BigQueryConfigError) as error:
        prepare_table(resolve_bigquery_config(options))
    assert str(error.value) == (
        f"table {config.table.spec} exists with a schema flowbeam cannot write to: "
        "missing column community_id (STRING); column src_port is STRING, flowbeam writes INT64")
    assert client.get_table(config.table.path).num_rows == 0
    assert [t.table_id for t in client.list_tables(dataset)] == ["flow_logs"]


@pytest.mark.emulator
def test_a_missing_dataset_stops_the_start_up(bigquery_emulator):
    config = emulator_config(bigquery_emulator, "no_such_dataset")
    with pytest.raises(BigQueryConfigError) as error:
        prepare_table(config)
    assert str(error.value) == (
        f"dataset {bigquery_emulator.project}:no_such_dataset does not exist: create it first, "
        f"e.g. `bq mk --dataset --location=EU {bigquery_emulator.project}:no_such_dataset`")


def test_an_unreachable_endpoint_stops_the_start_up():
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = BigQueryConfig(TableRef("proj", "ds", "t"), STREAMING_INSERTS,
                            f"http://127.0.0.1:{port}")
    with pytest.raises(BigQueryConfigError) as error:
        prepare_table(config, deadline_s=1.0)
    assert str(error.value) == f"preparing proj:ds.t: cannot reach BigQuery at {config.endpoint}"


@pytest.mark.emulator
def test_beam_writes_flow_rows_and_dead_letters_the_rejected_one(bigquery_emulator, dataset):
    config = emulator_config(bigquery_emulator, dataset)
    prepare_table(config)
    # The emulator accepts unknown fields and NULLs in REQUIRED columns, but not a value of
    # the wrong type: text in the INT64 column src_port.
    bad = flow_row(9, src_port="not-a-port")
    bad_json = to_bigquery_row(bad)
    # bqemulator's wording; it names the row's first column, real BigQuery the bad one.
    reason = f"Cannot convert value to string (bad value): {bad['id']} (reason: invalid, " \
             "location: id)"
    expected_dead_letter = dead_letter("bigquery_insert", reason, config.table.spec,
                                       payload=bad_json)

    pipeline = beam_testing.TestPipeline(runner="FnApiRunner", options=PipelineOptions([]))
    dead_letters = (pipeline | beam.Create([*KNOWN_ROWS, bad])
                    | "ToBigQuery" >> WriteFlowsToBigQuery(config))
    assert_that(dead_letters, equal_to([expected_dead_letter]))
    result = pipeline.run()
    result.wait_until_finish()

    client = emulator_client(bigquery_emulator)
    assert read_table(client, config.table) == KNOWN_ROWS
    counters = result.metrics().query(MetricsFilter().with_name("bigquery_rejected_rows"))
    assert [c.committed for c in counters["counters"]] == [1]
    assert read_table(client, config.errors_table) == [
        dead_letter_to_error_row(expected_dead_letter)]


class RecordingProxy(ThreadingHTTPServer):
    """Forwards HTTP to the emulator and keeps every insertAll request body it sees."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.insert_bodies: list[dict] = []
        super().__init__(("127.0.0.1", 0), _ForwardingHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ForwardingHandler(BaseHTTPRequestHandler):
    server: RecordingProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0].endswith("/insertAll"):
            self.server.insert_bodies.append(json.loads(body))
        upstream = http.client.HTTPConnection(self.server.upstream.hostname,
                                              self.server.upstream.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def recording_proxy(bigquery_emulator) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(bigquery_emulator.url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join(timeout=10)


@pytest.mark.emulator
def test_streaming_inserts_send_the_flow_id_as_insert_id(bigquery_emulator, dataset,
                                                         recording_proxy):
    prepare_table(emulator_config(bigquery_emulator, dataset))
    config = BigQueryConfig(TableRef(bigquery_emulator.project, dataset, "flow_logs"),
                            STREAMING_INSERTS, recording_proxy.url)
    with beam_testing.TestPipeline(runner="FnApiRunner", options=PipelineOptions([])) as pipeline:
        _ = pipeline | beam.Create(KNOWN_ROWS) | WriteFlowsToBigQuery(config)
    sent = [row for body in recording_proxy.insert_bodies for row in body["rows"]]
    assert sorted((row["insertId"], row["json"]["id"]) for row in sent) == [
        (row["id"], row["id"]) for row in KNOWN_ROWS]
    assert all(body["skipInvalidRows"] for body in recording_proxy.insert_bodies)


@pytest.mark.emulator
def test_beams_apitools_calls_reach_the_endpoint_through_our_client(bigquery_emulator,
                                                                    dataset):
    config = emulator_config(bigquery_emulator, dataset)
    prepare_table(config)
    wrapper = BigQueryWrapper(client=pickle.loads(pickle.dumps(BigQueryClients(config))))
    table = wrapper.get_table(config.table.project, config.table.dataset, config.table.table)
    assert [f.name for f in table.schema.fields] == list(FLOW_COLUMN_NAMES)
    assert (table.timePartitioning.type, table.timePartitioning.field) == ("DAY",
                                                                           "first_seen_at")
