"""Tests of flowbeam.packets.decoder: exact columns for hand-built packets, fragment tracking,
error counting, vectorised path == per-packet path, and dpkt as an independent peer on real
captures (skipped when the shared captures are absent)."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import struct
from pathlib import Path

import dpkt
import numpy as np
import pytest

from flowbeam.capture.records import RecordBatch
from flowbeam.packets.columns import (
    COLUMN_DTYPES,
    COLUMN_NAMES,
    PacketColumns,
    build_columns,
    concat_columns,
    empty_columns,
)
from flowbeam.packets.decoder import MAX_TIMESTAMP_US, PacketDecoder
from flowbeam.packets.header_constants import VLAN_ETHERTYPES

PCAPS = Path(__file__).resolve().parents[2] / "shared/data/pcaps"

A4, B4 = "10.0.0.1", "192.168.1.20"
A6, B6 = "2001:db8::1", "fe80::1234:5678:9abc:def0"

TCP, UDP, ICMP, ICMP6, SCTP, UDPLITE, GRE = 6, 17, 1, 58, 132, 136, 47
SYN, ACK, PSH = 0x02, 0x10, 0x08


# --- Packet builders ---------------------------------------------------------------------------

def ethernet(payload: bytes, ethertype: int, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Ethernet frame; ``tags`` is ((TPID, vlan id), ...) outermost first."""
    header = bytes.fromhex("001122334455") + bytes.fromhex("66778899aabb")
    for tpid, vid in tags:
        header += struct.pack("!HH", tpid, 0x2000 | vid)  # priority 1: only 12 bits are the id
    return header + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, src: str = A4, dst: str = B4, *, ident: int = 0x1234,
         frag: int = 0, options: bytes = b"", total: int | None = None,
         ihl: int | None = None, version: int = 4, tos: int = 0) -> bytes:
    header_len = 20 + len(options)
    vihl = (version << 4) | (header_len // 4 if ihl is None else ihl)
    total = header_len + len(payload) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", vihl, tos, total, ident, frag, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + options + payload


def ipv6(nxt: int, payload: bytes, src: str = A6, dst: str = B6,
         payload_len: int | None = None, *, traffic_class: int = 0, flow_label: int = 0) -> bytes:
    plen = len(payload) if payload_len is None else payload_len
    first_word = (6 << 28) | (traffic_class << 20) | flow_label
    return (struct.pack("!IHBB", first_word, plen, nxt, 64) + ipaddress.IPv6Address(src).packed
            + ipaddress.IPv6Address(dst).packed + payload)


def ext_header(nxt: int, units: int, ah: bool = False) -> bytes:
    """An IPv6 extension header of (units+1)*8 bytes, or (units+2)*4 bytes for AH."""
    size = (units + 2) * 4 if ah else (units + 1) * 8
    return bytes([nxt, units]) + bytes(size - 2)


def frag6(nxt: int, offset: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BBHI", nxt, 0, (offset << 3) | int(more), ident)


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 8192, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(mtype: int, code: int) -> bytes:
    return struct.pack("!BBHI", mtype, code, 0, 0x00010001)


def sll(proto: int, payload: bytes) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x00\x11\x22\x33\x44\x55\x00\x00", proto) + payload


def sll2(proto: int, payload: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", proto, 0, 3, 1, 0, 6, b"\x00" * 8) + payload


def null(family: int, payload: bytes, order: str) -> bytes:
    return struct.pack(order + "I", family) + payload


def make_batch(frames: list[bytes], linktype: int | list[int] = 1, *,
               snaplen: int | None = None, ts_start: int = 1_000_000) -> RecordBatch:
    """Concatenate frames into one buffer; ``snaplen`` cuts captured bytes, not wirelen."""
    captured = [f if snaplen is None else f[:snaplen] for f in frames]
    caplen = np.array([len(f) for f in captured], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(caplen)[:-1]]).astype(np.int64)
    n = len(frames)
    linktypes = [linktype] * n if isinstance(linktype, int) else linktype
    return RecordBatch(
        data=np.frombuffer(b"".join(captured), dtype=np.uint8),
        offsets=offsets[:n],
        caplen=caplen,
        wirelen=np.array([len(f) for f in frames], dtype=np.int64),
        ts_us=ts_start + np.arange(n, dtype=np.int64),
        linktype=np.array(linktypes, dtype=np.int32),
        file_offsets=24 + offsets[:n] + 16 * np.arange(n),
    )


def addr(text: str) -> tuple[int, int]:
    value = int(ipaddress.ip_address(text))
    return value >> 64, value & (2**64 - 1)


def rows(cols: PacketColumns) -> list[dict[str, int]]:
    return [{n: int(getattr(cols, n)[i]) for n in COLUMN_NAMES} for i in range(len(cols))]


def flow(cols: PacketColumns, i: int = 0) -> tuple:
    """(version, protocol, src, dst, src_port, dst_port) of row ``i``, addresses as text."""
    def text(hi: int, lo: int, version: int) -> str:
        value = (int(hi) << 64) | int(lo)
        return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))
    v = int(cols.ip_version[i])
    return (v, int(cols.protocol[i]), text(cols.src_hi[i], cols.src_lo[i], v),
            text(cols.dst_hi[i], cols.dst_lo[i], v), int(cols.src_port[i]),
            int(cols.dst_port[i]))


def decode_one(
    frame: bytes, linktype: int = 1, **kw: object
) -> tuple[PacketColumns, PacketDecoder]:
    decoder = PacketDecoder()
    return decoder.decode(make_batch([frame], linktype, **kw)), decoder


def assert_columns_equal(a: PacketColumns, b: PacketColumns) -> None:
    for name in COLUMN_NAMES:
        assert getattr(a, name).dtype == getattr(b, name).dtype, name
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --- Link layers, IP, transports ---------------------------------------------------------------

