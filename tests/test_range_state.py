"""Flow state across the ranges of a split read (``flowbeam.packets.range_state``): ranges
aggregated on their own, then folded in order, give the rows of one fragment per packet."""

from __future__ import annotations

import itertools
import random

import pytest

from flowbeam.flows.engine import ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT
from flowbeam.flows.protocols import TCP_ACK, TCP_FIN, TCP_SYN
from flowbeam.packets.aggregation import FragmentAggregator
from flowbeam.packets.range_state import RangeState
from flowbeam.packets.to_fragments import fold_ranges
from tests.test_packet_aggregation import (
    CLIENT,
    SERVER,
    T0,
    Pkt,
    batches_of,
    columns,
    disorder,
    one_fragment,
    random_scenario,
    rows_by_key,
)

IDLE, ACTIVE = 1_000, 10_000


def split_read(ranges: list[list[list[Pkt]]], idle: int = IDLE, active: int = ACTIVE,
               **options) -> tuple[list, list[RangeState]]:
    """Fragments of ranges (each a list of batches) read apart then folded, and the states."""
    fragments, states = [], []
    for index, batches in enumerate(ranges):
        aggregator = FragmentAggregator(idle, active, heads=index > 0, **options)
        for batch in batches:
            fragments += aggregator.add(columns(batch))
        final, state = aggregator.handoff()
        fragments += final
        states.append(state)
    return fragments + fold_ranges(states, idle, active), states


def per_packet_rows(packets: list[Pkt], idle: int = IDLE, active: int = ACTIVE) -> dict:
    end_us = max(p.ts for p in packets)
    return rows_by_key([one_fragment(p, idle, end_us) for p in packets], idle, active)


def cut(packets: list[Pkt], *at: int) -> list[list[list[Pkt]]]:
    """Ranges cut at packet positions ``at``, one packet per batch."""
    bounds = [0, *at, len(packets)]
    return [[[p] for p in packets[lo:hi]] for lo, hi in itertools.pairwise(bounds)]


def assert_exact(packets: list[Pkt], ranges: list, idle: int = IDLE, active: int = ACTIVE,
                 **options) -> list[RangeState]:
    fragments, states = split_read(ranges, idle, active, **options)
    assert sum(f.a_packets + f.b_packets for f in fragments) == len(packets)
    assert rows_by_key(fragments, idle, active) == per_packet_rows(packets, idle, active)
    return states


def statuses(packets: list[Pkt], ranges: list, **options) -> list[tuple[int, int, str]]:
    """(first_us - T0, packets, status) of every row, in time order."""
    fragments, _ = split_read(ranges, **options)
    return sorted((row.fragment.first_us - T0, row.fragment.a_packets + row.fragment.b_packets,
                   row.status) for rows in rows_by_key(fragments, IDLE, ACTIVE).values()
                  for row in rows)


def client(ts: int, flags: int = TCP_ACK) -> Pkt:
    return Pkt(T0 + ts, CLIENT, 40000, SERVER, 80, flags)


def server(ts: int, flags: int = TCP_ACK) -> Pkt:
    return Pkt(T0 + ts, SERVER, 80, CLIENT, 40000, flags)


def connection(start: int) -> list[Pkt]:
    """SYN, SYN-ACK, 4 ACKs, FIN both ways, last ACK: 9 packets 10 us apart."""
    flags = [(client, TCP_SYN), (server, TCP_SYN | TCP_ACK)] + [(client, TCP_ACK)] * 4 + [
        (client, TCP_FIN | TCP_ACK), (server, TCP_FIN | TCP_ACK), (client, TCP_ACK)]
    return [side(start + 10 * i, f) for i, (side, f) in enumerate(flags)]


@pytest.mark.parametrize("disorder_us", [0, 300, 100_000])
def test_port_reuse_after_a_fin_exchange_in_an_earlier_range(disorder_us):
    packets = connection(0) + connection(200)
    for at in range(1, len(packets)):
        ranges = cut(packets, at)
        assert statuses(packets, ranges, max_disorder_us=disorder_us) == [
            (0, 9, END_OF_FLOW), (200, 9, END_OF_FLOW)], at
        assert_exact(packets, ranges, max_disorder_us=disorder_us)


