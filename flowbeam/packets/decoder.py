"""Decode captured frames (``RecordBatch``) into the flow fields of IP packets (``PacketColumns``).

The decoder has two paths that must agree packet for packet:

* a vectorised path that decodes the common case for the whole batch with a handful of NumPy
  operations: Ethernet (untagged or one VLAN tag), Linux SLL/SLL2, NULL/LOOP and raw-IP link
  layers, IPv4 without options or fragmentation, IPv6 without extension headers, and any
  transport whose port bytes (TCP: up to the flags byte) were captured. Fixed-layout headers are
  read by gathering one fixed-size structured record per packet from a strided view of the batch
  buffer, so the cost per packet is a few memory copies, not Python bytecode;
* a per-packet Python path (``struct.unpack_from``) for everything else: VLAN stacks, MPLS
  label stacks (as dpkt and Wireshark decode them), IPv4 options and fragments, IPv6 extension
  headers and fragments, transports cut by the snaplen, and every malformed packet, which is
  counted in ``PacketDecoder.errors`` by reason. (Frames
  whose whole link header names a non-IP payload, e.g. ARP, are counted as ``not_ip`` without
  leaving the vectorised path.) It runs at a few hundred thousand packets/s, so it must stay
  reserved for the unusual packet.

Flows are keyed on the outermost IP header: tunnels (GRE, IP-in-IP, ...) are reported as their
own IP protocol with ports 0 and never decapsulated. ICMP (protocol 1) and ICMPv6 (58) put
type/code in the port columns the way Community ID v1 does, by protocol number whatever the IP
version (see ``ICMP_COUNTERPARTS``).

Rules for packets the capture cut short (caplen < wirelen), chosen so that bytes are never lost:

* ``ip_bytes`` always comes from the IP header (IPv4 total length, IPv6 40 + payload length),
  not from what was captured, so a snaplen-cut packet still counts its full size.
* A transport header cut after its ports keeps the ports; a TCP header cut before the flags
  byte reports flags 0. A transport header cut before its ports (ICMP: before type and code) is
  still emitted, with ports 0, and counted as ``errors["truncated_transport"]``: the packet did
  belong to some flow of that protocol between those hosts, and dropping it would lose bytes.
* The transport is only read within the IP payload (up to the IP total length), never from
  link-layer padding after it.

IP fragments: non-first fragments carry no transport header, so the decoder remembers the ports
of each first fragment, keyed by (version, src, dst, protocol, IP id) for IPv4 and (version, src,
dst, fragment identification) for IPv6, and gives them to the later fragments of the same
datagram. A non-first fragment seen before its first fragment waits until the first fragment
appears in this or a later batch, or until ``flush()`` (end of the file), which emits it with
ports 0. Both tables are bounded by ``max_tracked_fragments``: the oldest remembered first
fragment is forgotten, and the oldest waiting fragments are emitted at once with ports 0, so
memory stays bounded on hostile input and no packet is ever silently dropped.

Output rows are in capture order; a waiting fragment released by its first fragment is emitted
right after that first fragment (with its own ``ts_us``, ``ip_bytes`` and ``frame_bytes``).
"""

from __future__ import annotations

import collections
import dataclasses
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.flows.protocols import (
    ICMP_COUNTERPARTS,
    PORT_PROTOCOLS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
)
from flowbeam.packets.columns import (
    COLUMN_DTYPES,
    COLUMN_NAMES,
    PacketColumns,
    build_columns,
    empty_columns,
)


def _select_records(batch: RecordBatch, mask: np.ndarray) -> RecordBatch:
    """The records of ``batch`` where ``mask`` is true (over the same byte buffer)."""
    return dataclasses.replace(
        batch, offsets=batch.offsets[mask], caplen=batch.caplen[mask],
        wirelen=batch.wirelen[mask], ts_us=batch.ts_us[mask], linktype=batch.linktype[mask],
        file_offsets=batch.file_offsets[mask])


# --- Protocol constants ----------------------------------------------------------------------

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_12 = 12
LINKTYPE_RAW_14 = 14
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VERSION = {ETHERTYPE_IPV4: 4, ETHERTYPE_IPV6: 6}
VLAN_ETHERTYPES = frozenset({0x8100, 0x88A8, 0x9100})
# MPLS unicast/multicast: a label stack, then (we assume, as dpkt and Wireshark do) IP when the
# first nibble after the bottom label is 4 or 6.
MPLS_ETHERTYPES = frozenset({0x8847, 0x8848})

# BSD loopback address families: AF_INET is 2 everywhere, AF_INET6 is 24 (NetBSD/OpenBSD),
# 28 (FreeBSD) or 30 (macOS).
NULL_FAMILY_VERSION = {2: 4, 24: 6, 28: 6, 30: 6}

IPV6_FRAGMENT = 44
IPV6_AH = 51
# Extension headers the walk steps over; ESP (50) and No Next Header (59) end it and are then
# reported as the protocol, with ports 0.
IPV6_EXTENSION_HEADERS = frozenset({0, 43, IPV6_FRAGMENT, IPV6_AH, 60, 135, 139, 140})

