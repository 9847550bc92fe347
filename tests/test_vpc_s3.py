"""The VPC pipeline on s3:// inputs (a real moto server on 127.0.0.1): the flow log and the
Firehose file of the end-to-end test, read where AWS would deliver them."""

from __future__ import annotations

import boto3

from pipelines.vpc_flows import run
from tests.test_pcap_pipeline import read_errors, read_flows, summary_of
from tests.test_s3_input import CREDENTIALS, s3_flags


def test_flow_logs_and_envelopes_from_s3(vpc_inputs, ec2_endpoint, tmp_path, capsys):
    flow_log, envelopes, _ = vpc_inputs
    url, _ = ec2_endpoint
    s3 = boto3.client("s3", endpoint_url=url, **CREDENTIALS)
    s3.create_bucket(Bucket="logs")
    prefix = "AWSLogs/123456789010/vpcflowlogs/us-east-1/2019/08/26"
    s3.upload_file(str(flow_log), "logs", f"{prefix}/{flow_log.name}")
    s3.upload_file(str(envelopes), "logs", f"firehose/2016/06/19/{envelopes.name}")
    output = tmp_path / "out"
    assert run(["--input", f"s3://logs/{prefix}/*.log.gz", "--input",
                "s3://logs/firehose/2016/06/19/*", "--output", str(output),
                *s3_flags(url)]) == 0
    summary = summary_of(capsys.readouterr().out)
    assert (summary["files read"], summary["flow records"], summary["malformed records"]) == (
        "2", str(8 + 139), "1")
    [error] = read_errors(output)
    assert error["source"] == f"s3://logs/{prefix}/{flow_log.name}"
    rows = read_flows(output)
    assert sorted({row["sensor"] for row in rows}) == ["eni-12345678", "eni-1235b8ca123456789"]
    assert sum(row["src_bytes"] + row["dst_bytes"] for row in rows if row["sensor"] == (
        "eni-1235b8ca123456789")) == 568 + 376 + 100701 + 632 + 63388 + 23294588 + 1260 + 967
