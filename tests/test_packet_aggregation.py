"""FragmentAggregator: exact fragments on hand-made packets, and the contract that matters.

The contract: for every key, ``advance(fragments, idle, active, None)`` over the aggregator's
fragments gives the same rows as over one fragment per packet. The property tests check it on
random packets (ties, port reuse, long flows, out-of-order batches, tiny flush windows).
"""

from __future__ import annotations

import ipaddress
import random
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import pytest

from flowbeam.flows.engine import advance
from flowbeam.flows.fragment import NO_TIME, SIDE_A, SIDE_B, Fragment, order_key
from flowbeam.flows.protocols import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from flowbeam.packets import aggregation_columns
from flowbeam.packets.aggregation import FragmentAggregator
from flowbeam.packets.columns import PacketColumns

IDLE = 1_000
ACTIVE = 10_000
T0 = 1_700_000_000_000_000
CLIENT, SERVER = "10.0.0.9", "10.0.0.1"  # the server's address sorts first: it is side A
PSH = 0x08
ICMP = 1
UDP = 17


class Pkt(NamedTuple):
    """One packet as a test writes it; ``frame`` defaults to ``size`` + 14 (Ethernet)."""

    ts: int
    src: str
    sport: int
    dst: str
    dport: int
    flags: int = 0
    size: int = 100
    protocol: int = 6
    vlan: int = -1
    frame: int | None = None


def _address(text: str) -> tuple[int, int, int]:
    address = ipaddress.ip_address(text)
    return address.version, int(address) >> 64, int(address) & (2**64 - 1)


def columns(packets: list[Pkt]) -> PacketColumns:
    """PacketColumns as a decoder would build them."""
    src = [_address(p.src) for p in packets]
    dst = [_address(p.dst) for p in packets]
    return PacketColumns(
        ts_us=np.array([p.ts for p in packets], np.int64),
        ip_version=np.array([s[0] for s in src], np.uint8),
        protocol=np.array([p.protocol for p in packets], np.uint8),
        src_hi=np.array([s[1] for s in src], np.uint64),
        src_lo=np.array([s[2] for s in src], np.uint64),
        dst_hi=np.array([d[1] for d in dst], np.uint64),
        dst_lo=np.array([d[2] for d in dst], np.uint64),
        src_port=np.array([p.sport for p in packets], np.int32),
        dst_port=np.array([p.dport for p in packets], np.int32),
        vlan_id=np.array([p.vlan for p in packets], np.int32),
        ip_bytes=np.array([p.size for p in packets], np.int64),
        frame_bytes=np.array([p.size + 14 if p.frame is None else p.frame for p in packets],
                             np.int64),
        tcp_flags=np.array([p.flags for p in packets], np.uint8),
    )


def one_fragment(p: Pkt, idle: int, end_us: int, accounting: str = "ip") -> Fragment:
    """The reference: the fragment of one packet, written from the flow_engine docs."""
    version, s_hi, s_lo = _address(p.src)
    _, d_hi, d_lo = _address(p.dst)
    key, side = order_key(version, p.protocol, p.vlan, s_hi, s_lo, p.sport, d_hi, d_lo, p.dport)
    size = p.size if accounting == "ip" else (p.size + 14 if p.frame is None else p.frame)
    pure_syn = p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    a = int(side == SIDE_A)
    return Fragment(
        key=key, first_us=p.ts, last_us=p.ts,
        a_packets=a, a_bytes=size * a, b_packets=1 - a, b_bytes=size * (1 - a),
        a_flags=p.flags * a, b_flags=p.flags * (1 - a), first_sender=side,
        syn_us=p.ts if pure_syn else NO_TIME, syn_sender=side if pure_syn else SIDE_A,
        open_at_end=p.ts + idle > end_us)


def aggregate(batches: list[list[Pkt]], idle: int = IDLE, active: int = ACTIVE,
              **options) -> list[Fragment]:
    aggregator = FragmentAggregator(idle, active, **options)
    fragments = []
    for batch in batches:
        fragments += aggregator.add(columns(batch))
    return fragments + aggregator.finish()


