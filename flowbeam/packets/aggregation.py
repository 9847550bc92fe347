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
  five uint64 columns plus a 64-bit hash) and stages them;
- every ``flush_every_packets`` packets, the staged packets and the still-open rows of earlier
  windows (NumPy columns, one row per key) are sorted by (key hash, time), cut into rows where
  the key changes, where ``first - last so far >= idle``, and at active-timeout chain points,
  and reduced with ``ufunc.reduceat``;
- only rows that can no longer change become ``Fragment`` objects; the last row of every key
  stays open as NumPy columns until no packet that may still come can join it.

The rare cases take a slow path that runs ``flow_engine.split_rows`` itself on one-packet
fragments of just those keys: keys where a pure SYN comes at or after a FIN/RST (the 5-tuple
may be reused) and keys whose late packets overlap the key's open row. ``split_rows`` orders
fragments by content, so when a flow starts, ends and has its port reused within a single
microsecond, the rows before the reusing SYN go out as one-packet fragments (they would
otherwise sort after the SYN's row); the fast path never cuts two rows in one microsecond.

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

Ties: ``first_sender`` and ``syn_sender`` follow ``flow_engine.merge``: at the same
microsecond side A wins (``merge`` orders by (time, side)), whatever the input order, so that
the result does not depend on how packets were split into fragments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import chain, repeat

import numpy as np

from flowbeam.flows.engine import split_rows
from flowbeam.flows.fragment import NO_TIME, SIDE_A, Continuation, FlowKey, Fragment, merge
from flowbeam.flows.protocols import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from flowbeam.packets.columns import PacketColumns

DEFAULT_MAX_DISORDER_US = 100_000
MIN_HOLD_BACK_PACKETS = 4096

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
_FIN_RST_BOTH = (TCP_FIN | TCP_RST) | (TCP_FIN | TCP_RST) << 8
_MAX_PORT = 0xFFFF
_MAX_VLAN = 0xFFFE  # stored as vlan + 1 in 16 bits


_KEY_FIELDS = ("misc", "a_hi", "a_lo", "b_hi", "b_lo", "hash")


class _Columns:
    """A dataclass of equal-length arrays: joined and sliced column by column."""

    @classmethod
    def join(cls, parts: list) -> _Columns:
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def take(self, index: np.ndarray) -> _Columns:
        return type(self)(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class _Staged(_Columns):
    """One batch of packets as key columns: what ``add`` keeps until the next flush."""

    t2: np.ndarray  # int64: ts_us * 2 + side (side 1 = B), so sorting by t2 is (time, side)
    misc: np.ndarray  # uint64: ip_version, protocol, vlan_id + 1, a_port, b_port packed
    a_hi: np.ndarray  # uint64
    a_lo: np.ndarray
    b_hi: np.ndarray
    b_lo: np.ndarray
    hash: np.ndarray  # uint64: hash of the five key columns
    nbytes: np.ndarray  # int64
    flags: np.ndarray  # uint8: TCP flags

    def __len__(self) -> int:
        return len(self.t2)


@dataclass
class _Rows(_Columns):
    """Rows as columns: the open rows, rows waiting to be emitted, a window's reduced rows.

    Flags hold side A in the low byte and side B in the high byte; ``t2`` is
    ``first_us * 2 + first_sender`` and ``syn2`` ``syn_us * 2 + syn_sender`` (INT64_MAX: no
    pure SYN), so a plain minimum gives ``merge``'s (time, side) order. ``prev_flags`` and
    ``prev_last`` describe the flow's earlier rows when this row continues a flow after an
    active timeout (0 and NO_TIME otherwise): what ``split_rows`` needs as a Continuation.
    """

    misc: np.ndarray
    a_hi: np.ndarray
    a_lo: np.ndarray
    b_hi: np.ndarray
    b_lo: np.ndarray
    hash: np.ndarray
    t2: np.ndarray
    last: np.ndarray
    a_pk: np.ndarray
    a_by: np.ndarray
    b_pk: np.ndarray
    b_by: np.ndarray
    flags: np.ndarray  # uint16
    syn2: np.ndarray
    prev_flags: np.ndarray  # uint16
    prev_last: np.ndarray

    def __len__(self) -> int:
        return len(self.t2)

    @classmethod
    def empty(cls) -> _Rows:
        dtypes = [np.uint64] * 6 + [np.int64] * 6 + [np.uint16, np.int64, np.uint16, np.int64]
        return cls(*(np.empty(0, dtype) for dtype in dtypes))

    @classmethod
    def concat(cls, parts: list[_Rows]) -> _Rows:
        """Joined non-empty parts (the empty rows when there are none)."""
        parts = [p for p in parts if len(p)]
        return cls.join(parts) if parts else cls.empty()


@dataclass
class _Elements:
    """A window's open rows and packets in (key, time) order, as the reduction needs them.

    Only time, bytes and flags go through the sort permutation (random access is what costs);
    per-side counts are derived from them in order and the few open rows patched in. Key
    columns stay unsorted in ``keys`` and are read at row starts through ``perm``.
    """

    keys: dict[str, np.ndarray]  # _KEY_FIELDS, unsorted: open rows first, then packets
    perm: np.ndarray  # sorted position -> unsorted index
    key_change: np.ndarray  # between sorted positions i and i + 1
    is_open: np.ndarray
    t2: np.ndarray
    last: np.ndarray
    a_pk: np.ndarray
    a_by: np.ndarray
    b_pk: np.ndarray
    b_by: np.ndarray
    flags: np.ndarray  # uint16
    syn2: np.ndarray
    prev_flags: np.ndarray  # uint16, meaningful for open rows only
    prev_last: np.ndarray

    def __len__(self) -> int:
        return len(self.t2)

    def rows(self, starts: np.ndarray) -> _Rows:
        """One row per run of elements. A run is in (time, side) order and (outside slow
        keys) its elements do not overlap: the first has the smallest (time, side), the
        last the latest ``last_us``."""
        source = self.perm[starts]
        return _Rows(
            *(self.keys[name][source] for name in _KEY_FIELDS),
            self.t2[starts], self.last[np.append(starts[1:], len(self)) - 1],
            np.add.reduceat(self.a_pk, starts), np.add.reduceat(self.a_by, starts),
            np.add.reduceat(self.b_pk, starts), np.add.reduceat(self.b_by, starts),
            np.bitwise_or.reduceat(self.flags, starts), np.minimum.reduceat(self.syn2, starts),
            np.zeros(len(starts), np.uint16), np.full(len(starts), NO_TIME, np.int64))


def _elements(open_rows: _Rows, packets: list[_Staged]) -> _Elements:
    """Sort the open rows and the window's packets by (key, time)."""
    n_open = len(open_rows)
    parts = [open_rows, *packets]
    keys = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _KEY_FIELDS}
    t2 = np.concatenate([p.t2 for p in parts])
    perm, key_change = _sort_by_key_and_time(keys, t2)
    t2 = t2[perm]
    nbytes = np.concatenate([np.zeros(n_open, np.int64)] + [p.nbytes for p in parts[1:]])[perm]
    flags = np.concatenate([np.zeros(n_open, np.uint8)] + [p.flags for p in parts[1:]])[perm]
    side = t2 & 1
    b_by = nbytes * side
    e = _Elements(
        keys=keys, perm=perm, key_change=key_change, is_open=perm < n_open, t2=t2,
        last=t2 >> 1, a_pk=1 - side, a_by=nbytes - b_by, b_pk=side, b_by=b_by,
        flags=flags.astype(np.uint16) << (side.astype(np.uint16) << 3),
        syn2=np.where((flags & (TCP_SYN | TCP_ACK)) == TCP_SYN, t2, _INT64_MAX),
        prev_flags=np.zeros(len(t2), np.uint16), prev_last=np.full(len(t2), NO_TIME, np.int64))
    if n_open:
        at = np.flatnonzero(e.is_open)
        source = perm[at]
        for name in ("last", "a_pk", "a_by", "b_pk", "b_by", "flags", "syn2", "prev_flags",
                     "prev_last"):
            getattr(e, name)[at] = getattr(open_rows, name)[source]
    return e


class FragmentAggregator:
    """Pre-aggregates one input's packets (a capture file, a batch stream) into fragments.

    ``add`` returns the fragments that can no longer change (often none); ``finish`` ends the
    input, returns everything still open and makes the aggregator ready for a new input.
    Memory is bounded by the flush window, the held-back packets and one row per open flow.
    """

    def __init__(self, idle_timeout_us: int, active_timeout_us: int, byte_accounting: str = "ip",
                 flush_every_packets: int = 500_000, *,
                 max_disorder_us: int = DEFAULT_MAX_DISORDER_US) -> None:
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
        self._hold_cap = max(self._flush_every, MIN_HOLD_BACK_PACKETS)
        self._reset()

    def _reset(self) -> None:
        self._staged: list[_Staged] = []
        self._staged_count = 0
        self._held: _Staged | None = None
        self._open = _Rows.empty()  # the last row of every key with packets before the cut
        self._closed = _Rows.empty()  # final rows whose open_at_end is not known yet
        self._max_ts: int | None = None
        self._cut: int | None = None  # packets before it are reduced into rows

    def add(self, packets: PacketColumns) -> list[Fragment]:
        """Stage a batch; every ``flush_every_packets`` packets, return what is complete."""
        if len(packets) == 0:
            return []
        staged = _stage(packets, self._frame_bytes)
        newest = int(staged.t2.max() >> 1)
        self._max_ts = newest if self._max_ts is None else max(self._max_ts, newest)
        self._staged.append(staged)
        self._staged_count += len(staged)
        if self._staged_count < self._flush_every:
            return []
        return self._flush(final=False)

    def finish(self) -> list[Fragment]:
        """End of input: every remaining row, ``open_at_end`` where ``last + idle > end``."""
        if self._max_ts is None:
            return []
        fragments = self._flush(final=True)
        self._reset()
        return fragments

    # -- one flush window -------------------------------------------------------------------

    def _flush(self, final: bool) -> list[Fragment]:
        assert self._max_ts is not None
        parts = ([self._held] if self._held is not None else []) + self._staged
        self._staged, self._staged_count, self._held = [], 0, None
        previous_cut = self._cut
        if not final:
            self._cut = self._next_cut(parts)
            parts, held = _split_at(parts, self._cut)
            self._held = _Staged.join(held) if held else None
        late = previous_cut is not None and any(
            int(part.t2.min() >> 1) < previous_cut for part in parts)
        window = _Window(self._idle, self._active, None if final else self._cut,
                         self._max_ts, late)
        kept, closed, emitted = window.reduce(self._open, parts)
        self._open = kept
        closed = _Rows.concat([self._closed, closed])
        due = (closed.last + self._idle <= self._max_ts) | final
        self._closed = closed.take(~due)
        return _fragments(_Rows.concat([emitted, closed.take(due)]), self._idle, self._max_ts)

    def _next_cut(self, parts: list[_Staged]) -> int:
        """Packets at or after the cut wait for the next window (at most the hold-back cap);
        the cut never moves back."""
        assert self._max_ts is not None
        cut = self._max_ts - self._max_disorder
        held = sum(int(np.count_nonzero((part.t2 >> 1) >= cut)) for part in parts)
        if held > self._hold_cap:
            ts = np.concatenate([part.t2 >> 1 for part in parts])
            kth = len(ts) - self._hold_cap
            cut = max(cut, int(np.partition(ts, kth)[kth]) + 1)
        return cut if self._cut is None else max(cut, self._cut)


def _split_at(parts: list[_Staged], cut: int) -> tuple[list[_Staged], list[_Staged]]:
    """(packets before the cut, packets at or after it); input is mostly time-ordered, so
    usually only the last batches are split."""
    before, after = [], []
    for part in parts:
        hold = (part.t2 >> 1) >= cut
        if not hold.any():
            before.append(part)
        elif hold.all():
            after.append(part)
        else:
            before.append(part.take(~hold))
            after.append(part.take(hold))
    return before, after


class _Window:
    """The reduction of one flush window: the open rows of earlier windows plus new packets."""

    def __init__(self, idle: int, active: int, cut: int | None, max_ts: int,
                 late: bool) -> None:
        self._idle = idle
        self._active = active
        self._cut = cut  # None: the input has ended, everything is emitted
        self._max_ts = max_ts
        self._late = late  # some packets are older than the previous window's cut

    def reduce(self, open_rows: _Rows, packets: list[_Staged]) -> tuple[_Rows, _Rows, _Rows]:
        """(rows kept open, final rows waiting for their open_at_end, rows to emit)."""
        if len(open_rows) == 0 and not packets:
            return _Rows.empty(), _Rows.empty(), _Rows.empty()
        e = _elements(open_rows, packets)
        key_starts = np.flatnonzero(np.concatenate(([True], e.key_change)))
        slow_keys = self._slow_keys(e, key_starts)
        fast = self._fast_rows(e, key_starts, slow_keys)
        if not slow_keys.any():
            return fast
        key_ends = np.append(key_starts[1:], len(e))
        slow = self._slow_rows(e, key_starts[slow_keys], key_ends[slow_keys])
        kept, closed, emitted = (_Rows.concat([a, b]) for a, b in zip(fast, slow, strict=True))
        return kept, closed, emitted

    def _decide(self, rows: _Rows, key_last: np.ndarray) -> tuple[_Rows, _Rows, _Rows]:
        """The last row of a key stays open until no packet still to come can join it (its
        last packet is ``idle`` before the cut); a final row whose ``open_at_end`` could
        still be True waits until ``last + idle <= newest timestamp``."""
        if self._cut is None:
            return _Rows.empty(), _Rows.empty(), rows
        keep = key_last & (rows.last + self._idle > self._cut)
        closed = ~key_last & (rows.last + self._idle > self._max_ts)
        return rows.take(keep), rows.take(closed), rows.take(~keep & ~closed)

    def _slow_keys(self, e: _Elements, key_starts: np.ndarray) -> np.ndarray:
        """Keys the vectorised rules cannot decide: possible port reuse, late overlaps."""
        first = e.t2 >> 1
        pure_syn = (e.syn2 != _INT64_MAX) & ~e.is_open
        slow = np.zeros(len(key_starts), bool)
        if pure_syn.any():
            # A pure SYN at or after a FIN/RST of its key (ties included) may start a new
            # flow. An open row's flags, and those of its flow's earlier rows, count as seen
            # at its first packet: they all precede the window's packets.
            ends = (e.flags | e.prev_flags) & _FIN_RST_BOTH
            syn_t = np.where(pure_syn, first, _INT64_MIN)
            end_t = np.where(ends != 0, first, _INT64_MAX)
            slow |= (np.maximum.reduceat(syn_t, key_starts)
                     >= np.minimum.reduceat(end_t, key_starts))
        if self._late and e.is_open.any():
            # A late packet at or before the last packet of its key's open row: the running
            # maximum of last_us is no longer the previous element's last_us.
            open_last = np.where(e.is_open, e.last, _INT64_MIN)
            packet_first = np.where(e.is_open, _INT64_MAX, first)
            slow |= (np.maximum.reduceat(open_last, key_starts)
                     >= np.minimum.reduceat(packet_first, key_starts))
        return slow

    def _fast_rows(self, e: _Elements, key_starts: np.ndarray,
                   slow_keys: np.ndarray) -> tuple[_Rows, _Rows, _Rows]:
        """Rows cut at key changes, idle gaps and active-timeout chain points.

        Elements of a key are in time order and (outside slow keys) never overlap, so the
        running maximum of ``last_us`` is the previous element's. Slow keys are cut too (a
        key change is always a cut) but their rows are dropped: the slow path redoes them.
        """
        n = len(e)
        first = e.t2 >> 1
        boundary = np.zeros(n, bool)
        boundary[1:] = first[1:] - e.last[:-1] >= self._idle
        boundary[key_starts] = True
        seg_starts = np.flatnonzero(boundary)
        seg_ends = np.append(seg_starts[1:], n)
        chained = np.flatnonzero(first[seg_ends - 1] - first[seg_starts] >= self._active)
        row_starts = seg_starts
        if len(chained):
            points = [self._chain(first, int(seg_starts[s]), int(seg_ends[s])) for s in chained]
            row_starts = np.union1d(seg_starts, np.concatenate(points))
        rows = e.rows(row_starts)
        rows.prev_flags, rows.prev_last = self._flow_before(
            e, rows, row_starts, seg_starts[chained], seg_ends[chained])
        key_of_row = np.searchsorted(key_starts, row_starts, side="right") - 1
        key_last = np.append(key_of_row[1:] != key_of_row[:-1], True)
        fast = ~slow_keys[key_of_row]
        if not fast.all():
            rows, key_last = rows.take(fast), key_last[fast]
        return self._decide(rows, key_last)

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
    def _flow_before(e: _Elements, rows: _Rows, row_starts: np.ndarray,
                     chain_starts: np.ndarray, chain_ends: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Flags and last time of each row's earlier rows in its flow (after active timeouts):
        an open row carries its own; rows a chain splits add their predecessors'."""
        prev_flags = e.prev_flags[row_starts]
        prev_last = e.prev_last[row_starts]
        for lo, hi in zip(np.searchsorted(row_starts, chain_starts),
                          np.searchsorted(row_starts, chain_ends), strict=True):
            flags, last = int(prev_flags[lo]), int(prev_last[lo])
            for r in range(lo, hi - 1):
                flags |= int(rows.flags[r])
                last = max(last, int(rows.last[r]))
                prev_flags[r + 1], prev_last[r + 1] = flags, last
        return prev_flags, prev_last

    def _slow_rows(self, e: _Elements, starts: np.ndarray,
                   ends: np.ndarray) -> tuple[_Rows, _Rows, _Rows]:
        """Keys cut by ``flow_engine.split_rows`` itself, on one fragment per packet (and the
        key's open row, with its flow's earlier rows as the Continuation). The conversions
        to and from Python objects are done once for all slow keys of the window."""
        lengths = ends - starts
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        index = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lengths)
        key_columns = {name: column[e.perm[starts]] for name, column in e.keys.items()}
        keys = list(zip(*_key_columns(key_columns), strict=True))
        count = int(offsets[-1])
        fragments = list(map(tuple.__new__, repeat(Fragment, count), zip(
            chain.from_iterable(map(repeat, keys, lengths.tolist())),
            *_value_columns(e, index), repeat(False, count), strict=True)))
        continuations = self._continuations(e, index, offsets, keys)
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
                                   key_columns.items()}, merged, prev_flags, prev_last)
        return self._decide(rows, np.append(key_index[1:] != key_index[:-1], True))

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
    def _continuations(e: _Elements, index: np.ndarray, offsets: np.ndarray,
                       keys: list[FlowKey]) -> list[Continuation | None]:
        """Per slow key: its open row's flow so far, when that row continues a flow after an
        active timeout (what ``split_rows`` needs to go on with it)."""
        continuations: list[Continuation | None] = [None] * len(keys)
        positions = np.flatnonzero(e.is_open[index] & (e.prev_last[index] != NO_TIME))
        owners = np.searchsorted(offsets, positions, side="right") - 1
        for k, i in zip(owners.tolist(), index[positions].tolist(), strict=True):
            flags = int(e.prev_flags[i])
            continuations[k] = Continuation(keys[k], SIDE_A, int(e.prev_last[i]),
                                            flags & 0xFF, flags >> 8)
        return continuations


