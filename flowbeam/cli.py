"""The ``flowbeam`` command.

    flowbeam pcap --input 'captures/*.pcap' --output out/   # the pcap batch pipeline
    flowbeam generate --output sample.pcap                  # a synthetic capture to try it on

``flowbeam pcap ARGS`` is exactly ``python -m pipelines.pcap_flows ARGS`` (Beam's convention).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flowbeam.synthetic import write_capture
from pipelines import pcap_flows

PIPELINES = {"pcap": pcap_flows.run}


def generate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="flowbeam generate",
        description="Write a synthetic capture of complete TCP, UDP and ICMP conversations.")
    parser.add_argument("--output", required=True, help="pcap file to write")
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--packets", type=int, default=40000, help="about this many packets")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.flows < 1 or args.packets < 6 * args.flows:
        parser.error("need --flows >= 1 and --packets >= 6 * --flows (a flow has 6+ packets)")
    plan = write_capture(args.output, args.flows, args.packets, args.seed)
    print(f"wrote {args.output}: {int(plan.packets.sum())} packets in {len(plan)} flows")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ", ".join([*PIPELINES, "generate"])
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: flowbeam {{{commands}}} [options]\n\n{__doc__}")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if command == "generate":
        sys.exit(generate(rest))
    if command not in PIPELINES:
        print(f"flowbeam: error: unknown command {command!r} (choose from {commands})",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(PIPELINES[command](rest))


if __name__ == "__main__":
    main()