# Public error reasons (keys of PacketDecoder.errors).
SHORT_LINK_HEADER = "short_link_header"
SHORT_IP_HEADER = "short_ip_header"
BAD_IP_VERSION = "bad_ip_version"
BAD_IP_HEADER_LENGTH = "bad_ip_header_length"
BAD_IP_TOTAL_LENGTH = "bad_ip_total_length"
NOT_IP = "not_ip"
UNKNOWN_LINKTYPE = "unknown_linktype"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"

# 9999-12-31T23:59:59.999999Z: the last instant a flow row (and a BigQuery TIMESTAMP) can hold.
MAX_TIMESTAMP_US = 253_402_300_799_999_999
TRUNCATED_TRANSPORT = "truncated_transport"
BAD_IPV6_EXTENSION_HEADER = "bad_ipv6_extension_header"


def transport_bytes_needed(protocol: int) -> tuple[int, int]:
    """(bytes for the ports, bytes for everything we read) of a transport header.

    TCP: ports in bytes 0-3, flags in byte 13; UDP, SCTP, UDP-Lite: ports in bytes 0-3;
    ICMP/ICMPv6: type and code in bytes 0-1; any other protocol: nothing.
    """
    if protocol == PROTO_TCP:
        return 4, 14
    if protocol in PORT_PROTOCOLS:
        return 4, 4
    if protocol in ICMP_COUNTERPARTS:
        return 2, 2
    return 0, 0


# --- Lookup tables for the vectorised path -------------------------------------------------------

def _ethertype_version_table() -> np.ndarray:
    table = np.zeros(65536, dtype=np.uint8)
    for ethertype, version in ETHERTYPE_VERSION.items():
        table[ethertype] = version
    return table


def _ethertype_set_table(ethertypes: frozenset[int]) -> np.ndarray:
    table = np.zeros(65536, dtype=bool)
    table[list(ethertypes)] = True
    return table


def _bytes_needed_table() -> np.ndarray:
    return np.array([transport_bytes_needed(p)[1] for p in range(256)], dtype=np.int64)


def _icmp_pair_table() -> np.ndarray:
    """[is_icmpv6, type] -> paired type, or -1 when the code is used instead."""
    table = np.full((2, 256), -1, dtype=np.int32)
    for row, proto in enumerate((PROTO_ICMP, PROTO_ICMPV6)):
        for mtype, paired in ICMP_COUNTERPARTS[proto].items():
            table[row, mtype] = paired
    return table


def _read_only(table: np.ndarray) -> np.ndarray:
    """Module-level tables are shared by every decoder: make accidental writes fail loudly."""
    table.flags.writeable = False
    return table


_ETHER_VERSION = _read_only(_ethertype_version_table())
_IS_VLAN = _read_only(_ethertype_set_table(VLAN_ETHERTYPES))
# Ethertypes the slow path walks through (tags, label stacks): never "not IP" at first sight.
_IS_SHIM = _read_only(_ethertype_set_table(VLAN_ETHERTYPES | MPLS_ETHERTYPES))
_BYTES_NEEDED = _read_only(_bytes_needed_table())
_HAS_PORTS = _read_only(np.isin(np.arange(256), list(PORT_PROTOCOLS)))
_IS_IPV6_EXT = _read_only(np.isin(np.arange(256), list(IPV6_EXTENSION_HEADERS)))
_ICMP_PAIR = _read_only(_icmp_pair_table())

# Fixed-layout records gathered per packet. Fields may overlap: one record read serves both
# readings (e.g. IPv4 and IPv6 at the same start, little- and big-endian families).
_ETHERNET_RECORD = np.dtype(
    {"names": ["type", "tci", "inner"], "formats": [">u2", ">u2", ">u2"],
     "offsets": [12, 14, 16], "itemsize": 18}
)
_SLL_RECORD = np.dtype({"names": ["type"], "formats": [">u2"], "offsets": [14], "itemsize": 16})
_SLL2_RECORD = np.dtype({"names": ["type"], "formats": [">u2"], "offsets": [0], "itemsize": 20})
_NULL_RECORD = np.dtype(
    {"names": ["le", "be"], "formats": ["<u4", ">u4"], "offsets": [0, 0], "itemsize": 4}
)
# IPv4 (20-byte header, transport at 20) and IPv6 (40-byte header, transport at 40) overlaid.
_IP_RECORD = np.dtype(
    {
        "names": ["vihl", "len4", "frag4", "proto4", "src4", "dst4", "sport4", "dport4", "flags4",
                  "plen6", "next6", "src6hi", "src6lo", "dst6hi", "dst6lo", "sport6", "dport6",
                  "flags6"],
        "formats": ["u1", ">u2", ">u2", "u1", ">u4", ">u4", ">u2", ">u2", "u1",
                    ">u2", "u1", ">u8", ">u8", ">u8", ">u8", ">u2", ">u2", "u1"],
        "offsets": [0, 2, 6, 9, 12, 16, 20, 22, 33,
                    4, 6, 8, 16, 24, 32, 40, 42, 53],
        "itemsize": 54,
    }
)


