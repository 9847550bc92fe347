"""Community ID v1 (https://github.com/corelight/community-id-spec), computed from flow keys.

Our own implementation because it runs once per flow row on the hot path and takes the
integers our keys already hold; the ``communityid`` package is the test oracle.
"""

from __future__ import annotations

import base64
import hashlib
import struct

ICMP = 1
ICMPV6 = 58
_PORTED_PROTOCOLS = frozenset({6, 17, 132, ICMP, ICMPV6})

# ICMP types that have a counterpart (request <-> reply), from the spec. A message type not
# listed is "one way": its tuple is hashed as sent, without ordering the endpoints.
ICMP_COUNTERPARTS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
ICMPV6_COUNTERPARTS = {
    128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135,
    130: 131, 131: 130, 139: 140, 140: 139, 144: 145, 145: 144,
}


def community_id(
    protocol: int, src_addr: bytes, dst_addr: bytes, src_port: int, dst_port: int,
    seed: int = 0,
) -> str:
    """Community ID v1 of a flow; addresses are packed (4 or 16 bytes).

    For ICMP/ICMPv6 ``src_port``/``dst_port`` are what flowbeam stores: the type, and the code
    or the counterpart type (the spec's port equivalents).
    """
    one_way = False
    if protocol == ICMP:
        one_way = src_port not in ICMP_COUNTERPARTS
    elif protocol == ICMPV6:
        one_way = src_port not in ICMPV6_COUNTERPARTS
    if not one_way and (src_addr, src_port) > (dst_addr, dst_port):
        src_addr, dst_addr, src_port, dst_port = dst_addr, src_addr, dst_port, src_port
    data = struct.pack("!H", seed) + src_addr + dst_addr + struct.pack("!BB", protocol, 0)
    if protocol in _PORTED_PROTOCOLS:
        data += struct.pack("!HH", src_port, dst_port)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")
