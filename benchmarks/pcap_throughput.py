"""flowbeam vs nfstream on the same synthetic capture, in the same run.

    .venv/bin/pip install 'nfstream==6.6.0'      # the peer (benchmarks only, not a dependency)
    .venv/bin/python benchmarks/pcap_throughput.py [--packets 2000000] [--flows 100000] [--runs 3]

Builds a capture with the project's own generator (time-ordered, complete TCP/UDP/ICMP
conversations, unique 5-tuples), then runs, alternately and each in its own process, the
flowbeam batch pipeline end to end (read, decode, BuildFlows, Parquet sink, on the local
runner) and nfstream (idle timeout 120 s, IP-bytes accounting, no statistics or dissection).
Prints the median packets/s of each, their ratio, and each one's peak RSS; checks that both
found the generated number of flows. A second capture with the same flows but a third of the
packets shows whether flowbeam's peak memory grows with the capture size (it must not: files
are streamed; what is held is per flow, not per packet).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from flowbeam.synthetic import write_capture

NFSTREAM_SCRIPT = """
import sys
from nfstream import NFStreamer
streamer = NFStreamer(source=sys.argv[1], idle_timeout=120, active_timeout=1800,
                      accounting_mode=1, statistical_analysis=False, n_dissections=0,
                      splt_analysis=0)
flows = sum(1 for _ in streamer)
print(flows)
"""


def run_measured(argv: list[str]) -> tuple[float, int, str]:
    """Run a command; returns (wall seconds, peak RSS in MiB, stdout)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    output = process.stdout.read() if process.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[:4]} failed with status {status}")
    return elapsed, usage.ru_maxrss // 1024, output


def run_flowbeam(capture: Path, output: Path) -> tuple[float, int, int]:
    shutil.rmtree(output, ignore_errors=True)
    elapsed, rss, _ = run_measured([sys.executable, "-m", "pipelines.pcap_flows",
                                    "--input", str(capture), "--output", str(output)])
    flows = sum(pq.read_metadata(p).num_rows for p in output.glob("flows-*.parquet"))
    return elapsed, rss, flows


def run_nfstream(capture: Path) -> tuple[float, int, int]:
    elapsed, rss, output = run_measured([sys.executable, "-c", NFSTREAM_SCRIPT, str(capture)])
    return elapsed, rss, int(output.strip())


def build(directory: Path, packets: int, flows: int) -> tuple[Path, int]:
    capture = directory / f"synthetic-{packets}-{flows}.pcap"
    plan = write_capture(str(capture), flows=flows, packets=packets, seed=7)
    return capture, int(plan.packets.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=2_000_000)
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep captures here (default: a temp dir)")
    args = parser.parse_args()
    directory = Path(args.workdir or tempfile.mkdtemp(prefix="flowbeam-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    capture, packets = build(directory, args.packets, args.flows)
    size_mb = capture.stat().st_size / 2**20
    print(f"capture: {packets} packets, {args.flows} flows, {size_mb:.0f} MiB ({capture})")

    ours, peer = [], []
    for run in range(args.runs):
        elapsed, rss, flows = run_flowbeam(capture, directory / "out")
        ours.append((elapsed, rss, flows))
        print(f"  run {run + 1}: flowbeam {packets / elapsed:12,.0f} packets/s  "
              f"{elapsed:6.2f} s  peak RSS {rss} MiB  flows {flows}")
        elapsed, rss, flows = run_nfstream(capture)
        peer.append((elapsed, rss, flows))
        print(f"  run {run + 1}: nfstream {packets / elapsed:12,.0f} packets/s  "
              f"{elapsed:6.2f} s  peak RSS {rss} MiB  flows {flows}")

    our_rate = packets / statistics.median(r[0] for r in ours)
    peer_rate = packets / statistics.median(r[0] for r in peer)
    print(f"median flowbeam: {our_rate:,.0f} packets/s, peak RSS {max(r[1] for r in ours)} MiB")
    print(f"median nfstream: {peer_rate:,.0f} packets/s, peak RSS {max(r[1] for r in peer)} MiB")
    print(f"ratio flowbeam/nfstream: {our_rate / peer_rate:.2f}x")
    for name, runs in (("flowbeam", ours), ("nfstream", peer)):
        if any(r[2] != args.flows for r in runs):
            print(f"WARNING: {name} found {[r[2] for r in runs]} flows, expected {args.flows}")

    small, small_packets = build(directory, args.packets // 3, args.flows)
    _, small_rss, _ = run_flowbeam(small, directory / "out-small")
    print(f"flowbeam peak RSS, {args.flows} flows: {small_rss} MiB at {small_packets} packets, "
          f"{max(r[1] for r in ours)} MiB at {packets} packets")
    if args.workdir is None:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
