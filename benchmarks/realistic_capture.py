"""Build a long, real-shaped benchmark capture by replicating the real captures in data/pcaps.

    .venv/bin/python benchmarks/realistic_capture.py --packets 3053520 --output /tmp/real.pcap

Synthetic traffic is kinder than real traffic (every packet a plain TCP/UDP segment), so a
throughput figure measured on it flatters a decoder. This builds millions of packets out of
real ones instead: each "round" of ``ROUND_S`` seconds holds one or more copies of every
capture in ``SOURCES`` (echo conversations, a mixed LAN capture, HTTP downloads, video, an
IPv6 extension-header DoS, IPv4 fragments, snaplen-cut packets, SLL and raw-IP captures
converted to Ethernet...), each copy starting at a seeded random moment of the round, and the
round's packets sorted by time. Rounds follow one another, so the file is time-ordered like one
long capture. About 30% of the packets carry IPv6 extension headers or are IP fragments.

Each copy gets its own addresses so that copies are distinct flows: copy number ``s`` adds
``s`` to one 16-bit word of every IPv4/IPv6 address and subtracts ``s`` from the next one
(ones' complement arithmetic, modulo 0xFFFF). The ones' complement sum of every address is
therefore unchanged, and so is every checksum that covers addresses: IPv4 header checksums
and TCP/UDP/ICMPv6 checksums (pseudo-header) stay exactly as valid as in the source capture,
with no per-packet checksum work, fragments and extension headers included. The same map is
applied to ARP sender/target addresses and to the header an ICMP error quotes (its checksum
stays valid for the same reason), so a copy is consistent throughout. An address with a
0xFFFF word (e.g. 255.255.255.255) is left unchanged: 0x0000 and 0xFFFF are the same number
in ones' complement, so shifting both would map two addresses onto one.

Skipped sources: tcpdump_various_gre.pcap (tunnelled inner addresses are not shifted, so
copies would share inner flows) and the captures whose packets lie minutes to years apart
(ppp_raw_ip, ppp_ldap_mixed_linktypes, zeek_pcapng-multi-interface, nfs_dhcp_big_endian):
they do not fit in a round. The trailing partial record of sv_http-mime_truncated_file.pcap
is dropped. Output: classic pcap, little-endian, microseconds, Ethernet.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from flowbeam.capture.reader import CaptureDamagedError, read_capture
from flowbeam.capture.writer import write_pcap
from flowbeam.packets.header_constants import (
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    IPV6_EXTENSION_HEADERS,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_RAW,
    LINKTYPE_RAW_12,
    LINKTYPE_RAW_14,
    VLAN_ETHERTYPES,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcaps"
DEFAULT_PACKETS = 3_053_520
ROUND_S = 60  # every source fits in a round (the longest, zeek_icmp6, spans 59.3 s)
START_S = 1_704_067_200  # 2024-01-01T00:00:00Z: the capture's first round
# (file name, copies per round). ppp_ip4_fragments has 53 packets: 40 copies make fragments
# ~1.5% of the packets; denial6 gives the other ~29% (extension headers).
SOURCES = (
    ("zeek_echo-connections.pcap", 1),
    ("sv_denial6-6.pcap", 1),
    ("ppp_example.pcap", 1),
    ("sv_http-mime_truncated_file.pcap", 1),
    ("nfs_ps_vue_bigendian.pcap", 1),
    ("zeek_tcp_timestamp_snapcut.pcap", 1),
    ("ppp_sll.pcap", 1),
    ("tcpreplay_test.pcap", 1),
    ("ppp_ip4_fragments.pcap", 40),
    ("ppp_four_ipv6_http_streams_dlt12.pcap", 1),
    ("cs_icmp_traceroute.pcapng", 1),
    ("zeek_icmp6.pcap", 1),
    ("cs_http_ip4and6.pcapng", 1),
    ("zeek_tcp_truncated-header_snapcut.pcap", 1),
    ("zeek_http-vlan.pcap", 1),
    ("ppp_nanosecs_big_endian.pcap", 1),
    ("zeek_get-to-ssh-server_nanosec.pcap", 1),
    ("zeek_sip_linktype_ipv4.pcap", 1),
    ("sv_sctp_linktype_ipv4.pcap", 1),
)
_RAW_LINKTYPES = frozenset({LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_IPV4,
                            LINKTYPE_IPV6})
_MACS = bytes.fromhex("020000000001020000000002")  # made-up dst/src for converted frames
_ETHERTYPE_ARP = 0x0806
_ICMP_ERRORS = {1: frozenset({3, 4, 5, 11, 12}), 58: frozenset({1, 2, 3, 4})}
_RECORD = struct.Struct("<IIII")
_CHUNK_RECORDS = 1 << 15  # records gathered per write: ~3 MB of output, ~30 MB of indices


@dataclass(frozen=True)
class Template:
    """One source capture as back-to-back pcap records, ready to be copied and shifted."""

    name: str
    records: np.ndarray  # uint8: 16-byte record header + Ethernet frame, one after another
    starts: np.ndarray  # int64: offset of each record in ``records``
    ts_us: np.ndarray  # int64: time since the capture's first packet
    plus: np.ndarray  # int64: offsets in ``records`` of address words raised by the shift
    minus: np.ndarray  # int64: offsets of the address words lowered by the same amount
    special: np.ndarray  # bool: IPv6 with extension headers, or an IPv4 fragment

    @property
    def span_us(self) -> int:
        return int(self.ts_us.max()) if len(self.ts_us) else 0


@dataclass
class BuildStats:
    """What ``build_capture`` wrote; ``special`` counts extension-header and fragment packets."""

    packets: int = 0
    special: int = 0
    rounds: int = 0


def _to_ethernet(linktype: int, frame: bytes) -> bytes | None:
    """The frame as Ethernet: SLL and raw-IP headers are replaced, other link types skipped."""
    if linktype == LINKTYPE_ETHERNET:
        return frame
    if linktype == LINKTYPE_LINUX_SLL and len(frame) >= 16:
        return _MACS + frame[14:16] + frame[16:]
    if linktype in _RAW_LINKTYPES and frame:
        version = frame[0] >> 4
        if version in (4, 6):
            ethertype = ETHERTYPE_IPV4 if version == 4 else ETHERTYPE_IPV6
            return _MACS + ethertype.to_bytes(2, "big") + frame
    return None


def _ip_addresses(frame: bytes, l3: int, version: int, quoted: bool = False) -> list[int]:
    """Offsets in ``frame`` of the IP addresses of the header at ``l3`` (and, for an ICMP error,
    of the header it quotes); ``quoted`` stops the recursion at one level."""
    if version == 4 and len(frame) >= l3 + 20:
        found = [l3 + 12, l3 + 16]
        ihl, protocol = (frame[l3] & 0xF) * 4, frame[l3 + 9]
        inner = l3 + ihl + 8
        unfragmented = not int.from_bytes(frame[l3 + 6:l3 + 8], "big") & 0x3FFF
        if (not quoted and protocol == 1 and unfragmented and len(frame) > inner
                and frame[l3 + ihl] in _ICMP_ERRORS[1] and frame[inner] >> 4 == 4):
            found += _ip_addresses(frame, inner, 4, quoted=True)
        return found
    if version == 6 and len(frame) >= l3 + 40:
        found = [l3 + 8, l3 + 24]
        inner = l3 + 48
        if (not quoted and frame[l3 + 6] == 58 and len(frame) > inner
                and frame[l3 + 40] in _ICMP_ERRORS[58] and frame[inner] >> 4 == 6):
            found += _ip_addresses(frame, inner, 6, quoted=True)
        return found
    return []


def _describe(frame: bytes) -> tuple[list[int], list[int], bool]:
    """(offsets of words to raise, offsets of words to lower, special?) of an Ethernet frame.

    IPv4 shifts the address's two words; IPv6 words 2 and 3 (bytes 4-7: the subnet part, so
    link-local and multicast addresses change too).
    """
    l3, ethertype = 14, int.from_bytes(frame[12:14], "big")
    while ethertype in VLAN_ETHERTYPES and len(frame) >= l3 + 4:
        ethertype, l3 = int.from_bytes(frame[l3 + 2:l3 + 4], "big"), l3 + 4
    plus: list[int] = []
    minus: list[int] = []
    special = False
    if ethertype == _ETHERTYPE_ARP:
        addresses, word = ([l3 + 14, l3 + 24] if len(frame) >= l3 + 28 else []), 0
    elif ethertype == ETHERTYPE_IPV4:
        addresses, word = _ip_addresses(frame, l3, 4), 0
        special = len(frame) >= l3 + 8 and bool(
            int.from_bytes(frame[l3 + 6:l3 + 8], "big") & 0x3FFF)
    elif ethertype == ETHERTYPE_IPV6:
        addresses, word = _ip_addresses(frame, l3, 6), 4
        special = len(frame) > l3 + 6 and frame[l3 + 6] in IPV6_EXTENSION_HEADERS
    else:
        return plus, minus, special
    for address in addresses:
        high, low = address + word, address + word + 2
        if frame[high:high + 2] != b"\xff\xff" and frame[low:low + 2] != b"\xff\xff":
            plus.append(high)
            minus.append(low)
    return plus, minus, special


def load_template(path: Path) -> Template:
    """Read one capture with flowbeam's reader and lay it out as Ethernet pcap records."""
    parts: list[bytes] = []
    starts, times, plus, minus, special = [], [], [], [], []
    offset = 0
    try:
        with path.open("rb") as stream:
            for batch in read_capture(stream):
                for start, caplen, wirelen, ts_us, linktype in zip(
                        batch.offsets.tolist(), batch.caplen.tolist(), batch.wirelen.tolist(),
                        batch.ts_us.tolist(), batch.linktype.tolist(), strict=True):
                    original = batch.data[start:start + caplen].tobytes()
                    frame = _to_ethernet(linktype, original)
                    if frame is None:
                        continue
                    up, down, odd = _describe(frame)
                    base = offset + _RECORD.size
                    plus += [base + p for p in up]
                    minus += [base + p for p in down]
                    special.append(odd)
                    starts.append(offset)
                    times.append(ts_us)
                    parts.append(_RECORD.pack(0, 0, len(frame),
                                              wirelen + len(frame) - len(original)))
                    parts.append(frame)
                    offset += _RECORD.size + len(frame)
    except CaptureDamagedError:
        pass  # a truncated trailing record: keep every complete one before it
    ts = np.asarray(times, np.int64)
    return Template(path.name, np.frombuffer(b"".join(parts), np.uint8).copy(),
                    np.asarray(starts, np.int64), ts - (ts.min() if len(ts) else 0),
                    np.asarray(plus, np.int64), np.asarray(minus, np.int64),
                    np.asarray(special, bool))


