"""The capture agent as the tests run it: a subprocess, its summary, and the packets of the
batches it published (decoded with the batch format's own ``decode_batch`` and the project's
reader, and checked against each batch's attributes on the way)."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowbeam.agent import batch_format as bf
from flowbeam.capture.reader import read_capture
from flowbeam.capture.records import RecordBatch
from tests.pubsub_emulator import REPO, Received

PCAPS = REPO.parent / "shared/data/pcaps"


def shared_capture(name: str) -> Path:
    """A real capture from ../shared/data/pcaps (skips the test where they are absent)."""
    path = PCAPS / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


FLOWBEAM = Path(sys.executable).with_name("flowbeam")


def agent_command(*args: str) -> list[str]:
    """The installed command (``flowbeam capture``), without progress lines."""
    return [str(FLOWBEAM), "capture", "--progress_seconds", "0", *args]


def agent_env(endpoint: str) -> dict[str, str]:
    """This environment without FLOWBEAM_* variables (only the arguments count), pointed at
    the emulator (never at Google: no network here)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBEAM_")}
    return {**clean, "PUBSUB_EMULATOR_HOST": endpoint}


def run_agent(endpoint: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the agent to its end (``env``: more variables); its output as text."""
    return subprocess.run(agent_command(*args), env={**agent_env(endpoint), **(env or {})},
                          cwd=REPO, text=True, capture_output=True, timeout=timeout,
                          check=False)


def summary_value(stdout: str, name: str) -> str:
    """One row of the agent's summary."""
    match = re.search(rf"^  {re.escape(name)} +(.*)$", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def file_packets(path: Path) -> list[tuple[int, bytes, int, int]]:
    """(ts_us, frame, wirelen, linktype) of every record, in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        return [packet for records in read_capture(stream) for packet in _records(records)]


def _records(records: RecordBatch) -> list[tuple[int, bytes, int, int]]:
    return [(ts, bytes(records.data[o:o + c]), w, lt) for ts, o, c, w, lt in zip(
        records.ts_us.tolist(), records.offsets.tolist(), records.caplen.tolist(),
        records.wirelen.tolist(), records.linktype.tolist(), strict=True)]


def ordered(messages: list[Received]) -> list[Received]:
    """Messages in (session, sequence) order: Pub/Sub may deliver them in any order."""
    return sorted(messages, key=lambda m: (m.attributes[bf.ATTR_SESSION],
                                           int(m.attributes[bf.ATTR_SEQUENCE])))


def batch_packets(messages: list[Received]) -> list[tuple[int, bytes, int, int]]:
    """The packets of all batches in (session, sequence) order, checking each batch."""
    packets = []
    for message in ordered(messages):
        info = bf.batch_info(message.attributes)
        pcap = bf.decode_batch(message.data, message.attributes)
        got = [p for records in read_capture(io.BytesIO(pcap)) for p in _records(records)]
        assert len(got) == info.packets and {p[3] for p in got} == {info.linktype}
        assert (min(p[0] for p in got), max(p[0] for p in got)) == (
            info.first_packet_us, info.last_packet_us)
        assert int(message.attributes[bf.ATTR_TS]) == info.first_packet_us // 1000
        packets += got
    return packets
