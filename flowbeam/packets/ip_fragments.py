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
with a ``FragmentPlan`` that ``fragment_rows`` applies to the batch's columns: one Python step
per non-first fragment, while each run of consecutive first fragments (the common case: an
extension-header flood is all first fragments) updates the table in a few C-level calls. The
result is exactly that of handling the fragments one at a time.

Keys are fixed-width bytes (``FRAGMENT_KEY``) so the per-packet path packs them with ``struct``
and the vectorised path views a NumPy record array as the same bytes. Rows of the current batch
wait as their row index; ``detach`` turns those still waiting into row tuples (in
``COLUMN_NAMES`` order) before the batch's columns go away.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

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

    completed: list[int] = dataclasses.field(default_factory=list)
    completed_values: list[int] = dataclasses.field(default_factory=list)
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
        self.firsts: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.waiting: collections.OrderedDict[bytes, list[int | tuple]] = (
            collections.OrderedDict()
        )
        self.waiting_count = 0
        self._fresh: set[bytes] = set()  # waiting keys that hold row indexes of this batch

    def track(
        self, first: np.ndarray, keys: list[bytes], rows: list[int], values: list[int]
    ) -> FragmentPlan:
        """One batch's fragments in capture order: first-fragment flags, keys, row indexes and
        (for first fragments) their ``pack_transport`` values."""
        plan = FragmentPlan()
        bounds = [0, *(np.flatnonzero(first[1:] != first[:-1]) + 1).tolist(), len(first)]
        for start, stop in itertools.pairwise(bounds):
            if first[start]:
                self._firsts(keys[start:stop], rows[start:stop], values[start:stop], plan)
            else:
                for i in range(start, stop):
                    self._later(keys[i], rows[i], plan)
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

    def _firsts(self, keys: list[bytes], rows: list[int], values: list[int],
                plan: FragmentPlan) -> None:
        """A run of first fragments: release what waits for them, then remember them.

        Remembering a run at once ends in the same table as one by one: each key moves to the
        end (its last occurrence wins), then the oldest keys beyond the bound are forgotten.
        """
        if self.waiting:
            releasing = self.waiting.keys() & keys
            if releasing:
                self._release(keys, rows, values, releasing, plan)
        firsts = self.firsts
        size = len(firsts)
        firsts.update(zip(keys, values, strict=True))
        if len(firsts) - size < len(keys):
            # A key was already remembered or repeats in the run: update() left it in place,
            # so move every key to the end in run order (the last occurrence wins).
            move_to_end = firsts.move_to_end
            for key in keys:
                move_to_end(key)
        excess = len(firsts) - self.limit
        if excess > 0:
            collections.deque(map(firsts.popitem, itertools.repeat(False, excess)), maxlen=0)

    def _release(self, keys: list[bytes], rows: list[int], values: list[int],
                 releasing: set[bytes], plan: FragmentPlan) -> None:
        """Emit the fragments waiting for ``releasing`` keys after their first fragment."""
        for key, row, value in zip(keys, rows, values, strict=True):
            held = self.waiting.pop(key, None) if key in releasing else None
            if held:
                self.waiting_count -= len(held)
                plan.emit_after(row, held, value)

    def _later(self, key: bytes, row: int, plan: FragmentPlan) -> None:
        """A non-first fragment: completed at once if its first fragment is known, else held;
        the oldest waiting fragments are pushed out (ports 0) when over the bound."""
        known = self.firsts.get(key)
        if known is not None:
            plan.completed.append(row)
            plan.completed_values.append(known)
            return
        self.waiting.setdefault(key, []).append(row)
        self._fresh.add(key)
        self.waiting_count += 1
        plan.held.append(row)
        while self.waiting_count > self.limit:
            _, evicted = self.waiting.popitem(last=False)
            self.waiting_count -= len(evicted)
            plan.emit_after(row, evicted, NO_CHANGE)