def test_ethernet_ipv4_tcp_exact_columns() -> None:
    frame = ethernet(ipv4(TCP, tcp(43210, 443, SYN | ACK, b"x" * 10)), 0x0800)
    cols, decoder = decode_one(frame)
    src, dst = addr(A4), addr(B4)
    assert rows(cols) == [{
        "ts_us": 1_000_000, "ip_version": 4, "protocol": TCP,
        "src_hi": src[0], "src_lo": src[1], "dst_hi": dst[0], "dst_lo": dst[1],
        "src_port": 43210, "dst_port": 443, "vlan_id": -1, "ip_bytes": 50,
        "frame_bytes": 64, "tcp_flags": SYN | ACK,
    }]
    assert not decoder.errors
    for name in COLUMN_NAMES:
        assert getattr(cols, name).dtype == COLUMN_DTYPES[name]


def test_ethernet_ipv4_udp() -> None:
    cols, _ = decode_one(ethernet(ipv4(UDP, udp(5353, 53, b"q" * 12)), 0x0800))
    assert flow(cols) == (4, UDP, A4, B4, 5353, 53)
    assert (int(cols.ip_bytes[0]), int(cols.tcp_flags[0])) == (40, 0)


def test_ethernet_ipv6_tcp() -> None:
    cols, _ = decode_one(ethernet(ipv6(TCP, tcp(1025, 80, PSH | ACK, b"GET")), 0x86DD))
    assert flow(cols) == (6, TCP, A6, B6, 1025, 80)
    assert (int(cols.ip_bytes[0]), int(cols.tcp_flags[0])) == (63, PSH | ACK)
    assert (int(cols.src_hi[0]), int(cols.src_lo[0])) == addr(A6)


def test_ipv6_extension_headers_hop_by_hop_destination_options_fragment() -> None:
    # An atomic fragment (offset 0, M=0) is not part of a fragmented datagram: plain decode.
    chain = ext_header(60, 0) + ext_header(44, 1) + frag6(TCP, 0, False, 7) + tcp(5, 6, SYN)
    cols, decoder = decode_one(ethernet(ipv6(0, chain), 0x86DD))
    assert flow(cols) == (6, TCP, A6, B6, 5, 6)
    assert int(cols.ip_bytes[0]) == 40 + 8 + 16 + 8 + 20
    assert int(cols.tcp_flags[0]) == SYN
    assert not decoder.errors


@pytest.mark.parametrize(
    ("chain", "first", "expected"),
    [
        (ext_header(UDP, 1, ah=True) + udp(1, 2), 51, (UDP, 1, 2)),  # AH: (len+2)*4 bytes
        (ext_header(UDP, 0) + udp(3, 4), 43, (UDP, 3, 4)),  # routing
        (ext_header(59, 0) + b"zz", 135, (59, 0, 0)),  # mobility, then no next header
        (ext_header(TCP, 0) + tcp(7, 8, ACK), 139, (TCP, 7, 8)),  # HIP
        (ext_header(UDP, 0) + udp(9, 10), 140, (UDP, 9, 10)),  # shim6
        (ext_header(50, 0) + b"\x00" * 16, 0, (50, 0, 0)),  # ESP ends the walk
        (b"", 59, (59, 0, 0)),
    ],
)
def test_ipv6_extension_header_kinds(chain: bytes, first: int, expected: tuple) -> None:
    cols, decoder = decode_one(ethernet(ipv6(first, chain), 0x86DD))
    assert (int(cols.protocol[0]), int(cols.src_port[0]), int(cols.dst_port[0])) == expected
    assert not decoder.errors


@pytest.mark.parametrize(
    ("tags", "vlan"),
    [
        (((0x8100, 100),), 100),
        (((0x88A8, 200), (0x8100, 300)), 200),
        (((0x9100, 4095), (0x8100, 5)), 4095),
        (((0x8100, 1), (0x8100, 2), (0x8100, 3)), 1),
    ],
)
def test_vlan_tags_outermost_id(tags: tuple, vlan: int) -> None:
    cols, _ = decode_one(ethernet(ipv4(UDP, udp(1, 2)), 0x0800, tags))
    assert flow(cols) == (4, UDP, A4, B4, 1, 2)
    assert int(cols.vlan_id[0]) == vlan
    cols, _ = decode_one(ethernet(ipv6(TCP, tcp(1, 2, SYN)), 0x86DD, tags))
    assert (flow(cols), int(cols.vlan_id[0])) == ((6, TCP, A6, B6, 1, 2), vlan)


# Every single-tag shape the vectorised Ethernet path takes: each tag type, TCIs with every
# priority, the DEI bit, VLAN ids 0 and 4095 (the id is the TCI's low 12 bits only), and IP
# headers whose first bytes are not the usual 0x45 00 / 0x60 00 00 00 (TOS, traffic class, flow
# label). The other tests' tags all carry priority 1 and no flow label, so a fast path that
# mishandled these would be hidden.
FAST_TCIS = (0x0000, 0x0001, 0x0FFF, 0x1ABC, 0x2064, 0x7001, 0xE123, 0xFFFF)
FAST_PAYLOADS = [
    # (ethertype, IP packet, (version, protocol, src, dst, src_port, dst_port), ip_bytes, flags)
    (0x0800, ipv4(TCP, tcp(1, 2, SYN)), (4, TCP, A4, B4, 1, 2), 40, SYN),
    (0x0800, ipv4(UDP, udp(3, 4, b"abc"), tos=0xB8), (4, UDP, A4, B4, 3, 4), 31, 0),
    (0x0800, ipv4(ICMP, icmp(8, 0), tos=0xFF), (4, ICMP, A4, B4, 8, 0), 28, 0),
    (0x0800, ipv4(GRE, bytes(8)), (4, GRE, A4, B4, 0, 0), 28, 0),
    (0x86DD, ipv6(TCP, tcp(5, 6, ACK), traffic_class=0xB8, flow_label=0xFFFFF),
     (6, TCP, A6, B6, 5, 6), 60, ACK),
    (0x86DD, ipv6(UDP, udp(7, 8), flow_label=0x12345), (6, UDP, A6, B6, 7, 8), 48, 0),
    (0x86DD, ipv6(ICMP6, icmp(128, 0), traffic_class=0x01), (6, ICMP6, A6, B6, 128, 129), 48, 0),
]


