"""The ``flowbeam`` command.

    flowbeam pcap --input 'captures/*.pcap' --output out/   # the pcap batch pipeline
    flowbeam generate --output sample.pcap                  # a synthetic capture to try it on
    flowbeam vpc --input 'flowlogs/*.log.gz' --output out/  # AWS VPC Flow Logs to flows
    flowbeam capture --interface eth0 --topic projects/P/topics/T   # the capture agent
    flowbeam pubsub --subscription projects/P/subscriptions/S --output out/  # streaming

``flowbeam pcap ARGS`` is exactly ``python -m pipelines.pcap_flows ARGS`` (Beam's convention).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flowbeam.agent import command as capture_agent
from flowbeam.synthetic import write_capture

PIPELINES = ("pcap", "vpc", "pubsub")
# generate's default: the sample's 40,000 packets for 2,000 flows, kept for any --flows.
PACKETS_PER_FLOW = 20
# The sample has a few refused connections, as real traffic does (the README's queries find them).
REFUSED = 0.02


def generate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="flowbeam generate",
        description="Write a synthetic capture of complete TCP, UDP and ICMP conversations.")
    parser.add_argument("--output", required=True, help="pcap file to write")
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--packets", type=int, default=None,
                        help=f"about this many packets (default {PACKETS_PER_FLOW} per flow)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--refused", type=float, default=REFUSED,
                        help=f"fraction of TCP flows that are refused connection attempts "
                             f"(SYN, RST+ACK; default {REFUSED})")
    args = parser.parse_args(argv)
    if args.packets is None:
        args.packets = PACKETS_PER_FLOW * args.flows
    if args.flows < 1 or args.packets < 6 * args.flows:
        parser.error("need --flows >= 1 and --packets >= 6 * --flows (a flow has 6+ packets)")
    plan = write_capture(args.output, args.flows, args.packets, args.seed, args.refused)
    print(f"wrote {args.output}: {int(plan.packets.sum())} packets in {len(plan)} flows")
    return 0


def run_pipeline(command: str, argv: Sequence[str]) -> int:
    """Run one of the pipelines. They are imported only here: Beam takes seconds to import,
    and ``flowbeam capture`` (on a sensor) and ``flowbeam generate`` need none of it."""
    if command == "pcap":
        from pipelines import pcap_flows
        from pipelines.local_cores import freeze_imported_objects
        freeze_imported_objects()
        return pcap_flows.run(argv)
    if command == "vpc":
        from pipelines import vpc_flows
        return vpc_flows.run(argv)
    from pipelines import pubsub_flows
    return pubsub_flows.run(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ", ".join([*PIPELINES, "generate", "capture"])
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: flowbeam {{{commands}}} [options]\n\n{__doc__}")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if command == "generate":
        sys.exit(generate(rest))
    if command == "capture":
        sys.exit(capture_agent.main(rest))
    if command not in PIPELINES:
        print(f"flowbeam: error: unknown command {command!r} (choose from {commands})",
              file=sys.stderr)
        sys.exit(2)
    code = run_pipeline(command, rest)
    if command == "pcap":  # a batch run: done once its summary is out
        from pipelines.local_cores import exit_after_run
        exit_after_run(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
