"""``flowbeam capture``: the command line of the capture agent, and its summary.

    flowbeam capture --interface eth0 --topic projects/P/topics/T [--bpf EXPR] ...
    flowbeam capture --replay FILE.pcap[.gz] --topic projects/P/topics/T [--speed X]

Every option also comes from ``FLOWBEAM_<NAME>`` (the command line wins), so a systemd unit or
a container sets them in its environment; ``PUBSUB_EMULATOR_HOST`` sends to an emulator. A bad
start (unknown interface, no permission, bad filter, bad or missing topic) is one line on
stderr and exit code 2; a capture that stops under the agent, a damaged replay file or a batch
that could not be kept exits 1, after the summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from google.api_core import exceptions
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import pubsub_v1

from flowbeam.agent.batch_format import (
    COMPRESSION_GZIP,
    COMPRESSIONS,
    MAX_BATCH_BYTES,
    PCAP_HEADER_BYTES,
    RECORD_HEADER_BYTES,
)
from flowbeam.agent.batcher import Batcher
from flowbeam.agent.capture_filter import (
    own_traffic_filter,
    pubsub_endpoint,
    resolve_addresses,
    split_endpoint,
)
from flowbeam.agent.live import CaptureLostError, CaptureSetupError, LiveSource
from flowbeam.agent.publisher import Publisher
from flowbeam.agent.replay import ReplaySource
from flowbeam.agent.runner import AgentLoop, BatchSettings
from flowbeam.agent.spool import Spool
from flowbeam.capture.pcap import MAX_CAPLEN
from flowbeam.capture.source import CaptureError
from flowbeam.env_options import add_switch, env_default, unknown_environment

USAGE_ERROR = 2
# Google's naming rules: a project id (optionally domain-scoped), a topic name of 3-255
# characters starting with a letter.
TOPIC_PATTERN = re.compile(
    r"projects/(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9_.~+%-]{2,254}")
LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The options (see README, "Live capture"); each default may come from the environment."""
    parser = argparse.ArgumentParser(
        prog="flowbeam capture",
        description="Capture packets on an interface (or replay a capture file) and publish "
                    "them to Pub/Sub in batches. Every option also comes from FLOWBEAM_<NAME>.")
    add = parser.add_argument
    add("--interface", default=env_default("interface"), help="network interface to capture on")
    add("--replay", default=env_default("replay"),
        help="publish this capture file (pcap/pcapng, may be gzip'd) instead of capturing")
    add("--topic", default=env_default("topic"), help="Pub/Sub topic: projects/P/topics/T")
    add("--sensor", default=env_default("sensor", socket.gethostname()),
        help="name of this observation point, in every batch (default: the host name)")
    add("--bpf", default=env_default("bpf", ""),
        help="BPF capture filter expression (tcpdump syntax)")
    add("--snaplen", type=int, default=env_default("snaplen", 262144),
        help="bytes kept of each packet (default 262144: all of it)")
    add("--buffer_bytes", type=int, default=env_default("buffer_bytes", 32 << 20),
        help="kernel capture buffer: packets wait here while the agent is busy (default 32 MiB)")
    add("--batch_packets", type=int, default=env_default("batch_packets", 10000),
        help="send a batch when it holds this many packets (default 10000)")
    add("--batch_bytes", type=int, default=env_default("batch_bytes", 1_000_000),
        help=f"... or before it would exceed this many pcap bytes (default 1000000, "
             f"at most {MAX_BATCH_BYTES})")
    add("--batch_seconds", type=float, default=env_default("batch_seconds", 5.0),
        help="... or when its first packet is this many seconds old (default 5)")
    add("--speed", type=float, default=env_default("speed"),
        help="--replay only: X times real time (default: as fast as possible)")
    add("--compression", choices=COMPRESSIONS, default=env_default("compression", COMPRESSION_GZIP),
        help="batch data compression (default gzip)")
    add("--spool", default=env_default("spool"),
        help="directory for batches Pub/Sub could not take yet (sent on recovery or restart)")
    add("--spool_max_bytes", type=int, default=env_default("spool_max_bytes", 1 << 30),
        help="spool size bound (default 1 GiB); beyond it batches are counted as dropped")
    add("--max_pending_bytes", type=int, default=env_default("max_pending_bytes", 64 << 20),
        help="memory bound for unsent batches (default 64 MiB); beyond it: spool or drop")
    add("--drain_seconds", type=float, default=env_default("drain_seconds", 10.0),
        help="at the end, wait this long for unsent batches (default 10)")
    add("--progress_seconds", type=float, default=env_default("progress_seconds", 5.0),
        help="print a progress line this often on stderr (default 5; 0: never)")
    add_switch(parser, "include_own_traffic",
               "do not exclude the agent's own traffic to the Pub/Sub endpoint from the capture")
    return parser


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the options as one line, or None."""
    if (args.interface is None) == (args.replay is None):
        return "give exactly one of --interface and --replay"
    if not args.topic:
        return "--topic is required (projects/PROJECT/topics/TOPIC)"
    if not TOPIC_PATTERN.fullmatch(args.topic):
        return f"bad topic {args.topic!r}: expected projects/PROJECT/topics/TOPIC"
    if not 0 < len(args.sensor.encode()) <= 1024:  # Pub/Sub's limit for an attribute value
        return "--sensor must be 1 to 1024 bytes"
    if args.speed is not None and (args.replay is None or args.speed <= 0):
        return "--speed needs --replay and a positive value"
    if not 1 <= args.snaplen <= MAX_CAPLEN:
        return f"--snaplen must be 1..{MAX_CAPLEN}"
    if args.buffer_bytes < 1 << 20:
        return "--buffer_bytes must be at least 1 MiB"
    smallest = PCAP_HEADER_BYTES + RECORD_HEADER_BYTES + (args.snaplen if args.interface
                                                         else MAX_CAPLEN)
    if not smallest <= args.batch_bytes <= MAX_BATCH_BYTES:
        return (f"--batch_bytes must be {smallest}..{MAX_BATCH_BYTES} "
                f"(at least one record of --snaplen bytes)")
    if args.batch_packets < 1 or args.batch_seconds <= 0:
        return "--batch_packets and --batch_seconds must be positive"
    if args.max_pending_bytes < args.batch_bytes or args.spool_max_bytes < args.batch_bytes:
        return "--max_pending_bytes and --spool_max_bytes must hold at least one batch"
    if args.drain_seconds < 0 or args.progress_seconds < 0:
        return "--drain_seconds and --progress_seconds must not be negative"
    return None


def own_traffic_exclusion(args: argparse.Namespace) -> str:
    """The BPF expression that keeps the agent's own Pub/Sub traffic out ("" when told to)."""
    if args.include_own_traffic:
        return ""
    endpoint = pubsub_endpoint(os.environ)
    try:
        host, port = split_endpoint(endpoint)
        addresses = resolve_addresses(host, port)
    except (ValueError, OSError) as error:
        raise CaptureSetupError(f"cannot resolve the Pub/Sub endpoint {endpoint}: {error}"
                                " (to capture anyway: --include_own_traffic)") from None
    return own_traffic_filter(addresses, port)


