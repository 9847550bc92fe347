"""The fragment aggregator's sort: a window's elements by (key, time), checked exactly.

A window holds hundreds of thousands of packets, so this is the aggregator's costliest step:
one ``np.sort`` of uint64 (key hash in the high bits, time rank in the low bits) instead of a
``np.lexsort`` over five key columns, and an exact check that equal hash bits mean equal keys
(``KeySources.runs_agree``), with the lexsort as the fallback when they do not.
"""

from __future__ import annotations

import numpy as np

KEY_FIELDS = ("misc", "a_hi", "a_lo", "b_hi", "b_lo", "hash")


class KeySources:
    """The key columns of a window's elements, left in their parts (open rows, then each
    staged batch): concatenating five uint64 columns per packet only to read them at row
    starts cost more than the whole reduction."""

    def __init__(self, parts: list) -> None:
        self._parts = parts
        self._offsets = np.cumsum([0] + [len(p) for p in parts])

    def at(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The key columns at unsorted element indexes."""
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], self._offsets).tolist()
        out = {name: np.empty(len(index), np.uint64) for name in KEY_FIELDS}
        for part, offset, lo, hi in zip(self._parts, self._offsets.tolist(), bounds[:-1],
                                        bounds[1:], strict=False):
            if lo == hi:
                continue
            where, local = order[lo:hi], index[order[lo:hi]] - offset
            for name in KEY_FIELDS:
                out[name][where] = getattr(part, name)[local]
        return out

    def runs_agree(self, perm: np.ndarray, run_starts: np.ndarray) -> bool:
        """Whether every element has the key of its run's first element (runs are cut where
        the hash bits change, in ``perm`` order): one pass over each part, reading the
        few run keys from a table that stays in cache."""
        run_of = np.empty(len(perm), np.intp)  # intp: indexing with it needs no conversion
        run_of[perm] = np.repeat(np.arange(len(run_starts), dtype=np.int32),
                                 np.diff(np.append(run_starts, len(perm))))
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
                for name in KEY_FIELDS}


def sort_by_key_and_time(keys: KeySources, hashes: np.ndarray, t2: np.ndarray,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The order of elements by key, then (time, side), where the key changes in it, and the
    times in that order. ``hashes`` is consumed (sorted in place).

    One ``np.sort`` of uint64 does it: the high bits hold the key hash, the low bits the
    element's index, so each hash's elements come out in input order; the input is nearly
    in time order, and the few runs that go back in time are sorted again on their own
    (``_in_time_order``). Two keys sharing the hash bits would interleave: ``runs_agree``
    finds that exactly, and ``np.lexsort`` then sorts on the key columns themselves.
    """
    n = len(t2)
    bits = max(1, (n - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    # In place: every fresh array of the window's size costs its page faults.
    composite = hashes
    composite &= ~low
    scratch = np.arange(n, dtype=np.uint64)
    composite |= scratch
    composite.sort()
    # The index column is spent: it takes the xor of neighbours.
    hash_change = np.bitwise_xor(composite[1:], composite[:-1], out=scratch[1:]) > low
    composite &= low
    perm = composite.view(np.intp)
    run_starts = np.flatnonzero(np.concatenate(([True], hash_change)))
    sorted_t2 = _in_time_order(perm, t2[perm], hash_change, run_starts)
    if keys.runs_agree(perm, run_starts):
        return perm, hash_change, sorted_t2
    columns = keys.concat()
    perm = np.lexsort((t2, columns["b_lo"], columns["a_lo"], columns["b_hi"], columns["a_hi"],
                       columns["misc"]))
    return perm, key_change(columns, perm), t2[perm]


def _in_time_order(perm: np.ndarray, sorted_t2: np.ndarray, run_change: np.ndarray,
                   run_starts: np.ndarray) -> np.ndarray:
    """Sort, in place, the runs whose times go back into (time, index) order, as a stable
    sort by time of the whole input would have; the runs' times in that order."""
    back = np.flatnonzero((sorted_t2[1:] < sorted_t2[:-1]) & ~run_change)
    if len(back) == 0:
        return sorted_t2
    runs = np.unique(np.searchsorted(run_starts, back, side="right") - 1)
    starts = run_starts[runs]
    lengths = np.append(run_starts, len(perm))[runs + 1] - starts
    offsets = np.cumsum(lengths) - lengths
    index = np.arange(int(lengths.sum())) + np.repeat(starts - offsets, lengths)
    order = index[np.lexsort((sorted_t2[index], np.repeat(runs, lengths)))]
    perm[index] = perm[order]
    sorted_t2[index] = sorted_t2[order]
    return sorted_t2


def key_change(keys: dict[str, np.ndarray], perm: np.ndarray) -> np.ndarray:
    """Where the key changes between consecutive elements in ``perm`` order."""
    names = ["misc", "a_lo", "b_lo"]
    if keys["a_hi"].any() or keys["b_hi"].any():
        names += ["a_hi", "b_hi"]
    change = np.zeros(max(len(perm) - 1, 0), bool)
    for name in names:
        column = keys[name][perm]
        change |= column[1:] != column[:-1]
    return change
