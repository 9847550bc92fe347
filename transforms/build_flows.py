"""``BuildFlows``: merge flow fragments from any source into flow rows, in batch and streaming.

Fragments are keyed by a shard of their direction-independent flow key and merged in a
stateful DoFn with one event-time timer per shard. The rules themselves (idle and active
timeouts, TCP end of flow, direction) are the pure ``flow_engine.advance``; this module only
keeps state and decides *when* to call it:

- streaming (``transforms/flow_state.py``): the timer fires when the watermark reaches the
  earliest time at which a row of the shard can be final; the shard's ``OpenFlows`` (its
  flows, each with its due time) emits what is final at that time, running the rules only on
  the flows that are due or got fragments; a drain emits the flows still open as forced ends;
- batch (here): the watermark jumps to infinity once all input is read, so every timer fires
  once, at the end (see FIELD-NOTES); the shard then emits everything (open flows as forced
  ends when their input ended while they were active). One bag read per shard is all batch
  needs, so batch keeps the plain bag: no index to build and write back.

Why shards and not one state cell per flow key: a stateful element costs ~90 us on the
in-process runners (state and timer bookkeeping), so a state cell per flow would cap a local
run at ~11k flows/s. Decoders hand over fragments in batches; ``_ShardFragmentsFn`` splits each
batch into one list per shard, so elements into the shuffle scale with (batches x shards)
while each shard's state still only holds its own open flows.

State values are pickled by the DoFn itself and stored as opaque bytes: the SDK's state cache
measures every cached value with ``objsize``, which walks a list of fragments object by object
(it dominated a profile of a 100k-flow run) but sizes a bytes value at once.
"""

from __future__ import annotations

import pickle
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from flowbeam.flows.engine import advance
from flowbeam.flows.fragment import Fragment
from flowbeam.flows.records import to_flow_record
from transforms import counters
from transforms.flow_record_coder import FlowRecord
from transforms.flow_state import StreamingMergeFn

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


class _MergeFragmentsFn(beam.DoFn):
    """Batch, per shard: keep fragments until the input ends, then emit every row."""

    PENDING = BagStateSpec("pending", coders.BytesCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def __init__(self, idle_us: int, active_us: int, source: str) -> None:
        self._idle_us = idle_us
        self._active_us = active_us
        self._source = source
        self._rows = counters.counter(counters.FLOW_ROWS)
        self._fragments = counters.counter(counters.FRAGMENTS)

    def process(
        self,
        element: tuple[int, list[Fragment]],
        pending=beam.DoFn.StateParam(PENDING),
        close=beam.DoFn.TimerParam(CLOSE),
    ) -> None:
        _, fragments = element
        self._fragments.inc(len(fragments))
        pending.add(pickle.dumps(fragments, protocol=pickle.HIGHEST_PROTOCOL))
        # The timer fires once, after all input, whatever its time: no earliest-time
        # bookkeeping in state (it would cost two state-cache writes per element).
        close.set(Timestamp(micros=min(
            min(f.last_us + self._idle_us, f.first_us + self._active_us) for f in fragments)))

    @on_timer(CLOSE)
    def close_flows(self, pending=beam.DoFn.StateParam(PENDING)) -> Iterator[dict]:
        fragments: dict[tuple, list[Fragment]] = defaultdict(list)
        for blob in pending.read():
            for fragment in pickle.loads(blob):
                fragments[fragment.key].append(fragment)
        pending.clear()
        for key_fragments in fragments.values():
            rows = advance(key_fragments, self._idle_us, self._active_us, None)[0]
            for row in rows:
                yield to_flow_record(row, self._source)
            self._rows.inc(len(rows))


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
            .with_output_types(tuple[int, list])
            | "MergeFragments" >> beam.ParDo(
                _MergeFragmentsFn(self._idle_us, self._active_us, self._source)
                if fragment_batches.is_bounded
                else StreamingMergeFn(self._idle_us, self._active_us, self._source))
            .with_output_types(FlowRecord)
        )
