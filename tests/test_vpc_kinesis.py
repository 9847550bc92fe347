"""VPC Flow Logs through a real CloudWatch Logs subscription into Kinesis (a moto server on
127.0.0.1): the envelopes CloudWatch Logs writes are decoded, and the pipeline reads the stream
(up to its latest record, a batch back-fill) into flows, denials and dead letters."""

from __future__ import annotations

import gzip
import json
import time

from flowbeam.vpc.envelopes import DATA_MESSAGE, decode_record
from flowbeam.vpc.schemas import DENIED_FLOWS
from pipelines.vpc_flows import run
from tests.kinesis_servers import REGION
from tests.test_pcap_pipeline import read_errors, read_flows, summary_of
from tests.test_vpc_envelopes import ENVELOPE
from tests.test_vpc_pipeline import read_table

LOG_GROUP, LOG_STREAM = "vpc-flow-logs", "eni-12345678-all"
MESSAGES = [event["message"] for event in json.loads(ENVELOPE)["logEvents"]]


def subscribed_stream(kinesis, logs, name: str) -> None:
    """A stream fed by a subscription filter on a new log group (what the README sets up)."""
    kinesis.create_stream(StreamName=name, ShardCount=1)
    arn = kinesis.describe_stream(StreamName=name)["StreamDescription"]["StreamARN"]
    logs.create_log_group(logGroupName=f"{LOG_GROUP}-{name}")
    logs.create_log_stream(logGroupName=f"{LOG_GROUP}-{name}", logStreamName=LOG_STREAM)
    logs.put_subscription_filter(
        logGroupName=f"{LOG_GROUP}-{name}", filterName="flowbeam", filterPattern="",
        destinationArn=arn, roleArn="arn:aws:iam::123456789012:role/CWLtoKinesisRole")


def put_lines(logs, name: str, lines: list[str]) -> None:
    now_ms = int(time.time() * 1000)
    logs.put_log_events(logGroupName=f"{LOG_GROUP}-{name}", logStreamName=LOG_STREAM,
                        logEvents=[{"timestamp": now_ms, "message": line} for line in lines])


