"""The flow rules, on fragments built by hand: expected rows are reasoned out in each test."""

from __future__ import annotations

import random

import communityid

from flowbeam.flows.community_id import community_id
from flowbeam.flows.engine import ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT, advance
from flowbeam.flows.fragment import SIDE_A, SIDE_B, merge
from flowbeam.flows.protocols import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from flowbeam.flows.records import to_flow_record
from tests.fragment_builders import S, packet

IDLE = 120 * S
ACTIVE = 1800 * S
T0 = 1_700_000_000 * S
CLIENT, SERVER = "10.0.0.9", "10.0.0.1"  # the client's address sorts after the server's


def rows_of(fragments, now_us=None, idle=IDLE, active=ACTIVE):
    rows, kept, continuation, due = advance(fragments, idle, active, now_us)
    return [to_flow_record(row, "pcap") for row in rows], kept, continuation, due


def handshake(t, sport=40000):
    return [
        packet(t, CLIENT, sport, SERVER, 80, flags=TCP_SYN, size=60),
        packet(t + 1000, SERVER, 80, CLIENT, sport, flags=TCP_SYN | TCP_ACK, size=60),
        packet(t + 2000, CLIENT, sport, SERVER, 80, flags=TCP_ACK, size=52),
    ]


def closing(t, sport=40000):
    return [
        packet(t, CLIENT, sport, SERVER, 80, flags=TCP_FIN | TCP_ACK, size=52),
        packet(t + 1000, SERVER, 80, CLIENT, sport, flags=TCP_FIN | TCP_ACK, size=52),
        packet(t + 2000, CLIENT, sport, SERVER, 80, flags=TCP_ACK, size=52),
    ]


def test_tcp_conversation_is_one_row_oriented_from_the_syn_sender():
    rows, kept, _, _ = rows_of(handshake(T0) + closing(T0 + 5 * S))
    assert kept == []
    [row] = rows
    assert (row["src_addr"], row["src_port"], row["dst_addr"], row["dst_port"]) == (
        CLIENT, 40000, SERVER, 80)
    assert (row["src_packets"], row["src_bytes"], row["dst_packets"], row["dst_bytes"]) == (
        4, 60 + 52 + 52 + 52, 2, 60 + 52)
    assert row["src_tcp_flags"] == TCP_SYN | TCP_ACK | TCP_FIN
    assert row["dst_tcp_flags"] == TCP_SYN | TCP_ACK | TCP_FIN
    assert row["status"] == END_OF_FLOW
    assert row["first_seen_at"].timestamp() == T0 / S
    assert (row["last_seen_at"] - row["first_seen_at"]).total_seconds() == 5.002
    assert row["protocol"] == "tcp" and row["ip_protocol"] == 6 and row["ip_version"] == 4
    assert row["vlan_id"] is None


def test_direction_is_the_syn_sender_even_when_the_responder_is_seen_first():
    # The capture starts with a stray packet of the server, then the client's SYN.
    fragments = [packet(T0, SERVER, 80, CLIENT, 40000, flags=TCP_ACK)] + handshake(T0 + S)
    [row], *_ = rows_of(fragments)
    assert row["src_addr"] == CLIENT
    assert row["first_seen_at"].timestamp() == T0 / S


def test_without_syn_the_sender_of_the_earliest_packet_initiates():
    fragments = [
        packet(T0 + 10, SERVER, 53, CLIENT, 5353, protocol=17),
        packet(T0, CLIENT, 5353, SERVER, 53, protocol=17),
    ]
    [row], *_ = rows_of(fragments)
    assert (row["src_addr"], row["src_port"], row["src_packets"], row["dst_packets"]) == (
        CLIENT, 5353, 1, 1)
    assert row["src_tcp_flags"] is None and row["protocol"] == "udp"
    assert row["status"] == IDLE_TIMEOUT


