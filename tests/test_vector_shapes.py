"""Tests of the vectorised path on the IP shapes it used to leave to the per-packet path: IPv6
extension-header chains, IPv4 options, IPv4/IPv6 fragments and cut transports.

The per-packet path (``_decode(batch, vectorised=False)``) is the reference: the vectorised
path must give the same rows, in the same order, with the same error counts, on well-formed
and adversarial packets alike (chains cut by the snaplen, extension lengths that overrun,
chains deeper than the vectorised walk). Fragment tracking is checked against a model of the
one-packet-at-a-time tracker, including out-of-order fragments, fragments split across batches
and across the two paths, and overflowing tables.
"""

from __future__ import annotations

import collections
import struct
from pathlib import Path

import numpy as np
import pytest

from flowbeam.packets.columns import PacketColumns, concat_columns
from flowbeam.packets.decoder import PacketDecoder
from flowbeam.packets.ip_fragments import FragmentTracker
from flowbeam.packets.vector_headers import MAX_CHAIN
from tests.test_packet_decoder import (
    ICMP,
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
    null,
    read_pcap,
    sll,
    sll2,
    tcp,
    udp,
)

PCAPS = Path(__file__).resolve().parents[2] / "shared/data/pcaps"
MF = 0x2000
# Three VLAN tags: deeper than the vectorised path goes, so the frame takes the per-packet path.
DEEP_TAGS = ((0x88A8, 1), (0x8100, 2), (0x8100, 3))
QINQ = ((0x88A8, 100), (0x8100, 200))
HOP, ROUTING, DEST, FRAGMENT, AH = 0, 43, 60, 44, 51


def no_slow_path(decoder: PacketDecoder) -> PacketDecoder:
    """Make the decoder fail on any packet that reaches the per-packet path."""

    def refuse(*packet: object) -> tuple:
        raise AssertionError(f"took the per-packet path: {packet}")

    decoder._slow_packet = refuse  # type: ignore[method-assign]
    return decoder


def assert_paths_agree(frames: list[bytes], linktypes: int | list[int] = 1, *,
                       limit: int = 65536, batch_size: int | None = None,
                       snaplen: int | None = None) -> PacketColumns:
    """Decode with both paths (one decoder each, in batches); assert rows and errors agree."""
    fast, slow = PacketDecoder(limit), PacketDecoder(limit)
    step = batch_size or max(1, len(frames))
    types = [linktypes] * len(frames) if isinstance(linktypes, int) else linktypes
    fast_parts, slow_parts = [], []
    for start in range(0, len(frames), step):
        batch = make_batch(frames[start:start + step], types[start:start + step],
                           snaplen=snaplen, ts_start=1_000_000 + start)
        fast_parts.append(fast.decode(batch))
        slow_parts.append(slow._decode(batch, vectorised=False))
    fast_parts.append(fast.flush())
    slow_parts.append(slow.flush())
    fast_cols = concat_columns(fast_parts)
    assert_columns_equal(fast_cols, concat_columns(slow_parts))
    assert fast.errors == slow.errors
    return fast_cols


# --- Shapes that must now stay on the vectorised path -------------------------------------------

