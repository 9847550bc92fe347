"""Batches waiting on disk for Pub/Sub to come back (``--spool DIR``).

When the publisher's memory bound is reached during an outage, batches go here instead of
being dropped; and at shutdown, what memory still holds is written here, so a restart of the
agent (which sends the spool along with its new batches) loses nothing. One file per batch,
written to a temporary name and renamed, so a crash of the agent never leaves a half-written
batch under a batch name (there is no fsync: a power cut may lose the newest files). A file
is deleted only after Pub/Sub acknowledged the batch: after a crash a batch may be sent twice,
never not at all (``(sensor, session, sequence)`` identifies duplicates).

File layout: 4-byte big-endian length of the attributes as JSON, the JSON, then the data.
Names start with the time they were written (ns), so sorting them sends the oldest first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from flowbeam.agent.batch_format import ATTR_PACKETS, ATTR_SEQUENCE

SUFFIX = ".batch"
LOG = logging.getLogger(__name__)


@dataclass
class Message:
    """One batch ready to publish; ``spool_path`` is set while it lives in the spool."""

    data: bytes
    attributes: dict[str, str]
    packets: int
    spool_path: Path | None = None

    @property
    def size(self) -> int:
        """Data bytes: what the publisher's memory bound counts."""
        return len(self.data)


class Spool:
    """A directory of batch files, bounded by ``max_bytes`` of files.

    The waiting files are listed once at start and then kept in memory in name order, so
    taking the next one costs the same with 10 files or 100,000 (a long outage).
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(f"*{SUFFIX}.tmp"):  # a write cut short by a crash
            leftover.unlink()
        self.directory = directory
        self.max_bytes = max_bytes
        self._waiting = deque(sorted(directory.glob(f"*{SUFFIX}")))
        self._sending = 0  # files claimed and not yet removed or released
        self.bytes = sum(path.stat().st_size for path in self._waiting)

    def put(self, message: Message) -> bool:
        """Write ``message`` to a new file; False (nothing written) when it would not fit."""
        attributes = json.dumps(message.attributes, sort_keys=True).encode()
        blob = struct.pack(">I", len(attributes)) + attributes + message.data
        if self.bytes + len(blob) > self.max_bytes:
            return False
        sequence = message.attributes.get(ATTR_SEQUENCE, "")
        path = self.directory / f"{time.time_ns():020d}-{os.getpid()}-{sequence}{SUFFIX}"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(blob)  # no fsync: the capture thread waits on this write
        temporary.rename(path)
        self.bytes += len(blob)
        self._waiting.append(path)
        return True

    def claim_oldest(self) -> Message | None:
        """Load the oldest batch file not already being sent, and mark it as being sent.

        A file that cannot be read back (damaged on disk) is renamed ``*.damaged`` and
        skipped: kept for an operator, and never able to stop the batches behind it.
        """
        while self._waiting:
            path = self._waiting.popleft()
            try:
                blob = path.read_bytes()
                (length,) = struct.unpack_from(">I", blob)
                attributes = json.loads(blob[4 : 4 + length])
                packets = int(attributes[ATTR_PACKETS])
            except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
                LOG.warning("spool file %s is damaged (%s): set aside", path, error)
                with contextlib.suppress(OSError):  # (unless it is gone altogether)
                    self._rename(path, ".damaged")
                continue
            self._sending += 1
            return Message(blob[4 + length :], attributes, packets, spool_path=path)
        return None

    def release(self, message: Message) -> None:
        """The batch was not sent: its file is the next to try again."""
        self._sending -= 1
        self._waiting.appendleft(message.spool_path)

    def remove(self, message: Message) -> None:
        """The batch was sent: delete its file."""
        self._sending -= 1
        path = message.spool_path
        size = path.stat().st_size
        path.unlink()
        self.bytes -= size

    def set_aside(self, message: Message, suffix: str) -> None:
        """The batch can never be sent: rename its file to end in ``suffix`` (no longer a
        batch file, nor counted against the bound)."""
        self._sending -= 1
        self._rename(message.spool_path, suffix)

    def _rename(self, path: Path, suffix: str) -> None:
        size = path.stat().st_size
        path.rename(path.with_name(path.name + suffix))
        self.bytes -= size

    @property
    def files(self) -> int:
        """Batch files in the directory (waiting or being sent)."""
        return len(self._waiting) + self._sending
