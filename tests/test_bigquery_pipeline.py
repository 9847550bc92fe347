"""The pcap pipeline end to end into BigQuery: a real capture, the real bqemulator server, Beam's
own ``WriteToBigQuery`` (streaming inserts), checked against the same run's Parquet output and
against nfstream's flow count for the capture."""

from __future__ import annotations

import glob
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from google.cloud import bigquery

from flowbeam.flows.schema import FLOW_COLUMN_NAMES
from pipelines.pcap_flows import run
from tests.bigquery_emulator import EmulatorEndpoint
from transforms.bigquery_config import STREAMING_INSERTS, BigQueryConfig, TableRef
from transforms.bigquery_tables import cloud_client

PCAPS = Path(__file__).resolve().parents[2] / "shared/data/pcaps"
CAPTURE = "ppp_sll"  # 16 flows, nfstream agrees; zeek_http-vlan has a single flow
PROJECT = "proj"
RUNNER = "--runner=FnApiRunner"
CONTRACT = ("pipelines.pcap_flows must call resolve_bigquery_config() and prepare_table() before "
            "building the pipeline "
            "(BigQueryConfigError -> exit 2) and apply WriteFlowsToBigQuery to its flows")


@pytest.fixture
def capture() -> Path:
    path = PCAPS / f"{CAPTURE}.pcap"
    if not path.exists() or not path.with_suffix(".nfstream.csv").exists():
        pytest.skip(f"{path} (and its .nfstream.csv) not present: shared captures not installed")
    return path


def client_for(endpoint: EmulatorEndpoint) -> bigquery.Client:
    return cloud_client(BigQueryConfig(TableRef(PROJECT, "ds", "flow_logs"), STREAMING_INSERTS,
                                       endpoint.url))


@pytest.fixture
def dataset(bigquery_emulator: EmulatorEndpoint) -> str:
    """``proj:ds``, fresh: this module's emulator serves only this module's tests."""
    client = client_for(bigquery_emulator)
    client.delete_dataset("ds", delete_contents=True, not_found_ok=True)
    client.create_dataset("ds")
    return "ds"


def parquet_rows(directory: Path) -> list[dict]:
    files = sorted(glob.glob(str(directory / "flows-*.parquet")))
    assert files, f"no flows-*.parquet in {directory}"
    return [row for name in files for row in pq.read_table(name).to_pylist()]


def nfstream_flow_count(capture: Path) -> int:
    lines = capture.with_suffix(".nfstream.csv").read_text().splitlines()
    return len([line for line in lines if line.strip()]) - 1


def query(client: bigquery.Client, sql: str) -> list[dict]:
    return [dict(row) for row in client.query(sql).result()]


@pytest.mark.emulator
def test_a_capture_lands_in_bigquery_exactly_as_in_parquet(capture, bigquery_emulator, dataset,
                                                          tmp_path):
    code = run(["--input", str(capture), "--output", str(tmp_path), RUNNER,
                "--output_table", f"{PROJECT}:{dataset}.flow_logs",
                "--bq_endpoint", bigquery_emulator.url,
                "--bq_write_method", "streaming_inserts"])
    assert code == 0

    client = client_for(bigquery_emulator)
    assert [t.table_id for t in client.list_tables(dataset)] == [
        "flow_logs", "flow_logs_errors"], CONTRACT
    in_bigquery = query(client, f"SELECT * FROM `{PROJECT}.{dataset}.flow_logs` ORDER BY id")
    local = sorted(parquet_rows(tmp_path), key=lambda row: row["id"])
    assert in_bigquery and list(in_bigquery[0]) == list(FLOW_COLUMN_NAMES)
    assert in_bigquery == local
    assert len(in_bigquery) == nfstream_flow_count(capture)
    assert query(client, f"SELECT * FROM `{PROJECT}.{dataset}.flow_logs_errors`") == []
    table = client.get_table(f"{PROJECT}.{dataset}.flow_logs")
    assert (table.time_partitioning.field, table.clustering_fields) == (
        "first_seen_at", ["src_addr", "dst_addr", "protocol"])


@pytest.mark.emulator
def test_an_incompatible_table_is_a_usage_error_before_any_packet(capture, bigquery_emulator,
                                                                 dataset, tmp_path, capsys):
    client = client_for(bigquery_emulator)
    client.create_table(bigquery.Table(f"{PROJECT}.{dataset}.flow_logs",
                                       schema=[bigquery.SchemaField("id", "INT64")]))
    code = run(["--input", str(capture), "--output", str(tmp_path), RUNNER,
                "--output_table", f"{PROJECT}:{dataset}.flow_logs",
                "--bq_endpoint", bigquery_emulator.url])
    assert code == 2, CONTRACT
    assert (f"table {PROJECT}:{dataset}.flow_logs exists with a schema flowbeam cannot write "
            "to: column id is INT64, flowbeam writes STRING; missing column community_id "
            "(STRING);") in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "flows-*.parquet"))
    assert client.get_table(f"{PROJECT}.{dataset}.flow_logs").num_rows == 0


def test_a_bad_table_spec_is_a_usage_error(capture, tmp_path, capsys):
    code = run(["--input", str(capture), "--output", str(tmp_path), RUNNER,
                "--output_table", "flow_logs"])
    assert code == 2, CONTRACT
    assert ("--output_table 'flow_logs' is not a table spec: use PROJECT:DATASET.TABLE or "
            "PROJECT.DATASET.TABLE") in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "flows-*.parquet"))
