"""Link-layer, IP and transport header constants shared by both decode paths.

The vectorised path (``vector_path``) builds its lookup tables from these and the per-packet
path (``slow_path``) tests against them directly, so the two cannot drift apart on which
link types, ethertypes, IPv6 extension headers or transport bytes they accept.
"""

from __future__ import annotations

from flowbeam.flows.protocols import ICMP_COUNTERPARTS, PORT_PROTOCOLS, PROTO_TCP

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