def chain_shapes() -> list[bytes]:
    """Well-formed frames of every unusual IP shape the vectorised path now decodes."""
    ident = 0xCAFE0001
    return [
        ethernet(ipv6(HOP, ext_header(TCP, 0) + tcp(1, 2, SYN)), 0x86DD),
        ethernet(ipv6(HOP, ext_header(ROUTING, 1) + ext_header(DEST, 0)
                      + ext_header(UDP, 2) + udp(3, 4)), 0x86DD),
        ethernet(ipv6(AH, ext_header(DEST, 1, ah=True) + ext_header(TCP, 0)
                      + tcp(5, 6, SYN)), 0x86DD),
        ethernet(ipv6(135, ext_header(139, 0) + ext_header(140, 0) + ext_header(ICMP6, 0)
                      + icmp(128, 0)), 0x86DD),
        ethernet(ipv6(DEST, ext_header(50, 0) + bytes(16)), 0x86DD),  # ESP ends the walk
        ethernet(ipv6(HOP, ext_header(59, 0)), 0x86DD),  # no next header
        # Atomic fragment (offset 0, M=0): not a fragmented datagram.
        ethernet(ipv6(FRAGMENT, frag6(UDP, 0, False, 7) + udp(7, 8)), 0x86DD),
        # An IPv6 datagram in three fragments, the first behind hop-by-hop options.
        ethernet(ipv6(HOP, ext_header(FRAGMENT, 0) + frag6(ICMP6, 0, True, ident)
                      + icmp(128, 0) + bytes(8)), 0x86DD),
        ethernet(ipv6(FRAGMENT, frag6(ICMP6, 2, True, ident) + bytes(16)), 0x86DD),
        ethernet(ipv6(DEST, ext_header(FRAGMENT, 0) + frag6(ICMP6, 4, False, ident)
                      + bytes(8)), 0x86DD),
        # IPv4 options, and an IPv4 datagram with options in its first fragment.
        ethernet(ipv4(TCP, tcp(9, 10, SYN), options=b"\x94\x04\x00\x00"), 0x0800),
        ethernet(ipv4(UDP, udp(11, 12, bytes(16)), ident=77, frag=MF,
                      options=b"\x01" * 8), 0x0800),
        ethernet(ipv4(UDP, bytes(24), ident=77, frag=MF | 3), 0x0800),
        ethernet(ipv4(UDP, bytes(8), ident=77, frag=6), 0x0800),
        ethernet(ipv4(ICMP, icmp(8, 0), frag=MF, ident=78), 0x0800),
        # Other link layers with the same shapes.
        sll(0x86DD, ipv6(HOP, ext_header(UDP, 0) + udp(13, 14))),
        sll2(0x0800, ipv4(TCP, tcp(15, 16, SYN), options=bytes(4))),
        ethernet(ipv6(ROUTING, ext_header(TCP, 0) + tcp(17, 18, SYN)), 0x86DD, ((0x8100, 9),)),
        ipv6(HOP, ext_header(TCP, 0) + tcp(19, 20, SYN)),
        null(24, ipv6(DEST, ext_header(UDP, 0) + udp(21, 22)), "<"),
        ethernet(ipv6(HOP, ext_header(TCP, 0) + tcp(23, 24, SYN)), 0x86DD, QINQ),
        ethernet(ipv4(UDP, udp(25, 26)), 0x0800, QINQ),
    ]


CHAIN_LINKTYPES = [1] * 15 + [113, 276, 1, 101, 0, 1, 1]


def test_unusual_shapes_take_the_vectorised_path() -> None:
    frames = chain_shapes()
    batch = make_batch(frames, CHAIN_LINKTYPES)
    cols = no_slow_path(PacketDecoder()).decode(batch)
    reference = PacketDecoder()
    assert_columns_equal(cols, reference._decode(batch, vectorised=False))
    assert len(cols) == len(frames) and not reference.errors
    ports = list(zip(cols.src_port.tolist(), cols.dst_port.tolist(), strict=True))
    # The later fragments got their first fragment's ports (ICMPv6 echo: 128 -> 129).
    assert ports[7:10] == [(128, 129)] * 3
    assert ports[11:14] == [(11, 12)] * 3


