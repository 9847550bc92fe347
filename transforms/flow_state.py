"""The streaming side of ``BuildFlows``: one shard's open flows in state, timers that fire on
what is due, a drain that cuts off what is still open.

State per shard: ``pending``, a bag the fragments are appended to without reading anything
(a bag add costs the same with 10 or 10,000 open flows), and ``open``, the shard's
``OpenFlows`` as bytes (``flowbeam.flows.open_flows``: flows stay pickled until touched, each
with its due time). The ``close`` timer is set to the earliest time a row can be final,
rounded up to a whole second; when it fires (one flush per timer, as ``GroupIntoBatches``) the
pending fragments join their flows and only the flows that are due or got fragments run the
flow rules; the others are written back as the bytes they were read as (~0.35 us per open
flow of the shard, mostly in C).

Why not something else: the Python SDK has no map state; the streaming DirectRunner (the
local runner of the streaming pipelines and of ``TestStream``) supports neither ordered list
state nor keyed watermark holds; and a state cell per flow key costs far more per element on
that runner (65,536 shards, ~1 flow each: 3,240 fragments per CPU second at 10k open flows,
against 28,092 with 256 shards): it walks every key's timers after each bundle.

Measured with ``benchmarks/streaming_flows.py`` (4,000 one-packet fragments and 400 flow ends
per second of event time, idle timeout 30 s, watermark steps of 1 s, 256 shards; fragments per
CPU second over 60 steady seconds; peak RSS of the process, which also holds the TestStream):

| open flows | before: every flow of the shard at each firing | now | peak RSS before, now |
|---|---|---|---|
| 10,000 | 12,208 | 28,092 | 243, 256 MiB |
| 100,000 | 4,116 (2.97x fewer) | 19,136 (1.47x fewer) | 290, 411 MiB |

Before, the end of the stream alone (100k open flows released at +inf) took 118 CPU seconds:
each shard fired once per distinct due time, each time over all its flows; now 3.9 s. What
still grows with the open flows: the restore and write-back of a shard at each firing (~0.35
us per flow of the shard) and, as each flow sends every 25 s instead of every 2.5 s, fewer
packets of one flow share a firing, so the rules run more often per packet. Peak RSS is
higher at 100k than before (not investigated; the whole drain leaves in one bundle).

Times. A timer firing at ``t`` proves the watermark reached ``t``: the rows final at ``t``
(or at the latest time the shard already fired at, if later: its frontier) are emitted. A
fragment that starts before the frontier arrived behind the watermark: only such a fragment
can belong to a row already emitted. It is counted (``late_fragments``) and merged all the
same: into a row still open, or into a new row of its flow. Nothing is dropped: in the global
window a late element still reaches a ParDo, and a timer set in the past fires at once.

Drain. Stopping a streaming job with a drain (or the end of a ``TestStream``) moves the
watermark to +inf: every timer fires, the ``drain`` timer at the end of the global window
too. A row is a **forced end** when the end of the global window passed while its flow was
still open: its idle timeout had not elapsed at the last real watermark, the input was cut
off. The runner delivers the timers the jump released in timestamp order, so ``close``
timers due after the last real watermark fire just before ``drain``: rows are therefore held
until the end of the bundle, and those of a shard whose ``drain`` timer fires in the same
bundle were released by the jump too and are cut off like the rest. (The streaming
DirectRunner delivers all the timers one watermark step releases for a transform in one
bundle; a runner that split them across bundles would let the first such ``close`` firing of
a shard emit its rows as idle timeouts.)
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagRuntimeState,
    BagStateSpec,
    ReadModifyWriteRuntimeState,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from flowbeam.flows.fragment import Fragment
from flowbeam.flows.open_flows import OpenFlows, ReleasedRow
from flowbeam.flows.records import to_flow_record
from transforms import counters

_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Timers fire on whole seconds: the rows of a shard due within one second share one firing
# (one restore and write-back of the shard) instead of one firing each. A row goes out at
# most a second later in event time; what it contains does not change.
TIMER_GRANULARITY_US = 1_000_000


def _timer_time(due_us: int) -> int:
    """The firing time for rows due at ``due_us``: the next whole second."""
    return -(-due_us // TIMER_GRANULARITY_US) * TIMER_GRANULARITY_US


class StreamingMergeFn(beam.DoFn):
    """Per shard: fragments into ``OpenFlows``; emit rows when their time comes."""

    PENDING = BagStateSpec("pending", coders.BytesCoder())
    OPEN = ReadModifyWriteStateSpec("open", coders.BytesCoder())
    NEXT_FIRE = ReadModifyWriteStateSpec("next_fire", coders.VarIntCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)
    DRAIN = TimerSpec("drain", TimeDomain.WATERMARK)

    def __init__(self, idle_us: int, active_us: int, source: str) -> None:
        self._idle_us = idle_us
        self._active_us = active_us
        self._source = source
        self._rows = counters.counter(counters.FLOW_ROWS)
        self._fragments = counters.counter(counters.FRAGMENTS)
        self._late = counters.counter(counters.LATE_FRAGMENTS)
        self._held: dict[int, list[tuple[ReleasedRow, Timestamp]]] = {}

    def start_bundle(self) -> None:
        self._held = {}

    def process(
        self,
        element: tuple[int, list[Fragment]],
        pending=beam.DoFn.StateParam(PENDING),
        next_fire=beam.DoFn.StateParam(NEXT_FIRE),
        close=beam.DoFn.TimerParam(CLOSE),
        drain=beam.DoFn.TimerParam(DRAIN),
    ) -> None:
        _, fragments = element
        self._fragments.inc(len(fragments))
        pending.add(pickle.dumps(fragments, protocol=_PROTOCOL))
        # The earliest a row of these fragments can be final (a late fragment: in the past,
        # so the timer fires at once).
        earliest = min(
            min(f.last_us + self._idle_us, f.first_us + self._active_us) for f in fragments)
        earliest = _timer_time(earliest)
        current = next_fire.read()
        if current is None:
            drain.set(GlobalWindow().max_timestamp())
        if current is None or earliest < current:
            next_fire.write(earliest)
            close.set(Timestamp(micros=earliest))

    @on_timer(CLOSE)
    def close_flows(
        self,
        shard=beam.DoFn.KeyParam,
        fire_at=beam.DoFn.TimestampParam,
        pending=beam.DoFn.StateParam(PENDING),
        open_flows=beam.DoFn.StateParam(OPEN),
        next_fire=beam.DoFn.StateParam(NEXT_FIRE),
        close=beam.DoFn.TimerParam(CLOSE),
    ) -> None:
        flows = self._restore(open_flows, pending)
        released = flows.release(fire_at.micros)
        self._held.setdefault(shard, []).extend((row, fire_at) for row in released)
        open_flows.write(flows.dump())  # even empty: the frontier tells late fragments
        due = flows.next_due()
        if due is None:
            next_fire.clear()
        else:
            next_fire.write(_timer_time(due))
            close.set(Timestamp(micros=_timer_time(due)))

    @on_timer(DRAIN)
    def drain_flows(
        self,
        shard=beam.DoFn.KeyParam,
        pending=beam.DoFn.StateParam(PENDING),
        open_flows=beam.DoFn.StateParam(OPEN),
        next_fire=beam.DoFn.StateParam(NEXT_FIRE),
        close=beam.DoFn.TimerParam(CLOSE),
    ) -> Iterator[dict]:
        flows = self._restore(open_flows, pending)
        released = [row for row, _ in self._held.pop(shard, [])] + flows.release(None)
        open_flows.clear()
        next_fire.clear()
        close.clear()
        self._rows.inc(len(released))
        for row in released:
            yield to_flow_record(row.cut_off(), self._source)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        window = (GlobalWindow(),)
        for held in self._held.values():
            self._rows.inc(len(held))
            for row, fire_at in held:
                yield WindowedValue(to_flow_record(row.row, self._source), fire_at, window)
        self._held = {}

    def _restore(self, open_flows: ReadModifyWriteRuntimeState,
                 pending: BagRuntimeState) -> OpenFlows:
        """The shard's open flows with the fragments that arrived since the last firing."""
        flows = OpenFlows.restore(open_flows.read(), self._idle_us, self._active_us)
        late = flows.add(f for blob in pending.read() for f in pickle.loads(blob))
        pending.clear()
        self._late.inc(late)
        return flows
