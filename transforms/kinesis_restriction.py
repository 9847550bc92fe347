"""The restriction of the Kinesis reader's splittable DoFn: a set of shard cursors, and the
tracker that advances them record by record.

A restriction starts as one root shard (``flowbeam.kinesis_shards.initial_cursors``). Claims
move it forward: a record claim moves its shard's cursor to *after* that record; an end claim
removes a finished shard and adds the children it adopts (a split's two children, a merge's
child). So the restriction is always "what is left to read", and the residual of a checkpoint
(``try_split(0)``) is exactly that. The runner persists it with the bundle's output: a retried
bundle, a restarted worker or a job updated in place (Dataflow ``--update``) resumes after the
last record handed on, so nothing is lost and nothing is read twice. A drain truncates the
restriction (the default ``truncate`` of an unbounded restriction): reading stops there.

A split's two children stay in the parent's restriction, read in turn by one DoFn call, which
is what keeps "parent before child" without any coordination between workers. A dynamic split
(``try_split`` with a fraction > 0, from runners that issue them) hands whole shards, each with
the children waiting on it, to the residual.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.transforms.core import RestrictionProvider

from flowbeam.kinesis_shards import ShardCursor, ShardStart


@dataclass(frozen=True)
class ShardRestriction:
    """The shards left to read (``cursors``), where children adopted later start (the read's
    start), and whether each shard ends when caught up (``bounded``) rather than when closed."""

    cursors: tuple[ShardCursor, ...]
    child_start: ShardStart
    bounded: bool = False


@dataclass(frozen=True)
class RecordClaim:
    """Hand on the record ``sequence_number`` of ``shard_id``."""

    shard_id: str
    sequence_number: str


@dataclass(frozen=True)
class ShardEndClaim:
    """``shard_id`` is finished: closed and read to its end (then ``children`` are its adopted
    children), or caught up in a reader told to stop at the latest record (no children)."""

    shard_id: str
    children: tuple[ShardCursor, ...] = ()


def _groups(cursors: Iterable[ShardCursor]) -> list[list[ShardCursor]]:
    """Cursors grouped so a child waiting for a parent stays in the parent's group."""
    groups: list[list[ShardCursor]] = []
    group_of: dict[str, list[ShardCursor]] = {}
    for cursor in cursors:
        joined = [group_of[p] for p in cursor.waits_for if p in group_of]
        group = joined[0] if joined else []
        if not joined:
            groups.append(group)
        for other in joined[1:]:
            if other is not group:
                group.extend(other)
                groups.remove(other)
                for member in other:
                    group_of[member.shard_id] = group
        group.append(cursor)
        group_of[cursor.shard_id] = group
    return groups


class ShardRestrictionTracker(RestrictionTracker):
    """Tracks a ``ShardRestriction`` as ``RecordClaim``s and ``ShardEndClaim``s arrive.

    A claim fails (False) for a shard the tracker no longer holds: after a checkpoint
    (everything went to the residual) or a dynamic split (that shard went to the residual).
    The DoFn then stops reading that shard; whatever it fetched beyond the last successful
    claim is read again by whoever holds the residual.
    """

    def __init__(self, restriction: ShardRestriction) -> None:
        self._cursors = {cursor.shard_id: cursor for cursor in restriction.cursors}
        self._child_start = restriction.child_start
        self._bounded = restriction.bounded
        self._claimed = 0

    def current_restriction(self) -> ShardRestriction:
        return self._restriction(self._cursors.values())

    def _restriction(self, cursors: Iterable[ShardCursor]) -> ShardRestriction:
        return ShardRestriction(tuple(cursors), self._child_start, self._bounded)

    def try_claim(self, position: RecordClaim | ShardEndClaim) -> bool:
        if position.shard_id not in self._cursors:
            return False
        if isinstance(position, RecordClaim):
            self._cursors[position.shard_id] = ShardCursor(
                position.shard_id, ShardStart.after(position.sequence_number))
            self._claimed += 1
            return True
        del self._cursors[position.shard_id]
        for child in position.children:
            self._cursors.setdefault(child.shard_id, child)
        return True

    def try_split(self, fraction_of_remainder: float
                  ) -> tuple[ShardRestriction, ShardRestriction] | None:
        if not self._cursors:
            return None
        groups = _groups(self._cursors.values())
        if fraction_of_remainder > 0:
            keep = len(groups) - math.floor(len(groups) * fraction_of_remainder)
            if keep >= len(groups) or keep < 1:
                return None
        else:
            keep = 0
        primary = [cursor for group in groups[:keep] for cursor in group]
        residual = [cursor for group in groups[keep:] for cursor in group]
        self._cursors = {cursor.shard_id: cursor for cursor in primary}
        return self._restriction(primary), self._restriction(residual)

    def check_done(self) -> None:
        if self._cursors:
            raise ValueError(f"shards left unread: {sorted(self._cursors)}")

    def current_progress(self) -> RestrictionProgress:
        # A stream has no end to measure against: records handed on, and one unit per shard
        # still open so a restriction with work left never looks finished.
        return RestrictionProgress(completed=float(self._claimed),
                                   remaining=float(len(self._cursors)))

    def is_bounded(self) -> bool:
        return self._bounded


class ShardRestrictionProvider(RestrictionProvider):
    """The element is the initial restriction itself (one root shard, from discovery)."""

    def initial_restriction(self, element: ShardRestriction) -> ShardRestriction:
        return element

    def create_tracker(self, restriction: ShardRestriction) -> ShardRestrictionTracker:
        return ShardRestrictionTracker(restriction)

    def restriction_size(self, element: ShardRestriction, restriction: ShardRestriction
                         ) -> float:
        return float(len(restriction.cursors))