@pytest.mark.parametrize("tpid", sorted(VLAN_ETHERTYPES), ids=hex)
def test_single_tagged_frames_take_the_fast_path_exactly(tpid: int) -> None:
    frames, expected = [], []
    for tci in FAST_TCIS:
        for ethertype, packet, key, ip_bytes, flags in FAST_PAYLOADS:
            header = bytes.fromhex("001122334455" "66778899aabb")
            frames.append(header + struct.pack("!HHH", tpid, tci, ethertype) + packet)
            expected.append((key, tci & 0x0FFF, ip_bytes, flags))
    decoder = PacketDecoder()

    def no_slow_path(*packet: object) -> list[tuple]:
        raise AssertionError(f"took the per-packet path: {packet}")

    decoder._slow_packet = no_slow_path  # type: ignore[method-assign]
    cols = decoder.decode(make_batch(frames))
    assert [(flow(cols, i), int(cols.vlan_id[i]), int(cols.ip_bytes[i]),
             int(cols.tcp_flags[i])) for i in range(len(cols))] == expected
    assert not decoder.errors
    # The per-packet path, which the other tests exercise on the same shapes, agrees.
    assert_columns_equal(cols, PacketDecoder()._decode(make_batch(frames), vectorised=False))


def mpls(payload: bytes, labels: tuple[int, ...]) -> bytes:
    """An MPLS label stack (bottom-of-stack bit on the last label) before ``payload``."""
    stack = b"".join(struct.pack("!I", (label << 12) | (int(i == len(labels) - 1) << 8) | 64)
                     for i, label in enumerate(labels))
    return stack + payload


def test_mpls_label_stack_then_ip() -> None:
    cols, decoder = decode_one(ethernet(mpls(ipv4(TCP, tcp(1, 2, SYN)), (16, 17)), 0x8847))
    assert (flow(cols), int(cols.vlan_id[0])) == ((4, TCP, A4, B4, 1, 2), -1)
    cols, decoder = decode_one(
        ethernet(mpls(ipv6(UDP, udp(3, 4)), (99,)), 0x8847, ((0x8100, 12),)))
    assert (flow(cols), int(cols.vlan_id[0])) == ((6, UDP, A6, B6, 3, 4), 12)
    assert not decoder.errors
    _, decoder = decode_one(ethernet(mpls(bytes(4) + ethernet(b"", 0x0800), (5,)), 0x8847))
    assert decoder.errors == {"not_ip": 1}  # a pseudowire control word: not IP
    _, decoder = decode_one(ethernet(mpls(b"", (5, 6)), 0x8847)[:20])
    assert decoder.errors == {"short_link_header": 1}


def test_linux_sll_and_sll2() -> None:
    cols, _ = decode_one(sll(0x0800, ipv4(TCP, tcp(1, 2, SYN))), 113)
    assert (flow(cols), int(cols.vlan_id[0])) == ((4, TCP, A4, B4, 1, 2), -1)
    cols, _ = decode_one(sll(0x86DD, ipv6(UDP, udp(3, 4))), 113)
    assert flow(cols) == (6, UDP, A6, B6, 3, 4)
    cols, _ = decode_one(sll2(0x0800, ipv4(UDP, udp(5, 6))), 276)
    assert flow(cols) == (4, UDP, A4, B4, 5, 6)
    cols, _ = decode_one(sll2(0x86DD, ipv6(TCP, tcp(7, 8, ACK))), 276)
    assert flow(cols) == (6, TCP, A6, B6, 7, 8)


@pytest.mark.parametrize("linktype", [12, 14, 101])
def test_raw_ip_version_nibble_decides(linktype: int) -> None:
    decoder = PacketDecoder()
    batch = make_batch([ipv4(UDP, udp(1, 2)), ipv6(TCP, tcp(3, 4, SYN))], linktype)
    cols = decoder.decode(batch)
    assert [flow(cols, i) for i in range(2)] == [(4, UDP, A4, B4, 1, 2), (6, TCP, A6, B6, 3, 4)]


def test_raw_ipv4_and_ipv6_linktypes() -> None:
    cols, _ = decode_one(ipv4(TCP, tcp(1, 2, SYN)), 228)
    assert flow(cols) == (4, TCP, A4, B4, 1, 2)
    cols, _ = decode_one(ipv6(UDP, udp(3, 4)), 229)
    assert flow(cols) == (6, UDP, A6, B6, 3, 4)


@pytest.mark.parametrize(
    ("linktype", "family", "order", "version"),
    [
        (0, 2, "<", 4), (0, 2, ">", 4), (0, 24, "<", 6), (0, 28, ">", 6), (0, 30, "<", 6),
        (108, 2, ">", 4), (108, 30, ">", 6),
    ],
)
def test_null_and_loop(linktype: int, family: int, order: str, version: int) -> None:
    inner = ipv4(UDP, udp(1, 2)) if version == 4 else ipv6(UDP, udp(1, 2))
    cols, decoder = decode_one(null(family, inner, order), linktype)
    assert (int(cols.ip_version[0]), int(cols.src_port[0]), int(cols.dst_port[0])) == (
        version, 1, 2)
    assert not decoder.errors