def test_transports_cut_by_the_snaplen_stay_vectorised() -> None:
    """Cut anywhere after the IP headers (before the ports: counted; before the TCP flags: flags
    0), the vectorised path decodes it as the per-packet path does."""
    shapes = [  # (frame, bytes up to the transport, transport bytes holding the ports)
        (ethernet(ipv6(HOP, ext_header(TCP, 0) + tcp(1, 2, SYN)), 0x86DD), 14 + 40 + 8, 4),
        (ethernet(ipv4(TCP, tcp(3, 4, SYN), options=bytes(8)), 0x0800), 14 + 28, 4),
        (ethernet(ipv4(ICMP, icmp(8, 0), options=bytes(4), frag=MF), 0x0800), 14 + 24, 2),
    ]
    for frame, headers, port_bytes in shapes:
        for snaplen in range(headers, len(frame) + 1):
            fast, slow = no_slow_path(PacketDecoder()), PacketDecoder()
            batch = make_batch([frame, frame], snaplen=snaplen)
            assert_columns_equal(fast.decode(batch), slow._decode(batch, vectorised=False))
            assert fast.errors == slow.errors
            cut = snaplen < headers + port_bytes
            assert fast.errors == ({"truncated_transport": 2} if cut else {})


# --- Adversarial chains -------------------------------------------------------------------------

def test_chains_cut_at_every_byte_agree() -> None:
    frames = chain_shapes()
    cut = [frame[:length] for frame in frames for length in range(len(frame) + 1)]
    assert_paths_agree(cut, [lt for frame, lt in zip(frames, CHAIN_LINKTYPES, strict=True)
                             for _ in range(len(frame) + 1)])


@pytest.mark.parametrize("length", [0, 1, 2, 3, 200, 255])
def test_extension_lengths_that_overrun_agree(length: int) -> None:
    frames = []
    for kind in (HOP, ROUTING, DEST, AH, 135):
        header = bytes([UDP, length]) + bytes(6)
        frames.append(ethernet(ipv6(kind, header + udp(1, 2)), 0x86DD))
        frames.append(ethernet(ipv6(HOP, ext_header(kind, 0) + header + udp(1, 2)), 0x86DD))
        # The IPv6 payload length says less than was captured: the chain must fit in it.
        frames.append(ethernet(ipv6(kind, header + udp(1, 2), payload_len=8), 0x86DD))
    assert_paths_agree(frames)


def test_chains_deeper_than_the_vectorised_walk_agree() -> None:
    frames = []
    for depth in (MAX_CHAIN - 1, MAX_CHAIN, MAX_CHAIN + 1, 300):
        chain = b"".join(ext_header(DEST, 0) for _ in range(depth - 1)) + ext_header(UDP, 0)
        frames.append(ethernet(ipv6(DEST, chain + udp(depth, 2)), 0x86DD))
    cols = assert_paths_agree(frames)
    assert cols.src_port.tolist() == [MAX_CHAIN - 1, MAX_CHAIN, MAX_CHAIN + 1, 300]


def test_odd_fragment_headers_agree() -> None:
    ident = 5
    frames = [
        # Two fragment headers: the second one's key and offset win.
        ethernet(ipv6(FRAGMENT, frag6(FRAGMENT, 0, True, ident) + frag6(UDP, 0, True, ident + 1)
                      + udp(1, 2)), 0x86DD),
        ethernet(ipv6(FRAGMENT, frag6(UDP, 1, False, ident + 1) + bytes(8)), 0x86DD),
        # A later fragment whose fragment header claims another extension header follows.
        ethernet(ipv6(FRAGMENT, frag6(HOP, 1, True, 9) + bytes(8)), 0x86DD),
        # The fragment header itself cut short, and a chain ending exactly at the payload end.
        ethernet(ipv6(FRAGMENT, frag6(UDP, 0, True, 10)[:6]), 0x86DD),
        ethernet(ipv6(HOP, ext_header(FRAGMENT, 0) + frag6(TCP, 0, True, 11)), 0x86DD),
        # IPv4: options cut, total length shorter than the header, IHL too small.
        ethernet(ipv4(UDP, udp(1, 2), options=bytes(8), frag=MF, ident=12)[:26], 0x0800),
        ethernet(ipv4(UDP, udp(1, 2), options=bytes(8), total=24), 0x0800),
        ethernet(ipv4(UDP, udp(1, 2), ihl=4, frag=3), 0x0800),
    ]
    assert_paths_agree(frames)


