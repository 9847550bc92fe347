"""The reduction of one flush window of the fragment aggregator into rows.

The open rows of earlier windows and the window's packets, sorted by (key hash, time), are cut
into rows where the key changes, where ``first - last so far >= idle``, and at active-timeout
chain points, and reduced with ``ufunc.reduceat``; each row is then kept open, held until its
``open_at_end`` is known, or emitted.

The rare cases take a slow path that runs ``flow_engine.split_rows`` itself on one-packet
fragments of just those keys: keys where a pure SYN comes at or after a FIN/RST (the 5-tuple
may be reused) and keys whose late packets overlap the key's open row. ``split_rows`` orders
fragments by content, so when a flow starts, ends and has its port reused within a single
microsecond, the rows before the reusing SYN go out as one-packet fragments (they would
otherwise sort after the SYN's row); the fast path never cuts two rows in one microsecond.
"""

from __future__ import annotations

from itertools import chain, repeat

import numpy as np

from flowbeam.flows.engine import split_rows
from flowbeam.flows.fragment import NO_TIME, SIDE_A, Continuation, FlowKey, Fragment, merge
from flowbeam.flows.protocols import TCP_FIN, TCP_RST
from flowbeam.packets.aggregation_columns import (
    INT64_MAX,
    Elements,
    ElementValues,
    Rows,
    Staged,
    elements,
    key_columns,
    value_columns,
)
from flowbeam.packets.range_state import HeadPackets, head_ends, head_packets, head_rows

_INT64_MIN = np.iinfo(np.int64).min
_FIN_RST_BOTH = (TCP_FIN | TCP_RST) | (TCP_FIN | TCP_RST) << 8


