"""Re-processing captures into the same BigQuery table adds no duplicate row: the batch write
stages its rows and MERGEs them on ``id`` (``transforms.bigquery_merge``). End to end against
the real bqemulator server, with streaming inserts into the staging table (the only write
method an endpoint allows), and the MERGE's own guarantees on a staged table."""

from __future__ import annotations

import glob
import re
from datetime import UTC, datetime
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import PipelineVisitor
from google.cloud import bigquery

from flowbeam.synthetic import write_capture
from pipelines.options import bigquery_insert_mode
from pipelines.pcap_flows import run
from tests.bigquery_emulator import EmulatorEndpoint
from tests.test_bigquery_sink import flow_row
from transforms.bigquery_config import (
    FILE_LOADS,
    STORAGE_WRITE_API,
    STREAMING_INSERTS,
    BigQueryConfig,
    BigQueryConfigError,
    TableRef,
)
from transforms.bigquery_merge import (
    APPEND,
    MERGE,
    job_suffix,
    merge_staged_rows,
    merge_statement,
    prepare_staging_table,
    resolve_insert_mode,
    staging_table,
)
from transforms.bigquery_tables import cloud_client, prepare_table
from transforms.bigquery_write import WriteFlowsToBigQuery, to_bigquery_row

RUNNER = "--runner=FnApiRunner"
DATASET = "idempotent"


# --- Insert mode and the statement (no server) --------------------------------------------------


@pytest.mark.parametrize(("requested", "streaming", "method", "expected"), [
    (None, False, FILE_LOADS, MERGE),
    (None, False, STREAMING_INSERTS, MERGE),
    (None, True, STREAMING_INSERTS, APPEND),
    (None, True, STORAGE_WRITE_API, APPEND),
    (APPEND, False, FILE_LOADS, APPEND),
    (APPEND, False, STORAGE_WRITE_API, APPEND),
    (MERGE, False, STREAMING_INSERTS, MERGE),
])
def test_batch_merges_and_streaming_appends_by_default(requested, streaming, method, expected):
    assert resolve_insert_mode(requested, streaming=streaming, write_method=method) == expected


@pytest.mark.parametrize(("requested", "streaming", "method", "message"), [
    (MERGE, True, STREAMING_INSERTS,
     "--bq_insert_mode merge is for batch pipelines (a streaming write never finishes, so there "
     "is no moment to merge); streaming inserts de-duplicate by insert id: use "
     "--bq_insert_mode append"),
    (None, False, STORAGE_WRITE_API,
     "--bq_insert_mode merge needs file_loads or streaming_inserts (the Storage Write API "
     "reports its failed rows before it commits, so the merge could not wait for the rows); "
     "add --bq_insert_mode append to write with storage_write_api"),
    ("upsert", False, FILE_LOADS, "--bq_insert_mode 'upsert' is not one of merge, append"),
])
def test_insert_modes_that_cannot_work_are_refused(requested, streaming, method, message):
    with pytest.raises(BigQueryConfigError) as error:
        resolve_insert_mode(requested, streaming=streaming, write_method=method)
    assert str(error.value) == message


def test_the_insert_mode_comes_from_the_flag_or_the_environment(monkeypatch):
    config = BigQueryConfig(TableRef("proj", "ds", "flow_logs"), STREAMING_INSERTS)
    monkeypatch.delenv("FLOWBEAM_BQ_INSERT_MODE", raising=False)
    assert bigquery_insert_mode(PipelineOptions([]), config) == MERGE
    assert bigquery_insert_mode(PipelineOptions(["--streaming"]), config) == APPEND
    monkeypatch.setenv("FLOWBEAM_BQ_INSERT_MODE", "append")
    assert bigquery_insert_mode(PipelineOptions([]), config) == APPEND
    assert bigquery_insert_mode(PipelineOptions(["--bq_insert_mode", "merge"]), config) == MERGE


def test_each_job_stages_into_its_own_table_beside_the_flow_table():
    moment = datetime(2026, 11, 3, 1, 2, 3, tzinfo=UTC)
    first, second = job_suffix(moment), job_suffix(moment)
    assert re.fullmatch(r"20261103_010203_[0-9a-f]{8}", first) and first != second
    assert staging_table(TableRef("proj", "net", "flow_logs"), first) == TableRef(
        "proj", "net", f"flow_logs_staging_{first}")