def stream_data(kinesis, name: str) -> list[bytes]:
    [shard] = kinesis.list_shards(StreamName=name)["Shards"]
    iterator = kinesis.get_shard_iterator(StreamName=name, ShardId=shard["ShardId"],
                                          ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    return [record["Data"] for record in kinesis.get_records(ShardIterator=iterator)["Records"]]


def test_the_subscription_delivers_gzipped_data_messages(aws):
    _, kinesis, logs = aws
    subscribed_stream(kinesis, logs, "decoded")
    put_lines(logs, "decoded", MESSAGES)
    data = stream_data(kinesis, "decoded")
    assert data and all(d[:2] == b"\x1f\x8b" for d in data)
    envelopes = [decode_record(d) for d in data]
    assert {(e.message_type, e.log_group, e.log_stream) for e in envelopes} == {
        (DATA_MESSAGE, f"{LOG_GROUP}-decoded", LOG_STREAM)}
    assert [event.message for e in envelopes for event in e.events] == MESSAGES


def test_the_pipeline_reads_the_stream_to_its_latest_record(aws, tmp_path, capsys):
    url, kinesis, logs = aws
    subscribed_stream(kinesis, logs, "backfill")
    # AWS's ICMP example (the ping accepted, its reply rejected), a line that is no record.
    request = ("2 123456789010 eni-1235b8ca123456789 203.0.113.12 172.31.16.139 0 0 1 4 336 "
               "1432917027 1432917142 ACCEPT OK")
    reply = ("2 123456789010 eni-1235b8ca123456789 172.31.16.139 203.0.113.12 0 0 1 4 336 "
             "1432917094 1432917142 REJECT OK")
    put_lines(logs, "backfill", [request, reply, "not a record"])
    # A producer retry: the same envelope delivered twice, events de-duplicated by id.
    [delivered] = stream_data(kinesis, "backfill")
    bad_event = decode_record(delivered).events[2]
    kinesis.put_record(StreamName="backfill", Data=delivered, PartitionKey="retry")
    # Not an envelope at all.
    not_envelope = kinesis.put_record(StreamName="backfill", Data=gzip.compress(b"[]"),
                                      PartitionKey="x")
    output = tmp_path / "out"
    assert run(["--kinesis_stream", "backfill", "--kinesis_endpoint", url, "--aws_region",
                REGION, "--start_position", "trim_horizon", "--kinesis_stop_at_latest",
                "--output", str(output)]) == 0
    summary = summary_of(capsys.readouterr().out)
    assert {label: summary[label] for label in (
        "envelopes", "bad envelopes", "flow records", "malformed records", "denied records",
        "flows", "dead letters")} == {
        "envelopes": "2", "bad envelopes": "1", "flow records": "2", "malformed records": "1",
        "denied records": "1", "flows": "1", "dead letters": "2"}
    [row] = read_flows(output)
    assert (row["src_addr"], row["dst_addr"], row["protocol"], row["src_packets"],
            row["src_bytes"], row["dst_packets"], row["dst_bytes"], row["action"],
            row["sensor"], row["status"]) == (
        "203.0.113.12", "172.31.16.139", "icmp", 4, 336, 4, 336, "REJECT",
        "eni-1235b8ca123456789", "idle_timeout")
    [denied] = read_table(output, DENIED_FLOWS)
    assert (denied["src_addr"], denied["dst_addr"], denied["packets"], denied["bytes"]) == (
        "172.31.16.139", "203.0.113.12", 4, 336)
    errors = sorted(read_errors(output), key=lambda e: e["stage"])
    assert [(e["stage"], e["source"], e["reason"], e["payload"]) for e in errors] == [
        ("decode_envelope", "backfill", "not a subscription envelope: a JSON list",
         {"shard_id": not_envelope["ShardId"],
          "sequence_number": not_envelope["SequenceNumber"]}),
        ("parse_vpc_record", f"{LOG_GROUP}-backfill/{LOG_STREAM}",
         f"log event {bad_event.id}: 3 values for a format of 14 fields", "not a record")]


def last_sequence_numbers(kinesis, name: str) -> dict[str, str]:
    """Shard id -> the sequence number of its last record, as the stream has it now."""
    last = {}
    for shard in kinesis.list_shards(StreamName=name)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=name, ShardId=shard["ShardId"],
            ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records = kinesis.get_records(ShardIterator=iterator)["Records"]
        if records:
            last[shard["ShardId"]] = records[-1]["SequenceNumber"]
    return last


def flow_tuple(row: dict) -> tuple:
    return (row["src_addr"], row["dst_addr"], row["protocol"], row["src_port"],
            row["dst_port"], row["src_packets"], row["src_bytes"], row["dst_packets"],
            row["dst_bytes"], row["action"])


def test_a_resumed_back_fill_reads_only_what_came_since(aws, tmp_path):
    url, kinesis, logs = aws
    subscribed_stream(kinesis, logs, "incremental")
    eni = "2 123456789010 eni-1235b8ca123456789"
    put_lines(logs, "incremental", [  # AWS's ICMP example: the ping accepted, its reply not
        f"{eni} 203.0.113.12 172.31.16.139 0 0 1 4 336 1432917027 1432917142 ACCEPT OK",
        f"{eni} 172.31.16.139 203.0.113.12 0 0 1 4 336 1432917094 1432917142 REJECT OK"])

    def back_fill(output, *resume: str) -> None:
        assert run(["--kinesis_stream", "incremental", "--kinesis_endpoint", url,
                    "--aws_region", REGION, "--start_position", "trim_horizon",
                    "--kinesis_stop_at_latest=true", "--output", str(output), *resume]) == 0

    first = tmp_path / "first"
    back_fill(first)
    positions = json.loads((first / "kinesis_positions.json").read_text())
    assert positions == last_sequence_numbers(kinesis, "incremental") and positions
    assert [flow_tuple(row) for row in read_flows(first)] == [
        ("203.0.113.12", "172.31.16.139", "icmp", 0, 0, 4, 336, 4, 336, "REJECT")]

    put_lines(logs, "incremental", [  # later: a probe rejected, a connection accepted
        f"{eni} 198.51.100.7 172.31.16.139 0 0 1 2 168 1432918000 1432918060 REJECT OK",
        f"{eni} 172.31.16.139 198.51.100.9 44321 443 6 10 840 1432918000 1432918060 ACCEPT OK"])
    second = tmp_path / "second"
    back_fill(second, f"--kinesis_resume_after=@{first / 'kinesis_positions.json'}")
    assert sorted(flow_tuple(row) for row in read_flows(second)) == [
        ("172.31.16.139", "198.51.100.9", "tcp", 44321, 443, 10, 840, 0, 0, "ACCEPT"),
        ("198.51.100.7", "172.31.16.139", "icmp", 0, 0, 2, 168, 0, 0, "REJECT")]
    assert [(row["src_addr"], row["dst_addr"], row["packets"], row["bytes"])
            for row in read_table(second, DENIED_FLOWS)] == [
        ("198.51.100.7", "172.31.16.139", 2, 168)]
    later = json.loads((second / "kinesis_positions.json").read_text())
    assert later == last_sequence_numbers(kinesis, "incremental") != positions

    # Nothing new: nothing read, and the positions stay where they were.
    third = tmp_path / "third"
    back_fill(third, f"--kinesis_resume_after=@{second / 'kinesis_positions.json'}")
    assert read_flows(third) == [] and read_table(third, DENIED_FLOWS) == []
    assert json.loads((third / "kinesis_positions.json").read_text()) == later
