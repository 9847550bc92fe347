"""BuildFlows in streaming (TestStream on the streaming DirectRunner): the watermark decides.

Each test delivers packets in watermark steps and checks the exact rows. A BuildFlows that
emitted everything it holds at each timer firing, whatever the watermark, fails all of them
but the late-data one (there the watermark is past every row at the first firing); one that
emitted the rows a drain's jump to +inf releases before its ``drain`` timer fires fails the
drain test (both checked by introducing the bug).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from flowbeam.flows.engine import ACTIVE_TIMEOUT, FORCED_END, IDLE_TIMEOUT
from tests.fragment_builders import S, packet
from transforms.build_flows import BuildFlows
from transforms.flow_state import StreamingMergeFn

T0 = 1_700_000_000 * S
A, B = "192.168.1.2", "192.168.1.3"


def udp(seconds, sport=5353):
    """A 70-byte UDP packet from A:sport to B:53, ``seconds`` after T0."""
    return packet(T0 + round(seconds * S), A, sport, B, 53, protocol=17, size=70)


def steps(*events):
    """A TestStream from ``[packets...]`` (one element each) and watermark times (seconds)."""
    stream = TestStream()
    for event in events:
        if isinstance(event, list):
            stream = stream.add_elements(
                [TimestampedValue([f], f.first_us / S) for f in event])
        elif event == "end":
            stream = stream.advance_watermark_to_infinity()
        else:
            stream = stream.advance_watermark_to((T0 + event * S) / S)
    return stream


COLLECTED: list[tuple] = []  # rows seen by ``collect`` (the DirectRunner runs in-process)


def collect(row: dict) -> None:
    COLLECTED.append((row["src_port"], row["first_seen_at"].timestamp() - T0 / S,
                      row["src_packets"], row["status"]))


def check(stream, expected, idle_s=120, active_s=600):
    """Run BuildFlows over ``stream``; the rows as (sport, seconds of first packet, packets,
    status) must be ``expected``. Rows are collected by a DoFn rather than ``assert_that``:
    the streaming DirectRunner does not hold the watermark for timers, so ``assert_that``
    would miss the rows the final jump to +inf releases."""
    COLLECTED.clear()
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        _ = (p
             | stream
             | BuildFlows(idle_timeout_s=idle_s, active_timeout_s=active_s, shards=2)
             | beam.Map(collect))
    assert sorted(COLLECTED) == sorted(expected)


def test_packets_after_the_first_timer_join_the_open_row():
    # The first packet's row can be final at +120 s (its timer); by then a packet at +100 s
    # has arrived, so the row is open until +220 s; +200 s joins it too. One row, 3 packets.
    check(steps([udp(0)], 50, [udp(100)], 130, [udp(200)], 1000, "end"),
          [(5353, 0, 3, IDLE_TIMEOUT)])


def test_packets_after_a_row_of_their_flow_was_emitted_start_the_next_row():
    # Rows of one flow emitted at different watermarks: [0, 1] idle-closed at +121 s; the
    # flow sends again at +300 s: a new row; a long flow (sport 7) is cut by the active
    # timeout (60 s) into [400, 440] and [460, 470] while it goes on.
    check(steps([udp(0), udp(1)], 200, [udp(300)], [udp(400 + 20 * i, sport=7)
                                                    for i in range(3)], 455,
                [udp(460, sport=7), udp(470, sport=7)], 2000, "end"),
          [(5353, 0, 2, IDLE_TIMEOUT), (5353, 300, 1, IDLE_TIMEOUT),
           (7, 400, 3, ACTIVE_TIMEOUT), (7, 460, 2, IDLE_TIMEOUT)], active_s=60)


def test_out_of_order_packets_across_watermark_steps():
    # Within each step packets arrive in reverse order, and the next step's packets arrive
    # before the watermark reaches the current ones; never behind the watermark.
    check(steps([udp(90), udp(30)], 20, [udp(150), udp(110)], 100, [udp(400), udp(280)],
                250, [udp(380)], 1000, "end"),
          [(5353, 30, 4, IDLE_TIMEOUT), (5353, 280, 3, IDLE_TIMEOUT)])


def test_late_packets_behind_the_watermark_end_up_in_a_new_row_of_their_flow():
    # [0, 10] is emitted at +130 s; a delayed upload brings +20 s when the watermark is at
    # +500 s: a row of its own, not merged into the row already out, not dropped.
    check(steps([udp(0), udp(10)], 500, [udp(20)], 1000, "end"),
          [(5353, 0, 2, IDLE_TIMEOUT), (5353, 20, 1, IDLE_TIMEOUT)])


def test_a_drain_cuts_off_open_flows_and_only_them():
    # At the drain (watermark to +inf after +200 s): sport 1 was idle-closed at +121 s;
    # sport 2 ([150]) is open: forced end; sport 3 has a gap in its data (140, then 400): its
    # first row is an idle timeout whatever the watermark, its second row is open.
    check(steps([udp(0, sport=1), udp(1, sport=1), udp(150, sport=2), udp(140, sport=3),
                 udp(400, sport=3)], 200, "end"),
          [(1, 0, 2, IDLE_TIMEOUT), (2, 150, 1, FORCED_END), (3, 140, 1, IDLE_TIMEOUT),
           (3, 400, 1, FORCED_END)])


class FakeBag:
    """Bag state, for calling the DoFn's methods directly."""

    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)

    def read(self):
        return list(self.items)

    def clear(self):
        self.items = []


class FakeValue:
    """A value state or a timer, for calling the DoFn's methods directly."""

    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    set = write

    def clear(self):
        self.value = None


class FakeCounter:
    def __init__(self):
        self.total = 0

    def inc(self, n=1):
        self.total += n


def test_late_fragments_are_counted():
    # The DoFn's methods called as the runner would (the streaming DirectRunner reports the
    # counters of a step's first bundle only, so the count is checked here).
    fn = StreamingMergeFn(120 * S, 600 * S, "pubsub")
    fn._late = FakeCounter()
    pending, (open_flows, next_fire, close, drain) = FakeBag(), (FakeValue() for _ in range(4))

    def deliver(*fragments):
        fn.process((0, list(fragments)), pending, next_fire, close, drain)

    def fire(seconds):
        fn.start_bundle()
        fn.close_flows(0, Timestamp(micros=T0 + seconds * S), pending, open_flows, next_fire,
                       close)
        return [(row.value["first_seen_at"].timestamp() - T0 / S, row.value["status"])
                for row in fn.finish_bundle()]

    deliver(udp(0), udp(10))
    # The timer goes to the earliest a row can be final (+0 s + 120 s); the firing finds
    # the row open until +130 s and moves it there.
    assert close.value == Timestamp(micros=T0 + 120 * S)
    assert fire(120) == [] and close.value == Timestamp(micros=T0 + 130 * S)
    assert fire(130) == [(0, IDLE_TIMEOUT)] and fn._late.total == 0
    deliver(udp(20), udp(200))  # +20 s is behind the shard's frontier (+130 s)
    assert close.value == Timestamp(micros=T0 + 140 * S)
    assert fire(140) == [(20, IDLE_TIMEOUT)] and fn._late.total == 1
    assert next_fire.value == T0 + 320 * S
