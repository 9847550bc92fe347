"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flowbeam.synthetic import TrafficPlan, write_capture
from tests.bigquery_emulator import EmulatorEndpoint, running_emulator


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
