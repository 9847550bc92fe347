"""The fragment aggregator's NumPy columns: staged packets, rows and a window's sorted elements.

Everything between ``PacketColumns`` and the ``Fragment`` objects finally emitted stays in
columns, built and reduced here, so the common case never builds a Python object per packet. A
packet's direction-independent key is packed into five uint64 columns plus a 64-bit hash that
orders the window's sort; times carry the side in their low bit (``t2 = ts_us * 2 + side``),
so a plain minimum or sort gives ``merge``'s (time, side) order.

Ties: ``first_sender`` and ``syn_sender`` follow ``flow_engine.merge``: at the same
microsecond side A wins (``merge`` orders by (time, side)), whatever the input order, so that
the result does not depend on how packets were split into fragments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from flowbeam.flows.fragment import NO_TIME, SIDE_A
from flowbeam.flows.protocols import TCP_ACK, TCP_SYN
from flowbeam.packets.aggregation_sort import KEY_FIELDS, KeySources, sort_by_key_and_time
from flowbeam.packets.columns import PacketColumns

INT64_MAX = np.iinfo(np.int64).max
_MAX_16 = 0xFFFF  # ports and vlan_id + 1 are packed in 16 bits each


class Columns:
    """A dataclass of equal-length arrays: joined and sliced column by column."""

    @classmethod
    def join(cls, parts: list) -> Columns:
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def take(self, index: np.ndarray) -> Columns:
        return type(self)(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class Staged(Columns):
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
class Rows(Columns):
    """Rows as columns: the open rows, rows waiting to be emitted, a window's reduced rows.

    Flags hold side A in the low byte and side B in the high byte; ``t2`` is
    ``first_us * 2 + first_sender`` and ``syn2`` ``syn_us * 2 + syn_sender`` (INT64_MAX: no
    pure SYN), so a plain minimum gives ``merge``'s (time, side) order. ``prev_flags`` and
    ``prev_last`` describe the flow's earlier rows when this row continues a flow after an
    active timeout (0 and NO_TIME otherwise): what ``split_rows`` needs as a Continuation.
    ``head``: an open row that only tracks a split read's head packets (``range_state``).
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
    head: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.t2)

    @classmethod
    def empty(cls) -> Rows:
        dtypes = ([np.uint64] * 6 + [np.int64] * 6 + [np.uint16, np.int64, np.uint16, np.int64]
                  + [bool])
        return cls(*(np.empty(0, dtype) for dtype in dtypes))

    @classmethod
    def concat(cls, parts: list[Rows]) -> Rows:
        """Joined non-empty parts (the empty rows when there are none)."""
        parts = [p for p in parts if len(p)]
        return cls.join(parts) if parts else cls.empty()


