"""s3:// inputs through Beam's S3 filesystem, against a real moto server on 127.0.0.1."""

from __future__ import annotations

import gzip

import boto3
import pytest

from flowbeam.capture.writer import write_pcap
from flowbeam.synthetic import generate_packets, plan_traffic
from pipelines.pcap_flows import run
from tests.local_servers import running_moto
from tests.test_pcap_pipeline import as_expected, read_errors, read_flows, truth

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
               "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    with running_moto() as url:
        yield url, boto3.client("s3", endpoint_url=url, **CREDENTIALS)


def s3_flags(url: str) -> list[str]:
    return ["--s3_endpoint_url", url, "--s3_access_key_id", CREDENTIALS["aws_access_key_id"],
            "--s3_secret_access_key", CREDENTIALS["aws_secret_access_key"],
            "--s3_region_name", CREDENTIALS["region_name"], "--runner=FnApiRunner"]


def test_s3_glob_of_plain_and_gzipped_captures(s3_endpoint, tmp_path):
    url, client = s3_endpoint
    client.create_bucket(Bucket="captures")
    # One capture rotated into two objects, the second gzip'd: flows crossing the cut are whole.
    plan = plan_traffic(flows=90, packets=1800, seed=21)
    packets = list(generate_packets(plan))
    half = len(packets) // 2
    with open(tmp_path / "a.pcap", "wb") as stream:
        write_pcap(stream, packets[:half])
    with gzip.open(tmp_path / "b.pcap.gz", "wb") as stream:
        write_pcap(stream, packets[half:])
    client.upload_file(str(tmp_path / "a.pcap"), "captures", "2026/11/a.pcap")
    client.upload_file(str(tmp_path / "b.pcap.gz"), "captures", "2026/11/b.pcap.gz")
    client.put_object(Bucket="captures", Key="2026/11/c.pcap", Body=b"not a capture")

    output = tmp_path / "out"
    assert run(["--input", "s3://captures/2026/11/*", "--output", str(output),
                *s3_flags(url)]) == 0
    assert sorted(as_expected(r) for r in read_flows(output)) == truth(plan)
    [error] = read_errors(output)
    assert (error["source"], error["stage"]) == ("s3://captures/2026/11/c.pcap", "read_capture")
    assert error["reason"].startswith("not a pcap or pcapng file")


def test_an_s3_pattern_matching_nothing_is_reported(s3_endpoint, tmp_path, capsys):
    url, client = s3_endpoint
    client.create_bucket(Bucket="empty")
    assert run(["--input", "s3://empty/*.pcap", "--output", str(tmp_path), *s3_flags(url)]) == 1
    assert "flowbeam: no file matches 's3://empty/*.pcap'" in capsys.readouterr().err
