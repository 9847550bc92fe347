"""ReadFromKinesis against real servers on 127.0.0.1: moto (reads, start positions, throttling and
expired iterators through a fault proxy, following a stream) and kinesalite (splits and merges).
Restarts: tests/test_kinesis_restart.py; the rules without a server: tests/test_kinesis_shards.py.

``read_restrictions`` drives the splittable DoFn the way Beam's SDF invoker does (tracker
wrapped thread-safe, ``defer_remainder`` -> residual -> next call) so a test can see the order
records come out in and take a checkpoint where it wants; the pipeline tests run the whole
transform on the FnApiRunner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Duration, Timestamp

from flowbeam.kinesis_shards import ShardCursor, ShardStart
from tests.kinesis_servers import (
    REGION,
    FaultProxy,
    KinesisEndpoint,
    new_stream,
    put,
    wait_active,
)
from transforms import counters
from transforms.kinesis_client import KinesisConnection
from transforms.kinesis_read import KinesisRecord, ReadFromKinesis, _DiscoverShards, _ReadShards
from transforms.kinesis_restriction import ShardRestriction, ShardRestrictionTracker

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("aws_credentials")]


def reader(endpoint: KinesisEndpoint, stream: str, idle_lag_s: float = 2.0) -> _ReadShards:
    dofn = _ReadShards(stream, KinesisConnection(REGION, endpoint.url), poll_interval_s=0.0,
                       max_read_s=2.0, idle_watermark_lag_s=idle_lag_s)
    dofn.setup()
    return dofn


def seeds(endpoint: KinesisEndpoint, stream: str, start: str = "trim_horizon",
          bounded: bool = True) -> list[ShardRestriction]:
    discover = _DiscoverShards(stream, KinesisConnection(REGION, endpoint.url), start, None,
                               bounded)
    return list(discover.process(b""))


def read_restrictions(dofn: _ReadShards, restrictions: list[ShardRestriction],
                      checkpoint: Callable[[int], bool] = lambda _: False
                      ) -> tuple[list[KinesisRecord], list[ShardRestriction]]:
    """Run each restriction as the SDF invoker does, call after call, until none is left.
    ``checkpoint(n)`` true after the n-th output: the runner checkpoints there (try_split(0))
    and the residuals are returned instead of being read."""
    records: list[KinesisRecord] = []
    stopped: list[ShardRestriction] = []
    for restriction in restrictions:
        state = None
        while restriction is not None:
            tracker = ThreadsafeRestrictionTracker(ShardRestrictionTracker(restriction))
            estimator = ManualWatermarkEstimator(state)
            for value in dofn.process(restriction, tracker=RestrictionTrackerView(tracker),
                                      watermark_estimator=estimator):
                assert value.timestamp.micros == value.value.approximate_arrival_timestamp
                records.append(value.value)
                if checkpoint(len(records)):
                    stopped.append(tracker.try_split(0)[1])
            tracker.check_done()
            state = estimator.get_estimator_state()
            deferred = tracker.deferred_status()
            restriction = deferred[0] if deferred else None
    return records, stopped


def assert_exactly(records: list[KinesisRecord], data: list[bytes]) -> None:
    assert len({(r.shard_id, r.sequence_number) for r in records}) == len(records)
    assert sorted(r.data for r in records) == sorted(data)


def test_every_record_of_two_shards_once_with_its_arrival_time(moto):
    stream = new_stream(moto, 2)
    data = put(moto, stream, 0, 1200)
    records, _ = read_restrictions(reader(moto, stream), seeds(moto, stream))
    assert_exactly(records, data)
    assert {r.shard_id for r in records} == {"shardId-000000000000", "shardId-000000000001"}
    # Each shard's records in sequence order, with the server's arrival times.
    client = moto.client()
    for shard_id in ("shardId-000000000000", "shardId-000000000001"):
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard_id,
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        served = client.get_records(ShardIterator=iterator)["Records"]
        mine = [r for r in records if r.shard_id == shard_id]
        assert [(r.sequence_number, r.partition_key, r.data) for r in mine] == [
            (s["SequenceNumber"], s["PartitionKey"], s["Data"]) for s in served]
        assert [datetime.fromtimestamp(r.approximate_arrival_timestamp / 1e6, UTC)
                for r in mine] == [s["ApproximateArrivalTimestamp"] for s in served]
    assert all(r.stream == stream for r in records)


def test_start_positions(moto):
    stream = new_stream(moto, 2)
    before = put(moto, stream, 0, 40)
    time.sleep(0.05)
    moment = datetime.now(UTC)
    time.sleep(0.05)
    middle = put(moto, stream, 40, 40)
    from_latest = seeds(moto, stream, "latest")  # the pipeline starts here
    time.sleep(0.05)
    after = put(moto, stream, 80, 40)
    dofn = reader(moto, stream)
    assert_exactly(read_restrictions(dofn, seeds(moto, stream))[0], before + middle + after)
    assert_exactly(read_restrictions(dofn, seeds(moto, stream,
                                                 f"at_timestamp:{moment.isoformat()}"))[0],
                   middle + after)
    assert_exactly(read_restrictions(dofn, from_latest)[0], after)


def run_pipeline(endpoint: KinesisEndpoint, stream: str, check: Callable, **read_args):
    options = PipelineOptions(["--runner=FnApiRunner"])
    with beam.Pipeline(options=options) as pipeline:
        records = pipeline | ReadFromKinesis(stream, REGION, endpoint.url, "trim_horizon",
                                             stop_at_latest=True, poll_interval_s=0.0,
                                             **read_args)
        stamped = records | beam.Map(lambda r, ts=beam.DoFn.TimestampParam: (
            r, ts.micros == r.approximate_arrival_timestamp))
        check(stamped)
    return pipeline.result


def expect(expected: list[tuple[str, bytes, bool]]) -> Callable:
    """A check: the output is exactly these (sequence number, data, timestamp-is-arrival)."""
    return lambda stamped: assert_that(
        stamped | beam.MapTuple(lambda r, ok: (r.sequence_number, r.data, ok)),
        equal_to(expected))


def served(endpoint: KinesisEndpoint, stream: str, data: list[bytes]):
    """The (sequence number, data, True) of the records of ``data``, read from the server."""
    client = endpoint.client()
    found = []
    for shard in client.list_shards(StreamName=stream)["Shards"]:
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        found += [(r["SequenceNumber"], r["Data"], True)
                  for r in client.get_records(ShardIterator=iterator)["Records"]
                  if r["Data"] in set(data)]
    assert sorted(d for _, d, _ in found) == sorted(data)
    return found


def counter_value(result, name: str) -> int:
    """The flowbeam counter ``name`` summed over the steps that count it."""
    return sum(counter.committed for counter in result.metrics().query(
        MetricsFilter().with_namespace(counters.NAMESPACE).with_name(name))["counters"])


def test_throttled_and_failed_calls_back_off_and_lose_nothing(moto):
    stream = new_stream(moto, 2)
    data = put(moto, stream, 0, 300)
    with FaultProxy(moto) as proxy:
        proxy.fail("ListShards", "LimitExceededException", [1])
        proxy.fail("GetShardIterator", "LimitExceededException", [2])
        proxy.fail("GetRecords", "ProvisionedThroughputExceededException", [1, 2, 3])
        proxy.fail("GetRecords", "InternalFailure", [4], status=500)
        result = run_pipeline(proxy.endpoint, stream, expect(served(moto, stream, data)))
    assert counter_value(result, counters.KINESIS_THROTTLED) == 5
    assert counter_value(result, counters.KINESIS_ERRORS) == 1
    assert counter_value(result, counters.KINESIS_RECORDS) == 300


def test_a_stream_that_does_not_exist_fails_the_read_at_its_start(moto):
    with pytest.raises(Exception, match="ResourceNotFoundException"):
        run_pipeline(moto, "no-such-stream", lambda records: None)


def test_expired_iterators_resume_after_the_last_record(moto):
    stream = new_stream(moto, 2)
    data = put(moto, stream, 0, 200)
    with FaultProxy(moto, records_per_call=7) as proxy:
        proxy.fail("GetRecords", "ExpiredIteratorException", [3, 9, 10])
        result = run_pipeline(proxy.endpoint, stream, expect(served(moto, stream, data)))
    assert counter_value(result, counters.KINESIS_EXPIRED_ITERATORS) == 3
    assert counter_value(result, counters.KINESIS_RECORDS) == 200
    assert proxy.calls["GetRecords"] > 200 // 7


def test_following_a_caught_up_shard_defers_and_moves_the_watermark_to_now(moto):
    stream = new_stream(moto, 1)
    put(moto, stream, 0, 30)
    [restriction] = seeds(moto, stream, bounded=False)
    dofn = reader(moto, stream, idle_lag_s=0.2)

    def one_call(restriction, state):
        tracker = ThreadsafeRestrictionTracker(ShardRestrictionTracker(restriction))
        estimator = ManualWatermarkEstimator(state)
        out = [value.value for value in dofn.process(
            restriction, tracker=RestrictionTrackerView(tracker), watermark_estimator=estimator)]
        tracker.check_done()
        residual, _ = tracker.deferred_status()
        return out, residual, estimator.current_watermark()

    out, residual, watermark = one_call(restriction, None)
    assert [r.data for r in out] == [b"record-%05d" % n for n in range(30)]
    assert residual.cursors == (ShardCursor(out[-1].shard_id,
                                            ShardStart.after(out[-1].sequence_number)),)
    assert watermark.micros == out[-1].approximate_arrival_timestamp
    put(moto, stream, 30, 5)
    out, residual, watermark = one_call(residual, watermark)
    assert [r.data for r in out] == [b"record-%05d" % n for n in range(30, 35)]
    # Idle and caught up: the watermark moves to now - idle lag, once that passed the last record.
    time.sleep(0.3)
    before = Timestamp.now()
    out, residual, watermark = one_call(residual, watermark)
    assert out == [] and residual.cursors[0].start == ShardStart.after("35")
    lag = Duration(seconds=0.2)
    assert before - lag <= watermark <= Timestamp.now() - lag


def test_parents_are_read_to_their_end_before_their_children(lite):
    stream = new_stream(lite, 1)
    client = lite.client()
    data = put(lite, stream, 0, 150)
    client.split_shard(StreamName=stream, ShardToSplit="shardId-000000000000",
                       NewStartingHashKey=str(2 ** 127))
    wait_active(lite, stream)
    data += put(lite, stream, 150, 150)
    client.merge_shards(StreamName=stream, ShardToMerge="shardId-000000000001",
                        AdjacentShardToMerge="shardId-000000000002")
    wait_active(lite, stream)
    data += put(lite, stream, 300, 150)

    records, _ = read_restrictions(reader(lite, stream), seeds(lite, stream))
    assert_exactly(records, data)
    order = [r.shard_id[-1] for r in records]  # 0: the parent, 1 and 2: its children, 3: merged
    last = {shard: max(i for i, s in enumerate(order) if s == shard) for shard in "0123"}
    first = {shard: order.index(shard) for shard in "0123"}
    assert last["0"] < first["1"] and last["0"] < first["2"]
    assert max(last["1"], last["2"]) < first["3"]
    assert sorted(r.data for r in records if r.shard_id.endswith("0")) == data[:150]
    assert sorted(r.data for r in records if r.shard_id.endswith("3")) == data[300:]


def test_a_merge_of_two_roots_reads_everything_once_the_child_after_its_first_parent(lite):
    stream = new_stream(lite, 2)
    data = put(lite, stream, 0, 120)
    lite.client().merge_shards(StreamName=stream, ShardToMerge="shardId-000000000000",
                               AdjacentShardToMerge="shardId-000000000001")
    wait_active(lite, stream)
    data += put(lite, stream, 120, 60)
    [first_root, second_root] = seeds(lite, stream)
    dofn = reader(lite, stream)
    records = read_restrictions(dofn, [first_root])[0]
    assert [r.shard_id[-1] for r in records] == sorted(r.shard_id[-1] for r in records)
    assert {r.shard_id for r in records} == {"shardId-000000000000", "shardId-000000000002"}
    records += read_restrictions(dofn, [second_root])[0]
    assert_exactly(records, data)
