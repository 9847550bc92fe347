"""Start a test server process on 127.0.0.1 and wait until it answers (moto, GCS emulator);
``server_unavailable``, the one way a test gives up when its server cannot run here."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

HOST = "127.0.0.1"
# Set by .ci/run: there every server must start, so a skip for a missing server is a failure.
REQUIRE_SERVERS = "FLOWBEAM_REQUIRE_SERVERS"
LOG_TAIL_CHARS = 2000


def server_unavailable(name: str, reason: str, log_tail: str = "") -> NoReturn:
    """Give up on a test whose server ``name`` cannot run here, saying ``reason``.

    On a developer's machine the test is skipped (the ``-ra`` summary lists why). In CI
    (``FLOWBEAM_REQUIRE_SERVERS=1``, set by ``.ci/run``) it fails instead, because a suite
    that passes with its servers skipped has tested nothing of them. ``log_tail`` (the end of
    the server's output, if it ran) is appended to the message so a CI failure explains itself.

    Use it for every server a test starts (emulators, moto, network namespaces):
    ``server_unavailable("kinesalite", "exited with 1", log)``.
    """
    message = f"{name} is unavailable: {reason}"
    if log_tail:
        message += f"\n--- {name} output (end) ---\n{log_tail}"
    if os.environ.get(REQUIRE_SERVERS) == "1":
        pytest.fail(f"{message}\n({REQUIRE_SERVERS}=1: servers must start)", pytrace=False)
    pytest.skip(message)


MOTO_SERVER = Path(sys.executable).with_name("moto_server")


@contextlib.contextmanager
def running_moto() -> Iterator[str]:
    """A moto server (every AWS service moto has) on 127.0.0.1: its endpoint URL."""
    if not MOTO_SERVER.exists():
        server_unavailable("moto_server", f"{MOTO_SERVER} is absent (pip install 'moto[server]')")
    url = f"http://{HOST}:{free_port()}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # an HTTP answer of any status: it is serving
        except OSError:
            return False
        return True

    with running_server([str(MOTO_SERVER), "-H", HOST, "-p", url.rsplit(":", 1)[1]], answers,
                        "moto_server"):
        yield url


def free_port() -> int:
    """A port the kernel just considered free on 127.0.0.1 (a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], ready: Callable[[], bool], name: str,
                   timeout_s: float = 20.0) -> Iterator[None]:
    """Run ``command`` until the block ends; ``server_unavailable`` (skip, or fail in CI) with
    the server's output when ``ready()`` never says yes."""
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not ready():
                if server.poll() is not None:
                    reason = f"exited with {server.returncode} before answering"
                elif time.monotonic() > deadline:
                    reason = f"did not answer within {timeout_s:.0f} s"
                else:
                    time.sleep(0.1)
                    continue
                log.seek(0)
                server_unavailable(name, reason,
                                   log.read().decode(errors="replace")[-LOG_TAIL_CHARS:])
            yield
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
