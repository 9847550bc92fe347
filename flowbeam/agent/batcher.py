"""Packets in, batches out: the agent's only decision about when to publish.

Pure (no clock, no I/O) so the thresholds can be tested exactly: the caller passes each
packet and, while the interface is quiet, the time of its capture clock. A batch is closed
when the first of these is reached:

- ``max_packets`` packets;
- ``max_bytes`` bytes of pcap file (header included): a packet that would take the batch past
  it starts the next batch, so a message never exceeds the cap (the CLI makes the cap hold at
  least one ``snaplen`` record);
- ``max_seconds`` of capture time after the batch's first packet: a packet at or after that
  deadline starts the next batch, and ``poll(now)`` closes a batch whose deadline has passed on
  a quiet interface, so a packet waits at most ``max_seconds`` (plus one poll) to be sent;
- a change of link type (a classic pcap file has one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowbeam.agent.batch_format import PCAP_HEADER_BYTES, RECORD_HEADER_BYTES
from flowbeam.capture.writer import CapturedPacket


@dataclass
class PacketBatch:
    """Packets of one link type, in arrival order, and their pcap file size."""

    linktype: int
    first_us: int  # time of the batch's first packet: the seconds threshold counts from it
    packets: list[CapturedPacket] = field(default_factory=list)
    pcap_bytes: int = PCAP_HEADER_BYTES


class Batcher:
    """Groups packets into ``PacketBatch``es by packets, bytes, seconds and link type."""

    def __init__(self, max_packets: int, max_bytes: int, max_seconds: float) -> None:
        if max_packets < 1:
            raise ValueError(f"max_packets must be at least 1, not {max_packets}")
        if max_bytes < PCAP_HEADER_BYTES + RECORD_HEADER_BYTES:
            raise ValueError(f"max_bytes must hold a pcap header and a record, not {max_bytes}")
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, not {max_seconds}")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.max_us = round(max_seconds * 1_000_000)
        self._open: PacketBatch | None = None

    def add(self, packet: CapturedPacket, linktype: int) -> list[PacketBatch]:
        """Add one packet; return the batches it closed (none, one or two, oldest first)."""
        closed = []
        ts_us = packet.ts_ns // 1000
        record = RECORD_HEADER_BYTES + len(packet.data)
        batch = self._open
        if batch is not None and (
            linktype != batch.linktype
            or batch.pcap_bytes + record > self.max_bytes
            or ts_us >= batch.first_us + self.max_us
        ):
            closed.append(batch)
            batch = None
        if batch is None:
            batch = PacketBatch(linktype, ts_us)
        batch.packets.append(packet)
        batch.pcap_bytes += record
        if len(batch.packets) >= self.max_packets or batch.pcap_bytes >= self.max_bytes:
            closed.append(batch)
            batch = None
        self._open = batch
        return closed

    def poll(self, now_us: int) -> PacketBatch | None:
        """Close and return the open batch if ``max_seconds`` have passed since its start."""
        batch = self._open
        if batch is not None and now_us >= batch.first_us + self.max_us:
            self._open = None
            return batch
        return None

    def flush(self) -> PacketBatch | None:
        """Close and return the open batch, if any (at the end of input or on shutdown)."""
        batch, self._open = self._open, None
        return batch