def test_damaged_unusual_shapes_agree() -> None:
    """Seeded fuzzing of the chain and fragment frames: flipped bytes and cuts, small tables."""
    rng = np.random.default_rng(20261201)
    bases = chain_shapes()
    frames, linktypes = [], []
    for _ in range(4000):
        pick = int(rng.integers(len(bases)))
        damaged = bytearray(bases[pick])
        for at in rng.integers(0, len(damaged), size=rng.integers(0, 3)):
            damaged[at] = int(rng.choice([0, 1, 6, 17, 44, 51, 58, 60, 0x45, 0x60, 0xFF,
                                          rng.integers(256)]))
        cut = len(damaged) if rng.random() < 0.6 else int(rng.integers(0, len(damaged) + 1))
        frames.append(bytes(damaged[:cut]))
        linktypes.append(CHAIN_LINKTYPES[pick])
    assert_paths_agree(frames, linktypes, limit=6, batch_size=333)


# --- Fragments: order, batches, both paths, bounded tables --------------------------------------

class ReferenceTracker:
    """The fragment tracker's rules applied one packet at a time: the oracle for the batched
    ``FragmentTracker``. Rows are (name, ports) pairs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.firsts: collections.OrderedDict = collections.OrderedDict()
        self.waiting: collections.OrderedDict = collections.OrderedDict()
        self.count = 0

    def first(self, key: object, name: str, ports: tuple) -> list[tuple]:
        self.firsts[key] = ports
        self.firsts.move_to_end(key)
        while len(self.firsts) > self.limit:
            self.firsts.popitem(last=False)
        released = self.waiting.pop(key, [])
        self.count -= len(released)
        return [(name, ports)] + [(later, ports) for later in released]

    def later(self, key: object, name: str) -> list[tuple]:
        if key in self.firsts:
            return [(name, self.firsts[key])]
        self.waiting.setdefault(key, []).append(name)
        self.count += 1
        out = []
        while self.count > self.limit:
            _, names = self.waiting.popitem(last=False)
            self.count -= len(names)
            out += [(evicted, (0, 0)) for evicted in names]
        return out

    def drain(self) -> list[tuple]:
        return [(name, (0, 0)) for names in self.waiting.values() for name in names]


def random_fragments(rng: np.random.Generator, count: int, datagrams: int) -> list[tuple]:
    """(frame, is_first, datagram) of fragments of a few datagrams, in a random order: repeated
    and missing first fragments, later ones before their first, IPv4 and IPv6, and some behind
    three VLAN tags (the per-packet path) so the two paths share one tracker."""
    out = []
    for _ in range(count):
        datagram = int(rng.integers(datagrams))
        first = bool(rng.random() < 0.4)
        sport, dport = 1000 + datagram, 2000 + datagram
        if datagram % 2:
            payload = udp(sport, dport, bytes(8)) if first else bytes(16)
            frame = ethernet(ipv4(UDP, payload, ident=datagram, frag=MF if first else MF | 2),
                             0x0800, DEEP_TAGS if datagram % 3 == 0 else ())
        else:
            payload = tcp(sport, dport, SYN) if first else bytes(16)
            frame = ethernet(ipv6(FRAGMENT, frag6(TCP, 0 if first else 3, True, datagram)
                                  + payload), 0x86DD,
                             DEEP_TAGS if datagram % 4 == 0 else QINQ if datagram % 5 == 0 else ())
        out.append((frame, first, datagram))
    return out


@pytest.mark.parametrize(("seed", "limit", "datagrams", "batch_size"),
                         [(1, 65536, 30, 50), (2, 3, 12, 17), (3, 1, 6, 5), (4, 8, 40, 1),
                          (5, 5, 10, 1000)])
def test_fragment_tracking_matches_one_packet_at_a_time(
    seed: int, limit: int, datagrams: int, batch_size: int
) -> None:
    rng = np.random.default_rng(seed)
    packets = random_fragments(rng, 600, datagrams)
    frames = [frame for frame, _, _ in packets]
    cols = assert_paths_agree(frames, limit=limit, batch_size=batch_size)
    reference = ReferenceTracker(limit)
    expected = []
    for i, (_, first, datagram) in enumerate(packets):
        name = 1_000_000 + i  # each packet's ts_us names it
        if first:
            expected += reference.first(datagram, name, (1000 + datagram, 2000 + datagram))
        else:
            expected += reference.later(datagram, name)
    expected += reference.drain()
    got = list(zip(cols.ts_us.tolist(),
                   zip(cols.src_port.tolist(), cols.dst_port.tolist(), strict=True),
                   strict=True))
    assert got == expected


def test_fragments_across_batches_and_paths() -> None:
    """A first fragment behind three VLAN tags (per-packet path) completes plain later ones
    (vectorised) in the next batch, and the other way round; out of order within a batch."""
    tags = DEEP_TAGS
    first_tagged = ethernet(ipv4(UDP, udp(1, 2, bytes(8)), ident=1, frag=MF), 0x0800, tags)
    later_plain = ethernet(ipv4(UDP, bytes(8), ident=1, frag=2), 0x0800)
    first_plain = ethernet(ipv6(FRAGMENT, frag6(UDP, 0, True, 2) + udp(3, 4)), 0x86DD)
    later_tagged = ethernet(ipv6(FRAGMENT, frag6(UDP, 1, False, 2) + bytes(8)), 0x86DD, tags)
    frames = [later_tagged, first_tagged, later_plain, first_plain, later_plain, later_tagged]
    for batch_size in (1, 2, 3, 6):
        cols = assert_paths_agree(frames, batch_size=batch_size)
        assert cols.ts_us.tolist() == [1_000_001, 1_000_002, 1_000_003, 1_000_000, 1_000_004,
                                       1_000_005]
        assert cols.src_port.tolist() == [1, 1, 3, 3, 1, 3]


def test_tracker_runs_of_first_fragments_end_like_one_at_a_time() -> None:
    """A run with repeated keys and keys already known ends in the same table order."""
    tracker, reference = FragmentTracker(4), ReferenceTracker(4)
    runs = [[b"a", b"b", b"c"], [b"b", b"d", b"a", b"b"], [b"e", b"e"], [b"c", b"f", b"a"]]
    for run in runs:
        values = list(range(len(run)))
        tracker.track(np.ones(len(run), dtype=bool), run, list(range(len(run))), values)
        for key, value in zip(run, values, strict=True):
            reference.first(key, "", value)
        assert list(tracker.firsts.items()) == list(reference.firsts.items())


# --- Real captures ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sv_denial6-6.pcap", "ppp_ip4_fragments.pcap"])
def test_real_extension_header_and_fragment_captures_stay_vectorised(name: str) -> None:
    path = PCAPS / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    batch, _ = read_pcap(path)
    fast = no_slow_path(PacketDecoder())
    fast_cols = concat_columns([fast.decode(batch), fast.flush()])
    slow = PacketDecoder()
    assert_columns_equal(fast_cols,
                         concat_columns([slow._decode(batch, vectorised=False), slow.flush()]))
    assert fast.errors == slow.errors
    assert len(fast_cols) > 0


def test_fragment_key_bytes_of_both_paths_match() -> None:
    """The vectorised key layout and the per-packet ``struct`` layout are the same bytes."""
    first = ethernet(ipv4(UDP, udp(1, 2), ident=0xBEEF, frag=MF), 0x0800)
    later = ethernet(ipv4(UDP, bytes(8), ident=0xBEEF, frag=1), 0x0800, DEEP_TAGS)
    decoder = PacketDecoder()
    decoder.decode(make_batch([first]))  # vectorised
    cols = decoder.decode(make_batch([later]))  # per-packet (three tags)
    assert (cols.src_port.tolist(), cols.dst_port.tolist()) == ([1], [2])
    assert struct.unpack("!BQQQQBI", next(iter(decoder._fragments.firsts)))[-2:] == (UDP, 0xBEEF)
