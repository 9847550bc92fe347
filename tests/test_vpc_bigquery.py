"""The VPC pipeline's three BigQuery tables, on the BigQuery emulator (127.0.0.1): created at
start-up (partitioned, clustered), holding the same rows as the Parquet files, and the
README's example queries run on them."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from google.cloud import bigquery

from flowbeam.vpc.fields import DEFAULT_FORMAT
from flowbeam.vpc.schemas import DENIED_FLOWS, SUBNET_TRAFFIC
from pipelines.vpc_flows import run
from tests.test_pcap_pipeline import read_flows
from tests.test_readme import sql_block
from tests.test_vpc_envelopes import ENVELOPE
from tests.test_vpc_pipeline import read_table
from tests.test_vpc_records import doc_lines
from transforms.bigquery_config import STREAMING_INSERTS, BigQueryConfig, TableRef
from transforms.bigquery_tables import cloud_client

DATASET = "vpc"


def client_for(emulator) -> bigquery.Client:
    return cloud_client(BigQueryConfig(TableRef(emulator.project, DATASET, "flow_logs"),
                                       STREAMING_INSERTS, emulator.url))


def rows_of(client: bigquery.Client, sql: str) -> list[dict]:
    return [dict(row.items()) for row in client.query(sql).result()]


@pytest.mark.emulator
def test_the_three_tables_in_bigquery(vpc_inputs, bigquery_emulator, tmp_path):
    flow_log, envelopes, subnets = vpc_inputs
    project = bigquery_emulator.project
    client = client_for(bigquery_emulator)
    client.delete_dataset(DATASET, delete_contents=True, not_found_ok=True)
    client.create_dataset(DATASET)
    output = tmp_path / "out"
    ping = tmp_path / "ping.log"  # AWS's ICMP example, as an S3 file with its header line
    ping.write_text("\n".join([" ".join(DEFAULT_FORMAT), *doc_lines(
        "2 123456789010 eni-1235b8ca123456789 ")[3:5]]) + "\n")
    assert run(["--input", str(flow_log), "--input", str(envelopes), "--input", str(ping),
                "--subnets_file",
                str(subnets), "--output", str(output), "--runner=FnApiRunner",
                "--output_table", f"{project}:{DATASET}.flow_logs",
                "--bq_endpoint", bigquery_emulator.url]) == 0

    for table, parquet in (("flow_logs", read_flows(output)),
                           (SUBNET_TRAFFIC.name, read_table(output, SUBNET_TRAFFIC)),
                           (DENIED_FLOWS.name, read_table(output, DENIED_FLOWS))):
        in_bigquery = rows_of(client, f"SELECT * FROM `{project}.{DATASET}.{table}` ORDER BY id")
        assert in_bigquery == sorted(parquet, key=lambda row: row["id"]), table
    for spec in (SUBNET_TRAFFIC, DENIED_FLOWS):
        table = client.get_table(f"{project}.{DATASET}.{spec.name}")
        assert (table.time_partitioning.field, tuple(table.clustering_fields)) == (
            spec.partition_field, spec.clustering)
        assert [f.name for f in table.schema] == [c.name for c in spec.columns]

    def readme_query(marker: str, now: str) -> list[dict]:
        """The README query with ``marker``, on this dataset, "now" being ``now``."""
        sql = sql_block(marker).replace("`my-project.network.", f"`{project}.{DATASET}.")
        return rows_of(client, re.sub(r"CURRENT_TIMESTAMP\(\)", f"TIMESTAMP '{now}'", sql))

    # The day after the envelope's events (2016-06-19 10:04-10:06): its 14 REJECT records, all
    # to 10.100.21.62 (subnet-app), by source.
    denials = Counter(event["message"].split()[3] for event in json.loads(ENVELOPE)["logEvents"]
                      if " REJECT " in event["message"])
    assert sum(denials.values()) == 14 and len(denials) == 9
    assert [(r["dst_subnet"], r["src_addr"], r["denials"])
            for r in readme_query("AS denials", "2016-06-20 00:00:00+00")] == [
        ("subnet-app", address, count) for address, count in sorted(
            denials.items(), key=lambda item: (-item[1], item[0]))][:10]
    # The week before 2019-08-28: AWS's TCP example to 10.0.0.62 (subnet-dmz), by hour. On the
    # 26th (19:47-19:51) three records each way: the SYN, SYN and FIN of the clients, inbound;
    # the SYN-ACKs and the FIN of the server, outbound. On the 27th (19:12) one each way.
    assert [(r["hour"].isoformat(), r["subnet"], r["direction"], r["action"], r["flows"],
             r["packets"], r["bytes_total"])
            for r in readme_query("bytes_total", "2019-08-28 00:00:00+00")] == [
        ("2019-08-26T19:00:00+00:00", "subnet-dmz", "inbound", "ACCEPT", 3, 8 + 70 + 15774,
         568 + 100701 + 23294588),
        ("2019-08-26T19:00:00+00:00", "subnet-dmz", "outbound", "ACCEPT", 3, 7 + 12 + 1219,
         376 + 632 + 63388),
        ("2019-08-27T19:00:00+00:00", "subnet-dmz", "inbound", "ACCEPT", 1, 17, 1260),
        ("2019-08-27T19:00:00+00:00", "subnet-dmz", "outbound", "ACCEPT", 1, 14, 967)]
    # The day after AWS's ping example (2015-05-29): accepted in, its reply rejected out.
    assert readme_query("dst_packets > 0", "2015-05-30 00:00:00+00") == [
        {"interface": "eni-1235b8ca123456789", "src_addr": "203.0.113.12",
         "dst_addr": "172.31.16.139", "protocol": "icmp", "dst_port": 0, "src_packets": 4,
         "dst_packets": 4}]


def table_names(client: bigquery.Client) -> list[str]:
    return sorted(table.table_id for table in client.list_tables(DATASET))


@pytest.mark.emulator
def test_the_same_files_twice_leave_the_rows_of_one_run_in_every_table(
        vpc_inputs, bigquery_emulator, tmp_path):
    """A batch re-run (the default ``--bq_insert_mode merge``) stages all three tables and
    merges them on their ids: nothing is added twice, the staging tables are dropped."""
    flow_log, envelopes, subnets = vpc_inputs
    project = bigquery_emulator.project
    client = client_for(bigquery_emulator)
    client.delete_dataset(DATASET, delete_contents=True, not_found_ok=True)
    client.create_dataset(DATASET)
    runs = []
    for attempt in ("run1", "run2"):
        output = tmp_path / attempt
        assert run(["--input", str(flow_log), "--input", str(envelopes), "--subnets_file",
                    str(subnets), "--output", str(output), "--runner=FnApiRunner",
                    "--output_table", f"{project}:{DATASET}.flow_logs",
                    "--bq_endpoint", bigquery_emulator.url]) == 0
        runs.append({"flow_logs": read_flows(output),
                     SUBNET_TRAFFIC.name: read_table(output, SUBNET_TRAFFIC),
                     DENIED_FLOWS.name: read_table(output, DENIED_FLOWS)})
    first, second = runs
    for table, rows in first.items():
        by_id = sorted(rows, key=lambda row: row["id"])
        assert sorted(second[table], key=lambda row: row["id"]) == by_id, table  # same ids
        assert len(by_id) == len({row["id"] for row in rows}) > 0, table
        in_bigquery = rows_of(client, f"SELECT * FROM `{project}.{DATASET}.{table}` ORDER BY id")
        assert in_bigquery == by_id, table
    assert table_names(client) == sorted(
        name for table in ("flow_logs", SUBNET_TRAFFIC.name, DENIED_FLOWS.name)
        for name in (table, f"{table}_errors"))
