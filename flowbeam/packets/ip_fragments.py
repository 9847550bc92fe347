"""Bounded IP fragment tracking: gives non-first fragments the ports of their first fragment.

Non-first fragments carry no transport header, so the decoder remembers the ports of each
first fragment, keyed by (version, src, dst, protocol, IP id) for IPv4 and (version, src, dst,
fragment identification) for IPv6, and gives them to the later fragments of the same datagram.
A non-first fragment seen before its first fragment waits until the first fragment appears in
this or a later batch, or until the end of the file, which emits it with ports 0. Both tables
are bounded: the oldest remembered first fragment is forgotten, and the oldest waiting
fragments are emitted at once with ports 0, so memory stays bounded on hostile input and no
packet is ever silently dropped.

The tracker sees a batch's fragments all at once (``track``), in capture order, and answers
with a ``FragmentPlan`` that ``fragment_rows`` applies to the batch's columns. The first
fragments (the common case: an extension-header flood is all first fragments) only touch the
array-backed ``FirstFragmentTable``, which answers all the batch's later fragments at once; a
Python step is taken only for a later fragment it does not know (it must wait) and for a first
fragment that may release waiting ones. The result is exactly that of handling the fragments
one at a time.

Keys are fixed-width bytes (``FRAGMENT_KEY``) so the per-packet path packs them with ``struct``
and the vectorised path views a NumPy record array as the same bytes. Rows of the current batch
wait as their row index; ``detach`` turns those still waiting into row tuples (in
``COLUMN_NAMES`` order) before the batch's columns go away.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from flowbeam.packets.first_fragments import FirstFragmentTable, key_hashes, key_words

# (version, src hi, src lo, dst hi, dst lo, protocol (IPv4 only; 0 for IPv6), identification)
FRAGMENT_KEY = struct.Struct("!BQQQQBI")
FRAGMENT_KEY_DTYPE = np.dtype(
    [("version", "u1"), ("src_hi", ">u8"), ("src_lo", ">u8"), ("dst_hi", ">u8"),
     ("dst_lo", ">u8"), ("protocol", "u1"), ("ident", ">u4")]
)
assert FRAGMENT_KEY_DTYPE.itemsize == FRAGMENT_KEY.size
# The same keys as opaque bytes: they move with plain copies and ``tolist`` gives ``bytes``.
FRAGMENT_KEY_BYTES = np.dtype((np.void, FRAGMENT_KEY.size))

NO_CHANGE = -1  # a FragmentPlan value: emit the row as it is (ports 0)


class FragmentPackets(NamedTuple):
    """The fragments among a decode path's rows."""

    pos: np.ndarray  # int64: packet positions
    first: np.ndarray  # bool: first fragment (offset 0), else a later one
    key: np.ndarray  # FRAGMENT_KEY_BYTES


def fragment_key(version: int, src_hi: int, src_lo: int, dst_hi: int, dst_lo: int,
                 protocol: int, ident: int) -> bytes:
    """The tracker key of one fragment; pass protocol 0 for IPv6 (its key has none)."""
    return FRAGMENT_KEY.pack(version, src_hi, src_lo, dst_hi, dst_lo, protocol, ident)


def pack_transport(protocol: np.ndarray, src_port: np.ndarray, dst_port: np.ndarray) -> np.ndarray:
    """(protocol, ports) as one int64 per row: what a first fragment hands its later ones."""
    return ((protocol.astype(np.int64) << 32) | (src_port.astype(np.int64) << 16)
            | dst_port.astype(np.int64))


