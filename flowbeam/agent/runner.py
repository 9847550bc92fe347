"""The agent's loop: packets from a source, through the batcher, to the publisher.

One thread reads and batches (the capture must never wait on the network); the publisher's
own thread sends. The loop ends when the source ends (a replayed file) or the stop event is
set (SIGINT/SIGTERM); either way the open batch is flushed, so no captured packet is left
behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from flowbeam.agent.batch_format import encode_batch
from flowbeam.agent.batcher import Batcher, PacketBatch
from flowbeam.agent.publisher import Publisher
from flowbeam.agent.spool import Message
from flowbeam.capture.writer import CapturedPacket


class PacketSource(Protocol):
    """A live interface or a replayed file, as the loop sees it."""

    snaplen: int

    def chunks(self, stop: threading.Event) -> Iterator[tuple[int, list[CapturedPacket]]]: ...

    def now_us(self) -> int: ...

    def kernel_drops(self) -> int: ...


@dataclass
class LoopStats:
    """What the loop saw; the publisher keeps what happened to the batches after."""

    packets: int = 0
    batches: int = 0
    pcap_bytes: int = 0  # size of the batches as pcap files...
    message_bytes: int = 0  # ... and as messages (compressed or not)
    kernel_drops: int = 0
    started: float = 0.0  # time.monotonic() at start
    ended: float = 0.0


@dataclass(frozen=True)
class BatchSettings:
    """How batches are labelled and encoded (see ``batch_format``)."""

    sensor: str
    session: str
    compression: str


class AgentLoop:
    """Runs one source to its end (or to ``stop``), publishing every packet it yields."""

    def __init__(self, source: PacketSource, batcher: Batcher, publisher: Publisher,
                 settings: BatchSettings, *, progress_seconds: float,
                 progress: Callable[[str], None]) -> None:
        self._source = source
        self._batcher = batcher
        self._publisher = publisher
        self._settings = settings
        self._progress_seconds = progress_seconds
        self._progress = progress
        self._reported_drops = 0
        self.stats = LoopStats()

    def run(self, stop: threading.Event) -> None:
        """Read until the source ends or ``stop`` is set; always flush the open batch."""
        stats, batcher, source = self.stats, self._batcher, self._source
        stats.started = time.monotonic()
        next_progress = stats.started + self._progress_seconds
        try:
            for linktype, packets in source.chunks(stop):
                for packet in packets:
                    for batch in batcher.add(packet, linktype):
                        self._send(batch)
                stats.packets += len(packets)
                due = batcher.poll(source.now_us())
                if due is not None:
                    self._send(due)
                now = time.monotonic()
                if self._progress_seconds and now >= next_progress:
                    next_progress = now + self._progress_seconds
                    self._progress(self.progress_line())
        finally:
            last = batcher.flush()
            if last is not None:
                self._send(last)
            stats.kernel_drops = source.kernel_drops()
            stats.ended = time.monotonic()

    def _send(self, batch: PacketBatch) -> None:
        drops = self._source.kernel_drops()
        data, attributes = encode_batch(
            batch.packets, linktype=batch.linktype, sensor=self._settings.sensor,
            session=self._settings.session, sequence=self.stats.batches,
            kernel_drops=drops - self._reported_drops, snaplen=self._source.snaplen,
            compression=self._settings.compression)
        self._reported_drops = drops
        self.stats.batches += 1
        self.stats.pcap_bytes += batch.pcap_bytes
        self.stats.message_bytes += len(data)
        self._publisher.submit(Message(data, attributes, len(batch.packets)))

    def progress_line(self) -> str:
        """One line for the operator: how far capture and publishing got."""
        published = self._publisher.stats
        return (f"flowbeam capture: {self.stats.packets} packets, "
                f"{self._source.kernel_drops()} kernel drops, {self.stats.batches} batches, "
                f"{published.published_batches} published "
                f"({published.published_bytes / 1e6:.1f} MB), "
                f"{self._publisher.pending_batches} pending, "
                f"{published.spooled_batches} spooled, {published.failures} failures")
