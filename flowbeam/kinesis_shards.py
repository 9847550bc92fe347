"""The rules of reading a Kinesis stream's shards, without any client: where a shard's reading
starts, which shards a reader starts from, which shards follow a closed one, and how long to
back off when Kinesis throttles. ``transforms.kinesis_read`` makes the calls; these functions
decide, so the decisions are testable without a server.

Resharding: a split closes one shard and opens two children; a merge closes two adjacent
shards and opens one child. A child's records come after its parents' records, so a reader
that must keep each partition key's order reads a parent to its end before the child.
Ownership rule: a child is read by whoever finished its *first listed* parent (``ParentShardId``,
else ``AdjacentParentShardId`` when the first has expired out of the stream); a child never
starts before the parents held by the same reader have ended.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

TRIM_HORIZON = "TRIM_HORIZON"
AT_TIMESTAMP = "AT_TIMESTAMP"
AFTER_SEQUENCE_NUMBER = "AFTER_SEQUENCE_NUMBER"
START_POSITION_CHOICES = ("latest", "trim_horizon", "at_timestamp:ISO8601")

BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0


@dataclass(frozen=True)
class ShardStart:
    """Where reading one shard begins: the arguments of GetShardIterator besides the stream
    and the shard. Resuming is always ``after`` the last record handed on, so a record is
    neither skipped nor read twice."""

    iterator_type: str
    sequence_number: str | None = None
    timestamp: float | None = None  # seconds since the epoch, for AT_TIMESTAMP

    @staticmethod
    def after(sequence_number: str) -> ShardStart:
        return ShardStart(AFTER_SEQUENCE_NUMBER, sequence_number=sequence_number)

    def iterator_arguments(self) -> dict[str, object]:
        """The GetShardIterator keyword arguments for this start."""
        arguments: dict[str, object] = {"ShardIteratorType": self.iterator_type}
        if self.sequence_number is not None:
            arguments["StartingSequenceNumber"] = self.sequence_number
        if self.timestamp is not None:
            arguments["Timestamp"] = datetime.fromtimestamp(self.timestamp, UTC)
        return arguments


def parse_start_position(text: str, now: float) -> ShardStart:
    """``latest``, ``trim_horizon`` or ``at_timestamp:ISO8601`` as the start of every shard of
    a read (a child created after an AT_TIMESTAMP time starts at its beginning all the same).

    ``latest`` becomes "records that arrive from ``now`` on" (AT_TIMESTAMP now), not Kinesis's
    LATEST iterator: a LATEST iterator taken after a restart or a retried bundle would skip
    what arrived in between, while a timestamp means the same records every time.
    An ISO 8601 time without a zone is UTC.
    """
    if text == "latest":
        return ShardStart(AT_TIMESTAMP, timestamp=now)
    if text == "trim_horizon":
        return ShardStart(TRIM_HORIZON)
    prefix = "at_timestamp:"
    if text.startswith(prefix):
        try:
            moment = datetime.fromisoformat(text[len(prefix):])
        except ValueError:
            raise ValueError(f"start position {text!r}: not an ISO 8601 time after "
                             f"{prefix!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return ShardStart(AT_TIMESTAMP, timestamp=moment.timestamp())
    raise ValueError(f"start position {text!r}: expected one of "
                     f"{', '.join(START_POSITION_CHOICES)}")


@dataclass(frozen=True)
class Shard:
    """One shard of a ListShards answer: its id, its parents (first listed first), closed or
    open."""

    shard_id: str
    parents: tuple[str, ...]
    closed: bool

    @staticmethod
    def from_listing(entry: Mapping[str, object]) -> Shard:
        parents = tuple(str(entry[key]) for key in ("ParentShardId", "AdjacentParentShardId")
                        if entry.get(key))
        sequence_range = entry.get("SequenceNumberRange")
        closed = isinstance(sequence_range, Mapping) and "EndingSequenceNumber" in sequence_range
        return Shard(str(entry["ShardId"]), parents, closed)


@dataclass(frozen=True)
class ShardCursor:
    """A shard to read from ``start``; ``waits_for``: parents that must end first."""

    shard_id: str
    start: ShardStart
    waits_for: tuple[str, ...] = ()


def _owner(shard: Shard, listed: Mapping[str, Shard]) -> str | None:
    """The parent whose reader adopts ``shard``: its first parent still in the stream."""
    return next((parent for parent in shard.parents if parent in listed), None)


def children(shard_id: str, shards: Iterable[Shard], start: ShardStart) -> tuple[ShardCursor, ...]:
    """The cursors of the children adopted by the reader that finished ``shard_id``, each
    waiting for its other listed parents (the second half of a merge)."""
    listed = {shard.shard_id: shard for shard in shards}
    return tuple(ShardCursor(shard.shard_id, start,
                             tuple(p for p in shard.parents if p in listed and p != shard_id))
                 for shard in listed.values() if _owner(shard, listed) == shard_id)


def _ancestors(shard_id: str, listed: Mapping[str, Shard]) -> set[str]:
    found: set[str] = set()
    pending = [shard_id]
    while pending:
        for parent in listed[pending.pop()].parents:
            if parent in listed and parent not in found:
                found.add(parent)
                pending.append(parent)
    return found


def initial_cursors(shards: Iterable[Shard], start: ShardStart,
                    resume_after: Mapping[str, str] | None = None) -> list[ShardCursor]:
    """The shards a reader starts from, one cursor each, in listing order.

    Without ``resume_after`` these are the roots: the shards none of whose parents is still in
    the stream, starting at ``start``; every other shard is reached by following children.
    ``resume_after`` (shard id -> last sequence number already handed on, from an earlier run)
    starts those shards after that record; their ancestors count as finished (a child is read
    only after its parents), and the remaining lineages start as usual.
    """
    listed = {shard.shard_id: shard for shard in shards}
    resumed = {shard_id: seq for shard_id, seq in (resume_after or {}).items()
               if shard_id in listed}
    finished = set().union(*(_ancestors(shard_id, listed) for shard_id in resumed))
    waiting = set(listed) - finished  # shards not finished: resumed, or to be read by lineage
    cursors = []
    for shard in listed.values():
        if shard.shard_id in finished:
            continue
        if shard.shard_id in resumed:
            cursors.append(ShardCursor(shard.shard_id, ShardStart.after(resumed[shard.shard_id])))
        elif not any(parent in waiting for parent in shard.parents):
            cursors.append(ShardCursor(shard.shard_id, start))
    return cursors


def backoff_seconds(attempt: int, rng: random.Random, base_s: float = BACKOFF_BASE_S,
                    cap_s: float = BACKOFF_CAP_S) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...) of a throttled call: exponential,
    bounded by ``cap_s``, with "equal jitter" (between half and all of the step) so that many
    readers throttled together do not retry in lockstep."""
    step = min(cap_s, base_s * 2 ** (attempt - 1))
    return step / 2 + rng.uniform(0, step / 2)
