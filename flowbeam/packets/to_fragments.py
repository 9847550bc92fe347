"""Packets to fragments: the one pure step every packet source runs.

A capture file (``transforms.capture_files``) and a Pub/Sub packet batch both arrive as
``RecordBatch``es of one capture; this step decodes them (``PacketDecoder``) and pre-aggregates
the packets into flow fragments (``FragmentAggregator``), keeping the counts a run reports:
packets, bytes (as ``byte_accounting`` counts them), malformed packets per reason, and link
types it could not decode. The Beam DoFns around it only add metrics and dead letters.
"""

from __future__ import annotations

from collections.abc import Mapping

from flowbeam.capture.records import RecordBatch
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.aggregation import FragmentAggregator
from flowbeam.packets.columns import PacketColumns
from flowbeam.packets.decoder import PacketDecoder


class PacketsToFragments:
    """The record batches of one capture in, fragments out; feed every batch, then ``finish``.

    ``sensor`` scopes the flow keys: the same 5-tuple seen by two sensors is two flows.

    ``packets`` and ``bytes`` count the decoded IP packets so far; ``malformed`` and
    ``unknown_linktypes`` are what the decoder skipped.
    """

    def __init__(self, idle_timeout_us: int, active_timeout_us: int,
                 byte_accounting: str = "ip", sensor: str = "") -> None:
        self._frame_bytes = byte_accounting == "frame"
        self._decoder = PacketDecoder()
        self._aggregator = FragmentAggregator(
            idle_timeout_us, active_timeout_us, byte_accounting=byte_accounting, scope=sensor)
        self.packets = 0
        self.bytes = 0

    def add(self, batch: RecordBatch) -> list[Fragment]:
        """Fragments that are complete after this batch (most stay open until ``finish``)."""
        return self._aggregate(self._decoder.decode(batch))

    def finish(self) -> list[Fragment]:
        """The capture has ended: every remaining fragment, IP fragments still waiting
        for their first fragment included."""
        return self._aggregate(self._decoder.flush()) + self._aggregator.finish()

    @property
    def malformed(self) -> Mapping[str, int]:
        """Packets skipped, per reason."""
        return self._decoder.errors

    @property
    def unknown_linktypes(self) -> frozenset[int]:
        return frozenset(self._decoder.unknown_linktypes)

    def _aggregate(self, packets: PacketColumns) -> list[Fragment]:
        self.packets += len(packets)
        column = packets.frame_bytes if self._frame_bytes else packets.ip_bytes
        self.bytes += int(column.sum())
        return self._aggregator.add(packets)
