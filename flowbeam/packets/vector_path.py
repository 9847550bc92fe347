"""The vectorised decode path: the common case for a whole batch in a handful of NumPy operations.

It covers Ethernet (untagged, one VLAN tag or two), Linux SLL/SLL2, NULL/LOOP and raw-IP link
layers. Plain IP headers (IPv4 without options or fragmentation, IPv6 without extension
headers, transport captured up to what we read) are decoded here in one gather; the other IP
shapes (IPv4 options and fragments, IPv6 extension chains and fragments, cut transports) go to
its second stage: ``vector_short_chains`` for IPv6 behind one or two 8-byte headers,
``vector_headers`` for the others. Fixed-layout headers are read by gathering one
fixed-size structured record per packet from a strided view of the batch buffer
(``vector_gather``), so the cost per packet is a few memory copies, not Python bytecode. Frames
whose whole link header names a non-IP payload, e.g. ARP, are recognised here as ``not_ip``
(the decoder counts and drops them); every other packet neither stage can decode (deeper tag
stacks, MPLS, damage) is handed back for the per-packet path (``slow_path``), which must agree
with this one packet for packet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.packets.header_constants import (
    ETHERTYPE_VERSION,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_RAW_12,
    LINKTYPE_RAW_14,
    MPLS_ETHERTYPES,
    NULL_FAMILY_VERSION,
    VLAN_ETHERTYPES,
)
from flowbeam.packets.ip_fragments import (
    FRAGMENT_KEY_BYTES,
    FRAGMENT_KEY_DTYPE,
    FragmentPackets,
)
from flowbeam.packets.vector_gather import gather_records, read_only, take_records, take_rows
from flowbeam.packets.vector_headers import HeaderRows, decode_headers
from flowbeam.packets.vector_short_chains import decode_short_chains
from flowbeam.packets.vector_transport import PLAIN_TRANSPORT_END, transport_columns

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


_ETHER_VERSION = read_only(_ethertype_version_table())
_IS_VLAN = read_only(_ethertype_set_table(VLAN_ETHERTYPES))
# Ethertypes of neither IP nor what the slow path walks through (tags, label stacks): a whole
# link header of one of these is "not IP" at first sight.
_NOT_IP = read_only(
    (_ETHER_VERSION == 0) & ~_ethertype_set_table(VLAN_ETHERTYPES | MPLS_ETHERTYPES)
)

# Fixed-layout records gathered per packet. Fields may overlap: one record read serves both
# readings (e.g. IPv4 and IPv6 at the same start, little- and big-endian families).
_ETHERNET_RECORD = np.dtype(
    {"names": ["type", "tci", "inner", "innermost"], "formats": [">u2", ">u2", ">u2", ">u2"],
     "offsets": [12, 14, 16, 20], "itemsize": 22}
)
_SLL_RECORD = np.dtype({"names": ["type"], "formats": [">u2"], "offsets": [14], "itemsize": 16})
_SLL2_RECORD = np.dtype({"names": ["type"], "formats": [">u2"], "offsets": [0], "itemsize": 20})
_NULL_RECORD = np.dtype(
    {"names": ["le", "be"], "formats": ["<u4", ">u4"], "offsets": [0, 0], "itemsize": 4}
)
# IPv4 (20-byte header, transport at 20) and IPv6 (40-byte header, transport at 40) overlaid.
# Both ports are read as one word: every field read is a pass over all the records.
_IP_RECORD = np.dtype(
    {
        "names": ["vihl", "len4", "ident4", "frag4", "proto4", "src4", "dst4", "ports4",
                  "flags4", "plen6", "next6", "src6hi", "src6lo", "dst6hi", "dst6lo", "ports6",
                  "length6", "flags6"],
        "formats": ["u1", ">u2", ">u2", ">u2", "u1", ">u4", ">u4", ">u4",
                    "u1", ">u2", "u1", ">u8", ">u8", ">u8", ">u8", ">u4",
                    "u1", "u1"],
        "offsets": [0, 2, 4, 6, 9, 12, 16, 20,
                    33, 4, 6, 8, 16, 24, 32, 40,
                    41, 53],
        "itemsize": 54,
    }
)


# --- Vectorised link layers ------------------------------------------------------------------


class _LinkResult(NamedTuple):
    """What a vectorised link layer found, one element per packet given to it."""

    ok: np.ndarray  # bool: the vectorised IP stage may try it; else it takes the slow path
    not_ip: np.ndarray  # bool: a whole link header carrying something else (counted, dropped)
    ip_offset: np.ndarray  # int64: start of the IP header within the frame
    version: np.ndarray  # uint8: 4 or 6 as the link header says; 0: the version nibble decides
    vlan: np.ndarray  # int32: outermost VLAN id, -1 when untagged


LinkFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], _LinkResult]


def _link_ethernet(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    """Untagged, single-tagged or double-tagged (QinQ) Ethernet; deeper stacks take the slow
    path, and so do double-tagged frames that are not IP (it counts them).

    Every frame is read as untagged first, then the few tagged ones are read again: tags are
    rare, and a whole-batch pass for each tag depth would cost more than the untagged reading.
    """
    rec = gather_records(data, off, _ETHERNET_RECORD)
    outer = rec["type"].astype(np.intp)
    version = _ETHER_VERSION[outer]
    whole = cap >= 14
    found = _LinkResult(
        ok=(version != 0) & whole,
        not_ip=_NOT_IP[outer] & whole,
        ip_offset=np.full(len(off), 14),
        version=version,
        vlan=np.full(len(off), -1, dtype=np.int32),
    )
    tagged = np.flatnonzero(_IS_VLAN[outer])
    if len(tagged):
        _read_tags(rec[tagged], cap[tagged], tagged, found)
    return found


def _read_tags(rec: np.ndarray, cap: np.ndarray, rows: np.ndarray, found: _LinkResult) -> None:
    """Overwrite the ``rows`` of ``found`` (frames whose ethertype is a VLAN tag) with what their
    one or two tags say; ``rec`` and ``cap`` are those rows' own."""
    inner = rec["inner"].astype(np.intp)
    inner_version = _ETHER_VERSION[inner]
    double = _IS_VLAN[inner]
    innermost_version = _ETHER_VERSION[rec["innermost"]]
    found.ok[rows] = (((inner_version != 0) & (cap >= 18))
                      | (double & (innermost_version != 0) & (cap >= 22)))
    found.not_ip[rows] = _NOT_IP[inner] & (cap >= 18)
    found.ip_offset[rows] = np.where(double, 22, 18)
    found.version[rows] = np.where(double, innermost_version, inner_version)
    found.vlan[rows] = rec["tci"] & 0x0FFF


