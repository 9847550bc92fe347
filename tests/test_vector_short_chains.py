"""Tests of the second stage's shortcut (``vector_short_chains``): IPv6 behind one or two 8-byte
headers is decoded from one gather, never walked, and exactly as the per-packet path does,
however the packet is cut; and of the one-IP-version batches of the first stage.
"""

from __future__ import annotations

import pytest

from flowbeam.packets import vector_path
from flowbeam.packets.decoder import PacketDecoder
from tests.test_packet_decoder import (
    ICMP6,
    SYN,
    TCP,
    UDP,
    assert_columns_equal,
    ethernet,
    ext_header,
    frag6,
    icmp,
    ipv4,
    ipv6,
    make_batch,
    tcp,
    udp,
)
from tests.test_vector_shapes import (
    AH,
    DEST,
    FRAGMENT,
    HOP,
    ROUTING,
    assert_paths_agree,
    no_slow_path,
)


def short_chains() -> list[bytes]:
    """One frame of every short-chain shape, well formed."""
    ident = 0xBEEF0001
    return [
        ethernet(ipv6(HOP, ext_header(ICMP6, 0) + icmp(143, 0)), 0x86DD),  # MLD, router alert
        ethernet(ipv6(DEST, ext_header(TCP, 0) + tcp(1, 2, SYN)), 0x86DD),
        ethernet(ipv6(ROUTING, ext_header(UDP, 0) + udp(3, 4)), 0x86DD),
        ethernet(ipv6(AH, ext_header(UDP, 0, ah=True) + udp(5, 6)), 0x86DD),
        ethernet(ipv6(HOP, ext_header(59, 0)), 0x86DD),  # no next header
        ethernet(ipv6(FRAGMENT, frag6(UDP, 0, False, 7) + udp(7, 8)), 0x86DD),  # atomic
        ethernet(ipv6(HOP, ext_header(FRAGMENT, 0) + frag6(TCP, 0, False, 8)
                      + tcp(9, 10, SYN)), 0x86DD),  # atomic, transport at 56
        # A datagram in three fragments: first behind hop-by-hop options (denial6's shape).
        ethernet(ipv6(HOP, ext_header(FRAGMENT, 0) + frag6(ICMP6, 0, True, ident)
                      + icmp(128, 0) + bytes(8)), 0x86DD),
        ethernet(ipv6(FRAGMENT, frag6(ICMP6, 2, True, ident) + bytes(16)), 0x86DD),
        ethernet(ipv6(DEST, ext_header(FRAGMENT, 0) + frag6(HOP, 4, False, ident)
                      + bytes(8)), 0x86DD),  # later fragment: its next header is not walked
        ethernet(ipv6(FRAGMENT, frag6(UDP, 0, True, ident + 1) + udp(11, 12)), 0x86DD),
    ]


def test_short_chains_skip_the_chain_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    def walk(*args: object) -> None:
        raise AssertionError("walked a short chain")

    monkeypatch.setattr(vector_path, "decode_headers", walk)
    batch = make_batch(short_chains())
    cols = no_slow_path(PacketDecoder()).decode(batch)
    reference = PacketDecoder()
    assert_columns_equal(cols, reference._decode(batch, vectorised=False))
    assert not reference.errors
    ports = list(zip(cols.src_port.tolist(), cols.dst_port.tolist(), strict=True))
    assert ports[:2] == [(143, 0), (1, 2)]
    assert ports[7:10] == [(128, 129)] * 3  # the later fragments got their first's ports


def test_short_chains_cut_at_every_byte_agree() -> None:
    frames = short_chains()
    assert_paths_agree([frame[:length] for frame in frames for length in range(len(frame) + 1)])


def test_longer_chains_and_lengths_still_walk() -> None:
    """Headers longer than 8 bytes, and third headers, are the chain walk's: same rows."""
    frames = [
        ethernet(ipv6(HOP, ext_header(UDP, 1) + udp(1, 2)), 0x86DD),
        ethernet(ipv6(HOP, ext_header(DEST, 0) + ext_header(TCP, 0) + tcp(3, 4, SYN)), 0x86DD),
        ethernet(ipv6(FRAGMENT, frag6(HOP, 0, False, 5) + ext_header(UDP, 0) + udp(5, 6)),
                 0x86DD),
        ethernet(ipv6(HOP, ext_header(FRAGMENT, 0) + frag6(DEST, 0, True, 6)
                      + ext_header(UDP, 0) + udp(7, 8)), 0x86DD),
    ]
    assert_paths_agree(frames)


@pytest.mark.parametrize("versions", ["4", "6", "46"])
def test_batches_of_one_ip_version_or_both_agree(versions: str) -> None:
    frames = {
        "4": [ethernet(ipv4(TCP, tcp(1, 2, SYN)), 0x0800), ethernet(ipv4(UDP, udp(3, 4)), 0x0800)],
        "6": [ethernet(ipv6(TCP, tcp(5, 6, SYN)), 0x86DD), short_chains()[0]],
    }
    assert_paths_agree([frame for version in versions for frame in frames[version]])