def test_loop_is_network_byte_order_only() -> None:
    _, decoder = decode_one(null(2, ipv4(UDP, udp(1, 2)), "<"), 108)
    assert decoder.errors == {"not_ip": 1}


def test_sctp_and_udplite_ports() -> None:
    cols, _ = decode_one(ethernet(ipv4(SCTP, struct.pack("!HHII", 2905, 2906, 0, 0)), 0x0800))
    assert flow(cols) == (4, SCTP, A4, B4, 2905, 2906)
    cols, _ = decode_one(ethernet(ipv6(UDPLITE, udp(11, 12)), 0x86DD))
    assert flow(cols) == (6, UDPLITE, A6, B6, 11, 12)


def _key(cols: PacketColumns, i: int) -> tuple:
    """Direction-independent key: protocol and the ordered pair of endpoints."""
    _, proto, src, dst, sport, dport = flow(cols, i)
    return proto, tuple(sorted([(src, sport), (dst, dport)]))


def test_icmp_echo_request_and_reply_share_a_key() -> None:
    batch = make_batch([ethernet(ipv4(ICMP, icmp(8, 0)), 0x0800),
                        ethernet(ipv4(ICMP, icmp(0, 0), src=B4, dst=A4), 0x0800)])
    cols = PacketDecoder().decode(batch)
    assert flow(cols, 0) == (4, ICMP, A4, B4, 8, 0)
    assert flow(cols, 1) == (4, ICMP, B4, A4, 0, 8)
    assert _key(cols, 0) == _key(cols, 1)


def test_icmp_time_exceeded_and_unreachable_use_the_code() -> None:
    quoted = ipv4(UDP, udp(33434, 33435))[:28]
    batch = make_batch([ethernet(ipv4(ICMP, icmp(11, 0) + quoted), 0x0800),
                        ethernet(ipv4(ICMP, icmp(3, 3) + quoted), 0x0800)])
    cols = PacketDecoder().decode(batch)
    assert flow(cols, 0) == (4, ICMP, A4, B4, 11, 0)
    assert flow(cols, 1) == (4, ICMP, A4, B4, 3, 3)


def test_icmpv6_echo_and_neighbour_solicitation() -> None:
    batch = make_batch([
        ethernet(ipv6(ICMP6, icmp(128, 0)), 0x86DD),
        ethernet(ipv6(ICMP6, icmp(129, 0), src=B6, dst=A6), 0x86DD),
        ethernet(ipv6(ICMP6, icmp(135, 0)), 0x86DD),
        ethernet(ipv6(ICMP6, icmp(136, 0), src=B6, dst=A6), 0x86DD),
        ethernet(ipv6(ICMP6, icmp(1, 4)), 0x86DD),
    ])
    cols = PacketDecoder().decode(batch)
    assert [flow(cols, i)[4:] for i in range(5)] == [
        (128, 129), (129, 128), (135, 136), (136, 135), (1, 4)]
    assert _key(cols, 0) == _key(cols, 1)
    assert _key(cols, 2) == _key(cols, 3)


def test_icmp_mapping_matches_communityid_for_every_type() -> None:
    icmp4 = pytest.importorskip("communityid.icmp")
    icmp6 = pytest.importorskip("communityid.icmp6")
    frames = [ethernet(ipv4(ICMP, icmp(t, 7)), 0x0800) for t in range(256)]
    frames += [ethernet(ipv6(ICMP6, icmp(t, 7)), 0x86DD) for t in range(256)]
    batch = make_batch(frames)
    expected = [icmp4.get_port_equivalents(t, 7)[:2] for t in range(256)]
    expected += [icmp6.get_port_equivalents(t, 7)[:2] for t in range(256)]
    for cols in (PacketDecoder().decode(batch), PacketDecoder()._decode(batch, vectorised=False)):
        got = list(zip(cols.src_port.tolist(), cols.dst_port.tolist(), strict=True))
        assert got == expected


@pytest.mark.parametrize("proto", [GRE, 4, 41, 50, 89])
def test_tunnels_and_other_protocols_have_port_zero(proto: int) -> None:
    inner = ipv4(UDP, udp(1000, 2000))  # never decapsulated: the outer header is the key
    cols, decoder = decode_one(ethernet(ipv4(proto, b"\x00\x00\x08\x00" + inner), 0x0800))
    assert flow(cols) == (4, proto, A4, B4, 0, 0)
    assert int(cols.ip_bytes[0]) == 20 + 4 + len(inner)
    assert not decoder.errors


def test_ipv4_options_are_skipped() -> None:
    cols, decoder = decode_one(
        ethernet(ipv4(TCP, tcp(22, 5000, ACK), options=b"\x94\x04\x00\x00"), 0x0800))
    assert flow(cols) == (4, TCP, A4, B4, 22, 5000)
    assert (int(cols.ip_bytes[0]), int(cols.tcp_flags[0])) == (44, ACK)
    assert not decoder.errors


# --- Fragments ---------------------------------------------------------------------------------

MF = 0x2000


def v4_fragments(ident: int = 0x4242) -> tuple[bytes, bytes, bytes]:
    """First fragment (UDP 5000 -> 53, 24 payload bytes) and two later ones (offsets 24, 48)."""
    first = ethernet(ipv4(UDP, udp(5000, 53, b"a" * 16), ident=ident, frag=MF), 0x0800)
    second = ethernet(ipv4(UDP, b"b" * 24, ident=ident, frag=MF | 3), 0x0800)
    third = ethernet(ipv4(UDP, b"c" * 10, ident=ident, frag=6), 0x0800)
    return first, second, third


