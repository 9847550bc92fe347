"""The Kinesis reader's rules without a server: the restriction tracker (claims, checkpoints,
dynamic splits), the shards a read starts from, start positions, the backoff schedule."""

from __future__ import annotations

import random

import pytest

from flowbeam.kinesis_shards import (
    Shard,
    ShardCursor,
    ShardStart,
    backoff_seconds,
    initial_cursors,
    parse_start_position,
)
from transforms.kinesis_restriction import (
    RecordClaim,
    ShardEndClaim,
    ShardRestriction,
    ShardRestrictionTracker,
)


def test_tracker_claims_checkpoints_and_hands_whole_lineages_to_a_dynamic_split():
    start = ShardStart("TRIM_HORIZON")
    tracker = ShardRestrictionTracker(ShardRestriction((ShardCursor("p", start),), start))
    assert tracker.try_claim(RecordClaim("p", "7"))
    assert tracker.try_claim(ShardEndClaim("p", (ShardCursor("a", start),
                                                 ShardCursor("b", start),
                                                 ShardCursor("m", start, ("a", "b")))))
    assert not tracker.try_claim(RecordClaim("x", "1"))
    assert tracker.try_claim(RecordClaim("a", "9"))
    assert tracker.try_split(0.5) is None  # a, b and their merge child are one lineage
    tracker = ShardRestrictionTracker(ShardRestriction(
        (ShardCursor("a", start), ShardCursor("b", start), ShardCursor("c", start)), start))
    primary, residual = tracker.try_split(0.5)
    assert [c.shard_id for c in primary.cursors] == ["a", "b"]
    assert [c.shard_id for c in residual.cursors] == ["c"]
    assert not tracker.try_claim(RecordClaim("c", "1"))
    assert tracker.try_claim(RecordClaim("b", "5"))
    primary, residual = tracker.try_split(0)
    assert primary.cursors == ()
    assert residual.cursors == (ShardCursor("a", start), ShardCursor("b", ShardStart.after("5")))
    tracker.check_done()
    assert not tracker.try_claim(RecordClaim("a", "2"))


def test_initial_cursors_start_at_the_roots_or_after_the_resumed_positions():
    shards = [Shard("p", (), True), Shard("a", ("p",), True),
              Shard("b", ("p",), False), Shard("m", ("a", "x"), False),
              Shard("y", ("gone",), False)]
    start = ShardStart("TRIM_HORIZON")
    at = parse_start_position("at_timestamp:2026-12-01T06:00:00", 0.0)
    assert at == ShardStart("AT_TIMESTAMP", timestamp=1796104800.0)
    assert initial_cursors(shards, at) == [ShardCursor("p", at), ShardCursor("y", at)]
    assert initial_cursors(shards, start, {"a": "42"}) == [
        ShardCursor("a", ShardStart.after("42")), ShardCursor("b", start),
        ShardCursor("y", start)]
    assert parse_start_position("latest", 5.0) == ShardStart("AT_TIMESTAMP", timestamp=5.0)
    with pytest.raises(ValueError, match="expected one of latest, trim_horizon"):
        parse_start_position("earliest", 0.0)


def test_backoff_doubles_within_jitter_up_to_the_cap():
    rng = random.Random(3)
    for attempt, (low, high) in enumerate([(0.1, 0.2), (0.2, 0.4), (0.4, 0.8), (5.0, 10.0)], 1):
        delay = backoff_seconds(attempt if attempt < 4 else 12, rng)
        assert low <= delay <= high
