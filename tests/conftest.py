"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flowbeam.synthetic import TrafficPlan, write_capture
from tests.bigquery_emulator import EmulatorEndpoint, running_emulator
from tests.kinesis_servers import CREDENTIALS, KinesisEndpoint, kinesalite, moto_kinesis


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
