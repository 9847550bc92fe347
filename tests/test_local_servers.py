"""A test whose server cannot start is skipped on a laptop but fails in CI (.ci/run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.local_servers import REQUIRE_SERVERS, running_server

# A "server" that prints a line and exits before it ever answers.
DYING_SERVER = [sys.executable, "-c", "print('port 1 is taken'); raise SystemExit(3)"]


def test_a_server_that_dies_skips_the_test_outside_ci(monkeypatch):
    monkeypatch.delenv(REQUIRE_SERVERS, raising=False)
    with pytest.raises(pytest.skip.Exception) as outcome, running_server(
            DYING_SERVER, lambda: False, "dying-server"):
        pass
    assert str(outcome.value) == ("dying-server is unavailable: exited with 3 before "
                                  "answering\n--- dying-server output (end) ---\n"
                                  "port 1 is taken\n")


def test_a_server_that_dies_fails_the_test_in_ci_with_its_output(monkeypatch):
    monkeypatch.setenv(REQUIRE_SERVERS, "1")
    with pytest.raises(pytest.fail.Exception) as outcome, running_server(
            DYING_SERVER, lambda: False, "dying-server"):
        pass
    assert str(outcome.value) == ("dying-server is unavailable: exited with 3 before "
                                  "answering\n--- dying-server output (end) ---\n"
                                  "port 1 is taken\n\n(FLOWBEAM_REQUIRE_SERVERS=1: servers "
                                  "must start)")


def test_ci_requires_the_servers():
    """.ci/run is what CI runs: it must switch the mode on."""
    script = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert f"export {REQUIRE_SERVERS}=1\n" in script
