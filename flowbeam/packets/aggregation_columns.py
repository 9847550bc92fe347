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

import numpy as np

from flowbeam.flows.fragment import NO_TIME, SIDE_A
from flowbeam.flows.protocols import TCP_ACK, TCP_SYN
from flowbeam.packets.columns import PacketColumns

INT64_MAX = np.iinfo(np.int64).max
_MAX_PORT = 0xFFFF
_MAX_VLAN = 0xFFFE  # stored as vlan + 1 in 16 bits

_KEY_FIELDS = ("misc", "a_hi", "a_lo", "b_hi", "b_lo", "hash")


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


class KeySources:
    """The key columns of a window's elements, left in their parts (open rows, then each
    staged batch): concatenating five uint64 columns per packet only to read them at row
    starts cost more than the whole reduction."""

    def __init__(self, parts: list[Rows | Staged]) -> None:
        self._parts = parts
        self._offsets = np.cumsum([0] + [len(p) for p in parts])

    def at(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The key columns at unsorted element indexes."""
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], self._offsets).tolist()
        out = {name: np.empty(len(index), np.uint64) for name in _KEY_FIELDS}
        for part, offset, lo, hi in zip(self._parts, self._offsets.tolist(), bounds[:-1],
                                        bounds[1:], strict=False):
            if lo == hi:
                continue
            where, local = order[lo:hi], index[order[lo:hi]] - offset
            for name in _KEY_FIELDS:
                out[name][where] = getattr(part, name)[local]
        return out

    def runs_agree(self, perm: np.ndarray, run_starts: np.ndarray) -> bool:
        """Whether every element has the key of its run's first element (runs are cut where
        the hash bits change, in ``perm`` order): one pass over each part, reading the
        few run keys from a table that stays in cache."""
        run_of = np.empty(len(perm), np.int32)
        run_id = np.zeros(len(perm), np.int32)
        run_id[run_starts[1:]] = 1
        run_of[perm] = np.cumsum(run_id, dtype=np.int32)
        first = self.at(perm[run_starts])
        wide = bool(first["a_hi"].any() or first["b_hi"].any())
        for part, offset in zip(self._parts, self._offsets.tolist(), strict=False):
            run = run_of[offset:offset + len(part)]
            names = ["misc", "a_lo", "b_lo"]
            if wide or part.a_hi.any() or part.b_hi.any():
                names += ["a_hi", "b_hi"]
            for name in names:
                if (getattr(part, name) != first[name][run]).any():
                    return False
        return True

    def concat(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate([getattr(p, name) for p in self._parts])
                for name in _KEY_FIELDS}


@dataclass
class Elements:
    """A window's open rows and packets in (key, time) order, as the reduction needs them.

    Only time, bytes and flags go through the sort permutation (random access is what costs);
    per-side counts are derived from them in order and the few open rows patched in. Key
    columns stay unsorted in their parts and are read at row starts through ``perm``.
    """

    keys: KeySources  # unsorted: open rows first, then packets
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

    def rows(self, starts: np.ndarray) -> Rows:
        """One row per run of elements. A run is in (time, side) order and (outside slow
        keys) its elements do not overlap: the first has the smallest (time, side), the
        last the latest ``last_us``."""
        keys = self.keys.at(self.perm[starts])
        return Rows(
            *(keys[name] for name in _KEY_FIELDS),
            self.t2[starts], self.last[np.append(starts[1:], len(self)) - 1],
            np.add.reduceat(self.a_pk, starts), np.add.reduceat(self.a_by, starts),
            np.add.reduceat(self.b_pk, starts), np.add.reduceat(self.b_by, starts),
            np.bitwise_or.reduceat(self.flags, starts), np.minimum.reduceat(self.syn2, starts),
            np.zeros(len(starts), np.uint16), np.full(len(starts), NO_TIME, np.int64),
            np.zeros(len(starts), bool))


def elements(open_rows: Rows, packets: list[Staged]) -> Elements:
    """Sort the open rows and the window's packets by (key, time)."""
    n_open = len(open_rows)
    parts = [open_rows, *packets]
    keys = KeySources(parts)
    t2 = np.concatenate([p.t2 for p in parts])
    perm, key_change = _sort_by_key_and_time(keys, np.concatenate([p.hash for p in parts]), t2)
    t2 = t2[perm]
    nbytes = np.concatenate([np.zeros(n_open, np.int64)] + [p.nbytes for p in parts[1:]])[perm]
    flags = np.concatenate([np.zeros(n_open, np.uint8)] + [p.flags for p in parts[1:]])[perm]
    side = t2 & 1
    b_by = nbytes * side
    e = Elements(
        keys=keys, perm=perm, key_change=key_change, is_open=perm < n_open, t2=t2,
        last=t2 >> 1, a_pk=1 - side, a_by=nbytes - b_by, b_pk=side, b_by=b_by,
        flags=flags.astype(np.uint16) << (side.astype(np.uint16) << 3),
        syn2=np.where((flags & (TCP_SYN | TCP_ACK)) == TCP_SYN, t2, INT64_MAX),
        prev_flags=np.zeros(len(t2), np.uint16), prev_last=np.full(len(t2), NO_TIME, np.int64))
    if n_open:
        at = np.flatnonzero(e.is_open)
        source = perm[at]
        for name in ("last", "a_pk", "a_by", "b_pk", "b_by", "flags", "syn2", "prev_flags",
                     "prev_last"):
            getattr(e, name)[at] = getattr(open_rows, name)[source]
    return e