def test_ipv4_fragments_across_batches() -> None:
    first, second, third = v4_fragments()
    decoder = PacketDecoder()
    # The second fragment arrives before the first: it waits, then follows the first.
    out1 = decoder.decode(make_batch([second, first], ts_start=100))
    assert [flow(out1, i) for i in range(2)] == [(4, UDP, A4, B4, 5000, 53)] * 2
    assert out1.ts_us.tolist() == [101, 100]  # each keeps its own time and size
    assert out1.ip_bytes.tolist() == [44, 44]
    assert out1.tcp_flags.tolist() == [0, 0]
    # The third arrives in a later batch of the same file.
    out2 = decoder.decode(make_batch([third], ts_start=200))
    assert (flow(out2), out2.ts_us.tolist(), out2.ip_bytes.tolist()) == (
        (4, UDP, A4, B4, 5000, 53), [200], [30])
    assert len(decoder.flush()) == 0
    assert not decoder.errors


def test_orphan_fragment_released_by_flush_with_port_zero() -> None:
    _, second, third = v4_fragments()
    decoder = PacketDecoder()
    assert len(decoder.decode(make_batch([second]))) == 0
    assert len(decoder.decode(make_batch([third], ts_start=5))) == 0
    out = decoder.flush()
    assert [flow(out, i) for i in range(2)] == [(4, UDP, A4, B4, 0, 0)] * 2
    assert out.ts_us.tolist() == [1_000_000, 5]
    assert out.ip_bytes.tolist() == [44, 30]
    assert out.frame_bytes.tolist() == [58, 44]
    assert len(decoder.flush()) == 0


def test_fragments_of_different_datagrams_are_not_mixed() -> None:
    first, _, _ = v4_fragments(ident=1)
    _, second, _ = v4_fragments(ident=2)
    decoder = PacketDecoder()
    assert len(decoder.decode(make_batch([first, second]))) == 1
    assert flow(decoder.flush()) == (4, UDP, A4, B4, 0, 0)


def test_fragment_tables_are_bounded() -> None:
    decoder = PacketDecoder(max_tracked_fragments=2)
    later = [ethernet(ipv4(UDP, b"x" * 8, ident=i, frag=3), 0x0800) for i in range(3)]
    out = decoder.decode(make_batch(later))
    # The third waiting fragment pushes the oldest out, emitted at once with ports 0.
    assert out.ts_us.tolist() == [1_000_000]
    assert flow(out) == (4, UDP, A4, B4, 0, 0)
    assert len(decoder.flush()) == 2

    decoder = PacketDecoder(max_tracked_fragments=1)
    first_a, second_a, _ = v4_fragments(ident=10)
    first_b, _, _ = v4_fragments(ident=11)
    out = decoder.decode(make_batch([first_a, first_b, second_a]))
    assert len(out) == 2  # datagram 10's first fragment was forgotten: its second one waits
    assert len(decoder.flush()) == 1


def test_ipv6_fragments() -> None:
    ident = 0xDEADBEEF
    first = ethernet(ipv6(0, ext_header(44, 0) + frag6(TCP, 0, True, ident)
                          + tcp(8080, 1234, SYN, b"d" * 4)), 0x86DD)
    second = ethernet(ipv6(44, frag6(TCP, 4, True, ident) + b"e" * 32), 0x86DD)
    third = ethernet(ipv6(44, frag6(TCP, 8, False, ident) + b"f" * 8), 0x86DD)
    other = ethernet(ipv6(44, frag6(UDP, 8, False, ident + 1) + b"g" * 8), 0x86DD)
    decoder = PacketDecoder()
    out1 = decoder.decode(make_batch([second, first, other]))
    assert [flow(out1, i) for i in range(2)] == [(6, TCP, A6, B6, 8080, 1234)] * 2
    assert out1.ip_bytes.tolist() == [40 + 8 + 8 + 24, 40 + 8 + 32]
    assert out1.tcp_flags.tolist() == [SYN, 0]
    out2 = decoder.decode(make_batch([third]))
    assert flow(out2) == (6, TCP, A6, B6, 8080, 1234)
    orphan = decoder.flush()
    assert flow(orphan) == (6, UDP, A6, B6, 0, 0)  # its protocol from the fragment header
    assert not decoder.errors


# --- Truncation and malformed packets ------------------------------------------------------------

def test_snaplen_cut_packet_counts_its_full_ip_length() -> None:
    frame = ethernet(ipv4(TCP, tcp(80, 51000, ACK | PSH, b"p" * 1400)), 0x0800)
    cols, decoder = decode_one(frame, snaplen=68)
    assert flow(cols) == (4, TCP, A4, B4, 80, 51000)
    assert (int(cols.ip_bytes[0]), int(cols.frame_bytes[0])) == (1440, 1454)
    assert int(cols.tcp_flags[0]) == ACK | PSH
    assert not decoder.errors


@pytest.mark.parametrize(
    ("snaplen", "ports", "flags", "errors"),
    [
        (14 + 20 + 14, (1, 2), SYN, {}),  # flags byte is the last one captured
        (14 + 20 + 13, (1, 2), 0, {}),  # ports kept, flags lost
        (14 + 20 + 4, (1, 2), 0, {}),
        (14 + 20 + 3, (0, 0), 0, {"truncated_transport": 1}),  # emitted with ports 0
        (14 + 20, (0, 0), 0, {"truncated_transport": 1}),
    ],
)
def test_transport_cut_by_snaplen(snaplen: int, ports: tuple, flags: int, errors: dict) -> None:
    cols, decoder = decode_one(ethernet(ipv4(TCP, tcp(1, 2, SYN, b"z" * 100)), 0x0800),
                               snaplen=snaplen)
    assert flow(cols)[4:] == ports
    assert (int(cols.tcp_flags[0]), int(cols.ip_bytes[0])) == (flags, 140)
    assert decoder.errors == errors