@dataclass
class Elements:
    """A window's open rows and packets in (key, time) order, as the reduction needs them.

    Every array of the window's size costs twice: computing it, and the page faults of fresh
    memory. So only the packets' time, bytes and TCP flags go through the sort permutation;
    per-side counts and flags are reduced per row straight from them (``rows``), and the few
    open rows are patched into their rows. Per-element values (``values``) are
    derived only where they are read: the slow path's keys, a split read's head packets. Key
    columns stay unsorted in their parts and are read at row starts through ``perm``.
    """

    keys: KeySources  # unsorted: open rows first, then packets
    perm: np.ndarray  # sorted position -> unsorted index
    key_change: np.ndarray  # between sorted positions i and i + 1
    is_open: np.ndarray
    t2: np.ndarray
    first: np.ndarray  # t2 >> 1
    nbytes: np.ndarray  # int64, 0 for open rows
    tcp_flags: np.ndarray  # uint8, 0 for open rows
    open_at: np.ndarray  # the open rows' sorted positions, ascending
    opened: Rows  # the open rows, in that order

    def __len__(self) -> int:
        return len(self.t2)

    @cached_property
    def side(self) -> np.ndarray:
        """uint8: 1 where the element's first packet is side B."""
        return np.bitwise_and(self.t2, 1, dtype=np.uint8, casting="unsafe")

    def rows(self, starts: np.ndarray) -> Rows:
        """One row per run of elements. A run is in (time, side) order and (outside slow
        keys) its elements do not overlap: the first has the smallest (time, side), the
        last the latest ``last_us``."""
        n = len(self)
        ends = np.append(starts[1:], n)
        keys = self.keys.at(self.perm[starts])
        side = self.side
        b_pk = np.add.reduceat(side, starts, dtype=np.int64)
        b_by = np.add.reduceat(self.nbytes * side, starts)
        rows = Rows(
            *(keys[name] for name in KEY_FIELDS),
            self.t2[starts], self.first[ends - 1], ends - starts - b_pk,
            np.add.reduceat(self.nbytes, starts) - b_by, b_pk, b_by,
            np.bitwise_or.reduceat(_side_flags(self.tcp_flags, side), starts),
            self._syn2(starts), np.zeros(len(starts), np.uint16),
            np.full(len(starts), NO_TIME, np.int64), np.zeros(len(starts), bool))
        if len(self.open_at):
            self._add_open_rows(rows, starts, ends)
        return rows

    @cached_property
    def syn_at(self) -> np.ndarray:
        """Positions of the pure SYN packets, ascending."""
        return np.flatnonzero(pure_syn(self.tcp_flags))

    def _syn2(self, starts: np.ndarray) -> np.ndarray:
        """Per run, the (time, side) of its first pure SYN packet (INT64_MAX: none): times
        ascend within a run, so the first is the smallest."""
        syn2 = np.full(len(starts), INT64_MAX, np.int64)
        at = self.syn_at
        if len(at):
            run = np.searchsorted(starts, at, side="right") - 1
            lead = np.concatenate(([True], run[1:] != run[:-1]))
            syn2[run[lead]] = self.t2[at[lead]]
        return syn2

    def _add_open_rows(self, rows: Rows, starts: np.ndarray, ends: np.ndarray) -> None:
        """Patch the open rows into their runs: ``rows`` counted each as one packet of its
        first sender with no bytes and no flags. A run may hold two open rows of a key (a
        split read's fold under disorder beyond the bound): ``ufunc.at`` adds both."""
        o, at = self.opened, self.open_at
        run = np.searchsorted(starts, at, side="right") - 1
        side = self.t2[at] & 1
        np.add.at(rows.a_pk, run, o.a_pk - (1 - side))
        np.add.at(rows.b_pk, run, o.b_pk - side)
        np.add.at(rows.a_by, run, o.a_by)
        np.add.at(rows.b_by, run, o.b_by)
        np.bitwise_or.at(rows.flags, run, o.flags)
        np.minimum.at(rows.syn2, run, o.syn2)
        ends_here = ends[run] - 1 == at
        rows.last[run[ends_here]] = o.last[ends_here]
        starts_here = starts[run] == at
        rows.prev_flags[run[starts_here]] = o.prev_flags[starts_here]
        rows.prev_last[run[starts_here]] = o.prev_last[starts_here]

    def values(self, index: np.ndarray) -> ElementValues:
        """Per-element values at sorted positions ``index``."""
        opened = np.flatnonzero(self.is_open[index])
        return ElementValues(self.t2[index], self.first[index], self.side[index],
                             self.nbytes[index], self.tcp_flags[index], opened,
                             self.opened.take(np.searchsorted(self.open_at, index[opened])))

    @cached_property
    def _all(self) -> ElementValues:
        return ElementValues(self.t2, self.first, self.side, self.nbytes, self.tcp_flags,
                             self.open_at, self.opened)

    # Whole-window per-element values, as a split read's head (``range_state``) reads them.
    @property
    def last(self) -> np.ndarray:
        return self._all.last

    @property
    def flags(self) -> np.ndarray:
        return self._all.flags

    @property
    def a_by(self) -> np.ndarray:
        return self._all.a_by

    @property
    def b_by(self) -> np.ndarray:
        return self._all.b_by


