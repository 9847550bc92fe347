"""What a capture file's read reports, once per file, whether it was read whole
(``transforms.capture_files``) or in ranges (``transforms.capture_ranges``, or a local
process pool): its skipped packets per reason (Beam counters, and log lines in words), the
link types it could not decode, and its damage (a counter, a log line, one dead letter).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from apache_beam.pvalue import TaggedOutput

from flowbeam.packets.range_decode import RangeSummary
from transforms import counters
from transforms.dead_letters import DEAD_LETTER_TAG, dead_letter

LOG = logging.getLogger(__name__)

# The decoder's reasons (flowbeam.packets.error_reasons) in words, for the log and the summary.
REASON_WORDS = {
    "short_link_header": "frame shorter than its link header",
    "short_ip_header": "IP header cut short",
    "bad_ip_version": "IP version neither 4 nor 6",
    "bad_ip_header_length": "IPv4 header length under 20 bytes",
    "bad_ip_total_length": "IP total length shorter than the IP header",
    "bad_ipv6_extension_header": "malformed IPv6 extension header",
    "not_ip": "not IP: ARP, LLDP, STP or another link protocol",
    "unknown_linktype": "a link type flowbeam does not decode",
    "timestamp_out_of_range": "timestamp after the year 9999",
    "truncated_transport": "transport header cut by the snaplen",
}
# Reasons under which a packet is counted but still decoded (into a flow with ports 0).
DECODED_REASONS = frozenset({"truncated_transport"})


def describe_skipped(malformed: Mapping[str, int]) -> list[str]:
    """One capture's skipped packets in words: a line for those skipped ("skipped 7 packets:
    7 not IP: ...") and one for those still counted, with ports 0 (cut by the snaplen)."""
    lines = []
    for template, decoded in (("skipped {}", False), ("{} counted with ports 0", True)):
        reasons = sorted((reason, count) for reason, count in malformed.items()
                         if count and (reason in DECODED_REASONS) == decoded)
        if reasons:
            total = sum(count for _, count in reasons)
            packets = f"{total} packet{'s' if total != 1 else ''}"
            lines.append(template.format(packets) + ": " + "; ".join(
                f"{count} {REASON_WORDS.get(reason, reason)}" for reason, count in reasons))
    return lines


def report_skipped(path: str, malformed: Mapping[str, int],
                   unknown_linktypes: Iterable[int]) -> None:
    """Count a file's skipped packets per reason and log them in words, with the link types
    it has that flowbeam does not decode."""
    for reason, count in malformed.items():
        counters.malformed_counter(reason).inc(count)
    for linktype in sorted(unknown_linktypes):
        LOG.warning("flowbeam: %s: link type %d is not supported; its packets were skipped",
                    path, linktype)
    for line in describe_skipped(malformed):
        LOG.warning("flowbeam: %s: %s", path, line)


def damaged_file(damaged: Any, path: str, reason: str, offset: int | None = None
                 ) -> TaggedOutput:
    """A file damaged after some good records (which still become flows): counted on
    ``damaged``, logged, one dead letter."""
    damaged.inc()
    if offset is None:
        LOG.error("flowbeam: %s: %s", path, reason)
    else:
        LOG.error("flowbeam: %s: damaged at byte %d: %s", path, offset, reason)
    return TaggedOutput(DEAD_LETTER_TAG, dead_letter("read_capture", reason, path, offset))


def report_ranges(path: str, counted: Sequence[RangeSummary]) -> Iterator[TaggedOutput]:
    """Count a file read in ranges once, from its counted ranges' summaries (in order): a
    capture read, its packets, bytes and skipped packets, and its damage (the last counted
    range's, if any: one dead letter)."""
    counters.counter(counters.FILES_READ).inc()
    counters.counter(counters.PACKETS).inc(sum(summary.packets for summary in counted))
    counters.counter(counters.BYTES).inc(sum(summary.bytes for summary in counted))
    malformed: dict[str, int] = {}
    for summary in counted:
        for reason, count in summary.malformed.items():
            malformed[reason] = malformed.get(reason, 0) + count
    report_skipped(path, malformed,
                   {linktype for summary in counted for linktype in summary.unknown_linktypes})
    damage = counted[-1].outcome.damage
    if damage is not None:
        yield damaged_file(counters.counter(counters.FILES_DAMAGED), path, damage.reason,
                           damage.offset)


def log_read_whole(path: str, reason: str) -> None:
    """A file read in ranges whose ranges do not fit together is read again, whole."""
    LOG.warning("flowbeam: %s: read whole instead of in ranges: %s", path, reason)