class Window:
    """The reduction of one flush window: the open rows of earlier windows plus new packets."""

    def __init__(self, idle: int, active: int, cut: int | None, max_ts: int,
                 late: bool, head_until: int | None = None) -> None:
        self._idle = idle
        self._active = active
        self._cut = cut  # None: the input has ended, everything is emitted
        self._max_ts = max_ts
        self._late = late  # some packets are older than the previous window's cut
        # A split read's range after the first: keys start with head packets (range_state).
        self._head_until = head_until
        self.head: HeadPackets | None = None  # the window's head packets, set by ``reduce``

    def reduce(self, open_rows: Rows, packets: list[Staged]) -> tuple[Rows, Rows, Rows]:
        """(rows kept open, final rows waiting for their open_at_end, rows to emit)."""
        if len(open_rows) == 0 and not packets:
            return Rows.empty(), Rows.empty(), Rows.empty()
        e = elements(open_rows, packets)
        key_starts = np.flatnonzero(np.concatenate(([True], e.key_change)))
        slow_keys = self._slow_keys(e, key_starts)
        head_end = None
        if self._head_until is not None:
            head_end = head_ends(e, key_starts, slow_keys, open_rows.head, self._idle,
                                 self._head_until)
            if head_end is not None:
                self.head = head_packets(e, key_starts, head_end)
        fast = self._fast_rows(e, key_starts, slow_keys, head_end)
        if not slow_keys.any():
            return fast
        key_ends = np.append(key_starts[1:], len(e))
        slow = self._slow_rows(e, key_starts[slow_keys], key_ends[slow_keys],
                               None if head_end is None else head_end[slow_keys])
        kept, closed, emitted = (Rows.concat([a, b]) for a, b in zip(fast, slow, strict=True))
        return kept, closed, emitted

    def _decide(self, rows: Rows, key_last: np.ndarray,
                head: np.ndarray | None) -> tuple[Rows, Rows, Rows]:
        """The last row of a key stays open until no packet still to come can join it (its
        last packet is ``idle`` before the cut); a final row whose ``open_at_end`` could
        still be True waits until ``last + idle <= newest timestamp``.

        Head rows (``range_state``) are never emitted: their packets went to the head. A
        key's last head row stays open as its tracker until a packet still to come would be
        a safe reset (``idle`` before the cut, and the cut at or after ``head_until``)."""
        if self._cut is None:
            return Rows.empty(), Rows.empty(), rows
        keep = key_last & (rows.last + self._idle > self._cut)
        closed = ~key_last & (rows.last + self._idle > self._max_ts)
        if head is None:
            return rows.take(keep), rows.take(closed), rows.take(~keep & ~closed)
        tracker = head & key_last & (keep | (self._cut < self._head_until))
        keep = (keep & ~head) | tracker
        closed &= ~head
        kept = rows.take(keep)
        kept.head = tracker[keep]
        return kept, rows.take(closed), rows.take(~keep & ~closed & ~head)

    def _slow_keys(self, e: Elements, key_starts: np.ndarray) -> np.ndarray:
        """Keys the vectorised rules cannot decide: possible port reuse, late overlaps."""
        slow = np.zeros(len(key_starts), bool)
        if len(e.syn_at):
            # A pure SYN at or after a FIN/RST of its key (ties included) may start a new
            # flow. An open row's flags, and those of its flow's earlier rows, count as seen
            # at its first packet: they all precede the window's packets. Times ascend
            # within a key: its last SYN and its first FIN/RST decide.
            o = e.opened
            ended = ((o.flags | o.prev_flags) & _FIN_RST_BOTH) != 0
            end_at = np.sort(np.concatenate((np.flatnonzero(e.tcp_flags & (TCP_FIN | TCP_RST)),
                                             e.open_at[ended])))
            slow = (_at_key(e.first, key_starts, e.syn_at, _INT64_MIN, last=True)
                    >= _at_key(e.first, key_starts, end_at, INT64_MAX, last=False))
        if self._late and len(e.open_at):
            # A late packet at or before the last packet of its key's open row: the running
            # maximum of last_us is no longer the previous element's last_us.
            open_last = np.where(e.is_open, e.last, _INT64_MIN)
            packet_first = np.where(e.is_open, INT64_MAX, e.first)
            slow |= (np.maximum.reduceat(open_last, key_starts)
                     >= np.minimum.reduceat(packet_first, key_starts))
        return slow

    def _fast_rows(self, e: Elements, key_starts: np.ndarray, slow_keys: np.ndarray,
                   head_end: np.ndarray | None) -> tuple[Rows, Rows, Rows]:
        """Rows cut at key changes, idle gaps and active-timeout chain points.

        Elements of a key are in time order and (outside slow keys) never overlap, so the
        running maximum of ``last_us`` is the previous element's. Slow keys are cut too (a
        key change is always a cut) but their rows are dropped: the slow path redoes them.
        """
        n = len(e)
        first = e.first
        boundary = np.empty(n, bool)
        np.greater_equal(np.diff(first), self._idle, out=boundary[1:])
        # After an open row the gap runs from its last packet.
        inner = e.open_at < n - 1
        after = e.open_at[inner] + 1
        boundary[after] = first[after] - e.opened.last[inner] >= self._idle
        boundary[key_starts] = True
        seg_starts = np.flatnonzero(boundary)
        seg_ends = np.append(seg_starts[1:], n)
        chained = np.flatnonzero(first[seg_ends - 1] - first[seg_starts] >= self._active)
        row_starts = seg_starts
        if len(chained):
            points = [self._chain(first, int(seg_starts[s]), int(seg_ends[s])) for s in chained]
            row_starts = np.union1d(seg_starts, np.concatenate(points))
        rows = e.rows(row_starts)
        self._flow_before(rows, row_starts, seg_starts[chained], seg_ends[chained])
        key_of_row = np.searchsorted(key_starts, row_starts, side="right") - 1
        key_last = np.append(key_of_row[1:] != key_of_row[:-1], True)
        head = head_rows(rows, key_of_row, head_end)
        fast = ~slow_keys[key_of_row]
        if not fast.all():
            rows, key_last = rows.take(fast), key_last[fast]
            head = None if head is None else head[fast]
        return self._decide(rows, key_last, head)

    def _chain(self, first: np.ndarray, start: int, end: int) -> np.ndarray:
        """Active-timeout chain points of one idle-delimited segment (a long flow): each row
        starts at the first element at or after its predecessor's start + active."""
        times = first[start:end]
        points = []
        anchor = int(times[0])
        while True:
            j = int(np.searchsorted(times, anchor + self._active, side="left"))
            if j >= len(times):
                return np.array(points, np.int64)
            points.append(start + j)
            anchor = int(times[j])

    @staticmethod
    def _flow_before(rows: Rows, row_starts: np.ndarray, chain_starts: np.ndarray,
                     chain_ends: np.ndarray) -> None:
        """Flags and last time of each row's earlier rows in its flow (after active timeouts):
        an open row carries its own (``Elements.rows``); rows a chain splits add their
        predecessors'."""
        prev_flags, prev_last = rows.prev_flags, rows.prev_last
        for lo, hi in zip(np.searchsorted(row_starts, chain_starts),
                          np.searchsorted(row_starts, chain_ends), strict=True):
            flags, last = int(prev_flags[lo]), int(prev_last[lo])
            for r in range(lo, hi - 1):
                flags |= int(rows.flags[r])
                last = max(last, int(rows.last[r]))
                prev_flags[r + 1], prev_last[r + 1] = flags, last

    def _slow_rows(self, e: Elements, starts: np.ndarray, ends: np.ndarray,
                   head_end: np.ndarray | None) -> tuple[Rows, Rows, Rows]:
        """Keys cut by ``flow_engine.split_rows`` itself, on one fragment per packet (and the
        key's open row, with its flow's earlier rows as the Continuation). The conversions
        to and from Python objects are done once for all slow keys of the window."""
        lengths = ends - starts
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        index = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lengths)
        packed_keys = e.keys.at(e.perm[starts])
        # Rows are cut per key within this aggregator, whose scope is one: leave it empty here.
        keys = list(zip(*key_columns(packed_keys, ""), strict=True))
        count = int(offsets[-1])
        values = e.values(index)
        fragments = list(map(tuple.__new__, repeat(Fragment, count), zip(
            chain.from_iterable(map(repeat, keys, lengths.tolist())),
            *value_columns(values, slice(None)), repeat(False, count), repeat((), count),
            strict=True)))
        continuations = self._continuations(values, offsets, keys)
        merged, prev_flags, prev_last, key_index = [], [], [], []
        bounds = offsets.tolist()
        for k, key_continuation in enumerate(continuations):
            for fragment, flags, last in self._split_key(fragments[bounds[k]:bounds[k + 1]],
                                                         key_continuation):
                merged.append(fragment)
                prev_flags.append(flags)
                prev_last.append(last)
                key_index.append(k)
        key_index = np.array(key_index)
        rows = _rows_of_fragments({name: column[key_index] for name, column in
                                   packed_keys.items()}, merged, prev_flags, prev_last)
        return self._decide(rows, np.append(key_index[1:] != key_index[:-1], True),
                            head_rows(rows, key_index, head_end))

    def _split_key(self, fragments: list[Fragment], continuation: Continuation | None,
                   ) -> list[tuple[Fragment, int, int]]:
        """One key's rows by ``split_rows``, each with its flow's earlier flags and last time.

        ``split_rows`` orders fragments by content, so two row fragments starting in the same
        microsecond (a flow that started, ended and saw its port reused within it) could
        swap places downstream. The earlier rows of such a group are therefore returned as
        their one-packet fragments, which sort exactly as the packets do; the group's last
        row starts with the pure SYN and holds only packets sorted after it, so it sorts
        after all of them.
        """
        flags, last = ((continuation.a_flags | continuation.b_flags << 8, continuation.last_us)
                       if continuation else (0, NO_TIME))
        rows = split_rows(fragments, self._idle, self._active, continuation)
        out: list[tuple[Fragment, int, int]] = []
        for row, following in zip(rows, [*rows[1:], None], strict=True):
            fragment = merge(row.fragments)
            if row.new_flow:
                flags, last = 0, NO_TIME
            if following is not None and following.fragments[0].first_us == fragment.first_us:
                out += [(part, 0, NO_TIME) for part in row.fragments]
            else:
                out.append((fragment, flags, last))
            flags |= fragment.a_flags | fragment.b_flags << 8
            last = max(last, fragment.last_us)
        return out

    @staticmethod
    def _continuations(values: ElementValues, offsets: np.ndarray,
                       keys: list[FlowKey]) -> list[Continuation | None]:
        """Per slow key: its open row's flow so far, when that row continues a flow after an
        active timeout (what ``split_rows`` needs to go on with it; packets have no
        ``prev_last``)."""
        continuations: list[Continuation | None] = [None] * len(keys)
        positions = np.flatnonzero(values.prev_last != NO_TIME)
        owners = np.searchsorted(offsets, positions, side="right") - 1
        for k, flags, last in zip(owners.tolist(), values.prev_flags[positions].tolist(),
                                  values.prev_last[positions].tolist(), strict=True):
            continuations[k] = Continuation(keys[k], SIDE_A, last, flags & 0xFF, flags >> 8)
        return continuations