# -- columns in, columns out ------------------------------------------------------------------

def stage(packets: PacketColumns, frame_bytes: bool) -> Staged:
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
    return Staged(
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


def _sort_by_key_and_time(keys: KeySources, hashes: np.ndarray,
                          t2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order of elements by key, then (time, side), and where the key changes in it.

    One ``np.sort`` of uint64 does it: the high bits hold the key hash, the low bits the rank
    in time order (a stable argsort of nearly sorted times is cheap). Two keys sharing the
    hash bits would interleave: ``runs_agree`` finds that exactly, and ``np.lexsort`` then
    sorts on the key columns themselves.
    """
    n = len(t2)
    by_time = np.argsort(t2, kind="stable")
    bits = max(1, (n - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    composite = (hashes[by_time] & ~low) | np.arange(n, dtype=np.uint64)
    composite.sort()
    perm = by_time[(composite & low).astype(np.intp)]
    hash_change = (composite[1:] ^ composite[:-1]) > low
    if keys.runs_agree(perm, np.flatnonzero(np.concatenate(([True], hash_change)))):
        return perm, hash_change
    columns = keys.concat()
    perm = np.lexsort((t2, columns["b_lo"], columns["a_lo"], columns["b_hi"], columns["a_hi"],
                       columns["misc"]))
    return perm, _key_change(columns, perm)


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


def key_columns(keys: dict[str, np.ndarray], scope: str) -> list[list]:
    """The FlowKey fields, unpacked, as lists (``scope`` is the same for every key)."""
    misc = keys["misc"]
    return [(misc >> 56).tolist(), (misc >> 48 & 0xFF).tolist(),
            ((misc >> 32 & 0xFFFF).astype(np.int64) - 1).tolist(),
            keys["a_hi"].tolist(), keys["a_lo"].tolist(), (misc >> 16 & 0xFFFF).tolist(),
            keys["b_hi"].tolist(), keys["b_lo"].tolist(), (misc & 0xFFFF).tolist(),
            [scope] * len(misc)]


def value_columns(source: Rows | Elements, index: slice | np.ndarray) -> list[list[int]]:
    """Fragment fields after the key, up to ``open_at_end``."""
    t2, syn2, flags = source.t2[index], source.syn2[index], source.flags[index]
    has_syn = syn2 != INT64_MAX
    return [(t2 >> 1).tolist(), source.last[index].tolist(), source.a_pk[index].tolist(),
            source.a_by[index].tolist(), source.b_pk[index].tolist(),
            source.b_by[index].tolist(), (flags & 0xFF).tolist(), (flags >> 8).tolist(),
            (t2 & 1).tolist(), np.where(has_syn, syn2 >> 1, NO_TIME).tolist(),
            np.where(has_syn, syn2 & 1, SIDE_A).tolist()]