def test_a_gap_of_exactly_the_idle_timeout_starts_a_new_flow():
    udp = {"protocol": 17}
    just_inside = [packet(T0, CLIENT, 1, SERVER, 2, **udp),
                   packet(T0 + IDLE - 1, CLIENT, 1, SERVER, 2, **udp)]
    at_timeout = [packet(T0, CLIENT, 1, SERVER, 2, **udp),
                  packet(T0 + IDLE, CLIENT, 1, SERVER, 2, **udp)]
    assert len(rows_of(just_inside)[0]) == 1
    first, second = rows_of(at_timeout)[0]
    assert first["status"] == IDLE_TIMEOUT and first["src_packets"] == 1
    assert second["first_seen_at"].timestamp() == (T0 + IDLE) / S
    assert first["id"] != second["id"]


def test_port_reuse_after_fin_starts_a_new_flow_but_late_acks_stay():
    fragments = handshake(T0) + closing(T0 + S) + handshake(T0 + 3 * S)
    first, second = rows_of(fragments)[0]
    assert first["status"] == END_OF_FLOW
    assert first["src_packets"] + first["dst_packets"] == 6
    assert second["first_seen_at"].timestamp() == (T0 + 3 * S) / S
    assert second["src_packets"] + second["dst_packets"] == 3


def test_rst_ends_the_flow_and_a_syn_retransmission_does_not():
    retransmitted = [packet(T0, CLIENT, 4, SERVER, 80, flags=TCP_SYN),
                     packet(T0 + S, CLIENT, 4, SERVER, 80, flags=TCP_SYN)]
    [row], *_ = rows_of(retransmitted)
    assert row["src_packets"] == 2 and row["status"] == IDLE_TIMEOUT
    reset = retransmitted + [packet(T0 + 2 * S, SERVER, 80, CLIENT, 4, flags=TCP_RST | TCP_ACK),
                             packet(T0 + 3 * S, CLIENT, 4, SERVER, 80, flags=TCP_SYN)]
    first, second = rows_of(reset)[0]
    assert (first["status"], first["src_packets"], first["dst_packets"]) == (END_OF_FLOW, 2, 1)
    assert (second["status"], second["src_packets"]) == (IDLE_TIMEOUT, 1)


def test_active_timeout_rows_count_their_own_interval_and_keep_direction():
    active = 10 * S
    # One packet per second for 25 s, the server always answering after the client.
    fragments = []
    for second in range(25):
        fragments.append(packet(T0 + second * S, CLIENT, 9, SERVER, 7, protocol=17, size=10))
        fragments.append(packet(T0 + second * S + 5, SERVER, 7, CLIENT, 9, protocol=17, size=20))
    rows = rows_of(fragments, active=active)[0]
    assert [r["status"] for r in rows] == [ACTIVE_TIMEOUT, ACTIVE_TIMEOUT, IDLE_TIMEOUT]
    assert [r["src_packets"] for r in rows] == [10, 10, 5]
    assert [r["dst_bytes"] for r in rows] == [200, 200, 100]
    assert all(r["src_addr"] == CLIENT for r in rows)
    assert sum(r["src_bytes"] for r in rows) == 25 * 10  # summing rows never double counts


def test_forced_end_when_the_input_ended_while_the_flow_was_active():
    open_fragment = packet(T0, CLIENT, 1, SERVER, 2, protocol=17)._replace(open_at_end=True)
    [row], *_ = rows_of([open_fragment])
    assert row["status"] == FORCED_END


def test_rows_do_not_depend_on_the_order_of_fragments():
    rng = random.Random(7)
    fragments = handshake(T0) + closing(T0 + S) + handshake(T0 + 3 * S)
    fragments += [packet(T0 + 400 * S + i * S, CLIENT, 40000, SERVER, 80, flags=TCP_ACK)
                  for i in range(5)]
    expected = rows_of(fragments)[0]
    for _ in range(20):
        shuffled = fragments[:]
        rng.shuffle(shuffled)
        # Pre-merge random runs, as a decoder batching packets would.
        assert rows_of(shuffled)[0] == expected
    assert len(expected) == 3


def test_streaming_emits_only_final_rows_and_keeps_the_rest():
    fragments = handshake(T0)
    rows, kept, continuation, due = rows_of(fragments, now_us=T0 + 60 * S)
    assert rows == [] and continuation is None
    assert due == T0 + 2000 + IDLE
    assert len(kept) == 1  # the three settled packets were compacted into one fragment
    assert merge(fragments) == kept[0]
    rows, kept, _, due_after = rows_of(kept, now_us=due)
    assert [r["status"] for r in rows] == [IDLE_TIMEOUT] and kept == [] and due_after is None


