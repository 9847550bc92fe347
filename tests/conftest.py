"""Fixtures shared by the whole suite."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from flowbeam.synthetic import TrafficPlan, write_capture
from tests.bigquery_emulator import EmulatorEndpoint, running_emulator
from tests.kinesis_servers import CREDENTIALS, REGION, KinesisEndpoint, kinesalite, moto_kinesis
from tests.local_servers import running_moto
from tests.test_vpc_pipeline import CONTROL, ENVELOPE, HEADER, SUBNETS_CSV, doc_lines


@pytest.fixture(scope="session")
def bigquery_emulator() -> Iterator[EmulatorEndpoint]:
    """Session-wide BigQuery emulator on 127.0.0.1: its endpoint URL and project id."""
    with running_emulator() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[Path, TrafficPlan]:
    """A 300-flow synthetic capture and its plan (the known answer), written once."""
    path = tmp_path_factory.mktemp("synthetic") / "traffic.pcap"
    return path, write_capture(str(path), flows=300, packets=6000, seed=11)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials for the local Kinesis servers (never real ones)."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def moto() -> Iterator[KinesisEndpoint]:
    """A moto server on 127.0.0.1 serving Kinesis, for one test module."""
    with moto_kinesis() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def lite() -> Iterator[KinesisEndpoint]:
    """kinesalite on 127.0.0.1 (splits and merges end correctly there), for one module."""
    with kinesalite() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def ec2_endpoint() -> Iterator[tuple[str, Any]]:
    """A moto server on 127.0.0.1 and its EC2 client (dummy credentials), for one module."""
    with running_moto() as url:
        yield url, boto3.client("ec2", endpoint_url=url, aws_access_key_id="testing",
                                aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture
def vpc_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An S3-style flow log (AWS's TCP flag sequence, a malformed line in the middle) and an
    envelope file: the real DATA_MESSAGE, a CONTROL_MESSAGE, the DATA_MESSAGE again (a
    redelivery), each its own gzip member as Firehose concatenates them."""
    lines = doc_lines("3 vpc-abcdefab012345678")
    assert len(lines) == 8
    flow_log = tmp_path / "123456789010_vpcflowlogs_us-east-1_fl-1_20190826T1945Z_x.log.gz"
    flow_log.write_bytes(gzip.compress(
        "\n".join([HEADER, *lines[:4], "3 vpc-1 subnet-1 broken", *lines[4:]]).encode() + b"\n"))
    # Firehose names its objects without .gz: found gzip'd by their content.
    envelopes = tmp_path / "firehose-1-2016-06-19-10-04-46-x"
    envelopes.write_bytes(b"".join(gzip.compress(text.encode()) for text in (
        ENVELOPE, json.dumps(CONTROL), ENVELOPE)))
    subnets = tmp_path / "subnets.csv"
    subnets.write_text(SUBNETS_CSV)
    return flow_log, envelopes, subnets


@pytest.fixture
def aws(ec2_endpoint, monkeypatch):
    """Kinesis and CloudWatch Logs clients of the moto server, credentials in the
    environment (as the pipeline finds them)."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    url, _ = ec2_endpoint
    return (url, boto3.client("kinesis", endpoint_url=url, region_name=REGION),
            boto3.client("logs", endpoint_url=url, region_name=REGION))
