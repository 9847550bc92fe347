"""Transport fields for the vector paths: lookup tables by protocol, and ports/flags columns.

Both vectorised stages (``vector_path`` for plain IP headers, ``vector_headers`` for IPv4
options, fragments and IPv6 extension chains) read the transport the same way; the tables are
built from ``header_constants`` so they agree with the per-packet path too.
"""

from __future__ import annotations

import numpy as np

from flowbeam.flows.protocols import (
    ICMP_COUNTERPARTS,
    PORT_PROTOCOLS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
)
from flowbeam.packets.header_constants import IPV6_EXTENSION_HEADERS, transport_bytes_needed
from flowbeam.packets.vector_gather import read_only


def _icmp_pair_table() -> np.ndarray:
    """[is_icmpv6, type] -> paired type, or -1 when the code is used instead."""
    table = np.full((2, 256), -1, dtype=np.int32)
    for row, proto in enumerate((PROTO_ICMP, PROTO_ICMPV6)):
        for mtype, paired in ICMP_COUNTERPARTS[proto].items():
            table[row, mtype] = paired
    return table


# Bytes of transport header needed, by protocol: for the ports, and for everything we read.
PORT_BYTES = read_only(np.array([transport_bytes_needed(p)[0] for p in range(256)]))
TRANSPORT_BYTES = read_only(np.array([transport_bytes_needed(p)[1] for p in range(256)]))
_HAS_PORTS = read_only(np.isin(np.arange(256), list(PORT_PROTOCOLS)))
_ICMP_PAIR = read_only(_icmp_pair_table())


def _plain_transport_end_table() -> np.ndarray:
    """[is IPv6 << 8 | protocol] -> where the transport bytes we read end, from the IP header,
    for IPv4 without options and IPv6 without extension headers (``vector_path``'s plain
    packets); past any packet after an IPv6 extension header, which is never plain."""
    table = np.concatenate([TRANSPORT_BYTES + 20, TRANSPORT_BYTES + 40])
    table[256 + np.array(sorted(IPV6_EXTENSION_HEADERS))] = np.iinfo(np.int64).max
    return table


PLAIN_TRANSPORT_END = read_only(_plain_transport_end_table())


def transport_columns(
    raw_src: np.ndarray, raw_dst: np.ndarray, tcp_byte: np.ndarray, proto: np.ndarray
) -> dict[str, np.ndarray]:
    """Port and flag columns from the transport's first four bytes and its 14th byte.

    Ports only for protocols that have them; ICMP/ICMPv6 type and code mapped as Community ID
    does (by protocol number, whatever the IP version); flags only for TCP.
    """
    raw_src = raw_src.astype(np.int32, copy=False)
    has_ports = _HAS_PORTS[proto]
    # The zeros' dtypes give each result its column's dtype without a further copy.
    src_port = np.where(has_ports, raw_src, np.int32(0))
    dst_port = np.where(has_ports, raw_dst, np.int32(0))
    tcp_flags = np.where(proto == PROTO_TCP, tcp_byte, np.uint8(0))
    icmp = np.flatnonzero((proto == PROTO_ICMP) | (proto == PROTO_ICMPV6))
    if len(icmp):
        mtype = raw_src[icmp] >> 8
        code = raw_src[icmp] & 0xFF
        paired = _ICMP_PAIR[(proto[icmp] == PROTO_ICMPV6).astype(np.intp), mtype]
        src_port[icmp] = mtype
        dst_port[icmp] = np.where(paired >= 0, paired, code)
    return {"src_port": src_port, "dst_port": dst_port, "tcp_flags": tcp_flags}
