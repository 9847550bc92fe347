"""Flow state across the byte ranges of a split read, so that its rows are the whole read's.

A split read (``flowbeam.capture.splits``) aggregates each range of a capture on its own, but
a flow's rows depend on everything before: its idle gap, its flags (port reuse after a FIN
exchange or an RST) and its active-timeout chain may all begin in an earlier range. So:

- **Head packets.** In every range but the first, a key's packets up to its first *safe
  reset* are its head: their rows depend on the ranges before. A safe reset is a packet ``q``
  that starts a new flow whatever came before: an idle gap before it within the range and
  ``q >= head_until = U + idle``, where ``U`` bounds every earlier range's packet times.
  With disorder of at most ``max_disorder_us`` (the aggregator's contract), every packet of
  the range is at most that older than the newest packet of the earlier ranges, so
  ``U = (oldest packet of the range's first batch) + max_disorder_us``. After a safe reset
  the range's own aggregation is exact (flags and the active-timeout chain start fresh), so
  those rows are emitted by the range as in a whole read. Head packets are kept aside as
  compact columns (``HeadPackets``: never one Python object per packet, as an elephant
  flow's head may be a whole range), together with one open *tracker* row per head key that
  only watches for the idle gap. Anything wrongly taken for head would still be exact (the
  fold redoes it), so the classification is conservative: a key on the aggregator's slow
  path keeps its head.
- **Hand-off.** A range ends like a flush window: packets newer than ``cut = newest -
  max_disorder_us`` are held back, so its open rows (of keys past their head) are true
  prefixes. ``RangeState`` holds those rows, the range's head packets and held-back packets.
- **Fold.** A file's states are folded in range order by one aggregator that goes on as a
  whole read would (``FragmentAggregator.resume``): it reduces the state so far with range
  ``i``'s head packets at range ``i``'s cut, then takes over range ``i``'s open rows and held
  packets. A key that reset in range ``i`` left nothing open in the fold: its packets there
  all lie ``idle`` before its reset, which lies before the cut. So the two sets of open
  rows never share a key, and the fold emits exactly the rows a whole read would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbeam.packets.aggregation_columns import INT64_MAX, Columns, Elements, Rows, Staged

_INT64_MIN = np.iinfo(np.int64).min
_KEYS = ("misc", "a_hi", "a_lo", "b_hi", "b_lo", "hash")


@dataclass
class HeadPackets(Columns):
    """Head packets in a fifth of ``Staged``'s size (they travel to the fold): the key
    columns once per run of packets of one key, bytes in 32 bits when they fit."""

    runs: np.ndarray  # packets per run
    misc: np.ndarray  # the key columns of each run
    a_hi: np.ndarray
    a_lo: np.ndarray
    b_hi: np.ndarray
    b_lo: np.ndarray
    hash: np.ndarray
    t2: np.ndarray  # the packets' columns
    nbytes: np.ndarray
    flags: np.ndarray

    def __len__(self) -> int:
        return len(self.t2)

    def staged(self) -> Staged:
        keys = {name: np.repeat(getattr(self, name), self.runs) for name in _KEYS}
        return Staged(t2=self.t2, nbytes=self.nbytes.astype(np.int64), flags=self.flags,
                      **keys)


@dataclass
class RangeState:
    """What a split read's range hands over to the file's fold (see the module docstring)."""

    head: HeadPackets | None  # head packets (before each key's safe reset)
    open: Rows  # the last row of every key past its head, not final at the range's end
    closed: Rows  # final rows of such keys whose open_at_end is not known yet
    held: Staged | None  # packets at or after the cut
    cut: int | None  # the range's last cut (None: the range had no packets)
    newest_us: int | None  # the range's newest packet time

    @classmethod
    def empty(cls) -> RangeState:
        return cls(None, Rows.empty(), Rows.empty(), None, None, None)


def head_ends(e: Elements, key_starts: np.ndarray, slow_keys: np.ndarray, open_head: np.ndarray,
              idle: int, head_until: int) -> np.ndarray | None:
    """Per key of a window: elements starting before this time are head (INT64_MIN: none,
    INT64_MAX: all); None when no key of the window has head elements.

    A key's head goes on from its open tracker row, or starts with a key that has no open
    row and comes before ``head_until``; it ends at its first safe reset (an idle gap before
    an element at or after ``head_until``).
    """
    first = e.t2 >> 1
    open_at = np.flatnonzero(e.is_open)
    tracker = np.zeros(len(e), bool)
    tracker[open_at] = open_head[e.perm[open_at]]
    if not tracker.any() and int(first.min()) >= head_until:
        return None
    has_open = np.logical_or.reduceat(e.is_open, key_starts)
    starts_head = np.where(has_open, np.logical_or.reduceat(tracker, key_starts),
                           first[key_starts] < head_until)
    if not starts_head.any():
        return None
    # Elements of a key do not overlap outside slow keys: the previous element's last_us is
    # the running maximum (as in ``Window._fast_rows``).
    reset = np.zeros(len(e), bool)
    reset[1:] = (first[1:] - e.last[:-1] >= idle) & (first[1:] >= head_until)
    reset[key_starts] = False
    ends = np.minimum.reduceat(np.where(reset, first, INT64_MAX), key_starts)
    ends[slow_keys] = INT64_MAX
    return np.where(starts_head, ends, _INT64_MIN)


def head_packets(e: Elements, key_starts: np.ndarray,
                 head_end: np.ndarray) -> HeadPackets | None:
    """The window's head packets (open rows are not packets), one run per key."""
    lengths = np.diff(np.append(key_starts, len(e)))
    take = ((e.t2 >> 1) < np.repeat(head_end, lengths)) & ~e.is_open
    index = np.flatnonzero(take)
    if len(index) == 0:
        return None
    runs = np.add.reduceat(take, key_starts)
    has_run = runs > 0
    keys = e.keys.at(e.perm[index[np.cumsum(runs[has_run]) - runs[has_run]]])
    flags = e.flags[index]
    nbytes = e.a_by[index] + e.b_by[index]
    if nbytes.max() <= np.iinfo(np.uint32).max:
        nbytes = nbytes.astype(np.uint32)
    return HeadPackets(runs[has_run], *(keys[name] for name in _KEYS), e.t2[index], nbytes,
                       ((flags | flags >> 8) & 0xFF).astype(np.uint8))


def head_rows(rows: Rows, key_of_row: np.ndarray, head_end: np.ndarray | None,
              ) -> np.ndarray | None:
    """Which of a window's rows are head rows (they start before their key's head end)."""
    return None if head_end is None else (rows.t2 >> 1) < head_end[key_of_row]
