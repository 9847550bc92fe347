"""flowbeam vs peer flow meters (nfstream, argus, softflowd) on the same capture, in the same run.

    .venv/bin/pip install 'nfstream==6.6.0'      # a peer (benchmarks only, not a dependency)
    apt-get install -y argus-server argus-client softflowd nfdump      # the other peers
    .venv/bin/python benchmarks/pcap_throughput.py [--packets 2000000] [--flows 100000] [--runs 3]
    .venv/bin/python benchmarks/pcap_throughput.py --realistic [--packets 3053520]
        [--capture /tmp/bench/realistic-3m.pcap] [--peers nfstream,argus,softflowd]
        [--extra-flowbeam-args '--flow_shards 4']

Synthetic mode (the default) builds a capture with the project's own generator (time-ordered,
complete TCP/UDP/ICMP conversations, unique 5-tuples) and checks that every tool found the
generated number of flows; a second capture with the same flows but a third of the packets
shows whether flowbeam's peak memory grows with the capture size (it must not: files are
streamed; what is held is per flow, not per packet). ``--realistic`` uses
``realistic_capture.py`` instead: real captures replicated with shifted addresses, ~30% of the
packets with IPv6 extension headers or IPv4 fragments, which is where decoders slow down.
``--capture PATH`` reuses that file if it exists (else builds it there and keeps it).

Each run measures, alternately and each in its own process: the flowbeam batch pipeline end to
end (read, decode, BuildFlows, Parquet sink, on the local runner), nfstream (idle timeout
120 s, IP-bytes accounting, no statistics or dissection), argus (``argus -r CAP -w FILE``,
timeouts 120 s, status records only every 1800 s so a flow is one record; flows counted after
the timing with ``racount``) and softflowd (``-r CAP``, NetFlow v9 to an nfcapd on 127.0.0.1;
in file mode it expires flows only at the end; its flows are counted as nfdump pairs the
received one-way records into bidirectional 5-tuple flows, ``nfdump -b``: whole-file
conversations). Peak RSS is that of the tool's whole process tree: the larger of GNU
time's (``/usr/bin/time -f %M``, the largest single process) and the sum over the tree
sampled every 100 ms (a multi-core flowbeam run has several worker processes). Prints the
median packets/s of each tool, flowbeam's ratio to each, peak RSS and flow counts (all IP
flows, and TCP+UDP only where the tool says).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from realistic_capture import DEFAULT_PACKETS, build_capture

from flowbeam.capture.reader import CaptureStats, read_capture
from flowbeam.synthetic import write_capture

NFSTREAM_SCRIPT = """
import sys
from nfstream import NFStreamer
streamer = NFStreamer(source=sys.argv[1], idle_timeout=120, active_timeout=1800,
                      accounting_mode=1, statistical_analysis=False, n_dissections=0,
                      splt_analysis=0)
flows = tcp_udp = 0
for flow in streamer:
    flows += 1
    tcp_udp += flow.protocol in (6, 17)
print(flows, tcp_udp)
"""
# Bidirectional 5-tuple flows, every idle timeout 120 s; a status record only every 1800 s
# (the default 5 s would cut each flow into many records) and no periodic management records.
ARGUS_CONF = """\
ARGUS_FLOW_TYPE="Bidirectional"
ARGUS_FLOW_KEY="CLASSIC_5_TUPLE"
ARGUS_FLOW_STATUS_INTERVAL=1800
ARGUS_MAR_STATUS_INTERVAL=3600
""" + "".join(f"ARGUS_{kind}_TIMEOUT=120\n"
              for kind in ("IP", "TCP", "ICMP", "IGMP", "FRAG", "ARP", "OTHER"))
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SAMPLE_EVERY_S = 0.1  # how often a run's process tree is sampled for its memory
SOFTFLOWD_TIMEOUTS = ("general=120", "tcp=120", "tcp.rst=120", "tcp.fin=120", "udp=120",
                      "icmp=120", "maxlife=1800")


@dataclass(frozen=True)
class Result:
    """One tool's run: wall seconds, peak RSS (MiB), flows, TCP+UDP flows (None: not known)."""

    elapsed: float
    rss_mib: int
    flows: int
    tcp_udp: int | None = None


def run_measured(argv: list[str]) -> tuple[float, int, str]:
    """Run a command; returns (wall seconds, peak RSS in MiB of its process tree, stdout).

    Peak RSS is the larger of two measures. GNU time gives the largest single process of the
    tree (not our own ``wait4``: a child forked from this process inherits its memory map
    until ``exec``, and Linux keeps that high-water mark in the child's ``ru_maxrss``, so every
    tool would look at least as big as this harness). A tool that runs several processes at
    once (flowbeam's workers on a multi-core run) holds their sum, which ``_tree_rss`` samples
    every ``SAMPLE_EVERY_S`` while the command runs.
    """
    with (tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file,
          tempfile.TemporaryFile("w+") as output):
        started = time.perf_counter()
        process = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *argv],
                                   stdout=output, stderr=subprocess.STDOUT, text=True)
        tree_peak = 0
        while process.poll() is None:
            tree_peak = max(tree_peak, _tree_rss(process.pid))
            time.sleep(SAMPLE_EVERY_S)
        elapsed = time.perf_counter() - started
        output.seek(0)
        stdout = output.read()
        if process.returncode != 0:
            raise RuntimeError(f"{argv[:4]} failed ({process.returncode}): {stdout[-2000:]}")
        rss_kib = int(rss_file.read().split()[-1])
    return elapsed, max(rss_kib * 1024, tree_peak) >> 20, stdout