# -- columns in, columns out ------------------------------------------------------------------

def _stage(packets: PacketColumns, frame_bytes: bool) -> _Staged:
    """Key columns of a batch: endpoint a is the smaller (hi, lo, port), as ``order_key``."""
    ts = np.asarray(packets.ts_us, np.int64)
    src_hi = np.asarray(packets.src_hi, np.uint64)
    dst_hi = np.asarray(packets.dst_hi, np.uint64)
    src_lo = np.asarray(packets.src_lo, np.uint64)
    dst_lo = np.asarray(packets.dst_lo, np.uint64)
    src_port = np.asarray(packets.src_port, np.int64)
    dst_port = np.asarray(packets.dst_port, np.int64)
    vlan = np.asarray(packets.vlan_id, np.int64)
    _check_ranges(src_port, dst_port, vlan)
    has_hi = bool(src_hi.any() or dst_hi.any())
    swap = (src_lo > dst_lo) | ((src_lo == dst_lo) & (src_port > dst_port))
    if has_hi:
        swap = (src_hi > dst_hi) | ((src_hi == dst_hi) & swap)
        a_hi, b_hi = np.where(swap, dst_hi, src_hi), np.where(swap, src_hi, dst_hi)
    else:
        a_hi = b_hi = np.zeros(len(ts), np.uint64)
    a_lo, b_lo = np.where(swap, dst_lo, src_lo), np.where(swap, src_lo, dst_lo)
    a_port = np.where(swap, dst_port, src_port).astype(np.uint64)
    b_port = np.where(swap, src_port, dst_port).astype(np.uint64)
    misc = (np.asarray(packets.ip_version, np.uint64) << 56
            | np.asarray(packets.protocol, np.uint64) << 48
            | (vlan + 1).astype(np.uint64) << 32 | a_port << 16 | b_port)
    nbytes = packets.frame_bytes if frame_bytes else packets.ip_bytes
    return _Staged(
        t2=ts * 2 + swap, misc=misc, a_hi=a_hi, a_lo=a_lo, b_hi=b_hi, b_lo=b_lo,
        hash=_hash(misc, a_hi, a_lo, b_hi, b_lo, has_hi),
        # Copies: a decoder may reuse its buffers for the next batch.
        nbytes=np.array(nbytes, np.int64), flags=np.array(packets.tcp_flags, np.uint8))