def test_the_merge_inserts_one_copy_of_each_new_id_within_the_staged_days():
    columns = ("id", "first_seen_at", "src_bytes")
    sql = merge_statement(TableRef("proj", "net", "flow_logs"),
                          TableRef("proj", "net", "flow_logs_staging_x"),
                          datetime(2026, 11, 3, 1, 2, 3, 4, tzinfo=UTC),
                          datetime(2026, 11, 5, 0, 0, tzinfo=UTC), columns)
    assert sql == (
        "MERGE `proj.net.flow_logs` AS target\n"
        "USING (\n"
        "  SELECT `id`, `first_seen_at`, `src_bytes` FROM (\n"
        "    SELECT *, ROW_NUMBER() OVER (PARTITION BY `id`) AS flowbeam_copy\n"
        "    FROM `proj.net.flow_logs_staging_x`)\n"
        "  WHERE flowbeam_copy = 1) AS staged\n"
        "ON target.`id` = staged.`id`\n"
        "  AND target.`first_seen_at` BETWEEN TIMESTAMP '2026-11-03 01:02:03.000004+00:00' "
        "AND TIMESTAMP '2026-11-05 00:00:00.000000+00:00'\n"
        "WHEN NOT MATCHED THEN INSERT (`id`, `first_seen_at`, `src_bytes`) "
        "VALUES (staged.`id`, staged.`first_seen_at`, staged.`src_bytes`)")


class _MergeWaits(PipelineVisitor):
    """The producers of the merge step's side inputs: what it waits for."""

    def __init__(self) -> None:
        self.producers: list[str] = []

    def visit_transform(self, node) -> None:
        if node.full_label.endswith("/MergeStagedRows/Merge"):
            self.producers.extend(f"{side.pvalue.producer.full_label} [{side.pvalue.tag}]"
                                  for side in node.side_inputs)


@pytest.mark.parametrize(("method", "producers"), [
    (FILE_LOADS, [  # every load job (direct, or into temp tables), then the copy jobs
        "Write/WriteToBigQuery/BigQueryBatchFileLoads/Flatten [None]",
        "Write/WriteToBigQuery/BigQueryBatchFileLoads/ParDo(TriggerCopyJobs)/"
        "ParDo(TriggerCopyJobs) [None]"]),
    (STREAMING_INSERTS, [  # the insert requests
        "Write/WriteToBigQuery/_StreamToBigQuery/StreamInsertRows/ParDo(BigQueryWriteFn) "
        "[FailedRowsWithErrors]"]),
])
def test_the_merge_waits_for_the_steps_that_write_the_rows(method, producers):
    options = PipelineOptions(["--temp_location", "gs://bucket/tmp", "--project", "proj"])
    pipeline = beam.Pipeline(options=options)
    config = BigQueryConfig(TableRef("proj", "net", "flow_logs"), method)
    _ = (pipeline | beam.Create([])
         | "Write" >> WriteFlowsToBigQuery(config, staging=staging_table(config.table, "x")))
    waits = _MergeWaits()
    pipeline.visit(waits)
    assert waits.producers == producers


# --- Against the emulator -----------------------------------------------------------------------


@pytest.fixture
def client(bigquery_emulator: EmulatorEndpoint) -> bigquery.Client:
    """A client of the emulator with a fresh, empty ``idempotent`` dataset."""
    config = BigQueryConfig(TableRef(bigquery_emulator.project, DATASET, "flow_logs"),
                            STREAMING_INSERTS, bigquery_emulator.url)
    emulator = cloud_client(config)
    emulator.delete_dataset(DATASET, delete_contents=True, not_found_ok=True)
    emulator.create_dataset(DATASET)
    return emulator


@pytest.fixture(scope="module")
def captures(tmp_path_factory) -> tuple[Path, Path]:
    """Two small captures with disjoint flows."""
    directory = tmp_path_factory.mktemp("captures")
    first, second = directory / "first.pcap", directory / "second.pcap"
    write_capture(str(first), flows=40, packets=600, seed=3)
    write_capture(str(second), flows=30, packets=400, seed=4)
    return first, second