def _at_key(first: np.ndarray, key_starts: np.ndarray, at: np.ndarray, default: int,
            last: bool) -> np.ndarray:
    """Per key, the time of its last (else first) element among the ascending positions
    ``at`` (``default``: none)."""
    out = np.full(len(key_starts), default, np.int64)
    if len(at):
        key = np.searchsorted(key_starts, at, side="right") - 1
        change = key[1:] != key[:-1]
        pick = np.append(change, True) if last else np.concatenate(([True], change))
        out[key[pick]] = first[at[pick]]
    return out


def _rows_of_fragments(keys: dict[str, np.ndarray], fragments: list[Fragment],
                       prev_flags: list[int], prev_last: list[int]) -> Rows:
    """The slow path's rows back as columns."""
    fields_of = list(zip(*fragments, strict=True))  # one tuple per Fragment field

    def field(name: str) -> np.ndarray:
        return np.array(fields_of[Fragment._fields.index(name)], np.int64)

    syn_us, syn_sender = field("syn_us"), field("syn_sender")
    return Rows(
        **keys,
        t2=field("first_us") * 2 + field("first_sender"), last=field("last_us"),
        a_pk=field("a_packets"), a_by=field("a_bytes"),
        b_pk=field("b_packets"), b_by=field("b_bytes"),
        flags=(field("a_flags") | field("b_flags") << 8).astype(np.uint16),
        syn2=np.where(syn_us == NO_TIME, INT64_MAX, syn_us * 2 + syn_sender),
        prev_flags=np.array(prev_flags, np.uint16), prev_last=np.array(prev_last, np.int64),
        head=np.zeros(len(fragments), bool))