class ElementValues:
    """Per-element values of elements (a packet's from its time, bytes and flags, an open
    row's its own), each computed when first read."""

    def __init__(self, t2: np.ndarray, first: np.ndarray, side: np.ndarray,
                 nbytes: np.ndarray, tcp_flags: np.ndarray, open_at: np.ndarray,
                 opened: Rows) -> None:
        self.t2 = t2
        self._first = first  # t2 >> 1 (not to be written)
        self._side = side  # t2 & 1 (uint8)
        self._nbytes = nbytes
        self._tcp_flags = tcp_flags
        self._open_at = open_at  # positions of open rows in these elements
        self._opened = opened

    def _patched(self, values: np.ndarray, name: str) -> np.ndarray:
        if len(self._open_at):
            values[self._open_at] = getattr(self._opened, name)
        return values

    @cached_property
    def last(self) -> np.ndarray:
        return self._patched(self._first.copy(), "last")

    @cached_property
    def a_pk(self) -> np.ndarray:
        return self._patched(np.subtract(1, self._side, dtype=np.int64), "a_pk")

    @cached_property
    def b_pk(self) -> np.ndarray:
        return self._patched(self._side.astype(np.int64), "b_pk")

    @cached_property
    def a_by(self) -> np.ndarray:
        # Open rows' b_by is theirs, not a packet's: a_by overwrites those places anyway.
        return self._patched(self._nbytes - self.b_by, "a_by")

    @cached_property
    def b_by(self) -> np.ndarray:
        return self._patched(self._nbytes * self._side, "b_by")

    @cached_property
    def flags(self) -> np.ndarray:
        return self._patched(_side_flags(self._tcp_flags, self._side), "flags")

    @cached_property
    def syn2(self) -> np.ndarray:
        return self._patched(np.where(pure_syn(self._tcp_flags), self.t2, INT64_MAX), "syn2")

    @cached_property
    def prev_flags(self) -> np.ndarray:
        return self._patched(np.zeros(len(self.t2), np.uint16), "prev_flags")

    @cached_property
    def prev_last(self) -> np.ndarray:
        return self._patched(np.full(len(self.t2), NO_TIME, np.int64), "prev_last")


