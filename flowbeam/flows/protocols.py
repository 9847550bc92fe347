"""Protocol numbers, TCP flags and ICMP type pairs: one definition for every module.

The ICMP table follows Community ID v1 (mirroring Zeek): a message type with a counterpart
(echo request <-> echo reply, ...) stores the counterpart type where the destination port
goes, so a request and its reply share one flow key; a type without a counterpart is "one
way" and stores its code. Checked against communityid 1.5.0 in the tests.
"""

from __future__ import annotations

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_UDPLITE = 136

# Transports whose first four bytes are the source and destination ports.
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_UDPLITE})

PROTOCOL_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp",
                  PROTO_ICMPV6: "icmpv6", PROTO_SCTP: "sctp"}

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10


def _both_ways(request_reply: dict[int, int]) -> dict[int, int]:
    return {**request_reply, **{reply: request for request, reply in request_reply.items()}}


# Per ICMP protocol: message type -> its counterpart type (both directions).
ICMP_COUNTERPARTS: dict[int, dict[int, int]] = {
    PROTO_ICMP: _both_ways({8: 0, 13: 14, 15: 16, 10: 9, 17: 18}),
    PROTO_ICMPV6: _both_ways({128: 129, 133: 134, 135: 136, 130: 131, 139: 140, 144: 145}),
}


def protocol_name(protocol: int) -> str:
    """``tcp``, ``udp``, ... or the IP protocol number as text."""
    return PROTOCOL_NAMES.get(protocol, str(protocol))