def test_icmp_and_ipv6_cut_by_snaplen() -> None:
    cols, decoder = decode_one(ethernet(ipv4(ICMP, icmp(8, 0)), 0x0800), snaplen=14 + 21)
    assert (flow(cols)[4:], dict(decoder.errors)) == ((0, 0), {"truncated_transport": 1})
    cols, decoder = decode_one(ethernet(ipv6(UDP, udp(1, 2, b"u" * 50)), 0x86DD), snaplen=58)
    assert (flow(cols)[4:], int(cols.ip_bytes[0])) == ((1, 2), 98)
    assert not decoder.errors


def test_transport_is_not_read_from_link_padding() -> None:
    # IP total length says no TCP header follows; the bytes after it are Ethernet padding.
    frame = ethernet(ipv4(TCP, b"", total=20) + tcp(9, 9, SYN), 0x0800)
    cols, decoder = decode_one(frame)
    assert (flow(cols)[4:], int(cols.ip_bytes[0])) == ((0, 0), 20)
    assert decoder.errors == {"truncated_transport": 1}


MALFORMED = [
    (ethernet(b"", 0x0800)[:10], 1, "short_link_header"),
    (ethernet(b"", 0x0800, ((0x8100, 5),))[:16], 1, "short_link_header"),
    (sll(0x0800, b"")[:12], 113, "short_link_header"),
    (sll2(0x0800, b"")[:18], 276, "short_link_header"),
    (b"\x02\x00", 0, "short_link_header"),
    (ethernet(ipv4(UDP, udp(1, 2))[:12], 0x0800), 1, "short_ip_header"),
    (ethernet(ipv6(UDP, udp(1, 2))[:30], 0x86DD), 1, "short_ip_header"),
    (ethernet(ipv4(UDP, udp(1, 2), options=b"\x01" * 8)[:24], 0x0800), 1, "short_ip_header"),
    (b"", 101, "short_ip_header"),
    (ethernet(ipv4(UDP, udp(1, 2), version=6), 0x0800), 1, "bad_ip_version"),
    (ethernet(ipv6(UDP, udp(1, 2)), 0x0800), 1, "bad_ip_version"),
    (ipv4(UDP, udp(1, 2), version=5), 101, "bad_ip_version"),
    (ipv6(UDP, udp(1, 2)), 228, "bad_ip_version"),
    (ipv4(UDP, udp(1, 2)), 229, "bad_ip_version"),
    (ethernet(ipv4(UDP, udp(1, 2), ihl=4), 0x0800), 1, "bad_ip_header_length"),
    (ethernet(ipv4(UDP, udp(1, 2), total=19), 0x0800), 1, "bad_ip_total_length"),
    (ethernet(ipv4(UDP, udp(1, 2), options=b"\x01" * 4, total=22), 0x0800), 1,
     "bad_ip_total_length"),
    (ethernet(b"\x00\x01\x08\x00\x06\x04" + bytes(22), 0x0806), 1, "not_ip"),
    (ethernet(b"\x00" * 40, 0x0026), 1, "not_ip"),  # 802.3 length field
    (ethernet(ipv4(UDP, udp(1, 2)), 0x0800, ((0x8100, 5),))[:16] + b"\x88\xcc" + bytes(40),
     1, "not_ip"),
    (sll(0x0806, b"\x00" * 28), 113, "not_ip"),
    (null(7, ipv4(UDP, udp(1, 2)), "<"), 0, "not_ip"),
    (ethernet(ipv4(UDP, udp(1, 2)), 0x0800), 147, "unknown_linktype"),
    (ethernet(ipv6(0, ext_header(UDP, 4)[:16]), 0x86DD), 1, "bad_ipv6_extension_header"),
    (ethernet(ipv6(60, ext_header(UDP, 0)), 0x86DD)[:14 + 44], 1, "bad_ipv6_extension_header"),
]


@pytest.mark.parametrize(("frame", "linktype", "reason"), MALFORMED)
def test_each_malformed_reason_is_counted_and_skipped(frame: bytes, linktype: int,
                                                      reason: str) -> None:
    for vectorised in (True, False):
        decoder = PacketDecoder()
        good = ethernet(ipv4(UDP, udp(7, 7)), 0x0800)
        batch = make_batch([good, frame, good], [1, linktype, 1])
        cols = decoder._decode(batch, vectorised=vectorised)
        assert cols.ts_us.tolist() == [1_000_000, 1_000_002]
        assert decoder.errors == {reason: 1}


def test_errors_and_unknown_linktypes_accumulate() -> None:
    decoder = PacketDecoder()
    frame = ethernet(ipv4(UDP, udp(1, 2)), 0x0800)
    decoder.decode(make_batch([frame, frame], [147, 1]))
    decoder.decode(make_batch([frame, frame, frame], [147, 9999, 1]))
    assert decoder.errors == collections.Counter({"unknown_linktype": 3})
    assert decoder.unknown_linktypes == {147, 9999}


# --- Vectorised path == per-packet path ----------------------------------------------------------