def pure_syn(tcp_flags: np.ndarray) -> np.ndarray:
    """SYN without ACK: what may open a new flow on a reused 5-tuple."""
    return (tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN


def _side_flags(tcp_flags: np.ndarray, side: np.ndarray) -> np.ndarray:
    """uint16 flags: side A's in the low byte, side B's in the high byte."""
    return np.left_shift(tcp_flags, side << 3, dtype=np.uint16, casting="unsafe")


def elements(open_rows: Rows, packets: list[Staged]) -> Elements:
    """Sort the open rows and the window's packets by (key, time)."""
    n_open = len(open_rows)
    parts = [open_rows, *packets]
    keys = KeySources(parts)
    t2 = np.concatenate([p.t2 for p in parts])
    perm, key_change, t2 = sort_by_key_and_time(keys, np.concatenate([p.hash for p in parts]),
                                                t2)
    nbytes = np.concatenate([np.zeros(n_open, np.int64)] + [p.nbytes for p in packets])[perm]
    tcp_flags = np.concatenate([np.zeros(n_open, np.uint8)] + [p.flags for p in packets])[perm]
    is_open = perm < n_open
    open_at = np.flatnonzero(is_open)
    return Elements(keys, perm, key_change, is_open, t2, t2 >> 1, nbytes, tcp_flags, open_at,
                    open_rows.take(perm[open_at]))


# -- columns in, columns out ------------------------------------------------------------------

def stage(packets: PacketColumns, frame_bytes: bool) -> Staged:
    """Key columns of a batch: endpoint a is the smaller (hi, lo, port), as ``order_key``.

    Every packet goes through here, so the work is kept narrow: ports, VLAN, version and
    protocol are packed in 32-bit halves, and an IPv4-only batch shares one read-only zero
    column for both high address halves."""
    ts = np.asarray(packets.ts_us, np.int64)
    src_hi = np.asarray(packets.src_hi, np.uint64)
    dst_hi = np.asarray(packets.dst_hi, np.uint64)
    src_lo = np.asarray(packets.src_lo, np.uint64)
    dst_lo = np.asarray(packets.dst_lo, np.uint64)
    # int32 as PacketColumns has them; negatives wrap to large values and fail the check.
    src_port = np.asarray(packets.src_port, np.int32).astype(np.uint32)
    dst_port = np.asarray(packets.dst_port, np.int32).astype(np.uint32)
    vlan = (np.asarray(packets.vlan_id, np.int32) + 1).astype(np.uint32)
    if len(ts) and max(int((src_port | dst_port).max()), int(vlan.max())) > _MAX_16:
        raise ValueError("ports must be in [0, 65535] and vlan_id in [-1, 65534]")
    forward, reverse = src_port << 16 | dst_port, dst_port << 16 | src_port
    # (src_lo, src_port) > (dst_lo, dst_port); forward > reverse is src_port > dst_port.
    swap = (src_lo > dst_lo) | ((src_lo == dst_lo) & (forward > reverse))
    if src_hi.any() or dst_hi.any():
        swap = (src_hi > dst_hi) | ((src_hi == dst_hi) & swap)
        a_hi, b_hi = np.where(swap, dst_hi, src_hi), np.where(swap, src_hi, dst_hi)
        a_lo, b_lo = np.where(swap, dst_lo, src_lo), np.where(swap, src_lo, dst_lo)
        has_hi = True
    else:
        a_hi = b_hi = np.broadcast_to(np.uint64(0), ts.shape)
        # Equal lo: either is both.
        a_lo, b_lo = np.minimum(src_lo, dst_lo), np.maximum(src_lo, dst_lo)
        has_hi = False
    misc = (np.asarray(packets.ip_version).astype(np.uint32) << 24
            | np.asarray(packets.protocol).astype(np.uint32) << 16 | vlan).astype(np.uint64)
    misc <<= 32
    misc |= np.where(swap, reverse, forward)
    t2 = ts << 1
    t2 |= swap
    nbytes = packets.frame_bytes if frame_bytes else packets.ip_bytes
    return Staged(
        t2=t2, misc=misc, a_hi=a_hi, a_lo=a_lo, b_hi=b_hi, b_lo=b_lo,
        hash=_hash(misc, a_hi, a_lo, b_hi, b_lo, has_hi),
        # Copies: a decoder may reuse its buffers for the next batch.
        nbytes=np.array(nbytes, np.int64), flags=np.array(packets.tcp_flags, np.uint8))


def _mix(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place (0 maps to 0); ``scratch``: a buffer like ``x``."""
    x ^= np.right_shift(x, 30, out=scratch)
    x *= 0xBF58476D1CE4E5B9
    x ^= np.right_shift(x, 27, out=scratch)
    x *= 0x94D049BB133111EB
    x ^= np.right_shift(x, 31, out=scratch)
    return x


def _hash(misc: np.ndarray, a_hi: np.ndarray, a_lo: np.ndarray, b_hi: np.ndarray,
          b_lo: np.ndarray, has_hi: bool) -> np.ndarray:
    """64-bit key hash; the high-address term is 0 for IPv4, so it is skipped for batches
    without one and a key hashes the same in every batch."""
    scratch = np.empty_like(misc)
    h = a_lo * 0x9E3779B97F4A7C15
    h ^= b_lo
    h = _mix(h, scratch)
    h ^= misc
    if has_hi:
        high = a_hi * 0xC2B2AE3D27D4EB4F
        high ^= b_hi
        h ^= _mix(high, scratch)
    return _mix(h, scratch)


def key_columns(keys: dict[str, np.ndarray], scope: str) -> list[list]:
    """The FlowKey fields, unpacked, as lists (``scope`` is the same for every key)."""
    misc = keys["misc"]
    return [(misc >> 56).tolist(), (misc >> 48 & 0xFF).tolist(),
            ((misc >> 32 & 0xFFFF).astype(np.int64) - 1).tolist(),
            keys["a_hi"].tolist(), keys["a_lo"].tolist(), (misc >> 16 & 0xFFFF).tolist(),
            keys["b_hi"].tolist(), keys["b_lo"].tolist(), (misc & 0xFFFF).tolist(),
            [scope] * len(misc)]


def value_columns(source: Rows | ElementValues, index: slice | np.ndarray) -> list[list[int]]:
    """Fragment fields after the key, up to ``open_at_end``."""
    t2, syn2, flags = source.t2[index], source.syn2[index], source.flags[index]
    has_syn = syn2 != INT64_MAX
    return [(t2 >> 1).tolist(), source.last[index].tolist(), source.a_pk[index].tolist(),
            source.a_by[index].tolist(), source.b_pk[index].tolist(),
            source.b_by[index].tolist(), (flags & 0xFF).tolist(), (flags >> 8).tolist(),
            (t2 & 1).tolist(), np.where(has_syn, syn2 >> 1, NO_TIME).tolist(),
            np.where(has_syn, syn2 & 1, SIDE_A).tolist()]

