"""The remembered first fragments: a bounded LRU table kept in NumPy arrays, a batch at a time.

The rule is that of an ``OrderedDict`` bounded by ``limit``: every first fragment moves its key
to the end (its value is that of its last touch), the oldest key is forgotten beyond the bound,
and lookups do not reorder. So at any time the table holds exactly the ``limit`` distinct keys
with the most recent last touch: a key is remembered iff fewer than ``limit`` distinct keys
were touched since its last touch.

Why arrays: a capture can hold millions of first fragments (extension-header floods) and few
later ones that ever ask. A per-key Python object and dict update cost more than all the rest
of the decoding of such a packet, so first fragments are only appended to a log of touches,
and the questions of a batch's later fragments are answered for the whole batch at once.

The log holds touches in time order: key words, values, and per touch ``prev``, the log
position of the previous touch of the same key (or -1). ``prev`` makes "how many distinct keys
since" exact: touches between minus those that re-touch a key touched between. A touch is
found through a hash index (slot -> newest log position of that slot) and a chain per touch
(the previous log position of the same slot). When the log is full it is compacted to the
remembered keys; nothing older can ever be asked for again.
"""

from __future__ import annotations

import numpy as np

_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))  # MurmurHash3's fmix64
_SHIFT = np.uint64(33)


def key_words(keys: np.ndarray) -> np.ndarray:
    """Fixed-width byte keys (one per row) as rows of native uint64 words, zero padded."""
    width = keys.dtype.itemsize
    padded = np.zeros((len(keys), -(-width // 8) * 8), dtype=np.uint8)
    padded[:, :width] = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), width)
    return padded.view(np.uint64)


def key_hashes(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of ``key_words``: only ever a hint, keys are compared in full."""
    h = np.zeros(len(words), dtype=np.uint64)
    for column in words.T:
        h ^= column
        h *= _MULTIPLIER
        h ^= h >> _SHIFT
    for multiplier in _MIX:  # every input bit reaches the top bits, which pick the slot
        h *= multiplier
        h ^= h >> _SHIFT
    return h


class FirstFragmentTable:
    """``limit`` most recently touched keys and the value of their last touch."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._top = 0  # log positions in use
        self._allocate(4 * limit, 1)

    def update(self, words: np.ndarray, hashes: np.ndarray, values: np.ndarray,
               asked: np.ndarray, asked_hashes: np.ndarray, asked_after: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """Touch a batch's first fragments (``words``, ``hashes``, ``values``, in order) and
        answer the ``asked`` keys, each asked after the first ``asked_after[i]`` touches of the
        batch: (remembered, value of the last touch where remembered)."""
        start = self._make_room(len(words), words.shape[1])
        self._append(words, hashes, values)
        bound = start + asked_after
        found = self._newest(asked, asked_hashes, self._index[self._slots(asked_hashes)], bound)
        remembered = found >= 0
        near = remembered & (bound - found <= self.limit)
        for i in np.flatnonzero(remembered & ~near).tolist():
            remembered[i] = self._distinct_between(int(found[i]), int(bound[i])) < self.limit
        return remembered, self._values[np.where(remembered, found, 0)]

    def items(self) -> list[tuple[bytes, int]]:
        """(key words as bytes, value) of the remembered keys, least recently touched first."""
        live = np.flatnonzero(self._live())[-self.limit:]
        return [(self._words[p].tobytes(), int(self._values[p])) for p in live.tolist()]

    # --- the log ----------------------------------------------------------------------------

    def _allocate(self, capacity: int, width: int) -> None:
        self._capacity = capacity
        self._words = np.zeros((capacity, width), dtype=np.uint64)
        self._values = np.zeros(capacity, dtype=np.int64)
        self._hashes = np.zeros(capacity, dtype=np.uint64)
        self._chain = np.zeros(capacity, dtype=np.int64)
        self._prev = np.zeros(capacity, dtype=np.int64)
        # Two slots per log position: chains stay short, and the index small enough to stay
        # in cache (its reads and writes are random).
        self._bits = max(10, int(2 * capacity - 1).bit_length())
        self._index = np.full(1 << self._bits, -1, dtype=np.int32)
        self._marks = np.zeros(1 << self._bits, dtype=bool)  # scratch, all False between uses

    def _slots(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes >> np.uint64(64 - self._bits)).astype(np.int64)

    def _make_room(self, count: int, width: int) -> int:
        """Compact (and grow) the log if ``count`` more touches do not fit; where they go."""
        if self._top == 0 and self._words.shape[1] != width:  # the first keys set the width
            self._allocate(max(self._capacity, count), width)
        if self._top + count <= self._capacity:
            return self._top
        keep = np.flatnonzero(self._live())[-self.limit:]
        kept = (self._words[keep], self._hashes[keep], self._values[keep])
        self._top = 0
        if len(keep) + count > self._capacity:
            self._allocate(2 * (len(keep) + count), width)
        else:
            self._index.fill(-1)
        self._append(*kept)
        return self._top

    def _live(self) -> np.ndarray:
        """Which touches of the log are their key's last one."""
        live = np.ones(self._top, dtype=bool)
        prev = self._prev[: self._top]
        live[prev[prev >= 0]] = False
        return live

    def _append(self, words: np.ndarray, hashes: np.ndarray, values: np.ndarray) -> None:
        start, stop = self._top, self._top + len(words)
        if start == stop:
            return
        self._top = stop
        self._words[start:stop] = words
        self._hashes[start:stop] = hashes
        self._values[start:stop] = values
        positions = np.arange(start, stop)
        slots = self._slots(hashes)
        self._chain[start:stop] = self._index[slots]
        self._index[slots] = positions
        self._chain_same_slots(slots, positions)
        self._prev[start:stop] = self._newest(words, hashes, self._chain[start:stop], positions)

    def _chain_same_slots(self, slots: np.ndarray, positions: np.ndarray) -> None:
        """Link the touches of the batch that share a slot (the index kept only one of each)."""
        shared = self._index[slots] != positions
        if not shared.any():
            return
        marked = self._marks
        marked[slots[shared]] = True
        members = np.flatnonzero(marked[slots])
        marked[slots[shared]] = False
        members = members[np.lexsort((positions[members], slots[members]))]
        group_slots, group_positions = slots[members], positions[members]
        follows = group_slots[1:] == group_slots[:-1]
        self._chain[group_positions[1:][follows]] = group_positions[:-1][follows]
        last = np.append(~follows, True)
        self._index[group_slots[last]] = group_positions[last]

    def _newest(self, words: np.ndarray, hashes: np.ndarray, start: np.ndarray,
                bound: np.ndarray) -> np.ndarray:
        """Per key of ``words``: the newest log position before ``bound`` holding it, found by
        walking the slot chain from ``start``; -1 if none."""
        found = np.full(len(words), -1, dtype=np.int64)
        todo = np.flatnonzero(start >= 0)
        at = start[todo]
        while len(todo):
            same = (self._hashes[at] == hashes[todo]) & (at < bound[todo])
            maybe = np.flatnonzero(same)
            same[maybe] = (self._words[at[maybe]] == words[todo[maybe]]).all(axis=1)
            found[todo[same]] = at[same]
            todo, at = todo[~same], self._chain[at[~same]]
            going = at >= 0
            todo, at = todo[going], at[going]
        return found

    def _distinct_between(self, after: int, before: int) -> int:
        """Distinct keys whose last touch before log position ``before`` comes after ``after``:
        the touches between, less those that re-touch a key touched between."""
        prev = self._prev[after + 1 : before]
        return len(prev) - int(np.count_nonzero(prev > after))
