"""Build flow-engine fragments from readable packet descriptions, for tests."""

from __future__ import annotations

import ipaddress

from flowbeam.flows.fragment import NO_TIME, SIDE_A, Fragment, order_key
from flowbeam.flows.protocols import TCP_ACK, TCP_SYN

S = 1_000_000  # one second in microseconds


def split_address(text: str) -> tuple[int, int, int]:
    """(ip_version, hi, lo) of an address, as the decoders hold it."""
    address = ipaddress.ip_address(text)
    value = int(address)
    return address.version, value >> 64, value & (2**64 - 1)


def packet(
    ts_us: int, src: str, sport: int, dst: str, dport: int, *,
    protocol: int = 6, size: int = 100, flags: int = 0, vlan_id: int = -1, scope: str = "",
) -> Fragment:
    """A one-packet fragment, as a decoder would make it."""
    version, s_hi, s_lo = split_address(src)
    _, d_hi, d_lo = split_address(dst)
    key, side = order_key(version, protocol, vlan_id, s_hi, s_lo, sport, d_hi, d_lo, dport,
                          scope)
    pure_syn = protocol == 6 and flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    a, b = (1, 0) if side == SIDE_A else (0, 1)
    return Fragment(
        key=key, first_us=ts_us, last_us=ts_us,
        a_packets=a, a_bytes=size * a, b_packets=b, b_bytes=size * b,
        a_flags=flags * a, b_flags=flags * b,
        first_sender=side,
        syn_us=ts_us if pure_syn else NO_TIME, syn_sender=side if pure_syn else SIDE_A,
        open_at_end=False,
    )
