"""The open flows of one streaming shard, with their due times: what a timer firing reads.

Pure Python, no Beam: ``BuildFlows``'s streaming DoFn keeps one ``OpenFlows`` per shard in
state (``dump``/``restore``) and calls ``add`` with the fragments that arrived and ``release``
when its timer fires. A firing must cost what is due, not what is open: with 100k open flows
in 256 shards a shard holds ~400 flows and fires about every second of event time, and
running the flow rules on all of them at every firing (as ``BuildFlows`` first did) made the
work per fragment grow with the number of open flows. So:

- each flow's fragments and continuation stay pickled (``bytes``) until the flow is touched:
  a firing unpickles only the flows that are due or got new fragments, and ``dump`` writes
  the others back as the same ``bytes`` objects;
- each flow's due time (when its next row can be final) sits next to its bytes; a flow that
  got new fragments is due at once (``DUE_NOW``: the next release finds its exact due time).

Restoring the shard, finding what is due (one pass over the due times, in a comprehension)
and dumping it back cost ~0.35 us per open flow here, all but the pass in C; the flow rules
(``advance``, ~5-10 us) run only on the due and touched flows. A heap of due times kept in
state cost more: ~0.8 us per open flow, because pickling its tuples outweighs the pass it
saves.

Times: ``release(now_us)`` emits the rows final at ``now_us`` (the watermark reached it);
the largest ``now_us`` seen is the shard's *frontier*. A fragment starting before the
frontier arrived behind the watermark (late): it may belong to a row already emitted, so it
is counted; it still ends up in a row (merged with what is open, or in a new row of its flow).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import NamedTuple

from flowbeam.flows.engine import FORCED_END, IDLE_TIMEOUT, EmittedRow, advance
from flowbeam.flows.fragment import Continuation, Fragment

_PROTOCOL = pickle.HIGHEST_PROTOCOL
DUE_NOW = -1  # a flow with new fragments: advance it at the next release, whatever the time

Flow = tuple[list[Fragment], Continuation | None]


class OpenFlows:
    """One shard's open flows: fragments and continuation per flow key, and when each is due."""

    def __init__(self, idle_us: int, active_us: int) -> None:
        self._idle_us = idle_us
        self._active_us = active_us
        # pickled flow key -> (due time, pickled flow); the pickled flow is None while the
        # flow is in ``_loaded``. Keys are plain ints and a str, as the decoders make them,
        # so equal keys pickle to equal bytes.
        self._flows: dict[bytes, tuple[int, bytes | None]] = {}
        self._loaded: dict[bytes, Flow] = {}  # flows unpickled since ``restore``
        self.frontier: int | None = None  # the latest time rows were released at

    def __len__(self) -> int:
        return len(self._flows)

    @classmethod
    def restore(cls, blob: bytes | None, idle_us: int, active_us: int) -> OpenFlows:
        """The shard as ``dump`` left it (``None``: an empty shard)."""
        flows = cls(idle_us, active_us)
        if blob is not None:
            flows._flows, flows.frontier = pickle.loads(blob)
        return flows

    def dump(self) -> bytes:
        """The shard as bytes; untouched flows are written back as they were read.

        A tuple of builtins around pickled ``Fragment``s and ``Continuation``s: no class of
        this module is pickled, so it can change without breaking a job's stored state.
        """
        for key, flow in self._loaded.items():
            entry = self._flows.get(key)
            if entry is not None:
                self._flows[key] = (entry[0], pickle.dumps(flow, _PROTOCOL))
        self._loaded = {}
        return pickle.dumps((self._flows, self.frontier), _PROTOCOL)

    def add(self, fragments: Iterable[Fragment]) -> int:
        """Take new fragments; returns how many started before the frontier (late ones)."""
        late = 0
        for fragment in fragments:
            if self.frontier is not None and fragment.first_us < self.frontier:
                late += 1
            key = pickle.dumps(fragment.key, _PROTOCOL)
            self._load(key)[0].append(fragment)
            self._flows[key] = (DUE_NOW, None)
        return late

    def release(self, now_us: int | None) -> list[ReleasedRow]:
        """Rows final at ``now_us`` (or at the frontier, if later) of the due flows.

        ``None``: the input has ended, every row is released and no flow stays open.
        """
        if now_us is None:
            work = list(self._flows)
        else:
            now_us = now_us if self.frontier is None else max(now_us, self.frontier)
            self.frontier = now_us
            work = [key for key, (due, _) in self._flows.items() if due <= now_us]
        released: list[ReleasedRow] = []
        for key in work:
            released += self._advance(key, now_us)
        return released

    def next_due(self) -> int | None:
        """When the next row can be final (``None``: no open flow)."""
        return min((due for due, _ in self._flows.values()), default=None)

    def _load(self, key: bytes) -> Flow:
        flow = self._loaded.get(key)
        if flow is None:
            entry = self._flows.get(key)
            flow = ([], None) if entry is None else pickle.loads(entry[1])
            self._loaded[key] = flow
        return flow

    def _advance(self, key: bytes, now_us: int | None) -> list[ReleasedRow]:
        """Run the flow rules on one flow; keep what stays open and when it is due."""
        fragments, continuation = self._load(key)
        rows, kept, continuation, due = advance(
            fragments, self._idle_us, self._active_us, now_us, continuation)
        if due is None:
            del self._flows[key]
            del self._loaded[key]
        else:
            self._loaded[key] = (kept, continuation)
            self._flows[key] = (due, None)
        last = len(rows) - 1 if due is None else -1
        return [ReleasedRow(row, index == last) for index, row in enumerate(rows)]


class ReleasedRow(NamedTuple):
    """An emitted row, and whether it is the last row of what the shard holds of its flow (no
    later fragment of the flow is known): the only kind of row a drain can cut off."""

    row: EmittedRow
    last: bool

    def cut_off(self) -> EmittedRow:
        """The row as emitted when the input was cut off (a drain) before it was released:
        a flow's last row says ``forced_end`` where time alone said ``idle_timeout``."""
        if self.last and self.row.status == IDLE_TIMEOUT:
            return self.row._replace(status=FORCED_END)
        return self.row
