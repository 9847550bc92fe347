"""Bounded IP fragment tracking: gives non-first fragments the ports of their first fragment.

Non-first fragments carry no transport header, so the decoder remembers the ports of each
first fragment, keyed by (version, src, dst, protocol, IP id) for IPv4 and (version, src, dst,
fragment identification) for IPv6 (the keys ``slow_path`` builds), and gives them to the later
fragments of the same datagram. A non-first fragment seen before its first fragment waits until
the first fragment appears in this or a later batch, or until the end of the file, which emits
it with ports 0. Both tables are bounded: the oldest remembered first fragment is forgotten,
and the oldest waiting fragments are emitted at once with ports 0, so memory stays bounded on
hostile input and no packet is ever silently dropped.

Fragments travel as the decoder's row tuples, in ``COLUMN_NAMES`` order.
"""

from __future__ import annotations

import collections

# Indexes into a row tuple, in COLUMN_NAMES order.
_PROTOCOL, _SRC_PORT, _DST_PORT = 2, 7, 8


class FragmentTracker:
    """Ports of recent first fragments, and non-first fragments waiting for theirs (bounded)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.firsts: collections.OrderedDict[tuple, tuple[int, int, int]] = (
            collections.OrderedDict()
        )
        self.waiting: collections.OrderedDict[tuple, list[tuple]] = collections.OrderedDict()
        self.waiting_count = 0

    def first(self, key: tuple, proto: int, src_port: int, dst_port: int) -> list[tuple]:
        """Remember a first fragment; return the waiting fragments it releases, completed."""
        self.firsts[key] = (proto, src_port, dst_port)
        self.firsts.move_to_end(key)
        while len(self.firsts) > self.limit:
            self.firsts.popitem(last=False)
        released = self.waiting.pop(key, [])
        self.waiting_count -= len(released)
        return [_with_transport(row, proto, src_port, dst_port) for row in released]

    def later(self, key: tuple, row: tuple) -> list[tuple]:
        """A non-first fragment: completed at once if its first fragment is known, else kept.

        Returns the rows to emit now: the completed fragment, or the oldest waiting fragments
        pushed out (with ports 0) when the waiting list is over its bound.
        """
        known = self.firsts.get(key)
        if known is not None:
            return [_with_transport(row, *known)]
        self.waiting.setdefault(key, []).append(row)
        self.waiting_count += 1
        evicted: list[tuple] = []
        while self.waiting_count > self.limit:
            _, rows = self.waiting.popitem(last=False)
            self.waiting_count -= len(rows)
            evicted.extend(rows)
        return evicted

    def drain(self) -> list[tuple]:
        """All waiting fragments (ports 0), oldest first; the waiting list is emptied."""
        rows = [row for rows in self.waiting.values() for row in rows]
        self.waiting.clear()
        self.waiting_count = 0
        return rows


def _with_transport(row: tuple, proto: int, src_port: int, dst_port: int) -> tuple:
    values = list(row)
    values[_PROTOCOL], values[_SRC_PORT], values[_DST_PORT] = proto, src_port, dst_port
    return tuple(values)
