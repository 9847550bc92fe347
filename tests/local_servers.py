"""Start a test server process on 127.0.0.1 and wait until it answers (moto, GCS emulator)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the kernel just considered free on 127.0.0.1 (a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], ready: Callable[[], bool], name: str,
                   timeout_s: float = 20.0) -> Iterator[None]:
    """Run ``command`` until the block ends; skip the test when ``ready()`` never says yes."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.skip(f"{name} did not start")
            time.sleep(0.1)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