def by_key(fragments: list[Fragment]) -> dict[tuple, list[Fragment]]:
    keyed = defaultdict(list)
    for fragment in fragments:
        keyed[fragment.key].append(fragment)
    return keyed


def rows_by_key(fragments: list[Fragment], idle: int, active: int) -> dict[tuple, list]:
    return {key: advance(parts, idle, active, None)[0]
            for key, parts in by_key(fragments).items()}


def assert_same_rows(batches: list[list[Pkt]], idle: int, active: int, **options) -> None:
    """The contract: per key, the same rows as one fragment per packet."""
    packets = [p for batch in batches for p in batch]
    end_us = max(p.ts for p in packets)
    accounting = options.get("byte_accounting", "ip")
    expected = rows_by_key([one_fragment(p, idle, end_us, accounting) for p in packets],
                           idle, active)
    fragments = aggregate(batches, idle, active, **options)
    assert sum(f.a_packets + f.b_packets for f in fragments) == len(packets)
    actual = rows_by_key(fragments, idle, active)
    assert actual.keys() == expected.keys()
    for key, rows in expected.items():
        assert actual[key] == rows, key


# -- random traffic ---------------------------------------------------------------------------

TCP_FLAGS = [TCP_ACK, TCP_ACK, TCP_ACK | PSH, TCP_SYN, TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK,
             TCP_FIN, TCP_RST, TCP_RST | TCP_ACK]


def random_endpoints(rng: random.Random, count: int) -> list[tuple]:
    """A few hundred keys over few hosts and ports, so keys repeat and directions mix."""
    v4, v6 = ["10.0.0.1", "10.0.0.2", "10.0.0.3"], ["2001:db8::1", "2001:db8::2"]
    keys = set()
    while len(keys) < count:
        protocol = rng.choice([6, 6, 6, UDP, ICMP])
        a, b = rng.sample(v4 if rng.random() < 0.8 else v6, 2)
        if protocol == ICMP:
            ports = rng.choice([(8, 0), (0, 8), (3, 1)])
        else:
            ports = (rng.randrange(1000, 1010), rng.choice([53, 80, 443]))
        keys.add((protocol, a, ports[0], b, ports[1], rng.choice([-1, -1, 7])))
    return sorted(keys)


