"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bigquery_emulator import EmulatorEndpoint, running_emulator


@pytest.fixture(scope="session")
def bigquery_emulator() -> Iterator[EmulatorEndpoint]:
    """Session-wide BigQuery emulator on 127.0.0.1: its endpoint URL and project id."""
    with running_emulator() as endpoint:
        yield endpoint