def _gather_records(data: np.ndarray, starts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One ``dtype`` record per start position, copied from ``data`` (contiguous uint8).

    A strided view with a one-byte stride exposes a record at every byte of the buffer, so a
    single fancy index copies all of them. The view is of opaque ``V<width>`` items and only
    the gathered copy is reinterpreted as ``dtype``: NumPy copies void items with a plain
    memory copy (~12 ns per 54-byte record here) but structured items field by field (~60 ns).
    Records that would run past the end of the buffer (the last packets of a batch) are read
    from a small zero-padded copy of the tail instead; the bytes past a packet's caplen are
    garbage either way and the callers mask them out.
    """
    width = dtype.itemsize
    limit = len(data) - width  # last start whose record lies wholly inside the buffer
    if len(starts) == 0:
        return np.empty(0, dtype=dtype)
    if limit >= 0 and int(starts.max()) <= limit:
        return _record_view(data, width, limit + 1)[starts].view(dtype)
    out = np.empty(len(starts), dtype=_void(dtype))
    over = starts > limit
    inside = ~over
    if limit >= 0 and inside.any():
        out[inside] = _record_view(data, width, limit + 1)[starts[inside]]
    tail_start = int(starts[over].min())
    tail = np.zeros(len(data) - tail_start + width, dtype=np.uint8)
    tail[: len(data) - tail_start] = data[tail_start:]
    out[over] = _record_view(tail, width, len(tail) - width + 1)[starts[over] - tail_start]
    return out.view(dtype)


def _record_view(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """``count`` overlapping ``width``-byte items, one starting at each byte of ``data``."""
    return np.ndarray(shape=(count,), dtype=np.dtype((np.void, width)), buffer=data, strides=(1,))


def _void(dtype: np.dtype) -> np.dtype:
    """Opaque bytes of the same size as ``dtype``: NumPy moves these with a plain copy."""
    return np.dtype((np.void, dtype.itemsize))


# --- Vectorised link layers ------------------------------------------------------------------


class _LinkResult(NamedTuple):
    """What a vectorised link layer found, one element per packet given to it."""

    ok: np.ndarray  # bool: the vectorised IP stage may try it; else it takes the slow path
    not_ip: np.ndarray  # bool: a whole link header carrying something else (counted, dropped)
    ip_offset: np.ndarray  # int64: start of the IP header within the frame
    version: np.ndarray  # uint8: 4 or 6 as the link header says; 0: the version nibble decides
    vlan: np.ndarray  # int32: outermost VLAN id, -1 when untagged


_LinkFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], _LinkResult]


def _link_ethernet(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    """Untagged or single-tagged Ethernet; deeper tag stacks take the slow path."""
    rec = _gather_records(data, off, _ETHERNET_RECORD)
    outer = rec["type"]
    version = _ETHER_VERSION[outer]
    tagged = _IS_VLAN[outer]
    inner_version = _ETHER_VERSION[rec["inner"]]
    ok = ((version != 0) & (cap >= 14)) | (tagged & (inner_version != 0) & (cap >= 18))
    not_ip = ((version == 0) & ~_IS_SHIM[outer] & (cap >= 14)) | (
        tagged & (inner_version == 0) & ~_IS_SHIM[rec["inner"]] & (cap >= 18)
    )
    return _LinkResult(
        ok=ok,
        not_ip=not_ip,
        ip_offset=np.where(tagged, 18, 14),
        version=np.where(tagged, inner_version, version),
        vlan=np.where(tagged, (rec["tci"] & 0x0FFF).astype(np.int32), np.int32(-1)),
    )


def _link_sll(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    return _link_fixed_ethertype(data, off, cap, _SLL_RECORD, 16)


def _link_sll2(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    return _link_fixed_ethertype(data, off, cap, _SLL2_RECORD, 20)


def _link_fixed_ethertype(
    data: np.ndarray, off: np.ndarray, cap: np.ndarray, record: np.dtype, header: int
) -> _LinkResult:
    """A fixed-size header with an ethertype field (SLL, SLL2); VLAN tags take the slow path."""
    ethertype = _gather_records(data, off, record)["type"]
    version = _ETHER_VERSION[ethertype]
    whole = cap >= header
    return _LinkResult(
        ok=(version != 0) & whole,
        not_ip=(version == 0) & ~_IS_SHIM[ethertype] & whole,
        ip_offset=np.full(len(off), header),
        version=version,
        vlan=np.full(len(off), -1, dtype=np.int32),
    )


def _link_null(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    """BSD loopback: the family in the capturing host's byte order, so try both."""
    rec = _gather_records(data, off, _NULL_RECORD)
    le_version = _family_version(rec["le"])
    version = np.where(le_version != 0, le_version, _family_version(rec["be"]))
    return _link_family(version, cap)


def _link_loop(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    return _link_family(_family_version(_gather_records(data, off, _NULL_RECORD)["be"]), cap)


def _family_version(family: np.ndarray) -> np.ndarray:
    version = np.zeros(len(family), dtype=np.uint8)
    for value, ip_version in NULL_FAMILY_VERSION.items():
        version[family == value] = ip_version
    return version


def _link_family(version: np.ndarray, cap: np.ndarray) -> _LinkResult:
    whole = cap >= 4
    return _LinkResult(
        ok=(version != 0) & whole,
        not_ip=(version == 0) & whole,
        ip_offset=np.full(len(cap), 4),
        version=version,
        vlan=np.full(len(cap), -1, dtype=np.int32),
    )


def _link_raw(version: int) -> _LinkFunction:
    """Raw IP: no link header; ``version`` 0 lets the IP version nibble decide."""

    def link(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
        n = len(off)
        return _LinkResult(
            ok=np.ones(n, dtype=bool),
            not_ip=np.zeros(n, dtype=bool),
            ip_offset=np.zeros(n, dtype=np.int64),
            version=np.full(n, version, dtype=np.uint8),
            vlan=np.full(n, -1, dtype=np.int32),
        )

    return link


_VECTOR_LINKS = {
    LINKTYPE_ETHERNET: _link_ethernet,
    LINKTYPE_LINUX_SLL: _link_sll,
    LINKTYPE_LINUX_SLL2: _link_sll2,
    LINKTYPE_NULL: _link_null,
    LINKTYPE_LOOP: _link_loop,
    LINKTYPE_RAW_12: _link_raw(0),
    LINKTYPE_RAW_14: _link_raw(0),
    LINKTYPE_RAW: _link_raw(0),
    LINKTYPE_IPV4: _link_raw(4),
    LINKTYPE_IPV6: _link_raw(6),
}


# --- Vectorised IP + transport ----------------------------------------------------------------

def _vector_decode(
    batch: RecordBatch, data: np.ndarray, idx: np.ndarray, ip_offset: np.ndarray,
    version: np.ndarray, vlan: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Decode the common-case packets among ``idx``: (their positions, columns, the others)."""
    rec = _gather_records(data, batch.offsets[idx] + ip_offset, _IP_RECORD)
    is4, proto, ip_bytes, is_fast = _classify_ip(rec, batch.caplen[idx] - ip_offset, version)
    fast = np.flatnonzero(is_fast)
    if len(fast) < len(idx):
        # Compress as opaque bytes: indexing a structured array copies field by field (slow).
        rec = rec.view(_void(rec.dtype))[fast].view(rec.dtype)
        proto, ip_bytes, vlan, is4 = proto[fast], ip_bytes[fast], vlan[fast], is4[fast]
    pos = idx[fast]
    cols = {
        "ts_us": batch.ts_us[pos],
        "ip_version": np.where(is4, 4, 6).astype(np.uint8),
        "protocol": proto.astype(np.uint8),
        "src_hi": np.where(is4, 0, rec["src6hi"]).astype(np.uint64),
        "src_lo": np.where(is4, rec["src4"], rec["src6lo"]).astype(np.uint64),
        "dst_hi": np.where(is4, 0, rec["dst6hi"]).astype(np.uint64),
        "dst_lo": np.where(is4, rec["dst4"], rec["dst6lo"]).astype(np.uint64),
        "vlan_id": vlan,
        "ip_bytes": ip_bytes.astype(np.int64),
        "frame_bytes": batch.wirelen[pos].astype(np.int64),
    }
    cols.update(_vector_ports(rec, is4, proto))
    return pos, cols, idx[~is_fast]


def _classify_ip(
    rec: np.ndarray, captured: np.ndarray, version: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(is IPv4, protocol, ip_bytes, decodable here) from IP records and bytes captured from them.

    A packet is decodable here when its IP header is plain (IPv4 IHL 5, not a fragment, total
    length at least 20; IPv6 with a transport right after the fixed header) and the transport
    bytes we read lie within both the captured bytes and the IP payload. Everything else is left
    to the slow path, which applies the same rules, so the two paths agree on every packet.
    """
    vihl = rec["vihl"]
    is4 = (vihl == 0x45) & (version != 6)
    is6 = ((vihl >> 4) == 6) & (version != 4)
    proto = np.where(is4, rec["proto4"], rec["next6"])
    ip_bytes = np.where(is4, rec["len4"], rec["plen6"].astype(np.int64) + 40)
    available = np.minimum(captured, ip_bytes) - np.where(is4, 20, 40)
    plain = (is4 & ((rec["frag4"] & 0x3FFF) == 0) & (rec["len4"] >= 20)) | (
        is6 & ~_IS_IPV6_EXT[rec["next6"]]
    )
    return is4, proto, ip_bytes, plain & (available >= _BYTES_NEEDED[proto])


def _vector_ports(rec: np.ndarray, is4: np.ndarray, proto: np.ndarray) -> dict[str, np.ndarray]:
    """Port and flag columns; ICMP/ICMPv6 type and code mapped as Community ID does."""
    raw_src = np.where(is4, rec["sport4"], rec["sport6"]).astype(np.int32)
    raw_dst = np.where(is4, rec["dport4"], rec["dport6"]).astype(np.int32)
    has_ports = _HAS_PORTS[proto]
    src_port = np.where(has_ports, raw_src, 0).astype(np.int32)
    dst_port = np.where(has_ports, raw_dst, 0).astype(np.int32)
    is_tcp = proto == PROTO_TCP
    tcp_flags = np.where(is_tcp, np.where(is4, rec["flags4"], rec["flags6"]), 0).astype(np.uint8)
    icmp = np.flatnonzero((proto == PROTO_ICMP) | (proto == PROTO_ICMPV6))
    if len(icmp):
        mtype = raw_src[icmp] >> 8
        code = raw_src[icmp] & 0xFF
        paired = _ICMP_PAIR[(proto[icmp] == PROTO_ICMPV6).astype(np.intp), mtype]
        src_port[icmp] = mtype
        dst_port[icmp] = np.where(paired >= 0, paired, code)
    return {"src_port": src_port, "dst_port": dst_port, "tcp_flags": tcp_flags}


# --- Slow path: one packet at a time ------------------------------------------------------------

_RAW_VERSIONS = {LINKTYPE_RAW_12: 0, LINKTYPE_RAW_14: 0, LINKTYPE_RAW: 0,
                 LINKTYPE_IPV4: 4, LINKTYPE_IPV6: 6}
_U16_PAIR = struct.Struct("!HH")
_U32_BIG = struct.Struct("!I")
_U32_LITTLE = struct.Struct("<I")
_IPV4_HEADER = struct.Struct("!BxHHHxBxxII")
_IPV6_HEADER = struct.Struct("!4xHBxQQQQ")
_IPV6_FRAGMENT_HEADER = struct.Struct("!BxHI")


class _Malformed(Exception):
    """A packet we cannot decode; ``reason`` is the public error key it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _slow_link(pkt: memoryview, linktype: int) -> tuple[int, int, int]:
    """(IP header offset, expected IP version or 0 for 'by nibble', outer VLAN id or -1)."""
    if linktype == LINKTYPE_ETHERNET:
        return _ethertype_payload(pkt, 12)
    if linktype == LINKTYPE_LINUX_SLL:
        return _ethertype_payload(pkt, 14, header_end=16)
    if linktype == LINKTYPE_LINUX_SLL2:
        return _ethertype_payload(pkt, 0, header_end=20)
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        _require_link(pkt, 4)
        return 4, _family(pkt, linktype), -1
    return 0, _RAW_VERSIONS[linktype], -1


def _require_link(pkt: memoryview, length: int) -> None:
    if len(pkt) < length:
        raise _Malformed(SHORT_LINK_HEADER)


def _ethertype_payload(
    pkt: memoryview, type_at: int, header_end: int | None = None
) -> tuple[int, int, int]:
    """Walk VLAN tags (any depth) from the ethertype at ``type_at``; the outer tag is the VLAN.

    For Ethernet the tags sit between the MAC addresses and the ethertype; for SLL/SLL2 the
    protocol field plays the ethertype and any tags follow the fixed header.
    """
    end = type_at + 2 if header_end is None else header_end
    _require_link(pkt, end)
    ethertype = pkt[type_at] << 8 | pkt[type_at + 1]
    vlan = -1
    while ethertype in VLAN_ETHERTYPES:
        _require_link(pkt, end + 4)
        tci, ethertype = _U16_PAIR.unpack_from(pkt, end)
        if vlan < 0:
            vlan = tci & 0x0FFF
        end += 4
    if ethertype in MPLS_ETHERTYPES:
        return _mpls_payload(pkt, end), 0, vlan
    version = ETHERTYPE_VERSION.get(ethertype)
    if version is None:
        raise _Malformed(NOT_IP)
    return end, version, vlan


def _mpls_payload(pkt: memoryview, at: int) -> int:
    """Offset of the IP header after an MPLS label stack starting at ``at``.

    MPLS does not say what it carries: like dpkt and Wireshark we take the payload as IP when
    its first nibble is 4 or 6 (then the nibble decides the version) and count it as not IP
    otherwise (pseudowires, control words).
    """
    while True:
        _require_link(pkt, at + 4)
        bottom = pkt[at + 2] & 0x01
        at += 4
        if bottom:
            break
    if len(pkt) > at and pkt[at] >> 4 not in (4, 6):
        raise _Malformed(NOT_IP)
    return at


def _family(pkt: memoryview, linktype: int) -> int:
    """IP version from a NULL (host byte order, either) or LOOP (network order) family."""
    (big,) = _U32_BIG.unpack_from(pkt, 0)
    (little,) = _U32_LITTLE.unpack_from(pkt, 0)
    if linktype == LINKTYPE_NULL and little in NULL_FAMILY_VERSION:
        return NULL_FAMILY_VERSION[little]
    if big in NULL_FAMILY_VERSION:
        return NULL_FAMILY_VERSION[big]
    raise _Malformed(NOT_IP)


@dataclasses.dataclass(slots=True)
class _IpHeader:
    """What the slow path learned from the IP layer of one packet."""

    version: int
    protocol: int
    src_hi: int
    src_lo: int
    dst_hi: int
    dst_lo: int
    ip_bytes: int
    transport_at: int  # offset of the transport header in the packet
    payload_end: int  # end of the IP payload within the captured bytes
    fragment_key: tuple | None = None  # set for fragments of a fragmented datagram
    first_fragment: bool = False


def _slow_ip(pkt: memoryview, at: int, expected_version: int) -> _IpHeader:
    if len(pkt) < at + 1:
        raise _Malformed(SHORT_IP_HEADER)
    version = pkt[at] >> 4
    if version not in (4, 6) or (expected_version and version != expected_version):
        raise _Malformed(BAD_IP_VERSION)
    return _slow_ipv4(pkt, at) if version == 4 else _slow_ipv6(pkt, at)


def _slow_ipv4(pkt: memoryview, at: int) -> _IpHeader:
    if len(pkt) < at + 20:
        raise _Malformed(SHORT_IP_HEADER)
    vihl, total, ident, frag, proto, src, dst = _IPV4_HEADER.unpack_from(pkt, at)
    header = (vihl & 0x0F) * 4
    if header < 20:
        raise _Malformed(BAD_IP_HEADER_LENGTH)
    if len(pkt) < at + header:
        raise _Malformed(SHORT_IP_HEADER)
    if total < header:
        raise _Malformed(BAD_IP_TOTAL_LENGTH)
    ip = _IpHeader(4, proto, 0, src, 0, dst, total, at + header, min(len(pkt), at + total))
    more, offset = frag & 0x2000, frag & 0x1FFF
    if more or offset:
        ip.fragment_key = (4, src, dst, proto, ident)
        ip.first_fragment = offset == 0
    return ip


def _slow_ipv6(pkt: memoryview, at: int) -> _IpHeader:
    if len(pkt) < at + 40:
        raise _Malformed(SHORT_IP_HEADER)
    payload, proto, src_hi, src_lo, dst_hi, dst_lo = _IPV6_HEADER.unpack_from(pkt, at)
    ip = _IpHeader(6, proto, src_hi, src_lo, dst_hi, dst_lo, 40 + payload, at + 40,
                   min(len(pkt), at + 40 + payload))
    _walk_ipv6_extensions(pkt, ip)
    return ip


def _walk_ipv6_extensions(pkt: memoryview, ip: _IpHeader) -> None:
    """Step over extension headers, leaving ``ip.protocol`` at the transport.

    Every header must lie within the captured IP payload, otherwise the packet is counted as
    ``bad_ipv6_extension_header``: without the whole chain we cannot know the transport. A
    non-first fragment stops the walk; its protocol is the fragment header's next header until
    the first fragment tells us better.
    """
    at, end = ip.transport_at, ip.payload_end
    while ip.protocol in IPV6_EXTENSION_HEADERS:
        if at + 8 > end:
            raise _Malformed(BAD_IPV6_EXTENSION_HEADER)
        if ip.protocol == IPV6_FRAGMENT:
            nxt, offset_flags, ident = _IPV6_FRAGMENT_HEADER.unpack_from(pkt, at)
            ip.protocol, at = nxt, at + 8
            offset, more = offset_flags >> 3, offset_flags & 1
            if more or offset:
                ip.fragment_key = (6, ip.src_hi, ip.src_lo, ip.dst_hi, ip.dst_lo, ident)
                ip.first_fragment = offset == 0
            if offset:
                break
            continue
        nxt, length = pkt[at], pkt[at + 1]
        size = (length + 2) * 4 if ip.protocol == IPV6_AH else (length + 1) * 8
        if at + size > end:
            raise _Malformed(BAD_IPV6_EXTENSION_HEADER)
        ip.protocol, at = nxt, at + size
    ip.transport_at = at


def _slow_ports(pkt: memoryview, ip: _IpHeader) -> tuple[int, int, int, bool]:
    """(src_port, dst_port, tcp_flags, ports_missing) read within the captured IP payload."""
    available = ip.payload_end - ip.transport_at
    for_ports, for_all = transport_bytes_needed(ip.protocol)
    if available < for_ports:
        return 0, 0, 0, True
    at = ip.transport_at
    if ip.protocol in ICMP_COUNTERPARTS:
        mtype, code = pkt[at], pkt[at + 1]
        return mtype, ICMP_COUNTERPARTS[ip.protocol].get(mtype, code), 0, False
    if not for_ports:
        return 0, 0, 0, False
    src, dst = _U16_PAIR.unpack_from(pkt, at)
    flags = pkt[at + 13] if ip.protocol == PROTO_TCP and available >= for_all else 0
    return src, dst, flags, False


# Indexes into a row tuple, in COLUMN_NAMES order.
_PROTOCOL, _SRC_PORT, _DST_PORT = 2, 7, 8


class _FragmentTracker:
    """Ports of recent first fragments, and non-first fragments waiting for theirs (bounded)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.firsts: collections.OrderedDict[tuple, tuple[int, int, int]] = (
            collections.OrderedDict()
        )
        self.waiting: collections.OrderedDict[tuple, list[tuple]] = collections.OrderedDict()
        self.waiting_count = 0

    def first(self, key: tuple, proto: int, src_port: int, dst_port: int) -> list[tuple]:
        """Remember a first fragment; return the waiting fragments it releases, completed."""
        self.firsts[key] = (proto, src_port, dst_port)
        self.firsts.move_to_end(key)
        while len(self.firsts) > self.limit:
            self.firsts.popitem(last=False)
        released = self.waiting.pop(key, [])
        self.waiting_count -= len(released)
        return [_with_transport(row, proto, src_port, dst_port) for row in released]

    def later(self, key: tuple, row: tuple) -> list[tuple]:
        """A non-first fragment: completed at once if its first fragment is known, else kept.

        Returns the rows to emit now: the completed fragment, or the oldest waiting fragments
        pushed out (with ports 0) when the waiting list is over its bound.
        """
        known = self.firsts.get(key)
        if known is not None:
            return [_with_transport(row, *known)]
        self.waiting.setdefault(key, []).append(row)
        self.waiting_count += 1
        evicted: list[tuple] = []
        while self.waiting_count > self.limit:
            _, rows = self.waiting.popitem(last=False)
            self.waiting_count -= len(rows)
            evicted.extend(rows)
        return evicted

    def drain(self) -> list[tuple]:
        """All waiting fragments (ports 0), oldest first; the waiting list is emptied."""
        rows = [row for rows in self.waiting.values() for row in rows]
        self.waiting.clear()
        self.waiting_count = 0
        return rows


def _rows_to_columns(rows: list[tuple]) -> dict[str, tuple]:
    """Transpose slow-path row tuples into columns named as in ``PacketColumns``."""
    return dict(zip(COLUMN_NAMES, zip(*rows, strict=True), strict=True))


def _with_transport(row: tuple, proto: int, src_port: int, dst_port: int) -> tuple:
    values = list(row)
    values[_PROTOCOL], values[_SRC_PORT], values[_DST_PORT] = proto, src_port, dst_port
    return tuple(values)


# --- The decoder -------------------------------------------------------------------------------

class PacketDecoder:
    """Stateful per capture file/stream: tracks IPv4/IPv6 fragments across batches.

    Use one instance per capture file (or stream), call ``decode`` on its batches in order and
    ``flush`` once at the end. ``errors`` counts skipped or damaged packets by reason
    (cumulative); ``unknown_linktypes`` collects link types we cannot decode.
    """

    def __init__(self, max_tracked_fragments: int = 65536) -> None:
        self.errors: collections.Counter[str] = collections.Counter()
        self.unknown_linktypes: set[int] = set()
        self._fragments = _FragmentTracker(max_tracked_fragments)

    def decode(self, batch: RecordBatch) -> PacketColumns:
        """Flow fields of the packets of ``batch`` that yielded an IP flow observation."""
        in_range = batch.ts_us <= MAX_TIMESTAMP_US
        if not in_range.all():
            # A capture writer's garbage timestamps: counted, not turned into flows that no
            # sink could store.
            self.errors[TIMESTAMP_OUT_OF_RANGE] += int(np.count_nonzero(~in_range))
            batch = _select_records(batch, in_range)
        return self._decode(batch, vectorised=True)

    def flush(self) -> PacketColumns:
        """Non-first fragments whose first fragment never came, with ports 0 (end of file)."""
        rows = self._fragments.drain()
        if not rows:
            return empty_columns()
        return build_columns(**_rows_to_columns(rows))

    def _decode(self, batch: RecordBatch, vectorised: bool) -> PacketColumns:
        """``vectorised=False`` sends every packet through the slow path (tests compare both)."""
        n = len(batch)
        if n == 0:
            return empty_columns()
        data = np.ascontiguousarray(batch.data, dtype=np.uint8)
        linktype = np.asarray(batch.linktype)
        slow_idx: list[np.ndarray] = []
        fast_parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        for value, idx in _group_by_linktype(linktype):
            link = _VECTOR_LINKS.get(value)
            if link is None:
                self.errors[UNKNOWN_LINKTYPE] += len(idx)
                self.unknown_linktypes.add(value)
            elif not vectorised:
                slow_idx.append(idx)
            else:
                fast_parts.append(self._vector_group(batch, data, idx, link, slow_idx))
        fast_pos, fast_cols = _concat_fast(fast_parts)
        slow_pos, slow_rows = self._slow_decode(batch, data, _sorted_union(slow_idx))
        return _merge(fast_pos, fast_cols, slow_pos, slow_rows)

    def _vector_group(
        self, batch: RecordBatch, data: np.ndarray, idx: np.ndarray, link: _LinkFunction,
        slow_idx: list[np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Vectorised decode of one link type's packets; the rest is added to ``slow_idx``."""
        found = link(data, batch.offsets[idx], batch.caplen[idx])
        ok = found.ok
        ip_offset, version, vlan = found.ip_offset, found.version, found.vlan
        if not ok.all():
            not_ip = int(np.count_nonzero(found.not_ip))
            if not_ip:  # a Counter keeps zero counts: add only real ones
                self.errors[NOT_IP] += not_ip
            slow_idx.append(idx[~ok & ~found.not_ip])
            keep = np.flatnonzero(ok)
            idx, ip_offset, version, vlan = idx[keep], ip_offset[keep], version[keep], vlan[keep]
        pos, cols, rest = _vector_decode(batch, data, idx, ip_offset, version, vlan)
        if len(rest):
            slow_idx.append(rest)
        return pos, cols

    def _slow_decode(
        self, batch: RecordBatch, data: np.ndarray, idx: np.ndarray
    ) -> tuple[list[int], list[tuple]]:
        """Decode the packets at ``idx`` one by one; return (position of each row, rows).

        Per-packet values are converted to Python ints up front and packets are read through
        memoryview slices (no copy): NumPy scalar indexing would cost more than the parsing.
        """
        positions: list[int] = []
        rows: list[tuple] = []
        buffer = memoryview(data)
        packets = zip(
            idx.tolist(), batch.offsets[idx].tolist(), batch.caplen[idx].tolist(),
            batch.linktype[idx].tolist(), batch.ts_us[idx].tolist(), batch.wirelen[idx].tolist(),
            strict=True,
        )
        for i, start, caplen, linktype, ts_us, wirelen in packets:
            pkt = buffer[start : start + caplen]
            try:
                emitted = self._slow_packet(pkt, linktype, ts_us, wirelen)
            except _Malformed as bad:
                self.errors[bad.reason] += 1
                continue
            positions.extend([i] * len(emitted))
            rows.extend(emitted)
        return positions, rows

    def _slow_packet(
        self, pkt: memoryview, linktype: int, ts_us: int, wirelen: int
    ) -> list[tuple]:
        """The rows one packet yields: itself, plus any waiting fragments it completes."""
        ip_at, expected_version, vlan = _slow_link(pkt, linktype)
        ip = _slow_ip(pkt, ip_at, expected_version)
        later_fragment = ip.fragment_key is not None and not ip.first_fragment
        if later_fragment:
            src_port = dst_port = flags = 0
        else:
            src_port, dst_port, flags, missing = _slow_ports(pkt, ip)
            if missing:
                self.errors[TRUNCATED_TRANSPORT] += 1
        row = (ts_us, ip.version, ip.protocol, ip.src_hi, ip.src_lo, ip.dst_hi, ip.dst_lo,
               src_port, dst_port, vlan, ip.ip_bytes, wirelen, flags)
        if later_fragment:
            return self._fragments.later(ip.fragment_key, row)
        if ip.fragment_key is not None:
            return [row, *self._fragments.first(ip.fragment_key, ip.protocol, src_port, dst_port)]
        return [row]


def _group_by_linktype(linktype: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(link type, positions) per link type present; one cheap check for single-type batches."""
    first = int(linktype[0])
    if (linktype == first).all():
        return [(first, np.arange(len(linktype)))]
    return [(int(v), np.flatnonzero(linktype == v)) for v in np.unique(linktype)]


def _sorted_union(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)) if len(parts) > 1 else parts[0]


def _concat_fast(
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]],
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Join the vectorised results of several link types, back in capture order."""
    if not parts:
        return np.empty(0, dtype=np.int64), None
    if len(parts) == 1:
        return parts[0]
    pos = np.concatenate([p for p, _ in parts])
    order = np.argsort(pos, kind="stable")
    cols = {name: np.concatenate([c[name] for _, c in parts])[order] for name in COLUMN_NAMES}
    return pos[order], cols


def _merge(
    fast_pos: np.ndarray, fast_cols: dict[str, np.ndarray] | None,
    slow_pos: list[int], slow_rows: list[tuple],
) -> PacketColumns:
    """Interleave vectorised columns and slow-path rows by packet position (capture order)."""
    if not slow_rows:
        return empty_columns() if fast_cols is None else build_columns(**fast_cols)
    slow_cols = _rows_to_columns(slow_rows)
    if fast_cols is None or len(fast_pos) == 0:
        return build_columns(**slow_cols)
    positions = np.asarray(slow_pos, dtype=np.int64)
    slots = np.searchsorted(fast_pos, positions, side="right") + np.arange(len(positions))
    is_slow = np.zeros(len(fast_pos) + len(positions), dtype=bool)
    is_slow[slots] = True
    is_fast = ~is_slow
    merged = {}
    for name in COLUMN_NAMES:
        column = np.empty(len(is_slow), dtype=COLUMN_DTYPES[name])
        column[is_slow] = np.asarray(slow_cols[name], dtype=COLUMN_DTYPES[name])
        column[is_fast] = fast_cols[name]
        merged[name] = column
    return PacketColumns(**merged)