def random_packets(rng: random.Random, count: int, keys: int, span_us: int,
                   grid_us: int) -> list[Pkt]:
    """Packets on a coarse time grid (many ties), with bursts and silences per key."""
    endpoints = random_endpoints(rng, keys)
    packets = []
    for _ in range(count):
        protocol, a, a_port, b, b_port, vlan = rng.choice(endpoints)
        ts = T0 + rng.randrange(0, span_us // grid_us) * grid_us
        forward = rng.random() < 0.5
        src, sport, dst, dport = (a, a_port, b, b_port) if forward else (b, b_port, a, a_port)
        flags = rng.choice(TCP_FLAGS) if protocol == 6 else 0
        packets.append(Pkt(ts, src, sport, dst, dport, flags, rng.randrange(40, 1500),
                           protocol, vlan))
    packets.sort(key=lambda p: p.ts)
    return packets


def disorder(rng: random.Random, packets: list[Pkt], max_disorder_us: int) -> list[Pkt]:
    """Arrival order: each packet delayed by up to ``max_disorder_us``, so no packet arrives
    more than that after a newer one."""
    delayed = [(p.ts + rng.randint(0, max_disorder_us), i) for i, p in enumerate(packets)]
    return [packets[i] for _, i in sorted(delayed)]


def batches_of(rng: random.Random, packets: list[Pkt], largest: int = 120) -> list[list[Pkt]]:
    batches, i = [], 0
    while i < len(packets):
        size = rng.randint(1, largest)
        batches.append(packets[i:i + size])
        i += size
    return batches


def random_scenario(rng: random.Random) -> tuple[int, int, list[Pkt], int]:
    """Random rule settings and traffic: (idle, active, packets in time order, max disorder)."""
    idle = rng.choice([200, 500, 1_000])
    active = rng.choice([idle, 3 * idle, 10 * idle, 10**12])
    packets = random_packets(rng, rng.randint(500, 3000), rng.randint(20, 300),
                             span_us=rng.choice([20_000, 60_000]), grid_us=rng.choice([1, 7, 50]))
    return idle, active, packets, rng.choice([0, 30, 300, 3_000])


@pytest.mark.parametrize("seed", range(40))
def test_same_rows_as_one_fragment_per_packet_with_bounded_disorder(seed):
    rng = random.Random(seed)
    idle, active, packets, max_disorder = random_scenario(rng)
    arrival = disorder(rng, packets, max_disorder)
    assert_same_rows(batches_of(rng, arrival), idle, active,
                     flush_every_packets=rng.choice([1, 5, 37, 200, 100_000]),
                     max_disorder_us=max_disorder)


@pytest.mark.parametrize("seed", range(20))
def test_idle_rows_exact_under_any_disorder(seed):
    """Without TCP ends or active timeouts, late packets only close idle gaps: exact in any
    order, even far beyond max_disorder_us (batches shuffled, packets shuffled in them)."""
    rng = random.Random(1000 + seed)
    packets = [p._replace(flags=p.flags & (TCP_ACK | PSH))
               for p in random_packets(rng, rng.randint(500, 2000), rng.randint(5, 200),
                                       span_us=40_000, grid_us=rng.choice([1, 50]))]
    batches = batches_of(rng, packets)
    if seed % 2:
        rng.shuffle(batches)
    else:  # late by a batch or two: late packets land inside rows still open
        for i in range(len(batches) - 1):
            if rng.random() < 0.5:
                batches[i], batches[i + 1] = batches[i + 1], batches[i]
    for batch in batches:
        rng.shuffle(batch)
    assert_same_rows(batches, rng.choice([200, 1_000]), 10**15,
                     flush_every_packets=rng.choice([1, 10, 300]), max_disorder_us=0)


def test_late_packet_inside_an_open_row_keeps_the_rows_last_packet_as_gap_start():
    """The gap before a packet is measured from the latest packet before it, which a late
    packet inside an open row is not: such keys take the slow path."""
    other = (SERVER, 53, "10.0.0.2", 5353)
    batches = [[udp(T0), udp(T0 + 900), Pkt(T0 + 950, *other, protocol=UDP)],
               [udp(T0 + 100), udp(T0 + 1_200), Pkt(T0 + 1_300, *other, protocol=UDP)]]
    fragments = aggregate(batches, flush_every_packets=1, max_disorder_us=0)
    assert sorted(f.a_packets + f.b_packets for f in fragments) == [2, 4]
    assert_same_rows(batches, IDLE, ACTIVE, flush_every_packets=1, max_disorder_us=0)


@pytest.mark.parametrize("seed", range(10))
def test_nothing_is_lost_under_any_disorder(seed):
    """Beyond max_disorder_us rows may differ (port reuse, active chains), totals never do."""
    rng = random.Random(2000 + seed)
    packets = random_packets(rng, 2000, 150, span_us=40_000, grid_us=7)
    batches = batches_of(rng, packets)
    rng.shuffle(batches)
    fragments = aggregate(batches, 500, 2_000, flush_every_packets=50, max_disorder_us=0)
    assert totals(fragments) == totals([one_fragment(p, 500, 0) for p in packets])


def totals(fragments: list[Fragment]) -> dict[tuple, tuple]:
    return {key: (sum(f.a_packets for f in parts), sum(f.a_bytes for f in parts),
                  sum(f.b_packets for f in parts), sum(f.b_bytes for f in parts),
                  min(f.first_us for f in parts), max(f.last_us for f in parts))
            for key, parts in by_key(fragments).items()}


def test_hash_collisions_fall_back_to_an_exact_sort(monkeypatch):
    """Every key hashing alike must still give the same rows (np.lexsort path)."""
    monkeypatch.setattr(aggregation_columns, "_hash",
                        lambda misc, *_: np.zeros(len(misc), np.uint64))
    rng = random.Random(7)
    packets = random_packets(rng, 1500, 100, span_us=20_000, grid_us=7)
    assert_same_rows(batches_of(rng, disorder(rng, packets, 100)), 500, 3_000,
                     flush_every_packets=100, max_disorder_us=100)


# -- hand-made packets, exact fragments --------------------------------------------------------

def tcp_conversation(t: int, sport: int = 40000) -> list[Pkt]:
    c, s = (CLIENT, sport, SERVER, 80), (SERVER, 80, CLIENT, sport)
    return [
        Pkt(t, *c, TCP_SYN, 60),
        Pkt(t + 10, *s, TCP_SYN | TCP_ACK, 60),
        Pkt(t + 20, *c, TCP_ACK, 52),
        Pkt(t + 30, *c, TCP_ACK | PSH, 400),
        Pkt(t + 40, *s, TCP_ACK | PSH, 1500),
        Pkt(t + 50, *c, TCP_FIN | TCP_ACK, 52),
        Pkt(t + 60, *s, TCP_FIN | TCP_ACK, 52),
        Pkt(t + 70, *c, TCP_ACK, 52),
    ]


def tcp_key(sport: int = 40000, vlan: int = -1) -> tuple:
    _, _, server = _address(SERVER)
    _, _, client = _address(CLIENT)
    return (4, 6, vlan, 0, server, 80, 0, client, sport, "")


@pytest.mark.parametrize("flush_every", [1, 3, 500_000])
def test_one_tcp_conversation_both_directions(flush_every):
    """One fragment per row whatever the flush windows: the open row carries over."""
    packets = tcp_conversation(T0)
    batches = [packets[i:i + 2] for i in range(0, len(packets), 2)]
    [fragment] = aggregate(batches, flush_every_packets=flush_every, max_disorder_us=0)
    assert fragment == Fragment(
        key=tcp_key(), first_us=T0, last_us=T0 + 70,
        a_packets=3, a_bytes=60 + 1500 + 52, b_packets=5, b_bytes=60 + 52 + 400 + 52 + 52,
        a_flags=TCP_SYN | TCP_ACK | PSH | TCP_FIN, b_flags=TCP_SYN | TCP_ACK | PSH | TCP_FIN,
        first_sender=SIDE_B, syn_us=T0, syn_sender=SIDE_B, open_at_end=True)
    assert_same_rows(batches, IDLE, ACTIVE, flush_every_packets=flush_every)


def udp(t: int, size: int = 100, vlan: int = -1, forward: bool = True) -> Pkt:
    ends = (CLIENT, 5353, SERVER, 53) if forward else (SERVER, 53, CLIENT, 5353)
    return Pkt(t, *ends, size=size, protocol=UDP, vlan=vlan)


def spans(fragments: list[Fragment]) -> list[tuple[int, int]]:
    return sorted((f.first_us, f.last_us) for f in fragments)


@pytest.mark.parametrize("flush_every", [1, 500_000])
def test_idle_gap_of_exactly_idle_splits_one_less_does_not(flush_every):
    packets = [udp(T0), udp(T0 + IDLE - 1), udp(T0 + 2 * IDLE - 2)]
    options = {"flush_every_packets": flush_every, "max_disorder_us": 0}
    assert spans(aggregate([[p] for p in packets], **options)) == [(T0, T0 + 2 * IDLE - 2)]
    packets = [udp(T0), udp(T0 + IDLE), udp(T0 + 2 * IDLE - 1)]
    assert spans(aggregate([[p] for p in packets], **options)) == [
        (T0, T0), (T0 + IDLE, T0 + 2 * IDLE - 1)]


def test_port_reuse_after_fin_fin_starts_a_new_fragment():
    first, second = tcp_conversation(T0), tcp_conversation(T0 + 100)
    fragments = aggregate([first + second])
    assert spans(fragments) == [(T0, T0 + 70), (T0 + 100, T0 + 170)]
    assert all(f.syn_us == f.first_us and f.a_packets == 3 for f in fragments)


def test_port_reuse_after_rst_starts_a_new_fragment():
    c, s = (CLIENT, 40000, SERVER, 80), (SERVER, 80, CLIENT, 40000)
    packets = [Pkt(T0, *c, TCP_SYN), Pkt(T0 + 5, *s, TCP_RST | TCP_ACK),
               Pkt(T0 + 50, *c, TCP_SYN), Pkt(T0 + 55, *s, TCP_SYN | TCP_ACK)]
    fragments = aggregate([packets])
    assert spans(fragments) == [(T0, T0 + 5), (T0 + 50, T0 + 55)]
    assert [f.b_flags for f in sorted(fragments)] == [TCP_SYN, TCP_SYN]
    assert_same_rows([packets], IDLE, ACTIVE)


def test_syn_retransmission_before_any_fin_stays_in_the_fragment():
    c, s = (CLIENT, 40000, SERVER, 80), (SERVER, 80, CLIENT, 40000)
    packets = [Pkt(T0, *c, TCP_SYN), Pkt(T0 + 300, *c, TCP_SYN),
               Pkt(T0 + 310, *s, TCP_SYN | TCP_ACK), Pkt(T0 + 320, *c, TCP_ACK)]
    [fragment] = aggregate([packets])
    assert (fragment.first_us, fragment.last_us, fragment.syn_us, fragment.b_packets) == (
        T0, T0 + 320, T0, 3)


def test_syn_at_the_same_microsecond_as_the_ending_fin_across_windows():
    """Ties at the newest microsecond wait for the next window: split_rows orders tied
    packets by their fields (here the SYN before the FIN that ends the flow: no new flow)."""
    c, s = (CLIENT, 40000, SERVER, 80), (SERVER, 80, CLIENT, 40000)
    packets = [Pkt(T0, *c, TCP_SYN, 60), Pkt(T0 + 10, *s, TCP_FIN | TCP_ACK, 52),
               Pkt(T0 + 20, *c, TCP_FIN | TCP_ACK, 100), Pkt(T0 + 20, *c, TCP_SYN, 60)]
    batches = [packets[:3], packets[3:]]
    [fragment] = aggregate(batches, flush_every_packets=1, max_disorder_us=0)
    assert fragment.b_packets == 3
    assert_same_rows(batches, IDLE, ACTIVE, flush_every_packets=1, max_disorder_us=0)


def test_flow_ended_and_reused_within_one_microsecond():
    """Rows that start in the same microsecond would be re-ordered by split_rows (it sorts
    fragments by content): the earlier one goes out as one-packet fragments."""
    s = (SERVER, 80, CLIENT, 40000)
    packets = [Pkt(T0, *s, TCP_ACK, 50), Pkt(T0, *s, TCP_RST, 100), Pkt(T0, *s, TCP_SYN, 200)]
    fragments = aggregate([packets])
    assert sorted(f.a_bytes for f in fragments) == [50, 100, 200]
    assert_same_rows([packets], IDLE, ACTIVE)


@pytest.mark.parametrize("flush_every", [1, 7, 500_000])
def test_active_timeout_chain(flush_every):
    """Rows start at the first packet at or after the previous row's start + active."""
    packets = [udp(T0 + i * 300) for i in range(100)]  # up to T0 + 29_700
    fragments = aggregate([packets[i:i + 10] for i in range(0, 100, 10)],
                          flush_every_packets=flush_every, max_disorder_us=0)
    assert spans(fragments) == [(T0, T0 + 9_900), (T0 + 10_200, T0 + 20_100),
                                (T0 + 20_400, T0 + 29_700)]
    assert [f.a_packets + f.b_packets for f in sorted(fragments)] == [34, 34, 32]
    assert_same_rows([packets], IDLE, ACTIVE, flush_every_packets=flush_every)


def test_frame_byte_accounting():
    packets = [udp(T0, size=100), udp(T0 + 1, size=200, forward=False)._replace(frame=300)]
    [ip] = aggregate([packets])
    [frame] = aggregate([packets], byte_accounting="frame")
    assert (ip.a_bytes, ip.b_bytes) == (200, 100)
    assert (frame.a_bytes, frame.b_bytes) == (300, 114)


def test_open_at_end_only_within_idle_of_the_end_of_input():
    other = (SERVER, 53, "10.0.0.2", 5353)
    packets = [udp(T0), udp(T0 + 10), Pkt(T0 + 500, *other, protocol=UDP),
               Pkt(T0 + 1_010, *other, protocol=UDP)]
    fragments = {f.first_us: f.open_at_end for f in aggregate([packets])}
    assert fragments == {T0: False, T0 + 500: True}  # T0 + 10 + IDLE == end: not open


def test_vlan_is_part_of_the_key():
    fragments = aggregate([[udp(T0, vlan=-1), udp(T0 + 1, vlan=7), udp(T0 + 2, vlan=-1)]])
    assert sorted((f.key[2], f.a_packets + f.b_packets) for f in fragments) == [(-1, 2), (7, 1)]


def test_icmp_echo_request_and_reply_share_a_fragment():
    request = Pkt(T0, CLIENT, 8, SERVER, 0, size=84, protocol=ICMP)
    reply = Pkt(T0 + 400, SERVER, 0, CLIENT, 8, size=84, protocol=ICMP)
    [fragment] = aggregate([[request, reply]])
    _, _, client = _address(CLIENT)
    _, _, server = _address(SERVER)
    assert fragment.key == (4, ICMP, -1, 0, server, 0, 0, client, 8, "")
    assert (fragment.a_packets, fragment.b_packets, fragment.first_sender) == (1, 1, SIDE_B)


def test_same_microsecond_first_sender_is_side_a_as_merge_orders_it():
    """merge orders by (first_us, first_sender): ties go to side A whatever the input order."""
    [fragment] = aggregate([[udp(T0, forward=True), udp(T0, forward=False)]])
    assert fragment.first_sender == SIDE_A


def test_ipv4_key_hashes_alike_in_batches_with_and_without_ipv6():
    v6 = Pkt(T0 + 1, "2001:db8::1", 1, "2001:db8::2", 2, protocol=UDP)
    fragments = aggregate([[udp(T0)], [udp(T0 + 2), v6], [udp(T0 + 3)]],
                          flush_every_packets=1, max_disorder_us=0)
    assert sorted(f.a_packets + f.b_packets for f in fragments) == [1, 3]


def test_add_emits_a_flow_once_idle_before_the_cut():
    """Rows leave memory during the input: when their last packet is idle + max_disorder_us
    before the newest timestamp, no packet still to come can join them."""
    aggregator = FragmentAggregator(IDLE, ACTIVE, flush_every_packets=1, max_disorder_us=50)
    other = (SERVER, 53, "10.0.0.2", 5353)
    assert aggregator.add(columns([udp(T0)])) == []
    assert aggregator.add(columns([Pkt(T0 + IDLE + 49, *other, protocol=UDP)])) == []
    [fragment] = aggregator.add(columns([Pkt(T0 + IDLE + 50, *other, protocol=UDP)]))
    assert (fragment.first_us, fragment.open_at_end) == (T0, False)
    [rest] = aggregator.finish()
    assert rest.a_packets == 2
    assert aggregator.finish() == []


def test_hold_back_is_capped_so_memory_stays_bounded():
    """A huge max_disorder_us cannot hold back more than max(flush_every_packets, 4096)
    packets: rows are still emitted during the input, and time-ordered input stays exact."""
    rng = random.Random(3)
    packets = random_packets(rng, 6_000, 50, span_us=60_000, grid_us=1)
    batches = batches_of(rng, packets)
    aggregator = FragmentAggregator(200, 10**12, flush_every_packets=100,
                                    max_disorder_us=10**12)
    during = [f for batch in batches for f in aggregator.add(columns(batch))]
    assert during
    assert_same_rows(batches, 200, 10**12, flush_every_packets=100, max_disorder_us=10**12)


def test_rejects_bad_options_and_out_of_range_columns():
    with pytest.raises(ValueError, match="byte_accounting"):
        FragmentAggregator(IDLE, ACTIVE, byte_accounting="link")
    with pytest.raises(ValueError, match="timeouts"):
        FragmentAggregator(0, ACTIVE)
    with pytest.raises(ValueError, match="ports"):
        FragmentAggregator(IDLE, ACTIVE).add(columns([udp(T0)._replace(sport=70_000)]))