def table_path(endpoint: EmulatorEndpoint) -> str:
    return f"{endpoint.project}.{DATASET}.flow_logs"


def run_into_table(endpoint: EmulatorEndpoint, output: Path, *args: str) -> list[dict]:
    """Run the pipeline into the table (and ``output``); returns the run's Parquet rows."""
    code = run(["--output", str(output), RUNNER, "--output_table", table_path(endpoint),
                "--bq_endpoint", endpoint.url, *args])
    assert code == 0
    files = sorted(glob.glob(str(output / "flows-*.parquet")))
    return [row for name in files for row in pq.read_table(name).to_pylist()]


def table_rows(client: bigquery.Client, endpoint: EmulatorEndpoint) -> list[dict]:
    sql = f"SELECT * FROM `{table_path(endpoint)}` ORDER BY id"
    return [dict(row) for row in client.query(sql).result()]


def by_id(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda row: row["id"])


def table_names(client: bigquery.Client) -> list[str]:
    return sorted(table.table_id for table in client.list_tables(DATASET))


@pytest.mark.emulator
def test_the_same_capture_twice_leaves_each_row_once(bigquery_emulator, client, captures,
                                                     tmp_path):
    first, _ = captures
    rows = run_into_table(bigquery_emulator, tmp_path / "run1", "--input", str(first))
    assert len(rows) == 40
    assert table_rows(client, bigquery_emulator) == by_id(rows)

    again = run_into_table(bigquery_emulator, tmp_path / "run2", "--input", str(first))
    assert by_id(again) == by_id(rows)
    assert table_rows(client, bigquery_emulator) == by_id(rows)
    assert table_names(client) == ["flow_logs", "flow_logs_errors"]  # staging tables dropped


@pytest.mark.emulator
def test_an_added_capture_adds_only_its_rows(bigquery_emulator, client, captures, tmp_path):
    first, second = captures
    rows = run_into_table(bigquery_emulator, tmp_path / "run1", "--input", str(first))
    both = run_into_table(bigquery_emulator, tmp_path / "run2", "--input", str(first),
                          "--input", str(second))
    assert len(both) == 70 and {row["id"] for row in rows} < {row["id"] for row in both}
    assert table_rows(client, bigquery_emulator) == by_id(both)


@pytest.mark.emulator
def test_append_mode_writes_every_run(bigquery_emulator, client, captures, tmp_path):
    first, _ = captures
    for attempt in ("run1", "run2"):
        rows = run_into_table(bigquery_emulator, tmp_path / attempt, "--input", str(first),
                              "--bq_insert_mode", "append")
    # The emulator does not de-duplicate insert ids (BigQuery does, for about a minute).
    assert table_rows(client, bigquery_emulator) == by_id(rows + rows)
    assert table_names(client) == ["flow_logs", "flow_logs_errors"]


@pytest.mark.emulator
def test_a_twice_staged_row_and_a_retried_merge_insert_it_once(bigquery_emulator, client):
    config = BigQueryConfig(TableRef(bigquery_emulator.project, DATASET, "flow_logs"),
                            STREAMING_INSERTS, bigquery_emulator.url)
    prepare_table(config, client)
    staging = prepare_staging_table(config, client, suffix="retry")
    assert table_names(client) == ["flow_logs", "flow_logs_errors", "flow_logs_staging_retry"]
    staged = [to_bigquery_row(flow_row(n)) for n in (1, 2, 2, 3)]  # row 2: a retried insert
    assert client.insert_rows_json(staging.path, staged) == []
    assert client.insert_rows_json(config.table.path, [to_bigquery_row(flow_row(3))]) == []

    assert merge_staged_rows(client, config.table, staging) == 2  # rows 1 and 2
    assert merge_staged_rows(client, config.table, staging) == 0  # dropped: nothing to do
    assert table_rows(client, bigquery_emulator) == [flow_row(n) for n in (1, 2, 3)]
    assert table_names(client) == ["flow_logs", "flow_logs_errors"]