def _link_sll(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    return _link_fixed_ethertype(data, off, cap, _SLL_RECORD, 16)


def _link_sll2(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    return _link_fixed_ethertype(data, off, cap, _SLL2_RECORD, 20)


def _link_fixed_ethertype(
    data: np.ndarray, off: np.ndarray, cap: np.ndarray, record: np.dtype, header: int
) -> _LinkResult:
    """A fixed-size header with an ethertype field (SLL, SLL2); VLAN tags take the slow path."""
    ethertype = gather_records(data, off, record)["type"].astype(np.intp)
    version = _ETHER_VERSION[ethertype]
    whole = cap >= header
    return _LinkResult(
        ok=(version != 0) & whole,
        not_ip=_NOT_IP[ethertype] & whole,
        ip_offset=np.full(len(off), header),
        version=version,
        vlan=np.full(len(off), -1, dtype=np.int32),
    )


def _link_null(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    """BSD loopback: the family in the capturing host's byte order, so try both."""
    rec = gather_records(data, off, _NULL_RECORD)
    le_version = _family_version(rec["le"])
    version = np.where(le_version != 0, le_version, _family_version(rec["be"]))
    return _link_family(version, cap)


def _link_loop(data: np.ndarray, off: np.ndarray, cap: np.ndarray) -> _LinkResult:
    return _link_family(_family_version(gather_records(data, off, _NULL_RECORD)["be"]), cap)


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


def _link_raw(version: int) -> LinkFunction:
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


VECTOR_LINKS = {
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

class HeaderResult(NamedTuple):
    """What ``vector_decode`` hands the decoder besides its rows (the second stage's rows are
    among them, in capture order): fragments, errors, the rest."""

    fragments: list[FragmentPackets]  # the rows that are fragments, one part per second stage
    rest: np.ndarray  # int64: packet positions left to the per-packet path
    truncated: int  # rows whose transport was cut before its ports (truncated_transport)


def vector_decode(
    batch: RecordBatch, data: np.ndarray, idx: np.ndarray, ip_offset: np.ndarray,
    version: np.ndarray, vlan: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray], HeaderResult | None]:
    """Decode the packets at ``idx``: (positions and columns of the rows, in capture order; the
    fragments among them, errors and packets left to the per-packet path, or None when every
    packet was plain).

    Every column is computed once for the whole batch: the plain packets' transport fields come
    from the IP record, and the second stage writes its packets' over them: short IPv6 chains
    from one more gather (``vector_short_chains``), the others from the chain walk
    (``vector_headers``).
    """
    start = take_rows(batch.offsets, idx) + ip_offset
    captured = take_rows(batch.caplen, idx) - ip_offset
    rec = gather_records(data, start, _IP_RECORD)
    ip, is6, proto, ip_bytes, plain = _classify_ip(rec, captured, version)
    ports = ip.pick(rec["ports4"], rec["ports6"], np.uint32)
    sport, dport = (ports >> 16).view(np.int32), (ports & 0xFFFF).view(np.int32)  # < 2**16
    tcp_byte = ip.pick(rec["flags4"], rec["flags6"], np.uint8)
    rest = np.flatnonzero(~plain)
    if not len(rest):
        cols = _ip_columns(batch, idx, rec, ip, proto, vlan, ip_bytes)
        cols.update(transport_columns(sport, dport, tcp_byte, proto))
        return idx, cols, None
    stages: list[tuple[np.ndarray, HeaderRows]] = []  # (rows, what the stage found for them)
    six = is6[rest]
    if six.any():
        end = np.minimum(captured[rest], ip_bytes[rest])
        short, found = decode_short_chains(data, start, rest, rec["next6"][rest],
                                           rec["length6"][rest], six, end)
        if len(found.ok):
            stages.append((rest[short], found))
            rest = rest[~short]
    if len(rest):
        stages.append((rest, decode_headers(data, start[rest], take_records(rec, rest),
                                            captured[rest], version[rest], ip.is4[rest],
                                            ip_bytes[rest])))
    for rows, found in stages:
        proto[rows] = found.proto
        readable = rows[found.readable_rows]
        sport[readable], dport[readable] = found.sport, found.dport
        tcp_byte[readable] = found.tcp_byte
    cols = _ip_columns(batch, idx, rec, ip, proto, vlan, ip_bytes)
    ports = transport_columns(sport, dport, tcp_byte, proto)
    # Non-first fragments, cut or portless transports.
    portless = np.concatenate([rows[found.ok & ~found.readable] for rows, found in stages])
    for column in ports.values():
        column[portless] = 0
    cols.update(ports)
    fragments = [_fragments(cols, idx, rows, found) for rows, found in stages]
    slow = np.concatenate([rows[~found.ok] for rows, found in stages])
    others = HeaderResult(fragments, idx[slow], sum(found.truncated for _, found in stages))
    if len(slow):
        keep = np.ones(len(idx), dtype=bool)
        keep[slow] = False
        keep = np.flatnonzero(keep)
        idx = idx[keep]
        cols = {name: column[keep] for name, column in cols.items()}
    return idx, cols, others


class _ByVersion:
    """Each packet's IPv4 or IPv6 reading of a field: ``np.where(is4, four, six)``.

    Batches often hold one IP version only (captures come in runs of one kind of traffic):
    then only that version's field is read, one pass over the records instead of two and a
    select.
    """

    def __init__(self, is4: np.ndarray) -> None:
        self.is4 = is4
        self.only = 4 if is4.all() else 6 if not is4.any() else 0

    def pick(self, four: np.ndarray | int, six: np.ndarray | int, dtype: type) -> np.ndarray:
        """A new array of ``dtype``, one element per packet."""
        if not self.only:
            return np.where(self.is4, four, six).astype(dtype, copy=False)
        value = four if self.only == 4 else six
        if isinstance(value, np.ndarray):
            return value.astype(dtype)
        return np.full(len(self.is4), value, dtype=dtype)


def _classify_ip(
    rec: np.ndarray, captured: np.ndarray, version: np.ndarray
) -> tuple[_ByVersion, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(which packets are IPv4, is IPv6, protocol, ip_bytes, plain) from IP records and bytes
    captured from them.

    IPv4 is version nibble 4 where the link layer does not say 6, for plain and second-stage
    packets alike (IPv6 likewise); the protocol is the IP header's (the second stage replaces it
    with the one after the extension headers). A packet is plain, decodable from its IP record
    alone, when its IP header is (IPv4 IHL 5, not a fragment, total length at least 20; IPv6
    with a transport right after the fixed header) and the transport bytes we read lie within
    both the captured bytes and the IP payload. Everything else goes to the second stage
    (``vector_short_chains``, then ``vector_headers``), then the slow path, which apply the
    same rules.

    Each read of a record field is a pass over all the records, so a field used twice is read
    once, and one lookup by IP version and protocol says where the transport we read ends.
    """
    vihl = rec["vihl"].copy()  # read once: each read of a field is a pass over the records
    nibble = vihl >> 4
    is4 = (nibble == 4) & (version != 6)
    is6 = (nibble == 6) & (version != 4)
    ip = _ByVersion(is4)
    proto = ip.pick(rec["proto4"], rec["next6"], np.uint8)
    len4 = rec["len4"].astype(np.int64)
    ip_bytes = len4 if ip.only == 4 else ip.pick(len4, rec["plen6"].astype(np.int64) + 40, np.int64)
    header = (is4 & (vihl == 0x45) & ((rec["frag4"] & 0x3FFF) == 0) & (len4 >= 20)) | is6
    transport_end = PLAIN_TRANSPORT_END[(is6.astype(np.uint16) << 8) | proto]
    return ip, is6, proto, ip_bytes, header & (np.minimum(captured, ip_bytes) >= transport_end)


def _ip_columns(batch: RecordBatch, pos: np.ndarray, rec: np.ndarray, ip: _ByVersion,
                proto: np.ndarray, vlan: np.ndarray, ip_bytes: np.ndarray
                ) -> dict[str, np.ndarray]:
    """The IP-level columns of the packets at ``pos`` from their gathered IP headers ``rec``
    (IPv4 and IPv6 fields side by side, ``ip`` choosing), already in their final dtypes."""
    return {
        "ts_us": take_rows(batch.ts_us, pos, copy=True),
        "ip_version": ip.pick(4, 6, np.uint8),
        "protocol": proto.astype(np.uint8, copy=False),
        "src_hi": ip.pick(0, rec["src6hi"], np.uint64),
        "src_lo": ip.pick(rec["src4"], rec["src6lo"], np.uint64),
        "dst_hi": ip.pick(0, rec["dst6hi"], np.uint64),
        "dst_lo": ip.pick(rec["dst4"], rec["dst6lo"], np.uint64),
        "vlan_id": vlan,
        "ip_bytes": ip_bytes,
        "frame_bytes": take_rows(batch.wirelen, pos, copy=True),
    }


def _fragments(
    cols: dict[str, np.ndarray], idx: np.ndarray, rows: np.ndarray, found: HeaderRows
) -> FragmentPackets:
    """The fragments among the second-stage packets at ``rows`` (rows of ``cols``)."""
    fragment = found.ok & found.fragment
    rows = rows[fragment]
    return FragmentPackets(pos=idx[rows], first=~found.later[fragment],
                           key=_fragment_keys(cols, rows, found.ident[fragment]))


def _fragment_keys(
    cols: dict[str, np.ndarray], rows: np.ndarray, ident: np.ndarray
) -> np.ndarray:
    """The ``FragmentTracker`` keys of the fragment rows (the IPv6 key has no protocol)."""
    key = np.zeros(len(rows), dtype=FRAGMENT_KEY_DTYPE)
    version = cols["ip_version"][rows]
    key["version"] = version
    for name in ("src_hi", "src_lo", "dst_hi", "dst_lo"):
        key[name] = cols[name][rows]
    key["protocol"] = np.where(version == 4, cols["protocol"][rows], 0)
    key["ident"] = ident
    return key.view(FRAGMENT_KEY_BYTES)
