"""``BuildFlows``: merge flow fragments from any source into flow rows, in batch and streaming.

Fragments are keyed by a shard of their direction-independent flow key and merged in a
stateful DoFn with one event-time timer per shard. The rules themselves (idle and active
timeouts, TCP end of flow, direction) are the pure ``flow_engine.advance``; this module only
keeps state and decides *when* to call it:

- streaming (``transforms/flow_state.py``): the timer fires when the watermark reaches the
  earliest time at which a row of the shard can be final; the shard's ``OpenFlows`` (its
  flows, each with its due time) emits what is final at that time, running the rules only on
  the flows that are due or got fragments; a drain emits the flows still open as forced ends;
- batch (here): no row is final before all input is read (the watermark jumps to infinity
  only then, see FIELD-NOTES), so batch groups each shard's fragments (one GroupByKey) and
  emits everything at once (open flows as forced ends when their input ended while they were
  active): no state and no timers, whose per-shard bookkeeping on the local runner (the state
  cache sizes every value it holds, ~3 ms a call) cost more than the rules themselves.

Why shards and not one state cell per flow key: a stateful element costs ~90 us on the
in-process runners (state and timer bookkeeping), so a state cell per flow would cap a local
run at ~11k flows/s. Decoders hand over fragments in batches; ``_ShardFragmentsFn`` splits each
batch into one list per shard, so elements into the shuffle scale with (batches x shards)
while each shard's state still only holds its own open flows.

Streaming state values are pickled by the DoFn itself and stored as opaque bytes: the SDK's
state cache measures every cached value with ``objsize``, which walks a list of fragments
object by object (it dominated a profile of a 100k-flow run) but sizes a bytes value at once.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from itertools import chain

import apache_beam as beam

from flowbeam.flows.engine import advance_all
from flowbeam.flows.fragment import Fragment
from flowbeam.flows.records import to_flow_records
from transforms import counters
from transforms.flow_record_coder import FlowRecord
from transforms.flow_state import StreamingMergeFn
from transforms.fragment_coder import FragmentBatch

DEFAULT_SHARDS = 256


def shard_of(fragment: Fragment, shards: int) -> int:
    """The shard of a fragment's flow key, the same in every process.

    Ints and tuples of ints hash deterministically, str does not (``PYTHONHASHSEED``): two
    workers would put one flow's fragments in different shards. The scope (a str) goes in
    as its CRC.
    """
    key = fragment.key
    return hash((key[:9], zlib.crc32(key[9].encode()))) % shards


class _ShardFragmentsFn(beam.DoFn):
    """Split a batch of fragments into one (shard, fragments) element per shard it touches."""

    def __init__(self, shards: int) -> None:
        self._shards = shards

    def process(self, fragments: Iterable[Fragment]) -> Iterator[tuple[int, list[Fragment]]]:
        by_shard: dict[int, list[Fragment]] = defaultdict(list)
        for fragment in fragments:
            by_shard[shard_of(fragment, self._shards)].append(fragment)
        yield from by_shard.items()


class _MergeShardFn(beam.DoFn):
    """Batch, per shard: all of the shard's fragments (grouped by key), every row out."""

    def __init__(self, idle_us: int, active_us: int, source: str) -> None:
        self._idle_us = idle_us
        self._active_us = active_us
        self._source = source
        self._rows = counters.counter(counters.FLOW_ROWS)
        self._fragments = counters.counter(counters.FRAGMENTS)

    def process(self, shard: tuple[int, Iterable[list[Fragment]]]) -> Iterator[dict]:
        batches = list(shard[1])
        self._fragments.inc(sum(map(len, batches)))
        rows = advance_all(chain.from_iterable(batches), self._idle_us, self._active_us)
        self._rows.inc(len(rows))
        yield from to_flow_records(rows, self._source)


class _MergeShards(beam.PTransform):
    """Batch: a GroupByKey per shard, then the rules over each shard's fragments. The input
    ends before any row can be final, so batch needs no state and no timer: one shuffle."""

    def __init__(self, idle_us: int, active_us: int, source: str) -> None:
        super().__init__()
        self._merge = _MergeShardFn(idle_us, active_us, source)

    def expand(self, sharded: beam.PCollection) -> beam.PCollection:
        return (sharded
                | "GroupByShard" >> beam.GroupByKey()
                | "MergeShard" >> beam.ParDo(self._merge).with_output_types(FlowRecord))


class BuildFlows(beam.PTransform):
    """Batches of fragments in, ``flow_logs`` rows (dicts) out.

    ``idle_timeout_s``: inactivity that closes a flow; ``active_timeout_s``: a longer flow is
    emitted in rows of at most this length and keeps counting; ``source`` fills the rows'
    ``source`` column; ``shards`` bounds the number of state cells (see the module docstring).
    """

    def __init__(
        self,
        idle_timeout_s: float = 120,
        active_timeout_s: float = 1800,
        source: str = "pcap",
        shards: int = DEFAULT_SHARDS,
    ) -> None:
        super().__init__()
        if idle_timeout_s <= 0 or active_timeout_s <= 0:
            raise ValueError("idle and active timeouts must be positive")
        self._idle_us = round(idle_timeout_s * 1_000_000)
        self._active_us = round(active_timeout_s * 1_000_000)
        self._source = source
        self._shards = shards

    def expand(self, fragment_batches: beam.PCollection) -> beam.PCollection:
        return (
            fragment_batches
            | "ShardFragments" >> beam.ParDo(_ShardFragmentsFn(self._shards))
            .with_output_types(tuple[int, FragmentBatch])
            | "MergeFragments" >> (
                _MergeShards(self._idle_us, self._active_us, self._source)
                if fragment_batches.is_bounded
                else beam.ParDo(StreamingMergeFn(self._idle_us, self._active_us, self._source))
                .with_output_types(FlowRecord))
        )
