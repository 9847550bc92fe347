"""A streaming shard's open flows (``OpenFlows``), without Beam: rows, due times, late
fragments, the drain, and that a release only runs the flow rules on what is due."""

from __future__ import annotations

import random

import pytest

from flowbeam.flows import open_flows as open_flows_module
from flowbeam.flows.engine import (
    ACTIVE_TIMEOUT,
    END_OF_FLOW,
    FORCED_END,
    IDLE_TIMEOUT,
    advance,
)
from flowbeam.flows.open_flows import OpenFlows
from flowbeam.flows.protocols import TCP_ACK, TCP_FIN, TCP_SYN
from tests.fragment_builders import S, packet

IDLE = 120 * S
ACTIVE = 600 * S
T0 = 1_700_000_000 * S


def udp(t, sport=5353):
    return packet(t, "192.168.1.2", sport, "192.168.1.3", 53, protocol=17, size=70)


def shard(flows: OpenFlows) -> OpenFlows:
    """The shard as the next timer firing sees it: dumped to state and restored."""
    return OpenFlows.restore(flows.dump(), IDLE, ACTIVE)


def summary(released):
    return sorted((r.row.fragment.first_us - T0, r.row.fragment.last_us - T0,
                   r.row.fragment.a_packets + r.row.fragment.b_packets, r.row.status, r.last)
                  for r in released)


def test_a_flow_is_released_when_its_idle_timeout_has_passed_and_not_before():
    flows = OpenFlows(IDLE, ACTIVE)
    assert flows.add([udp(T0), udp(T0 + 10 * S)]) == 0
    assert flows.release(T0 + 10 * S) == []
    # Last packet at +10 s: final from +130 s on.
    assert flows.next_due() == T0 + 130 * S
    flows = shard(flows)
    assert flows.release(T0 + 129 * S) == []
    assert summary(flows.release(T0 + 130 * S)) == [(0, 10 * S, 2, IDLE_TIMEOUT, True)]
    assert len(flows) == 0 and flows.next_due() is None


def test_a_fragment_arriving_before_the_due_time_extends_the_row():
    flows = OpenFlows(IDLE, ACTIVE)
    flows.add([udp(T0)])
    assert flows.release(T0 + 60 * S) == []
    flows = shard(flows)
    flows.add([udp(T0 + 100 * S)])  # on time: after the frontier (+60 s)
    assert flows.release(T0 + 120 * S) == []  # the old due time: no longer final
    assert flows.next_due() == T0 + 220 * S
    assert summary(shard(flows).release(T0 + 220 * S)) == [
        (0, 100 * S, 2, IDLE_TIMEOUT, True)]


def test_active_timeout_rows_go_out_as_soon_as_they_are_final():
    flows = OpenFlows(IDLE, ACTIVE)
    # A packet every 100 s from +0 to +1300 s, released after each: rows [0, 500] (final at
    # +600 s, 0 + active timeout), [600, 1100] (final at +1200 s), [1200, 1300] (+1420 s).
    released = {}
    for step in range(14):
        flows.add([udp(T0 + step * 100 * S)])
        flows = shard(flows)
        released[step * 100] = summary(flows.release(T0 + step * 100 * S))
    assert {t: rows for t, rows in released.items() if rows} == {
        600: [(0, 500 * S, 6, ACTIVE_TIMEOUT, False)],
        1200: [(600 * S, 1100 * S, 6, ACTIVE_TIMEOUT, False)]}
    assert flows.release(T0 + 1419 * S) == []
    assert summary(flows.release(T0 + 1420 * S)) == [(1200 * S, 1300 * S, 2, IDLE_TIMEOUT, True)]


def test_a_release_runs_the_flow_rules_only_on_due_and_touched_flows(monkeypatch):
    flows = OpenFlows(IDLE, ACTIVE)
    flows.add([udp(T0 + i * S // 1000, sport=10000 + i) for i in range(1000)])
    flows.release(T0)  # all 1000 flows get their due time, +120 s to +121 s
    flows.add([udp(T0 + 60 * S, sport=10000)])  # flow 0 moves to +180 s
    calls = []

    def counting_advance(*args):
        calls.append(args[0][0].key[5])
        return advance(*args)

    monkeypatch.setattr(open_flows_module, "advance", counting_advance)
    flows = shard(flows)
    flows.add([udp(T0 + 61 * S, sport=20000)])  # a new flow
    # At +120.001 s: flow 1 is due; flow 0 (its due time moved) and flow 20000 got
    # fragments; the 997 others are neither, and stay pickled.
    released = flows.release(T0 + 120 * S + 1000)
    assert sorted(calls) == [10000, 10001, 20000]
    assert summary(released) == [(1000, 1000, 1, IDLE_TIMEOUT, True)]
    assert len(flows) == 1000


def test_late_fragments_are_counted_and_end_up_in_a_new_row_of_their_flow():
    flows = OpenFlows(IDLE, ACTIVE)
    flows.add([udp(T0), udp(T0 + 10 * S)])
    assert summary(flows.release(T0 + 500 * S)) == [(0, 10 * S, 2, IDLE_TIMEOUT, True)]
    flows = shard(flows)
    # A delayed upload: +20 s was part of the row already out; +600 s is on time.
    assert flows.add([udp(T0 + 20 * S), udp(T0 + 600 * S)]) == 1
    # The frontier stays at +500 s even if a timer fires at an earlier time. The late
    # packet's row is final (+140 s); a later packet of its flow is held, so it is not last.
    assert summary(flows.release(T0 + 140 * S)) == [(20 * S, 20 * S, 1, IDLE_TIMEOUT, False)]
    assert flows.next_due() == T0 + 720 * S


def test_the_drain_cuts_off_open_flows_only():
    syn = packet(T0, "10.0.0.9", 40000, "10.0.0.1", 80, flags=TCP_SYN)
    fin_a = packet(T0 + S, "10.0.0.9", 40000, "10.0.0.1", 80, flags=TCP_FIN | TCP_ACK)
    fin_b = packet(T0 + 2 * S, "10.0.0.1", 80, "10.0.0.9", 40000, flags=TCP_FIN | TCP_ACK)
    flows = OpenFlows(IDLE, ACTIVE)
    # UDP: a row closed by a gap in the data, then an open row; TCP: ended by FIN.
    flows.add([udp(T0), udp(T0 + 300 * S), syn, fin_a, fin_b])
    released = shard(flows).release(None)
    assert sorted((r.row.fragment.first_us - T0, r.cut_off().status) for r in released) == [
        (0, END_OF_FLOW), (0, IDLE_TIMEOUT), (300 * S, FORCED_END)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_watermark_steps_give_the_rows_of_one_batch_run(seed):
    rng = random.Random(seed)
    fragments = [udp(T0 + rng.randrange(0, 3000) * S, sport=rng.randrange(5))
                 for _ in range(200)]
    expected = sorted(
        (row.fragment, row.status) for sport in range(5)
        for row in advance([f for f in fragments if f.key[5] == sport], IDLE, ACTIVE, None)[0])
    flows, released = OpenFlows(IDLE, ACTIVE), []
    for step in range(0, 3200, 50):  # each step: what starts in it, shuffled, then release
        arriving = [f for f in fragments if step * S <= f.first_us - T0 < (step + 50) * S]
        rng.shuffle(arriving)
        assert flows.add(arriving) == 0
        flows = shard(flows)
        released += flows.release(T0 + (step + 50) * S)
    released += flows.release(None)
    assert sorted((r.row.fragment, r.row.status) for r in released) == expected
