"""BuildFlows in streaming mode with many concurrent open flows: fragments/s and peak RSS.

    .venv/bin/python benchmarks/streaming_flows.py [--open 10000 100000] [--steps 120]

Each size runs in its own process on the streaming DirectRunner (``TestStream``, the local
runner of the streaming pipelines). The traffic is steady: every second of event time brings
``--rate`` one-packet fragments (in batches of ``--batch``, as a decoder hands them over) and
the watermark advances one second; ``--closures`` flows per second send their last packet and
as many new ones start. Each flow sends one packet every ``open / rate`` seconds (below the
idle timeout), so the only thing that changes between sizes is how many flows are open: work
per second is the same, and a flow state whose cost follows the open flows shows up as a
throughput drop.

A warm-up second opens all the flows (each with one fragment standing for its past); a second
run with the warm-up alone is subtracted, so fragments/s covers the steady seconds only. Times
are the process's CPU time, not wall time: this machine is shared, and the DirectRunner runs
in one process. Every flow ends in one row (the active timeout is 10 h): the row count is
checked against the number of flows.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from flowbeam.flows.fragment import SIDE_A, Fragment
from transforms.build_flows import BuildFlows

S = 1_000_000
T0 = 1_700_000_000 * S


def flow_key(flow: int) -> tuple:
    """A UDP key of its own for each flow number (10.x.y.z:40000 -> 192.168.0.1:53)."""
    return (4, 17, -1, 0, 0x0A000000 + flow, 40000, 0, 0xC0A80001, 53, "")


def traffic(open_flows: int, rate: int, closures: int, steps: int) -> list[list[Fragment]]:
    """Per second of event time, the fragments that arrive in it (second 0: the warm-up).

    Flow ``j`` starts at second ``(j - open_flows) / closures`` and sends ``rate / closures``
    packets, one every ``open_flows / rate`` seconds, so at any second ``open_flows`` flows
    are sending, ``closures`` of them send their last packet and ``rate`` packets are sent.
    The packets a flow sent before second 0 arrive as one fragment in the warm-up.
    """
    period = open_flows / rate
    packets = rate // closures
    seconds: list[list[Fragment]] = [[] for _ in range(steps + 1)]
    for flow in range(open_flows + closures * steps):
        key = flow_key(flow)
        start = (flow - open_flows) / closures
        times = [start + n * period for n in range(packets)]
        past = [t for t in times if t < 0]
        if past:
            first, last = T0 + round(past[0] * S), T0 + round(past[-1] * S)
            seconds[0].append(Fragment(key, first, last, len(past), 100 * len(past), 0, 0,
                                       0, 0, SIDE_A, -1, SIDE_A, False))
        for t in times:
            if 0 <= t < steps:
                ts = T0 + round(t * S)
                seconds[int(t) + 1].append(
                    Fragment(key, ts, ts, 1, 100, 0, 0, 0, 0, SIDE_A, -1, SIDE_A, False))
    return seconds


ROWS = [0]  # rows seen by ``_count_row`` in this process (the DirectRunner runs in-process)


def _count_row(_: dict) -> None:
    ROWS[0] += 1


def run(open_flows: int, rate: int, closures: int, idle_s: float, steps: int, batch: int,
        shards: int) -> None:
    """One pipeline run; prints its CPU seconds, fragments, rows and peak RSS (MiB)."""
    seconds = traffic(open_flows, rate, closures, steps)
    stream = TestStream()
    for second, fragments in enumerate(seconds):
        ts = (T0 + second * S) / S
        stream = stream.add_elements([
            TimestampedValue(fragments[i:i + batch], ts)
            for i in range(0, len(fragments), batch)])
        stream = stream.advance_watermark_to(ts)
    stream = stream.advance_watermark_to_infinity()
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | stream
         | BuildFlows(idle_timeout_s=idle_s, active_timeout_s=10 * 3600, shards=shards)
         | beam.Map(_count_row))
    started = time.process_time()
    # No round trip through the runner API: it would pickle (and bz2) every TestStream
    # fragment, a cost of the harness, not of BuildFlows.
    pipeline.run(test_runner_api=False).wait_until_finish()
    cpu = time.process_time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(cpu, sum(map(len, seconds)), ROWS[0], peak)


def measure(args: argparse.Namespace, open_flows: int, steps: int) -> list[float]:
    """Run one size in a fresh process: [CPU s, fragments, rows, peak RSS MiB]."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import streaming_flows as b; b.run({open_flows}, {args.rate}, {args.closures}, "
            f"{args.idle}, {steps}, {args.batch}, {args.shards})")
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True).stdout
    return [float(x) for x in output.split()[-4:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rate", type=int, default=4000, help="fragments per second")
    parser.add_argument("--closures", type=int, default=400, help="flows ending per second")
    parser.add_argument("--idle", type=float, default=30, help="idle timeout (s)")
    parser.add_argument("--steps", type=int, default=60, help="steady seconds")
    parser.add_argument("--batch", type=int, default=500, help="fragments per element")
    parser.add_argument("--shards", type=int, default=256)
    args = parser.parse_args()
    print("open flows | steady fragments per CPU second | peak RSS MiB | CPU s: run, warm-up")
    for open_flows in args.open:
        warm, _, _, _ = measure(args, open_flows, 0)
        cpu, fragments, rows, peak = measure(args, open_flows, args.steps)
        if rows != open_flows + args.closures * args.steps:
            raise SystemExit(f"{rows:,.0f} rows for {open_flows + args.closures * args.steps:,}"
                             " flows")
        steady = fragments - open_flows
        print(f"{open_flows:>10,} | {steady / (cpu - warm):>32,.0f} | {peak:>12,.0f} | "
              f"{cpu:.1f}, {warm:.1f}", flush=True)


if __name__ == "__main__":
    main()
