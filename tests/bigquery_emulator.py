"""A real BigQuery emulator server (bqemulator) for tests, started offline on 127.0.0.1.

bqemulator 1.4.0 runs ``INSTALL spatial`` at start-up, a download that fails offline and aborts
the start. This module is also the tiny launcher that avoids it: run as a script, it replaces
``DuckDBEngine._load_spatial`` with a no-op (GEOGRAPHY is lost; flow rows have none) and then
runs bqemulator's own command line. site-packages stay untouched. The optional ``avro``
extension download is switched off through bqemulator's own setting
(``BQEMU_ENABLE_FORMAT_EXTENSIONS=false``) so the server never leaves 127.0.0.1.

The server is a separate process, reached over HTTP exactly like BigQuery, so the tests
exercise the same wire calls (tables.get/insert, tabledata.insertAll, jobs.query) the
pipeline makes in production.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
PROJECT_ID = "flowbeam-test"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EmulatorEndpoint:
    """Where a running emulator answers: the REST base URL and its default project."""

    url: str
    project: str


class EmulatorUnavailable(RuntimeError):
    """The emulator could not be started here (not installed, or it died at start-up)."""


def _answers(url: str) -> bool:
    """Whether the emulator's readiness probe says it is ready."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class BigQueryEmulator:
    """One bqemulator server process; use as a context manager or call start()/stop()."""

    def __init__(self, project: str = PROJECT_ID) -> None:
        self.project = project
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self.endpoint: EmulatorEndpoint | None = None

    def start(self) -> EmulatorEndpoint:
        """Launch the server and wait until it answers; raises EmulatorUnavailable."""
        # Imported here: this file also runs as the launcher script, where ``tests`` is not
        # importable.
        from tests.local_servers import free_port

        rest_port, grpc_port = free_port(), free_port()
        env = dict(os.environ, BQEMU_ENABLE_FORMAT_EXTENSIONS="false", BQEMU_LOG_LEVEL="warning")
        command = [
            sys.executable, str(Path(__file__).resolve()), "start", "--ephemeral",
            "--rest-host", HOST, "--rest-port", str(rest_port),
            "--grpc-host", HOST, "--grpc-port", str(grpc_port),
            "--project", self.project,
        ]
        self._process = subprocess.Popen(command, env=env, stdout=self._log,
                                         stderr=subprocess.STDOUT)
        url = f"http://{HOST}:{rest_port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                reason = f"bqemulator exited with {self._process.returncode}: {self.log_tail()}"
                self.stop()
                raise EmulatorUnavailable(reason)
            if _answers(url):
                self.endpoint = EmulatorEndpoint(url=url, project=self.project)
                return self.endpoint
            time.sleep(0.1)
        reason = f"bqemulator did not answer within {START_TIMEOUT_S:.0f} s: {self.log_tail()}"
        self.stop()
        raise EmulatorUnavailable(reason)

    def stop(self) -> None:
        """Terminate the server process (then kill it if it does not exit); idempotent."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        self._log.close()

    def log_tail(self, limit: int = 2000) -> str:
        """The end of the server's output, to explain a failed start."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:]

    def __enter__(self) -> EmulatorEndpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_emulator() -> Iterator[EmulatorEndpoint]:
    """A started emulator, or ``server_unavailable`` (a skip, a failure in CI) saying why it
    cannot start here, with its output."""
    from tests.local_servers import server_unavailable

    try:
        import bqemulator  # noqa: F401  (only to give a clear reason)
    except ImportError:
        server_unavailable("BigQuery emulator",
                           "bqemulator is not installed (pip install bqemulator==1.4.0)")
    emulator = BigQueryEmulator()
    try:
        endpoint = emulator.start()
    except (EmulatorUnavailable, OSError) as exc:
        server_unavailable("BigQuery emulator", f"could not start: {exc}")
    try:
        yield endpoint
    finally:
        emulator.stop()


def _serve() -> None:
    """Run bqemulator's command line with the spatial extension download skipped."""
    from bqemulator.cli import main
    from bqemulator.storage.engine import DuckDBEngine

    def _skip_spatial(self: DuckDBEngine) -> None:
        """Offline: no GEOGRAPHY support, which flow rows do not need."""

    DuckDBEngine._load_spatial = _skip_spatial
    main()


if __name__ == "__main__":
    _serve()