def test_streaming_active_rows_come_out_before_the_flow_ends():
    active = 10 * S
    fragments = [packet(T0 + s * S, CLIENT, 9, SERVER, 7, protocol=17) for s in range(15)]
    rows, kept, continuation, due = advance(fragments, IDLE, active, T0 + 12 * S)
    assert [(r.status, r.fragment.a_packets + r.fragment.b_packets) for r in rows] == [
        (ACTIVE_TIMEOUT, 10)]
    assert continuation is not None and continuation.src_side == rows[0].src_side
    assert due == T0 + 14 * S + IDLE  # the open row closes at its idle timeout
    later = [packet(T0 + s * S, CLIENT, 9, SERVER, 7, protocol=17) for s in range(15, 22)]
    rows2, kept2, continuation2, _ = advance(kept + later, IDLE, active, None, continuation)
    assert [(r.status, r.fragment.a_packets + r.fragment.b_packets) for r in rows2] == [
        (ACTIVE_TIMEOUT, 10), (IDLE_TIMEOUT, 2)]
    assert kept2 == [] and continuation2 is None
    # Same rows as the batch computation over all packets at once.
    batch, *_ = advance(fragments + later, IDLE, active, None)
    assert rows + rows2 == batch


def test_icmp_echo_request_and_reply_are_one_flow_with_community_id():
    request = packet(T0, CLIENT, 8, SERVER, 0, protocol=1, size=84)
    reply = packet(T0 + 500, SERVER, 0, CLIENT, 8, protocol=1, size=84)
    [row], *_ = rows_of([request, reply])
    assert (row["src_addr"], row["src_port"], row["dst_port"]) == (CLIENT, 8, 0)
    assert (row["src_packets"], row["dst_packets"], row["protocol"]) == (1, 1, "icmp")
    oracle = communityid.CommunityID().calc(
        communityid.FlowTuple.make_icmp(CLIENT, SERVER, 8, 0))
    assert row["community_id"] == oracle


def test_community_id_matches_the_reference_implementation():
    cid = communityid.CommunityID()
    cases = [
        (6, "128.232.110.120", "66.35.250.204", 34855, 80, communityid.FlowTuple.make_tcp),
        (17, "8.8.8.8", "192.168.1.52", 53, 54585, communityid.FlowTuple.make_udp),
        (132, "192.168.170.8", "192.168.170.56", 7, 80, communityid.FlowTuple.make_sctp),
        (6, "fe80::200:86ff:fe05:80da", "fe80::260:97ff:fe07:69ea", 1, 2,
         communityid.FlowTuple.make_tcp),
    ]
    import ipaddress
    for proto, src, dst, sport, dport, make in cases:
        ours = community_id(proto, ipaddress.ip_address(src).packed,
                            ipaddress.ip_address(dst).packed, sport, dport)
        assert ours == cid.calc(make(src, dst, sport, dport))
    # ICMP time exceeded is one-way: hashed as sent, not reordered.
    src, dst = "192.168.0.89", "10.0.0.1"
    assert community_id(1, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                        11, 0) == cid.calc(communityid.FlowTuple.make_icmp(src, dst, 11, 0))
    # ICMPv6 echo reply pairs with the request (type 129 -> counterpart 128).
    src6, dst6 = "fe80::1", "fe80::2"
    assert community_id(58, ipaddress.ip_address(src6).packed, ipaddress.ip_address(dst6).packed,
                        129, 128) == cid.calc(communityid.FlowTuple.make_icmp6(src6, dst6, 129, 0))
    # Other protocols hash without ports.
    assert community_id(47, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                        0, 0) == cid.calc(communityid.FlowTuple(47, src, dst))


def test_vlan_scopes_the_key():
    a = packet(T0, CLIENT, 1, SERVER, 2, protocol=17, vlan_id=10)
    b = packet(T0 + 1, CLIENT, 1, SERVER, 2, protocol=17, vlan_id=20)
    assert a.key != b.key
    [row], *_ = rows_of([a])
    assert row["vlan_id"] == 10


