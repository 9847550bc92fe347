"""Packets to fragments: the one pure step every packet source runs.

A capture file (``transforms.capture_files``) and a Pub/Sub packet batch both arrive as
``RecordBatch``es of one capture; this step decodes them (``PacketDecoder``) and pre-aggregates
the packets into flow fragments (``FragmentAggregator``), keeping the counts a run reports:
packets, bytes (as ``byte_accounting`` counts them), malformed packets per reason, and link
types it could not decode. The Beam DoFns around it only add metrics and dead letters.

A split read's range (``flowbeam.capture.splits``) ends with ``finish_range`` instead of
``finish``; ``fold_ranges`` then turns its file's range states into the remaining fragments.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.aggregation import FragmentAggregator
from flowbeam.packets.columns import COLUMN_NAMES, PacketColumns
from flowbeam.packets.decoder import PacketDecoder
from flowbeam.packets.range_state import RangeState

# The wire length given to records decoded only for context (``resolve``): no real frame has
# it, so their rows are told apart from the waiting fragments they release.
_CONTEXT_WIRELEN = -1


class PacketsToFragments:
    """The record batches of one capture in, fragments out; feed every batch, then ``finish``.

    ``sensor`` scopes the flow keys: the same 5-tuple seen by two sensors is two flows.
    ``heads``: the batches are a split read's range after the first (``range_state``).

    ``packets`` and ``bytes`` count the decoded IP packets so far; ``malformed`` and
    ``unknown_linktypes`` are what the decoder skipped.
    """

    def __init__(self, idle_timeout_us: int, active_timeout_us: int,
                 byte_accounting: str = "ip", sensor: str = "", heads: bool = False) -> None:
        self._frame_bytes = byte_accounting == "frame"
        self._decoder = PacketDecoder()
        self._aggregator = FragmentAggregator(
            idle_timeout_us, active_timeout_us, byte_accounting=byte_accounting, scope=sensor,
            heads=heads)
        self.packets = 0
        self.bytes = 0
        self._priming = False

    def prime(self, batch: RecordBatch) -> None:
        """Decode records before a split read's range only for the first IP fragments they
        hold (``flowbeam.capture.splits``): nothing of theirs is emitted or counted."""
        self._decoder.decode(batch)
        self._priming = True

    def add(self, batch: RecordBatch) -> list[Fragment]:
        """Fragments that are complete after this batch (most stay open until ``finish``)."""
        self._end_priming()
        return self._aggregate(self._decoder.decode(batch))

    def resolve(self, batch: RecordBatch) -> list[Fragment]:
        """Decode records after a split read's range only to complete its waiting fragments:
        the fragments they release are emitted and counted, nothing of their own is."""
        self._end_priming()
        errors = collections.Counter(self._decoder.errors)
        linktypes = set(self._decoder.unknown_linktypes)
        context = dataclasses.replace(batch, wirelen=np.full(len(batch), _CONTEXT_WIRELEN))
        decoded = self._decoder.decode(context)
        self._decoder.errors.clear()
        self._decoder.errors.update(errors)
        self._decoder.unknown_linktypes.intersection_update(linktypes)
        released = decoded.frame_bytes != _CONTEXT_WIRELEN
        return self._aggregate(PacketColumns(**{name: getattr(decoded, name)[released]
                                                for name in COLUMN_NAMES}))

    def finish(self) -> list[Fragment]:
        """The capture has ended: every remaining fragment, IP fragments still waiting
        for their first fragment included."""
        self._end_priming()
        return self._aggregate(self._decoder.flush()) + self._aggregator.finish()

    def finish_range(self) -> tuple[list[Fragment], RangeState]:
        """A split read's range has ended: its fragments that are final, and the state its
        file's ``fold_ranges`` goes on from."""
        self._end_priming()
        fragments = self._aggregate(self._decoder.flush())
        final, state = self._aggregator.handoff()
        return fragments + final, state

    @property
    def malformed(self) -> Mapping[str, int]:
        """Packets skipped, per reason."""
        return self._decoder.errors

    @property
    def unknown_linktypes(self) -> frozenset[int]:
        return frozenset(self._decoder.unknown_linktypes)

    def _end_priming(self) -> None:
        """Forget what the primers left: their waiting fragments and their counts."""
        if self._priming:
            self._priming = False
            self._decoder.flush()
            self._decoder.errors.clear()
            self._decoder.unknown_linktypes.clear()

    def _aggregate(self, packets: PacketColumns) -> list[Fragment]:
        self.packets += len(packets)
        column = packets.frame_bytes if self._frame_bytes else packets.ip_bytes
        self.bytes += int(column.sum())
        return self._aggregator.add(packets)


def fold_ranges(states: Iterable[RangeState], idle_timeout_us: int, active_timeout_us: int,
                sensor: str = "") -> list[Fragment]:
    """The fragments a split read's ranges left to their file (their states, in range order):
    with the ranges' own fragments, exactly those of one whole read."""
    aggregator = FragmentAggregator(idle_timeout_us, active_timeout_us, scope=sensor)
    fragments = []
    for state in states:
        fragments += aggregator.resume(state)
    return fragments + aggregator.finish()
