"""BuildFlows on Beam runners: batch (TestPipeline) and streaming (TestStream)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from flowbeam.flows.engine import ACTIVE_TIMEOUT, END_OF_FLOW, IDLE_TIMEOUT
from flowbeam.flows.protocols import TCP_ACK, TCP_FIN, TCP_SYN
from tests.fragment_builders import S, packet
from transforms.build_flows import BuildFlows, shard_of

T0 = 1_700_000_000 * S


def conversation_packets():
    """Three flows: a TCP connection, a UDP exchange split by an idle gap, a long UDP flow."""
    tcp = [
        packet(T0, "10.0.0.9", 40000, "10.0.0.1", 80, flags=TCP_SYN, size=60),
        packet(T0 + 1000, "10.0.0.1", 80, "10.0.0.9", 40000, flags=TCP_SYN | TCP_ACK, size=60),
        packet(T0 + 2000, "10.0.0.9", 40000, "10.0.0.1", 80, flags=TCP_ACK, size=52),
        packet(T0 + 3 * S, "10.0.0.9", 40000, "10.0.0.1", 80, flags=TCP_FIN | TCP_ACK, size=52),
        packet(T0 + 3 * S + 10, "10.0.0.1", 80, "10.0.0.9", 40000, flags=TCP_FIN | TCP_ACK,
               size=52),
    ]
    udp = [
        packet(T0 + 5 * S, "192.168.1.2", 5353, "192.168.1.3", 53, protocol=17, size=70),
        packet(T0 + 5 * S + 100, "192.168.1.3", 53, "192.168.1.2", 5353, protocol=17, size=90),
        packet(T0 + 200 * S, "192.168.1.2", 5353, "192.168.1.3", 53, protocol=17, size=70),
    ]
    # 1 packet every 10 s for 100 s: with a 60 s active timeout, two rows.
    long_flow = [packet(T0 + i * 10 * S, "fd00::1", 9, "fd00::2", 9, protocol=17, size=40)
                 for i in range(10)]
    return tcp + udp + long_flow


def summary(row):
    return (row["src_addr"], row["dst_addr"], row["first_seen_at"].timestamp(),
            row["src_packets"], row["dst_packets"], row["src_bytes"], row["dst_bytes"],
            row["status"])


EXPECTED = [
    ("10.0.0.9", "10.0.0.1", T0 / S, 3, 2, 164, 112, END_OF_FLOW),
    ("192.168.1.2", "192.168.1.3", (T0 + 5 * S) / S, 1, 1, 70, 90, IDLE_TIMEOUT),
    ("192.168.1.2", "192.168.1.3", (T0 + 200 * S) / S, 1, 0, 70, 0, IDLE_TIMEOUT),
    ("fd00::1", "fd00::2", T0 / S, 6, 0, 240, 0, ACTIVE_TIMEOUT),
    ("fd00::1", "fd00::2", (T0 + 60 * S) / S, 4, 0, 160, 0, IDLE_TIMEOUT),
]


class Summarize(beam.DoFn):
    def process(self, row):
        yield summary(row)


def batches(fragments, size, seed):
    shuffled = fragments[:]
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i:i + size] for i in range(0, len(shuffled), size)]


def test_batch_rows_are_exact_whatever_the_order_and_batching():
    for seed, size, shards in ((1, 1, 1), (2, 3, 4), (3, 50, 256)):
        with TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
            rows = (p
                    | beam.Create(batches(conversation_packets(), size, seed))
                    | BuildFlows(idle_timeout_s=120, active_timeout_s=60, shards=shards)
                    | beam.ParDo(Summarize()))
            assert_that(rows, equal_to(EXPECTED))


def test_streaming_with_out_of_order_elements_and_watermark_steps():
    fragments = conversation_packets()
    rng = random.Random(5)
    stream = TestStream()
    # Deliver in 4 steps of event time; within a step, shuffled; the watermark trails by 30 s.
    steps = [0, 50, 100, 250]
    for start, end in zip(steps, steps[1:] + [10**6], strict=True):
        step = [f for f in fragments if start * S <= f.first_us - T0 < end * S]
        rng.shuffle(step)
        if step:
            stream = stream.add_elements(
                [TimestampedValue([f], f.first_us / S) for f in step])
        stream = stream.advance_watermark_to((T0 + max(start, 30) * S - 30 * S) / S)
    # End on a finite step first: rows still open when the watermark jumps to infinity are
    # forced ends (a drain, see tests/test_build_flows_streaming.py), and the streaming
    # DirectRunner holds no watermark for timers, so assert_that would miss them.
    stream = stream.advance_watermark_to((T0 + 10_000 * S) / S).advance_watermark_to_infinity()
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        rows = (p
                | stream
                | BuildFlows(idle_timeout_s=120, active_timeout_s=60, shards=4)
                | beam.ParDo(Summarize()))
        assert_that(rows, equal_to(EXPECTED))



def test_a_flow_key_has_the_same_shard_in_every_process():
    # str hashes differ between processes (PYTHONHASHSEED): a scoped key must not use them,
    # or two workers would split one flow's fragments between shards.
    fragment = "packet(0, '10.0.0.1', 1, '10.0.0.2', 2, scope='sensor-7')"
    code = ("from tests.fragment_builders import packet; from transforms.build_flows import "
            f"shard_of; print(shard_of({fragment}, 4096))")
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                           text=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert int(other) == shard_of(packet(0, "10.0.0.1", 1, "10.0.0.2", 2, scope="sensor-7"),
                                  4096)
