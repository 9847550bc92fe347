"""Community ID v1 (https://github.com/corelight/community-id-spec), computed from flow keys.

Our own implementation because it runs once per flow row on the hot path and takes the
integers our keys already hold; the ``communityid`` package is the test oracle.
"""

from __future__ import annotations

import hashlib
import struct
from binascii import b2a_base64

from flowbeam.flows.protocols import (
    ICMP_COUNTERPARTS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
)

# Transports whose ports (ICMP: type and code) are part of the hashed tuple.
_PORTED_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMPV6})
# The hashed fields around the addresses: seed; protocol, a zero pad byte (and the ports).
_SEED = struct.Struct("!H")
_PORTED_TAIL = struct.Struct("!BBHH")
_PORTLESS_TAIL = struct.Struct("!BB")


def community_id(
    protocol: int, src_addr: bytes, dst_addr: bytes, src_port: int, dst_port: int,
    seed: int = 0,
) -> str:
    """Community ID v1 of a flow; addresses are packed (4 or 16 bytes).

    For ICMP/ICMPv6 ``src_port``/``dst_port`` are what flowbeam stores: the type, and the code
    or the counterpart type (the spec's port equivalents).
    """
    # An ICMP type without a counterpart is hashed as sent, without ordering the endpoints.
    counterparts = ICMP_COUNTERPARTS.get(protocol)
    one_way = counterparts is not None and src_port not in counterparts
    if not one_way and (src_addr > dst_addr or (src_addr == dst_addr and src_port > dst_port)):
        src_addr, dst_addr, src_port, dst_port = dst_addr, src_addr, dst_port, src_port
    if protocol in _PORTED_PROTOCOLS:
        tail = _PORTED_TAIL.pack(protocol, 0, src_port, dst_port)
    else:
        tail = _PORTLESS_TAIL.pack(protocol, 0)
    digest = hashlib.sha1(_SEED.pack(seed) + src_addr + dst_addr + tail).digest()
    return "1:" + b2a_base64(digest, newline=False).decode("ascii")