def unpack_transport(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(protocol, src_port, dst_port) from ``pack_transport`` values."""
    return values >> 32, (values >> 16) & 0xFFFF, values & 0xFFFF


@dataclasses.dataclass(slots=True)
class FragmentPlan:
    """How a batch's rows change: completed in place, held back, or emitted after an anchor.

    A released or evicted row is emitted right after the row (``anchors``) whose fragment
    released it (a first fragment) or pushed it out (a later one, itself maybe among them).
    ``handles`` are row indexes of this batch or row tuples of an earlier one; ``values`` are
    ``pack_transport`` values to give them, or ``NO_CHANGE``.
    """

    completed: np.ndarray  # row indexes
    completed_values: np.ndarray
    held: list[int] = dataclasses.field(default_factory=list)
    anchors: list[int] = dataclasses.field(default_factory=list)
    handles: list[int | tuple] = dataclasses.field(default_factory=list)
    values: list[int] = dataclasses.field(default_factory=list)

    def emit_after(self, anchor: int, rows: list[int | tuple], value: int) -> None:
        self.anchors.extend([anchor] * len(rows))
        self.handles.extend(rows)
        self.values.extend([value] * len(rows))


class FragmentTracker:
    """Ports of recent first fragments, and non-first fragments waiting for theirs (bounded)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._firsts = FirstFragmentTable(self.limit)
        self._key_size = 0
        self.waiting: collections.OrderedDict[bytes, list[int | tuple]] = (
            collections.OrderedDict()
        )
        self.waiting_count = 0
        self._fresh: set[bytes] = set()  # waiting keys that hold row indexes of this batch

    @property
    def firsts(self) -> dict[bytes, int]:
        """The remembered first fragments (key: ``pack_transport`` value), oldest first."""
        return {key[: self._key_size]: value for key, value in self._firsts.items()}

    def track(
        self, first: np.ndarray, keys: Sequence[bytes] | np.ndarray,
        rows: Sequence[int] | np.ndarray, values: Sequence[int] | np.ndarray,
    ) -> FragmentPlan:
        """One batch's fragments in capture order: first-fragment flags, fixed-width keys, row
        indexes and (for first fragments) their ``pack_transport`` values.

        The first-fragment table answers every later fragment of the batch at once; only the
        later fragments it does not know, and the first fragments that may release waiting
        ones, take a Python step each, in capture order.
        """
        first = np.asarray(first, dtype=bool)
        keys = np.asarray(keys)
        keys = keys.view(np.dtype((np.void, keys.dtype.itemsize)))
        self._key_size = keys.dtype.itemsize
        rows, values = np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.int64)
        firsts, laters = np.flatnonzero(first), np.flatnonzero(~first)
        words = key_words(keys)
        hashes = key_hashes(words)
        remembered, known = self._firsts.update(
            words[firsts], hashes[firsts], values[firsts], words[laters], hashes[laters],
            np.searchsorted(firsts, laters))
        plan = FragmentPlan(rows[laters[remembered]], known[remembered])
        unknown = laters[~remembered]
        releasing = firsts[self._may_release(keys.dtype, hashes[firsts], hashes[unknown])]
        steps = np.sort(np.concatenate([unknown, releasing]))
        for is_first, key, row, value in zip(first[steps].tolist(), keys[steps].tolist(),
                                             rows[steps].tolist(), values[steps].tolist(),
                                             strict=True):
            if is_first:
                self._release(key, row, value, plan)
            else:
                self._hold(key, row, plan)
        return plan

    def detach(self, row_tuple: Callable[[int], tuple]) -> None:
        """Replace the waiting row indexes of this batch by their row tuples."""
        for key in self._fresh:
            held = self.waiting.get(key)
            if held:
                self.waiting[key] = [row_tuple(h) if isinstance(h, int) else h for h in held]
        self._fresh.clear()

    def drain(self) -> list[tuple]:
        """All waiting fragments (ports 0), oldest first; the waiting list is emptied."""
        rows = [row for rows in self.waiting.values() for row in rows]
        self.waiting.clear()
        self.waiting_count = 0
        return rows  # type: ignore[return-value]  # detach() left only tuples

    def _may_release(self, key_type: np.dtype, first_hashes: np.ndarray,
                     unknown_hashes: np.ndarray) -> np.ndarray:
        """Which first fragments may find fragments waiting for them: those whose key hash is
        that of a key waiting now or of a later fragment of this batch about to wait."""
        if not self.waiting and not len(unknown_hashes):
            return np.zeros(len(first_hashes), dtype=bool)
        waiting = np.frombuffer(b"".join(self.waiting), dtype=key_type)
        return np.isin(first_hashes,
                       np.concatenate([key_hashes(key_words(waiting)), unknown_hashes]))

    def _release(self, key: bytes, row: int, value: int, plan: FragmentPlan) -> None:
        """A first fragment: emit the fragments waiting for it right after it."""
        held = self.waiting.pop(key, None)
        if held:
            self.waiting_count -= len(held)
            plan.emit_after(row, held, value)

    def _hold(self, key: bytes, row: int, plan: FragmentPlan) -> None:
        """A non-first fragment whose first fragment is not known: it waits; the oldest
        waiting fragments are pushed out (ports 0) when over the bound."""
        self.waiting.setdefault(key, []).append(row)
        self._fresh.add(key)
        self.waiting_count += 1
        plan.held.append(row)
        while self.waiting_count > self.limit:
            _, evicted = self.waiting.popitem(last=False)
            self.waiting_count -= len(evicted)
            plan.emit_after(row, evicted, NO_CHANGE)