@pytest.mark.parametrize("disorder_us", [0, 300, 100_000])
def test_active_timeout_chain_across_one_and_two_boundaries(disorder_us):
    """A packet every 500 us for 25 ms: rows start at 0, 10 and 20 ms whatever the cuts
    (a range that restarted the chain at its own first packet would cut elsewhere)."""
    packets = [client(500 * i) for i in range(50)]
    golden = [(0, 20, ACTIVE_TIMEOUT), (10_000, 20, ACTIVE_TIMEOUT), (20_000, 10, FORCED_END)]
    for at in [(7,), (15,), (20,), (21,), (33,), (7, 29), (15, 35), (19, 41), (1, 49)]:
        ranges = cut(packets, *at)
        assert statuses(packets, ranges, max_disorder_us=disorder_us) == golden, at
        assert_exact(packets, ranges, max_disorder_us=disorder_us)


def test_an_elephant_flow_spanning_every_range_travels_as_columns():
    """No idle gap, so every range after the first holds the flow as head packets (columns,
    never fragments); the fold makes the chain of the whole read."""
    packets = [client(100 * i, TCP_ACK) if i % 2 else server(100 * i) for i in range(1000)]
    for count in (2, 3, 7):
        ranges = cut(packets, *(len(packets) * k // count for k in range(1, count)))
        states = assert_exact(packets, ranges, max_disorder_us=50)
        assert states[0].head is None
        # Every packet of a later range is head, but the newest ones held back past the cut.
        assert [len(s.head) + len(s.held) for s in states[1:]] == [len(r) for r in ranges[1:]]
        assert all(len(s.head.runs) == 1 for s in states[1:])  # one key: its columns once
    assert [n for _, n, _ in statuses(packets, cut(packets, 500), max_disorder_us=50)] == [
        100] * 10


def test_a_key_that_restarts_after_an_idle_gap_is_the_ranges_own():
    """Past the first idle gap that no earlier range can bridge, a range emits the rows
    itself: only the packets before it are head."""
    early = [client(100 * i) for i in range(10)]  # 0 .. 900 us
    late = [client(5_000 + 100 * i) for i in range(10)]  # after an idle gap
    packets = [client(-2_000)] + early + late
    states = assert_exact(packets, cut(packets, 1), max_disorder_us=300)
    assert len(states[1].head) == len(early)
    assert_exact(packets, cut(packets, 1), max_disorder_us=100_000)  # no safe reset: all head


@pytest.mark.parametrize("seed", range(6))
def test_disorder_at_a_boundary(seed):
    """A range's first packets are older than the newest of the range before (by less than
    max_disorder_us): they join the rows held open there, chain points included."""
    rng = random.Random(seed)
    packets = [client(250 * i, rng.choice([TCP_ACK, TCP_ACK | 0x08])) for i in range(120)]
    arrival = disorder(rng, packets, 2_000)
    for at in range(10, 110, 7):
        assert_exact(packets, cut(arrival, at), max_disorder_us=2_000)
        assert_exact(packets, cut(arrival, at, at + 5), max_disorder_us=2_000)


@pytest.mark.parametrize("seed", range(40))
def test_random_traffic_split_anywhere_gives_the_per_packet_rows(seed):
    rng = random.Random(seed)
    idle, active, packets, max_disorder = random_scenario(rng)
    batches = batches_of(rng, disorder(rng, packets, max_disorder))
    for count in (2, 5, 12):
        bounds = sorted(rng.sample(range(1, len(batches)), min(count - 1, len(batches) - 1)))
        ranges = [batches[lo:hi] for lo, hi in itertools.pairwise([0, *bounds, len(batches)])]
        assert_exact(packets, ranges, idle, active, max_disorder_us=max_disorder,
                     flush_every_packets=rng.choice([1, 5, 37, 200, 100_000]))


def test_empty_ranges_and_ranges_without_packets_fold_to_nothing():
    packets = [client(100 * i) for i in range(5)]
    assert_exact(packets, [[], [[p] for p in packets], []])
    assert fold_ranges([RangeState.empty()], IDLE, ACTIVE) == []


def test_idle_rows_end_as_idle_timeout_across_ranges():
    packets = [client(0), client(500), client(5_000)]
    assert statuses(packets, cut(packets, 1, 2), max_disorder_us=0) == [
        (0, 2, IDLE_TIMEOUT), (5_000, 1, FORCED_END)]