def test_the_sensor_scopes_the_key_and_fills_its_column():
    seen_by_a = packet(T0, CLIENT, 1, SERVER, 2, protocol=17, scope="sensor-a")
    seen_by_b = packet(T0 + 1, CLIENT, 1, SERVER, 2, protocol=17, scope="sensor-b")
    assert seen_by_a.key[:-1] == seen_by_b.key[:-1] and seen_by_a.key != seen_by_b.key
    [row_a], *_ = rows_of([seen_by_a])
    [row_b], *_ = rows_of([seen_by_b])
    assert (row_a["sensor"], row_b["sensor"]) == ("sensor-a", "sensor-b")
    assert row_a["id"] != row_b["id"]
    [unscoped], *_ = rows_of([packet(T0, CLIENT, 1, SERVER, 2, protocol=17)])
    assert unscoped["sensor"] is None


def test_an_unscoped_row_keeps_the_id_it_had_before_scopes_existed():
    """Re-processing old captures must find the ids already in a user's table: the id of an
    unscoped flow is the blake2b-128 of (source, 9-field key, first_us), as it always was."""
    import hashlib
    import ipaddress
    fragment = packet(T0, CLIENT, 40000, SERVER, 80, protocol=17)
    [row], *_ = rows_of([fragment])
    legacy_key = (4, 17, -1, 0, int(ipaddress.ip_address(SERVER)), 80,
                  0, int(ipaddress.ip_address(CLIENT)), 40000)
    legacy = hashlib.blake2b(repr(("pcap", legacy_key, T0)).encode(), digest_size=16)
    assert row["id"] == legacy.hexdigest()


def test_attributes_become_columns_and_the_earliest_value_wins():
    early = packet(T0, CLIENT, 1, SERVER, 2, protocol=17)._replace(
        attributes=(("sensor", "eni-1"),))
    late = packet(T0 + S, SERVER, 2, CLIENT, 1, protocol=17)._replace(
        attributes=(("sensor", "eni-2"),))
    assert merge([late, early]).attributes == (("sensor", "eni-1"),)
    assert merge([late, packet(T0, CLIENT, 1, SERVER, 2, protocol=17)]).attributes == (
        ("sensor", "eni-2"),)
    [row], *_ = rows_of([late, early])
    assert row["sensor"] == "eni-1"


def test_sides_are_reported_from_the_initiator():
    assert SIDE_A != SIDE_B
    reply_first = [packet(T0, SERVER, 80, CLIENT, 5, protocol=17, size=7),
                   packet(T0 + 1, CLIENT, 5, SERVER, 80, protocol=17, size=3)]
    [row], *_ = rows_of(reply_first)
    assert (row["src_addr"], row["src_bytes"], row["dst_bytes"]) == (SERVER, 7, 3)


def test_a_continuation_is_kept_while_its_next_row_is_not_final():
    active = 10 * S
    fragments = [packet(T0 + s * S, CLIENT, 9, SERVER, 7, protocol=17) for s in range(12)]
    _, kept, continuation, _ = advance(fragments, IDLE, active, T0 + 11 * S)
    assert continuation is not None
    # A later timer fires before the second row is final: nothing out, same continuation.
    rows, kept_again, still, due = advance(kept, IDLE, active, T0 + 12 * S, continuation)
    assert rows == [] and still == continuation and due == T0 + 11 * S + IDLE
    assert sum(f.a_packets + f.b_packets for f in kept_again) == 2


def test_a_flow_seen_in_one_fragment_gets_the_same_row_as_its_packets():
    """A decoder's pre-merged fragment takes the one-fragment shortcut; its packets take the
    general path: same row."""
    packets = handshake(T0) + closing(T0 + S)
    merged = merge(packets)
    assert advance([merged], IDLE, ACTIVE, None) == advance(packets, IDLE, ACTIVE, None)
    [row], *_ = rows_of([merged])
    assert (row["src_addr"], row["status"]) == (CLIENT, END_OF_FLOW)
    cut_off = merge(handshake(T0))._replace(open_at_end=True)
    assert advance([cut_off], IDLE, ACTIVE, None)[0][0].status == FORCED_END