def _tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants now (0 once it has gone).

    The tree is walked through ``/proc/PID/task/TID/children`` rather than a scan of all of
    ``/proc``: the sampling must cost little, as it shares the cores with the tool measured.
    """
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * PAGE_BYTES
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    pending.extend(int(child) for child in children.read().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_flowbeam(capture: Path, work: Path, extra: list[str]) -> Result:
    output = work / "flowbeam-out"
    shutil.rmtree(output, ignore_errors=True)
    elapsed, rss, _ = run_measured([sys.executable, "-m", "pipelines.pcap_flows", "--input",
                                    str(capture), "--output", str(output), *extra])
    flows = tcp_udp = 0
    for path in output.glob("flows-*.parquet"):
        protocols = pq.read_table(path, columns=["ip_protocol"]).column("ip_protocol")
        flows += len(protocols)
        tcp_udp += pc.sum(pc.is_in(protocols, value_set=pa.array([6, 17], protocols.type))
                          .cast("int64")).as_py() or 0
    return Result(elapsed, rss, flows, tcp_udp)


def run_nfstream(capture: Path, work: Path) -> Result:
    elapsed, rss, output = run_measured([sys.executable, "-c", NFSTREAM_SCRIPT, str(capture)])
    flows, tcp_udp = (int(n) for n in output.split()[-2:])
    return Result(elapsed, rss, flows, tcp_udp)


def run_argus(capture: Path, work: Path) -> Result:
    conf, records = work / "argus.conf", work / "flows.argus"
    conf.write_text(ARGUS_CONF)
    records.unlink(missing_ok=True)
    elapsed, rss, _ = run_measured(["argus", "-X", "-F", str(conf), "-r", str(capture),
                                    "-w", str(records)])
    counts = subprocess.run(["racount", "-r", str(records), "-M", "proto"], check=True,
                            capture_output=True, text=True).stdout
    by_name = {line.split()[0]: int(line.split()[1]) for line in counts.splitlines()
               if len(line.split()) > 2 and line.split()[1].isdigit()}
    return Result(elapsed, rss, by_name["sum"], by_name.get("tcp", 0) + by_name.get("udp", 0))


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_softflowd(capture: Path, work: Path) -> Result:
    """softflowd exporting to an nfcapd of our own; ``-c none``: with a control socket,
    softflowd 1.1.0 blocks in accept() between reads of a file and never finishes."""
    received = work / "nfcapd"
    shutil.rmtree(received, ignore_errors=True)
    received.mkdir()
    port = _free_udp_port()
    collector = subprocess.Popen(["nfcapd", "-b", "127.0.0.1", "-p", str(port), "-w",
                                  str(received), "-B", str(32 << 20)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let it bind before the first export
        elapsed, rss, output = run_measured([
            "softflowd", "-r", str(capture), "-n", f"127.0.0.1:{port}", "-v", "9", "-6",
            "-m", "100000000", "-c", "none", "-p", str(work / "softflowd.pid"),
            *(arg for timeout in SOFTFLOWD_TIMEOUTS for arg in ("-t", timeout))])
        time.sleep(1.0)  # the last export datagrams
    finally:
        collector.terminate()  # nfcapd writes its file on SIGTERM
        collector.wait(timeout=30)
    exported = re.search(r"Flows exported: (\d+) \((\d+) records\)", output)
    if exported is None:
        raise RuntimeError(f"softflowd printed no statistics: {output[-2000:]}")
    listing = subprocess.run(["nfdump", "-R", str(received), "-b", "-q", "-o", "fmt:%pr"],
                             check=True, capture_output=True, text=True).stdout.split()
    print(f"  softflowd's own counters: {exported.group(1)} flows exported as "
          f"{exported.group(2)} records; nfdump pairs them into {len(listing)} "
          "bidirectional flows")
    return Result(elapsed, rss, len(listing), sum(p in ("TCP", "UDP") for p in listing))


PEERS: dict[str, tuple[Callable[[], bool], Callable[[Path, Path], Result]]] = {
    "nfstream": (lambda: subprocess.run([sys.executable, "-c", "import nfstream"],
                                        capture_output=True).returncode == 0, run_nfstream),
    "argus": (lambda: all(shutil.which(c) for c in ("argus", "racount")), run_argus),
    "softflowd": (lambda: all(shutil.which(c) for c in ("softflowd", "nfcapd", "nfdump")),
                  run_softflowd),
}


def build_synthetic(directory: Path, packets: int, flows: int) -> tuple[Path, int]:
    capture = directory / f"synthetic-{packets}-{flows}.pcap"
    plan = write_capture(str(capture), flows=flows, packets=packets, seed=7)
    return capture, int(plan.packets.sum())


def realistic(path: Path, packets: int) -> tuple[Path, int]:
    """The realistic capture at ``path``: reused when it exists (its packets counted with
    flowbeam's reader), else built there."""
    if not path.exists():
        return path, build_capture(path, packets).packets
    stats = CaptureStats()
    with path.open("rb") as stream:
        for _ in read_capture(stream, stats=stats):
            pass
    return path, stats.records


def report(packets: int, results: dict[str, list[Result]]) -> None:
    """The table: median packets/s, flowbeam's ratio to each tool, peak RSS, flow counts."""
    rates = {name: packets / statistics.median(r.elapsed for r in runs)
             for name, runs in results.items()}
    print(f"\n{'tool':10} {'packets/s':>12} {'flowbeam/x':>10} {'peak RSS':>9}  flows "
          "(TCP+UDP)")
    for name, runs in results.items():
        flows = sorted({r.flows for r in runs})
        tcp_udp = sorted({r.tcp_udp for r in runs if r.tcp_udp is not None})
        print(f"{name:10} {rates[name]:12,.0f} {rates['flowbeam'] / rates[name]:9.2f}x "
              f"{max(r.rss_mib for r in runs):5d} MiB  {'/'.join(map(str, flows))}"
              + (f" ({'/'.join(map(str, tcp_udp))})" if tcp_udp else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=None,
                        help=f"default 2000000 synthetic, {DEFAULT_PACKETS} realistic")
    parser.add_argument("--flows", type=int, default=100_000, help="synthetic mode only")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep captures here (default: a temp dir)")
    parser.add_argument("--realistic", action="store_true",
                        help="replicated real captures instead of the synthetic generator")
    parser.add_argument("--capture", type=Path, default=None,
                        help="realistic capture to reuse (built and kept there if missing)")
    parser.add_argument("--peers", default=None,
                        help="comma-separated, of nfstream,argus,softflowd (default: nfstream "
                             "synthetic, all installed realistic)")
    parser.add_argument("--extra-flowbeam-args", default="",
                        help="more flags for pipelines.pcap_flows, shell-quoted")
    args = parser.parse_args()
    directory = Path(args.workdir or tempfile.mkdtemp(prefix="flowbeam-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    wanted = (args.peers or ("nfstream,argus,softflowd" if args.realistic else "nfstream"))
    peers = {}
    for name in filter(None, wanted.split(",")):
        if name not in PEERS:
            parser.error(f"unknown peer {name!r}")
        if PEERS[name][0]():
            peers[name] = PEERS[name][1]
        else:
            print(f"{name} is not installed: skipped")
    if args.realistic:
        capture, packets = realistic(
            args.capture or directory / "realistic.pcap", args.packets or DEFAULT_PACKETS)
        print(f"capture: {packets} real-shaped packets, "
              f"{capture.stat().st_size / 2**20:.0f} MiB ({capture})")
    else:
        capture, packets = build_synthetic(directory, args.packets or 2_000_000, args.flows)
        print(f"capture: {packets} packets, {args.flows} flows, "
              f"{capture.stat().st_size / 2**20:.0f} MiB ({capture})")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start")

    extra = shlex.split(args.extra_flowbeam_args)
    tools: dict[str, Callable[[Path, Path], Result]] = {
        "flowbeam": lambda cap, work: run_flowbeam(cap, work, extra), **peers}
    results: dict[str, list[Result]] = {name: [] for name in tools}
    for run in range(args.runs):
        for name, tool in tools.items():
            result = tool(capture, directory)
            results[name].append(result)
            print(f"  run {run + 1}: {name:9} {packets / result.elapsed:12,.0f} packets/s  "
                  f"{result.elapsed:7.2f} s  peak RSS {result.rss_mib} MiB  "
                  f"flows {result.flows}  load {os.getloadavg()[0]:.1f}", flush=True)
    report(packets, results)

    if not args.realistic:
        for name, runs in results.items():
            if any(r.flows != args.flows for r in runs):
                print(f"WARNING: {name} found {[r.flows for r in runs]} flows, "
                      f"expected {args.flows}")
        small, small_packets = build_synthetic(directory, packets // 3, args.flows)
        small_rss = run_flowbeam(small, directory, extra).rss_mib
        print(f"flowbeam peak RSS, {args.flows} flows: {small_rss} MiB at {small_packets} "
              f"packets, {max(r.rss_mib for r in results['flowbeam'])} MiB at {packets} packets")
    if args.workdir is None:
        shutil.rmtree(directory)  # a --capture outside it is kept


if __name__ == "__main__":
    main()
