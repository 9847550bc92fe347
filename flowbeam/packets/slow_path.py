"""The per-packet decode path (``struct.unpack_from``): everything the vectorised path leaves.

That is VLAN stacks, MPLS label stacks (as dpkt and Wireshark decode them), IPv6 extension
chains deeper than the vectorised walk, and every malformed packet, which raises ``Malformed``
with the error reason it is counted under. It decodes every shape, and is the reference the
vectorised path (``vector_path``, ``vector_headers``) is tested against packet for packet, but
it runs at a few hundred thousand packets/s, so it must stay reserved for the unusual packet.
Like the vectorised path, it only recognises fragments (``_IpHeader.fragment_key``): the decoder
tracks them (``fragment_rows``) for both paths at once, in capture order.
"""

from __future__ import annotations

import dataclasses
import struct

from flowbeam.flows.protocols import ICMP_COUNTERPARTS, PROTO_TCP
from flowbeam.packets.error_reasons import (
    BAD_IP_HEADER_LENGTH,
    BAD_IP_TOTAL_LENGTH,
    BAD_IP_VERSION,
    BAD_IPV6_EXTENSION_HEADER,
    NOT_IP,
    SHORT_IP_HEADER,
    SHORT_LINK_HEADER,
)
from flowbeam.packets.header_constants import (
    ETHERTYPE_VERSION,
    IPV6_AH,
    IPV6_EXTENSION_HEADERS,
    IPV6_FRAGMENT,
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
    transport_bytes_needed,
)
from flowbeam.packets.ip_fragments import fragment_key

_RAW_VERSIONS = {LINKTYPE_RAW_12: 0, LINKTYPE_RAW_14: 0, LINKTYPE_RAW: 0,
                 LINKTYPE_IPV4: 4, LINKTYPE_IPV6: 6}
_U16_PAIR = struct.Struct("!HH")
_U32_BIG = struct.Struct("!I")
_U32_LITTLE = struct.Struct("<I")
_IPV4_HEADER = struct.Struct("!BxHHHxBxxII")
_IPV6_HEADER = struct.Struct("!4xHBxQQQQ")
_IPV6_FRAGMENT_HEADER = struct.Struct("!BxHI")


class Malformed(Exception):
    """A packet we cannot decode; ``reason`` is the public error key it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def slow_link(pkt: memoryview, linktype: int) -> tuple[int, int, int]:
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
        raise Malformed(SHORT_LINK_HEADER)


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
        raise Malformed(NOT_IP)
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
        raise Malformed(NOT_IP)
    return at


def _family(pkt: memoryview, linktype: int) -> int:
    """IP version from a NULL (host byte order, either) or LOOP (network order) family."""
    (big,) = _U32_BIG.unpack_from(pkt, 0)
    (little,) = _U32_LITTLE.unpack_from(pkt, 0)
    if linktype == LINKTYPE_NULL and little in NULL_FAMILY_VERSION:
        return NULL_FAMILY_VERSION[little]
    if big in NULL_FAMILY_VERSION:
        return NULL_FAMILY_VERSION[big]
    raise Malformed(NOT_IP)


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
    fragment_key: bytes | None = None  # set for fragments of a fragmented datagram
    first_fragment: bool = False


def slow_ip(pkt: memoryview, at: int, expected_version: int) -> _IpHeader:
    if len(pkt) < at + 1:
        raise Malformed(SHORT_IP_HEADER)
    version = pkt[at] >> 4
    if version not in (4, 6) or (expected_version and version != expected_version):
        raise Malformed(BAD_IP_VERSION)
    return _slow_ipv4(pkt, at) if version == 4 else _slow_ipv6(pkt, at)


def _slow_ipv4(pkt: memoryview, at: int) -> _IpHeader:
    if len(pkt) < at + 20:
        raise Malformed(SHORT_IP_HEADER)
    vihl, total, ident, frag, proto, src, dst = _IPV4_HEADER.unpack_from(pkt, at)
    header = (vihl & 0x0F) * 4
    if header < 20:
        raise Malformed(BAD_IP_HEADER_LENGTH)
    if len(pkt) < at + header:
        raise Malformed(SHORT_IP_HEADER)
    if total < header:
        raise Malformed(BAD_IP_TOTAL_LENGTH)
    ip = _IpHeader(4, proto, 0, src, 0, dst, total, at + header, min(len(pkt), at + total))
    more, offset = frag & 0x2000, frag & 0x1FFF
    if more or offset:
        ip.fragment_key = fragment_key(4, 0, src, 0, dst, proto, ident)
        ip.first_fragment = offset == 0
    return ip


def _slow_ipv6(pkt: memoryview, at: int) -> _IpHeader:
    if len(pkt) < at + 40:
        raise Malformed(SHORT_IP_HEADER)
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
            raise Malformed(BAD_IPV6_EXTENSION_HEADER)
        if ip.protocol == IPV6_FRAGMENT:
            nxt, offset_flags, ident = _IPV6_FRAGMENT_HEADER.unpack_from(pkt, at)
            ip.protocol, at = nxt, at + 8
            offset, more = offset_flags >> 3, offset_flags & 1
            if more or offset:
                ip.fragment_key = fragment_key(6, ip.src_hi, ip.src_lo, ip.dst_hi, ip.dst_lo, 0,
                                               ident)
                ip.first_fragment = offset == 0
            if offset:
                break
            continue
        nxt, length = pkt[at], pkt[at + 1]
        size = (length + 2) * 4 if ip.protocol == IPV6_AH else (length + 1) * 8
        if at + size > end:
            raise Malformed(BAD_IPV6_EXTENSION_HEADER)
        ip.protocol, at = nxt, at + size
    ip.transport_at = at


def slow_ports(pkt: memoryview, ip: _IpHeader) -> tuple[int, int, int, bool]:
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
