"""Time each stage of the pcap pipeline alone, in plain Python, on one capture.

    .venv/bin/python benchmarks/pcap_stages.py CAPTURE.pcap

Reading; reading + decoding + pre-aggregation; the flow engine and row building; Arrow
conversion. The difference between their sum and a pipeline run is Beam's own cost.
"""

from __future__ import annotations

import sys
import time

from flowbeam.capture.reader import read_capture
from flowbeam.flows.engine import advance_all
from flowbeam.flows.records import to_flow_records
from flowbeam.flows.schema import records_to_arrow
from flowbeam.packets.to_fragments import PacketsToFragments

IDLE_US, ACTIVE_US = 120_000_000, 1_800_000_000


def main(path: str) -> None:
    started = time.perf_counter()
    with open(path, "rb") as stream:
        packets = sum(len(batch) for batch in read_capture(stream))
    elapsed = time.perf_counter() - started
    print(f"read                   {elapsed:6.2f} s  {packets / elapsed:12,.0f} packets/s")

    step, fragments = PacketsToFragments(IDLE_US, ACTIVE_US), []
    started = time.perf_counter()
    with open(path, "rb") as stream:
        for batch in read_capture(stream):
            fragments += step.add(batch)
    fragments += step.finish()
    elapsed = time.perf_counter() - started
    print(f"read+decode+aggregate  {elapsed:6.2f} s  {packets / elapsed:12,.0f} packets/s  "
          f"{len(fragments)} fragments")

    started = time.perf_counter()  # what BuildFlows' batch merge does, as one shard
    rows = to_flow_records(advance_all(fragments, IDLE_US, ACTIVE_US), "pcap")
    print(f"flow engine + rows     {time.perf_counter() - started:6.2f} s  {len(rows)} rows")

    started = time.perf_counter()
    records_to_arrow(rows)
    print(f"arrow                  {time.perf_counter() - started:6.2f} s")


if __name__ == "__main__":
    main(sys.argv[1])
