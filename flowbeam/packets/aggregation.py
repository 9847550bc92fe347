"""Packets to flow fragments at NumPy speed, so the shuffle scales with flows, not packets.

``FragmentAggregator`` turns decoded ``PacketColumns`` into ``flow_engine.Fragment``s: one per
flow row (see ``flow_engine.split_rows``) and flush window. ``BuildFlows`` later merges
fragments from anywhere, so the one contract that matters is::

    advance(my fragments of a key, idle, active, None) == advance(one fragment per packet, ...)

which holds when every fragment lies inside one row of the per-packet rules *and* no rule
would look inside it: a fragment that straddles an idle gap, a port reuse or an active-timeout
chain point would be cut differently (or not at all) by ``split_rows``.

How (the common case never builds a Python object per packet):

- ``add`` turns each batch into key columns at once (direction-independent key packed into
  five uint64 columns plus a 64-bit hash, see ``aggregation_columns``) and stages them;
- every ``flush_every_packets`` packets, the staged packets and the still-open rows of earlier
  windows (NumPy columns, one row per key) are sorted by (key hash, time), cut into rows where
  the key changes, where ``first - last so far >= idle``, and at active-timeout chain points,
  and reduced with ``ufunc.reduceat`` (``aggregation_window``);
- only rows that can no longer change become ``Fragment`` objects; the last row of every key
  stays open as NumPy columns until no packet that may still come can join it.

Exactness and the order of the input
------------------------------------
Inside a flush window any order is exact: the window is sorted. Across windows the aggregator
relies on the input being time-ordered up to ``max_disorder_us``: at each flush it reduces
only packets older than ``cut = newest timestamp - max_disorder_us`` and holds the others back
for the next window. If no packet arrives more than ``max_disorder_us`` older than the newest
one seen before it, every packet still to come is at or after the cut, so each open row
holds *all* packets of its key before the cut and every later packet sorts strictly after it.
The open row is then a true prefix of the per-packet order, which is why one aggregated row
is enough state:

- idle gaps: the running maximum of ``last_us`` is the open row's ``last_us``;
- port reuse: "has the flow ended?" needs only the OR of the flow's flags so far, which the
  open row keeps (including the flags of the flow's earlier, already emitted rows);
- active-timeout chains are exact across windows, not approximate: a row is chained from its
  first fragment's ``first_us``, that is a real packet time, and the open row keeps its row's
  true first packet (one fragment per row, never a partial row), so the next chain point
  ``first_us + active`` is the per-packet one. The rows a chain closes are final (later
  packets sort after the next row's start) and are emitted once their ``open_at_end`` is
  known to be False.

A row is emitted when its last packet is ``idle`` or more before the cut: every packet still
to come starts a new flow. The ``open_at_end`` of a fragment is ``last_us + idle > newest
timestamp`` at emission, which is False except in ``finish`` (where "newest" is the end of
the input), exactly as for one-packet fragments.

Packets older than the cut (disorder beyond ``max_disorder_us``, or beyond the hold-back cap
of ``max(flush_every_packets, 4096)`` packets) are never lost and are aggregated the same way,
but the rows may then differ from per-packet rows in these cases only: such a packet belongs
to a row already emitted (the flow rules evaluated on fragments then decide), it precedes the
first packet of its key's open row (moving that row's active-timeout chain), or it is a pure
SYN/FIN/RST whose place inside an aggregated row matters for port reuse. Idle-timeout rows
(all traffic that is not TCP, and TCP flows without port reuse or active timeouts) stay exact
under any disorder, since adding packets to a flow only ever closes idle gaps.

Split reads
-----------
The same contract holds for a capture read as byte ranges (``flowbeam.capture.splits``):
each range's aggregator sets aside the packets whose rows depend on earlier ranges
(``heads=True``) and ends with ``handoff`` instead of ``finish``; one more aggregator folds
the ranges' states in order with ``resume``, then ``finish``es. See ``range_state``.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from flowbeam.flows.fragment import Fragment
from flowbeam.packets.aggregation_columns import Rows, Staged, key_columns, stage, value_columns
from flowbeam.packets.aggregation_window import Window
from flowbeam.packets.columns import PacketColumns
from flowbeam.packets.range_state import HeadPackets, RangeState

DEFAULT_MAX_DISORDER_US = 100_000
MIN_HOLD_BACK_PACKETS = 4096


class FragmentAggregator:
    """Pre-aggregates one input's packets (a capture file, a batch stream) into fragments.

    ``add`` returns the fragments that can no longer change (often none); ``finish`` ends the
    input, returns everything still open and makes the aggregator ready for a new input.
    Memory is bounded by the flush window, the held-back packets and one row per open flow.

    ``heads``: the input is a split read's range after the first: set aside each key's head
    packets (``range_state``) and end with ``handoff``.
    """

    def __init__(self, idle_timeout_us: int, active_timeout_us: int, byte_accounting: str = "ip",
                 flush_every_packets: int = 500_000, *,
                 max_disorder_us: int = DEFAULT_MAX_DISORDER_US, scope: str = "",
                 heads: bool = False) -> None:
        if idle_timeout_us <= 0 or active_timeout_us <= 0:
            raise ValueError("idle and active timeouts must be positive")
        if byte_accounting not in ("ip", "frame"):
            raise ValueError(f"byte_accounting must be 'ip' or 'frame', not {byte_accounting!r}")
        if flush_every_packets <= 0 or max_disorder_us < 0:
            raise ValueError("flush_every_packets must be positive, max_disorder_us >= 0")
        self._idle = int(idle_timeout_us)
        self._active = int(active_timeout_us)
        self._frame_bytes = byte_accounting == "frame"
        self._flush_every = int(flush_every_packets)
        self._max_disorder = int(max_disorder_us)
        self._scope = scope  # the flow key's scope (a sensor name) of every fragment
        self._hold_cap = max(self._flush_every, MIN_HOLD_BACK_PACKETS)
        self._heads = heads
        self._reset()

    def _reset(self) -> None:
        self._staged: list[Staged] = []
        self._staged_count = 0
        self._held: Staged | None = None
        self._open = Rows.empty()  # the last row of every key with packets before the cut
        self._closed = Rows.empty()  # final rows whose open_at_end is not known yet
        self._max_ts: int | None = None
        self._cut: int | None = None  # packets before it are reduced into rows
        self._head_until: int | None = None  # heads: a safe reset is at or after it
        self._head: list[HeadPackets] = []  # heads: the head packets set aside

    def add(self, packets: PacketColumns) -> list[Fragment]:
        """Stage a batch; every ``flush_every_packets`` packets, return what is complete."""
        if len(packets) == 0:
            return []
        staged = stage(packets, self._frame_bytes)
        if self._heads and self._max_ts is None:
            # Earlier ranges' packets are at most max_disorder newer than any of this range.
            self._head_until = int(staged.t2.min() >> 1) + self._max_disorder + self._idle
        newest = int(staged.t2.max() >> 1)
        self._max_ts = newest if self._max_ts is None else max(self._max_ts, newest)
        self._staged.append(staged)
        self._staged_count += len(staged)
        if self._staged_count < self._flush_every:
            return []
        return self._flush(final=False)

    def finish(self) -> list[Fragment]:
        """End of input: every remaining row, ``open_at_end`` where ``last + idle > end``."""
        if self._heads:
            raise RuntimeError("a range with head packets ends with handoff, not finish")
        if self._max_ts is None:
            return []
        fragments = self._flush(final=True)
        self._reset()
        return fragments

    def handoff(self) -> tuple[list[Fragment], RangeState]:
        """End of a split read's range: what is final, and the state its file's fold goes on
        from (packets at or after the cut stay held back, as between flush windows)."""
        if self._max_ts is None:
            return [], RangeState.empty()
        fragments = self._flush(final=False)
        state = RangeState(HeadPackets.join(self._head) if self._head else None,
                           self._open.take(~self._open.head), self._closed, self._held,
                           self._cut, self._max_ts)
        self._reset()
        return fragments, state

    def resume(self, state: RangeState) -> list[Fragment]:
        """Fold the next range of a split read (``range_state``): reduce its head packets
        with the state so far at its cut, then take over its open rows and held packets."""
        if state.newest_us is None:
            return []
        if state.head is not None:
            self._staged.append(state.head.staged())
        self._max_ts = state.newest_us if self._max_ts is None else max(self._max_ts,
                                                                        state.newest_us)
        fragments = self._flush(final=False, cut=state.cut)
        self._open = Rows.concat([self._open, state.open])
        self._closed = Rows.concat([self._closed, state.closed])
        if state.held is not None:
            self._staged.append(state.held)
            self._staged_count += len(state.held)
        return fragments

    # -- one flush window -------------------------------------------------------------------

    def _flush(self, final: bool, cut: int | None = None) -> list[Fragment]:
        """Reduce a window; ``cut``: the cut to use (else the next one after the newest)."""
        assert self._max_ts is not None
        parts = ([self._held] if self._held is not None else []) + self._staged
        self._staged, self._staged_count, self._held = [], 0, None
        previous_cut = self._cut
        if not final:
            if cut is None:
                self._cut = self._next_cut(parts)
            elif self._cut is None or cut > self._cut:
                self._cut = cut
            parts, held = _split_at(parts, self._cut)
            self._held = Staged.join(held) if held else None
        late = previous_cut is not None and any(
            int(part.t2.min() >> 1) < previous_cut for part in parts)
        window = Window(self._idle, self._active, None if final else self._cut,
                        self._max_ts, late, self._head_until)
        kept, closed, emitted = window.reduce(self._open, parts)
        if window.head is not None:
            self._head.append(window.head)
        self._open = kept
        closed = Rows.concat([self._closed, closed])
        due = (closed.last + self._idle <= self._max_ts) | final
        self._closed = closed.take(~due)
        return _fragments(Rows.concat([emitted, closed.take(due)]), self._idle, self._max_ts,
                          self._scope)

    def _next_cut(self, parts: list[Staged]) -> int:
        """Packets at or after the cut wait for the next window (at most the hold-back cap);
        the cut never moves back."""
        assert self._max_ts is not None
        cut = self._max_ts - self._max_disorder
        held = sum(int(np.count_nonzero(part.t2 >= 2 * cut)) for part in parts)
        if held > self._hold_cap:
            ts = np.concatenate([part.t2 >> 1 for part in parts])
            kth = len(ts) - self._hold_cap
            cut = max(cut, int(np.partition(ts, kth)[kth]) + 1)
        return cut if self._cut is None else max(cut, self._cut)


def _split_at(parts: list[Staged], cut: int) -> tuple[list[Staged], list[Staged]]:
    """(packets before the cut, packets at or after it); input is mostly time-ordered, so
    usually only the last batches are split."""
    before, after = [], []
    for part in parts:
        hold = part.t2 >= 2 * cut  # t2 >> 1 >= cut, without the shifted copy
        if not hold.any():
            before.append(part)
        elif hold.all():
            after.append(part)
        else:
            before.append(part.take(~hold))
            after.append(part.take(hold))
    return before, after


def _fragments(rows: Rows, idle: int, max_ts: int, scope: str) -> list[Fragment]:
    """Fragment objects for emitted rows: the only per-row Python objects built."""
    count = len(rows)
    if count == 0:
        return []
    keys = zip(*key_columns(vars(rows), scope), strict=True)
    open_at_end = (rows.last + idle > max_ts).tolist()
    return list(map(tuple.__new__, repeat(Fragment, count),
                    zip(keys, *value_columns(rows, slice(None)), open_at_end,
                        repeat((), count), strict=True)))