def mixed_frames() -> list[tuple[bytes, int]]:
    first, second, third = v4_fragments()
    return [
        (ethernet(ipv4(TCP, tcp(1, 2, SYN)), 0x0800), 1),
        (ethernet(ipv4(UDP, udp(3, 4), ident=9), 0x0800, ((0x8100, 42),)), 1),
        (ethernet(ipv6(TCP, tcp(5, 6, ACK)), 0x86DD, ((0x8100, 7),)), 1),
        (second, 1),
        (ethernet(ipv4(TCP, tcp(7, 8, SYN), options=b"\x01" * 4), 0x0800), 1),
        (ethernet(ipv6(0, ext_header(UDP, 0) + udp(9, 10)), 0x86DD), 1),
        (ethernet(b"\x00" * 28, 0x0806), 1),
        (first, 1),
        (ethernet(ipv4(ICMP, icmp(8, 0)), 0x0800), 1),
        (ethernet(ipv6(ICMP6, icmp(135, 0)), 0x86DD, ((0x88A8, 1), (0x8100, 2))), 1),
        (sll(0x0800, ipv4(SCTP, udp(11, 12))), 113),
        (sll2(0x86DD, ipv6(UDP, udp(13, 14))), 276),
        (ipv4(GRE, b"\x00" * 8), 101),
        (ipv6(TCP, tcp(15, 16, SYN)), 229),
        (null(24, ipv6(UDP, udp(17, 18)), "<"), 0),
        (null(2, ipv4(UDP, udp(19, 20)), ">"), 108),
        (third, 1),
        (ethernet(ipv4(TCP, tcp(21, 22, SYN, b"x" * 300)), 0x0800)[:14 + 20 + 6], 1),
        (ethernet(ipv4(UDP, udp(1, 2), ihl=3), 0x0800), 1),
        (ethernet(ipv4(TCP, tcp(23, 24, 0xFF)), 0x0800), 1),
        (ethernet(mpls(ipv4(UDP, udp(25, 26)), (3, 4)), 0x8847), 1),
    ]


def test_vectorised_and_per_packet_paths_agree() -> None:
    frames = mixed_frames()
    batch = make_batch([f for f, _ in frames], [lt for _, lt in frames])
    fast, slow = PacketDecoder(), PacketDecoder()
    fast_cols, slow_cols = fast.decode(batch), slow._decode(batch, vectorised=False)
    assert_columns_equal(fast_cols, slow_cols)
    assert fast.errors == slow.errors == {"not_ip": 1, "bad_ip_header_length": 1}
    assert len(fast_cols) == len(frames) - 2
    # Decoding each packet alone (one decoder: fragment state carries over) gives the same rows.
    alone = PacketDecoder()
    parts = [alone.decode(make_batch([f], lt, ts_start=1_000_000 + i))
             for i, (f, lt) in enumerate(frames)]
    assert_columns_equal(concat_columns(parts), fast_cols)
    # Capture order, except that the early second fragment (3) follows its first fragment (7).
    order = [0, 1, 2, 4, 5, 7, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20]
    assert fast_cols.ts_us.tolist() == [1_000_000 + i for i in order]


def test_paths_agree_on_damaged_packets() -> None:
    """Seeded fuzzing: truncated and byte-flipped frames never raise, and both paths agree."""
    rng = np.random.default_rng(20240601)
    bases = mixed_frames()
    frames, linktypes = [], []
    for _ in range(3000):
        frame, linktype = bases[rng.integers(len(bases))]
        damaged = bytearray(frame)
        for at in rng.integers(0, min(len(damaged), 80), size=rng.integers(0, 3)):
            damaged[at] = rng.choice([0, 0x45, 0x60, 0x81, 0xFF, rng.integers(256)])
        cut = len(damaged) if rng.random() < 0.5 else rng.integers(0, len(damaged) + 1)
        frames.append(bytes(damaged[:cut]))
        linktypes.append(linktype if rng.random() < 0.95 else int(rng.choice([0, 1, 101, 7])))
    fast, slow = PacketDecoder(max_tracked_fragments=8), PacketDecoder(max_tracked_fragments=8)
    for start in range(0, len(frames), 700):
        batch = make_batch(frames[start:start + 700], linktypes[start:start + 700])
        assert_columns_equal(fast.decode(batch), slow._decode(batch, vectorised=False))
    assert_columns_equal(fast.flush(), slow.flush())
    assert fast.errors == slow.errors
    assert len(fast.errors) >= 8  # the damage reached many different checks


def test_batch_with_unordered_offsets_into_a_larger_buffer() -> None:
    """Offsets may point anywhere in a reused buffer, in any order; tails need no padding."""
    frames = [f for f, lt in mixed_frames() if lt == 1]
    plain = make_batch(frames)
    junk = np.full(7, 0xEE, dtype=np.uint8)
    order = np.arange(len(frames))[::-1]
    pieces, offsets, position = [junk], np.zeros(len(frames), np.int64), len(junk)
    for i in order:
        offsets[i] = position
        pieces.append(np.frombuffer(frames[i], dtype=np.uint8))
        position += len(frames[i])
    moved = RecordBatch(np.concatenate(pieces), offsets, plain.caplen, plain.wirelen,
                        plain.ts_us, plain.linktype, plain.file_offsets)
    assert_columns_equal(PacketDecoder().decode(moved), PacketDecoder().decode(plain))


def test_empty_batch_and_column_helpers() -> None:
    assert set(COLUMN_DTYPES) == set(COLUMN_NAMES)  # one dtype per PacketColumns field
    cols = PacketDecoder().decode(make_batch([]))
    assert len(cols) == 0
    assert_columns_equal(cols, empty_columns())
    built = build_columns(**{n: [1] for n in COLUMN_NAMES})
    assert all(getattr(built, n).dtype == COLUMN_DTYPES[n] for n in COLUMN_NAMES)
    with pytest.raises(TypeError):
        build_columns(ts_us=[1])


# --- dpkt as an independent peer on real captures -------------------------------------------------

def read_pcap(path: Path) -> tuple[RecordBatch, list[bytes]]:
    """All records of a classic pcap through dpkt, as one RecordBatch (wirelen = caplen)."""
    with path.open("rb") as f:
        reader = dpkt.pcap.Reader(f)
        linktype = reader.datalink()
        records = []
        try:
            for ts, buf in reader:
                records.append((int(ts * 1_000_000), buf))
        except dpkt.NeedData:  # a truncated trailing record ends the file
            pass
    batch = make_batch([buf for _, buf in records], linktype)
    ts_us = np.array([t for t, _ in records], dtype=np.int64)
    return RecordBatch(batch.data, batch.offsets, batch.caplen, batch.wirelen, ts_us,
                       batch.linktype, batch.file_offsets), [buf for _, buf in records]