def _shift_words(buf: np.ndarray, at: np.ndarray, delta: int) -> None:
    """Add ``delta`` (ones' complement, modulo 0xFFFF) to the big-endian words at ``at``."""
    words = (buf[at].astype(np.int64) << 8) | buf[at + 1]
    words = (words + delta) % 0xFFFF
    buf[at] = words >> 8
    buf[at + 1] = words & 0xFF


def _round(templates: list[tuple[Template, int]], rng: np.random.Generator, serial: int,
           start_us: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One round's copies, concatenated: (records, starts, lengths, ts_us, special)."""
    records, starts, lengths, times, special = [], [], [], [], []
    base = 0
    for template, copies in templates:
        lengths_one = np.diff(np.append(template.starts, len(template.records)))
        for _ in range(copies):
            serial += 1
            copy = template.records.copy()
            _shift_words(copy, template.plus, serial)
            _shift_words(copy, template.minus, -serial)
            offset = int(rng.integers(0, ROUND_S * 1_000_000 - template.span_us + 1))
            records.append(copy)
            starts.append(template.starts + base)
            lengths.append(lengths_one)
            times.append(template.ts_us + start_us + offset)
            special.append(template.special)
            base += len(copy)
    return (np.concatenate(records), np.concatenate(starts), np.concatenate(lengths),
            np.concatenate(times), np.concatenate(special))


def _write_records(stream: BinaryIO, records: np.ndarray, starts: np.ndarray,
                   lengths: np.ndarray, ts_us: np.ndarray) -> None:
    """Write the records in the given order, each with its timestamp, ~3 MB per write."""
    for first in range(0, len(starts), _CHUNK_RECORDS):
        src, size = starts[first:first + _CHUNK_RECORDS], lengths[first:first + _CHUNK_RECORDS]
        dst = np.cumsum(size) - size
        out = records[np.arange(int(size.sum())) + np.repeat(src - dst, size)]
        stamps = ts_us[first:first + _CHUNK_RECORDS]
        header = np.empty((len(src), 2), "<u4")
        header[:, 0], header[:, 1] = np.divmod(stamps, 1_000_000)
        out[(dst[:, None] + np.arange(8)).ravel()] = header.view(np.uint8).ravel()
        stream.write(out.data)


def build_capture(output: str | Path, packets: int = DEFAULT_PACKETS, seed: int = 1,
                  data: Path = DATA) -> BuildStats:
    """Write ``packets`` real-shaped packets to ``output`` (see the module docstring)."""
    templates = [(load_template(data / name), copies) for name, copies in SOURCES]
    per_round = sum(len(t.starts) * copies for t, copies in templates)
    copies_per_round = sum(copies for _, copies in templates)
    rounds = -(-packets // per_round)
    if rounds * copies_per_round >= 0xFFFF:
        raise ValueError(f"{packets} packets need more than 65534 distinct copies")
    rng = np.random.default_rng(seed)
    too_long = [t.name for t, _ in templates if t.span_us > ROUND_S * 1_000_000]
    if too_long:
        raise ValueError(f"longer than a {ROUND_S} s round: {', '.join(too_long)}")
    stats = BuildStats()
    with open(output, "wb") as stream:
        write_pcap(stream, [], linktype=LINKTYPE_ETHERNET)  # the file header
        for number in range(rounds):
            start_us = (START_S + number * ROUND_S) * 1_000_000
            records, starts, lengths, ts_us, special = _round(
                templates, rng, number * copies_per_round, start_us)
            order = np.argsort(ts_us, kind="stable")[:packets - stats.packets]
            _write_records(stream, records, starts[order], lengths[order], ts_us[order])
            stats.packets += len(order)
            stats.special += int(special[order].sum())
            stats.rounds += 1
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=DEFAULT_PACKETS)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path, default=DATA, help="the real captures' directory")
    args = parser.parse_args()
    if args.packets < 1:
        parser.error("--packets must be positive")
    started = time.perf_counter()
    stats = build_capture(args.output, args.packets, args.seed, args.data)
    elapsed = time.perf_counter() - started
    size = Path(args.output).stat().st_size
    print(f"{args.output}: {stats.packets:,} packets, {size / 2**20:,.0f} MiB, "
          f"{stats.rounds} rounds of {ROUND_S} s, {stats.special / stats.packets:.1%} with IPv6 "
          f"extension headers or IPv4 fragments, built in {elapsed:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