def _check_ranges(src_port: np.ndarray, dst_port: np.ndarray, vlan: np.ndarray) -> None:
    """The packed key has 16 bits per port and for vlan_id + 1."""
    if len(vlan) and (min(src_port.min(), dst_port.min()) < 0
                      or max(src_port.max(), dst_port.max()) > _MAX_PORT
                      or vlan.min() < -1 or vlan.max() > _MAX_VLAN):
        raise ValueError("ports must be in [0, 65535] and vlan_id in [-1, 65534]")


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place (0 maps to 0)."""
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9
    x ^= x >> 27
    x *= 0x94D049BB133111EB
    x ^= x >> 31
    return x


def _hash(misc: np.ndarray, a_hi: np.ndarray, a_lo: np.ndarray, b_hi: np.ndarray,
          b_lo: np.ndarray, has_hi: bool) -> np.ndarray:
    """64-bit key hash; the high-address term is 0 for IPv4, so it is skipped for batches
    without one and a key hashes the same in every batch."""
    h = _mix(a_lo * 0x9E3779B97F4A7C15 ^ b_lo)
    h ^= misc
    if has_hi:
        h ^= _mix(a_hi * 0xC2B2AE3D27D4EB4F ^ b_hi)
    return _mix(h)


def _sort_by_key_and_time(keys: dict[str, np.ndarray],
                          t2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order of elements by key, then (time, side), and where the key changes in it.

    One ``np.sort`` of uint64 does it: the high bits hold the key hash, the low bits the rank
    in time order (a stable argsort of nearly sorted times is cheap). Two keys sharing the
    hash bits would interleave: ``_key_change`` finds that exactly, and ``np.lexsort`` then
    sorts on the key columns themselves.
    """
    n = len(t2)
    by_time = np.argsort(t2, kind="stable")
    bits = max(1, (n - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    composite = (keys["hash"][by_time] & ~low) | np.arange(n, dtype=np.uint64)
    composite.sort()
    perm = by_time[(composite & low).astype(np.intp)]
    hash_change = (composite[1:] ^ composite[:-1]) > low
    key_change = _key_change(keys, perm)
    if (key_change & ~hash_change).any():
        perm = np.lexsort((t2, keys["b_lo"], keys["a_lo"], keys["b_hi"], keys["a_hi"],
                           keys["misc"]))
        key_change = _key_change(keys, perm)
    return perm, key_change


def _key_change(keys: dict[str, np.ndarray], perm: np.ndarray) -> np.ndarray:
    """Where the key changes between consecutive elements in ``perm`` order."""
    names = ["misc", "a_lo", "b_lo"]
    if keys["a_hi"].any() or keys["b_hi"].any():
        names += ["a_hi", "b_hi"]
    change = np.zeros(max(len(perm) - 1, 0), bool)
    for name in names:
        column = keys[name][perm]
        change |= column[1:] != column[:-1]
    return change


def _key_columns(keys: dict[str, np.ndarray]) -> list[list[int]]:
    """The FlowKey fields, unpacked, as lists."""
    misc = keys["misc"]
    return [(misc >> 56).tolist(), (misc >> 48 & 0xFF).tolist(),
            ((misc >> 32 & 0xFFFF).astype(np.int64) - 1).tolist(),
            keys["a_hi"].tolist(), keys["a_lo"].tolist(), (misc >> 16 & 0xFFFF).tolist(),
            keys["b_hi"].tolist(), keys["b_lo"].tolist(), (misc & 0xFFFF).tolist()]


def _value_columns(source: _Rows | _Elements, index: slice | np.ndarray) -> list[list[int]]:
    """Fragment fields after the key, up to ``open_at_end``."""
    t2, syn2, flags = source.t2[index], source.syn2[index], source.flags[index]
    has_syn = syn2 != _INT64_MAX
    return [(t2 >> 1).tolist(), source.last[index].tolist(), source.a_pk[index].tolist(),
            source.a_by[index].tolist(), source.b_pk[index].tolist(),
            source.b_by[index].tolist(), (flags & 0xFF).tolist(), (flags >> 8).tolist(),
            (t2 & 1).tolist(), np.where(has_syn, syn2 >> 1, NO_TIME).tolist(),
            np.where(has_syn, syn2 & 1, SIDE_A).tolist()]


def _fragments(rows: _Rows, idle: int, max_ts: int) -> list[Fragment]:
    """Fragment objects for emitted rows: the only per-row Python objects built."""
    count = len(rows)
    if count == 0:
        return []
    keys = zip(*_key_columns(vars(rows)), strict=True)
    open_at_end = (rows.last + idle > max_ts).tolist()
    return list(map(tuple.__new__, repeat(Fragment, count),
                    zip(keys, *_value_columns(rows, slice(None)), open_at_end, strict=True)))


def _rows_of_fragments(keys: dict[str, np.ndarray], fragments: list[Fragment],
                       prev_flags: list[int], prev_last: list[int]) -> _Rows:
    """The slow path's rows back as columns."""
    fields_of = list(zip(*fragments, strict=True))  # one tuple per Fragment field

    def field(name: str) -> np.ndarray:
        return np.array(fields_of[Fragment._fields.index(name)], np.int64)

    syn_us, syn_sender = field("syn_us"), field("syn_sender")
    return _Rows(
        **keys,
        t2=field("first_us") * 2 + field("first_sender"), last=field("last_us"),
        a_pk=field("a_packets"), a_by=field("a_bytes"),
        b_pk=field("b_packets"), b_by=field("b_bytes"),
        flags=(field("a_flags") | field("b_flags") << 8).astype(np.uint16),
        syn2=np.where(syn_us == NO_TIME, _INT64_MAX, syn_us * 2 + syn_sender),
        prev_flags=np.array(prev_flags, np.uint16), prev_last=np.array(prev_last, np.int64))
