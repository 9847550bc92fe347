"""The streaming form of the VPC pipeline, as a user runs it: ``python -m pipelines.vpc_flows
--kinesis_stream NAME`` (no ``--kinesis_stop_at_latest``) against a moto server on 127.0.0.1,
fed by a real CloudWatch Logs subscription, subnets from EC2, stopped with Ctrl-C. It runs on
the local streaming runner (``transforms.direct_streaming``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowbeam.vpc.schemas import DENIED_FLOWS, SUBNET_TRAFFIC
from tests.kinesis_servers import REGION
from tests.test_pcap_pipeline import read_flows
from tests.test_pubsub_flows import stop
from tests.test_vpc_kinesis import put_lines, stream_data, subscribed_stream
from tests.test_vpc_pipeline import read_table
from tests.test_vpc_subnets import make_subnets

pytestmark = pytest.mark.emulator
ROOT = Path(__file__).parents[1]

# A TCP conversation out of subnet "web" (10.20.1.0/24) and its reply, logged by the
# instance's interface, and a rejected SSH probe into it. Version 2 records have no TCP flags:
# the initiator is the record that started first.
REQUEST = ("2 123456789010 eni-0a1 10.20.1.5 198.51.100.7 40000 443 6 10 5000 "
           "1699999990 1700000050 ACCEPT OK")
REPLY = ("2 123456789010 eni-0a1 198.51.100.7 10.20.1.5 443 40000 6 8 12000 "
         "1700000000 1700000050 ACCEPT OK")
PROBE = ("2 123456789010 eni-0a1 203.0.113.9 10.20.1.5 51515 22 6 1 40 "
         "1700000010 1700000050 REJECT OK")
MINUTE = "2023-11-14T22:13:00+00:00"  # 1699999980: the minute all three started in


def wait_for(output: Path, patterns: list[str], timeout_s: float = 150.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(list(output.glob(pattern)) for pattern in patterns):
            return True
        time.sleep(1.0)
    return False


def test_the_stream_is_followed_until_stopped(aws, ec2_endpoint, tmp_path):
    url, kinesis, logs = aws
    subnet_ids, _ = make_subnets(ec2_endpoint[1])
    web = subnet_ids["web"]
    subscribed_stream(kinesis, logs, "live")
    output = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.vpc_flows", "--kinesis_stream", "live",
         "--kinesis_endpoint", url, "--aws_region", REGION, "--start_position", "trim_horizon",
         "--subnets_from_ec2", "--ec2_endpoint", url, "--log_denied", "--idle_timeout", "5",
         "--output", str(output), "--output_every", "5"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        put_lines(logs, "live", [REQUEST, REPLY, PROBE])
        # A producer retry: the same envelope again; its events count once.
        [delivered] = stream_data(kinesis, "live")
        kinesis.put_record(StreamName="live", Data=delivered, PartitionKey="retry")
        written = wait_for(output, ["flows-*.parquet", "denied_flows-*.parquet",
                                    "subnet_traffic-*.parquet"])
    finally:
        exit_code, log = stop(process)
    assert written, log
    assert exit_code == 0, log
    assert "using EC2's subnets at start-up" in log

    flows = sorted(read_flows(output), key=lambda row: row["src_addr"])
    assert [(row["src_addr"], row["src_port"], row["dst_addr"], row["dst_port"], row["protocol"],
             row["src_packets"], row["src_bytes"], row["dst_packets"], row["dst_bytes"],
             row["action"], row["sensor"], row["src_subnet"], row["dst_subnet"])
            for row in flows] == [
        ("10.20.1.5", 40000, "198.51.100.7", 443, "tcp", 10, 5000, 8, 12000, "ACCEPT",
         "eni-0a1", web, None),
        ("203.0.113.9", 51515, "10.20.1.5", 22, "tcp", 1, 40, 0, 0, "REJECT",
         "eni-0a1", None, web)]

    [denied] = read_table(output, DENIED_FLOWS)
    assert (denied["src_addr"], denied["dst_addr"], denied["dst_port"], denied["packets"],
            denied["bytes"], denied["dst_subnet"]) == ("203.0.113.9", "10.20.1.5", 22, 1, 40, web)
    assert log.count("flowbeam denied ") == 1

    traffic = read_table(output, SUBNET_TRAFFIC)
    assert sorted((row["minute"].isoformat(), row["subnet"], row["subnet_name"], row["direction"],
                   row["action"], row["flows"], row["packets"], row["bytes"])
                  for row in traffic) == [
        (MINUTE, web, "web", "inbound", "ACCEPT", 1, 8, 12000),
        (MINUTE, web, "web", "inbound", "REJECT", 1, 1, 40),
        (MINUTE, web, "web", "outbound", "ACCEPT", 1, 10, 5000)]