def _publisher_client(topic: str) -> pubsub_v1.PublisherClient:
    """A PublisherClient whose topic exists; raises CaptureSetupError when it surely does not.

    An unreachable Pub/Sub is not an error: the agent starts, keeps its batches and retries.
    """
    try:
        client = pubsub_v1.PublisherClient()
    except DefaultCredentialsError as error:
        raise CaptureSetupError(f"no Google credentials: {error}".splitlines()[0]) from None
    try:
        client.get_topic(request={"topic": topic}, retry=None, timeout=10)
    except exceptions.NotFound:
        raise CaptureSetupError(f"topic {topic} does not exist") from None
    except exceptions.InvalidArgument as error:
        raise CaptureSetupError(f"bad topic {topic!r}: {error.message}") from None
    except exceptions.PermissionDenied:
        pass  # allowed to publish but not to look the topic up: the publishes will tell
    except exceptions.GoogleAPICallError as error:
        LOG.warning("Pub/Sub not reachable yet (%s): batches are kept and retried",
                    type(error).__name__)
    return client


def main(argv: Sequence[str]) -> int:
    """Run the agent; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"flowbeam capture: error: {problem}", file=sys.stderr)
        return USAGE_ERROR
    for warning in unknown_environment():
        print(f"flowbeam capture: warning: {warning}", file=sys.stderr)
    stop = threading.Event()  # set early: a signal during start-up still ends with a summary
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    try:
        if args.interface is not None:
            source = LiveSource(args.interface, snaplen=args.snaplen,
                                buffer_bytes=args.buffer_bytes, bpf=args.bpf,
                                exclude=own_traffic_exclusion(args))
            what = f"capturing on {args.interface} (filter: {source.filter or 'none'})"
        else:
            source = ReplaySource(args.replay, args.speed)
            what = f"replaying {args.replay}"
        client = _publisher_client(args.topic)
        spool = Spool(Path(args.spool), args.spool_max_bytes) if args.spool else None
    except (CaptureSetupError, OSError) as error:
        print(f"flowbeam capture: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    publisher = Publisher(client, args.topic, max_pending_bytes=args.max_pending_bytes,
                          spool=spool)
    loop = AgentLoop(
        source, Batcher(args.batch_packets, args.batch_bytes, args.batch_seconds), publisher,
        BatchSettings(args.sensor, uuid.uuid4().hex[:16], args.compression),
        progress_seconds=args.progress_seconds,
        progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"flowbeam capture: {what}, publishing to {args.topic} as sensor {args.sensor}",
          file=sys.stderr, flush=True)
    failure = ""
    try:
        loop.run(stop)
    except (CaptureLostError, CaptureError) as error:
        failure = str(error)
    finally:
        source.close()
    publisher.close(args.drain_seconds)
    print(summary(loop, publisher, what, args.compression))
    if failure:
        print(f"flowbeam capture: error: {failure}", file=sys.stderr)
    return 1 if failure or publisher.stats.dropped_batches else 0


def summary(loop: AgentLoop, publisher: Publisher, what: str, compression: str) -> str:
    """The end-of-run report: packets in, batches out, and where every batch went."""
    seen, sent = loop.stats, publisher.stats
    elapsed = max(seen.ended - seen.started, 1e-9)
    ratio = f"{seen.message_bytes / seen.pcap_bytes:.1%}" if seen.pcap_bytes else "-"
    rows = [
        ("source", what),
        ("packets captured", f"{seen.packets}"),
        ("kernel drops", f"{seen.kernel_drops}"),
        ("batches", f"{seen.batches} ({sent.published_batches} published, "
                    f"{sent.spooled_batches} spooled, {sent.dropped_batches} dropped)"),
        ("packets published", f"{sent.published_packets} ({sent.dropped_packets} dropped)"),
        ("bytes", f"{seen.pcap_bytes} pcap, {seen.message_bytes} {compression} ({ratio}), "
                  f"{sent.published_bytes} published"),
        ("publish failures", f"{sent.failures}"
                             + (f" (last: {sent.last_error})" if sent.failures else "")),
        ("spool", f"{publisher.spooled_files} batches waiting"),
        ("elapsed", f"{elapsed:.2f} s"),
        ("packets/s", f"{seen.packets / elapsed:,.0f}"),
    ]
    return "flowbeam capture summary\n" + "\n".join(f"  {name:<18}{value}" for name, value in rows)