def dpkt_link(buf: bytes, linktype: int) -> tuple[object, int]:
    """(what dpkt finds after the link header, outer VLAN id or -1)."""
    if linktype == 1:
        eth = dpkt.ethernet.Ethernet(buf)
        tags = getattr(eth, "vlan_tags", [])
        return eth.data, tags[0].id if tags else -1
    if linktype == 113:
        return dpkt.sll.SLL(buf).data, -1
    version = buf[0] >> 4 if buf else 0
    return {4: dpkt.ip.IP, 6: dpkt.ip6.IP6}.get(version, bytes)(buf), -1


def dpkt_flow(buf: bytes, linktype: int = 1) -> tuple | None:
    """(version, protocol, src, dst, sport, dport, ip_len, vlan) as dpkt parses a frame."""
    ip, vlan = dpkt_link(buf, linktype)
    if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
        return None
    transport = ip.data
    sport = dport = 0
    if isinstance(transport, dpkt.tcp.TCP | dpkt.udp.UDP):
        sport, dport = transport.sport, transport.dport
    elif isinstance(transport, dpkt.icmp.ICMP | dpkt.icmp6.ICMP6):
        mapping = pytest.importorskip(
            "communityid.icmp" if isinstance(transport, dpkt.icmp.ICMP) else "communityid.icmp6")
        sport, dport, _ = mapping.get_port_equivalents(transport.type, transport.code)
    if isinstance(ip, dpkt.ip.IP):
        return (4, ip.p, ipaddress.IPv4Address(ip.src).compressed,
                ipaddress.IPv4Address(ip.dst).compressed, sport, dport, ip.len, vlan)
    return (6, ip.p, ipaddress.IPv6Address(ip.src).compressed,
            ipaddress.IPv6Address(ip.dst).compressed, sport, dport, 40 + ip.plen, vlan)


@pytest.mark.parametrize(
    "name",
    [
        "ppp_example.pcap",  # the two the brief names; then MPLS + ICMP, ICMPv6, SLL, raw IP
        "zeek_http-vlan.pcap",
        "tcpreplay_test.pcap",
        "zeek_icmp6.pcap",
        "ppp_sll.pcap",
        "ppp_raw_ip.pcap",
        "ppp_four_ipv6_http_streams_dlt12.pcap",
        "zeek_sip_linktype_ipv4.pcap",
    ],
)
def test_against_dpkt_on_real_captures(name: str) -> None:
    path = PCAPS / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    batch, frames = read_pcap(path)
    linktype = int(batch.linktype[0])
    expected = [f for f in (dpkt_flow(buf, linktype) for buf in frames) if f is not None]
    decoder = PacketDecoder()
    cols = decoder.decode(batch)
    assert len(decoder.flush()) == 0
    got = [(*flow(cols, i), int(cols.ip_bytes[i]), int(cols.vlan_id[i]))
           for i in range(len(cols))]
    assert len(got) == len(expected) > 0
    for ours, theirs in zip(got, expected, strict=True):
        if theirs[1] in (TCP, UDP, ICMP, ICMP6):
            assert ours == theirs
        else:  # dpkt has no ports for these: compare all but the port columns
            assert ours[:4] + ours[6:] == theirs[:4] + theirs[6:]
    if name == "zeek_http-vlan.pcap":
        assert set(cols.vlan_id.tolist()) != {-1}


def test_real_ipv4_fragments_take_their_first_fragments_ports() -> None:
    path = PCAPS / "ppp_ip4_fragments.pcap"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    batch, frames = read_pcap(path)
    first_ports, expected = {}, []
    for buf in frames:
        ip = dpkt.ethernet.Ethernet(buf).data
        key = (ip.src, ip.dst, ip.p, ip.id)
        if ip.offset == 0:
            first_ports[key] = (ip.data.sport, ip.data.dport)
        expected.append(first_ports[key])  # in this capture first fragments come first
    decoder = PacketDecoder()
    cols = decoder.decode(batch)
    assert list(zip(cols.src_port.tolist(), cols.dst_port.tolist(), strict=True)) == expected
    assert sum(1 for buf in frames if dpkt.ethernet.Ethernet(buf).data.offset) > 10
    assert len(decoder.flush()) == 0 and not decoder.errors


@pytest.mark.parametrize("name", sorted(p.name for p in PCAPS.glob("*.pcap")) or ["none"])
def test_paths_agree_on_every_real_capture(name: str) -> None:
    path = PCAPS / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    batch, _ = read_pcap(path)
    fast, slow = PacketDecoder(), PacketDecoder()
    fast_cols = concat_columns([fast.decode(batch), fast.flush()])
    slow_cols = concat_columns([slow._decode(batch, vectorised=False), slow.flush()])
    assert_columns_equal(fast_cols, slow_cols)
    assert fast.errors == slow.errors
    assert len(fast_cols) > 0


def test_timestamps_beyond_year_9999_are_counted_not_decoded() -> None:
    frames = [ethernet(ipv4(17, udp(1, 2)), 0x0800) for _ in range(3)]
    batch = make_batch(frames)
    ts = batch.ts_us.copy()
    ts[1] = MAX_TIMESTAMP_US + 1
    batch = dataclasses.replace(batch, ts_us=ts)
    decoder = PacketDecoder()
    cols = decoder.decode(batch)
    assert cols.ts_us.tolist() == [batch.ts_us[0], batch.ts_us[2]]
    assert decoder.errors == collections.Counter({"timestamp_out_of_range": 1})
