"""The batch merge's shortcuts give exactly what the per-key, per-row functions give: the
rows of ``advance_all`` are ``advance``'s key by key, ``to_flow_records`` is
``to_flow_record`` row by row, and the timestamps and ids are those of their definitions."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta

from flowbeam.flows.engine import advance, advance_all
from flowbeam.flows.fragment import merge
from flowbeam.flows.protocols import TCP_ACK, TCP_FIN, TCP_SYN
from flowbeam.flows.records import timestamp, timestamps, to_flow_record, to_flow_records
from flowbeam.flows.schema import FLOW_COLUMN_NAMES
from tests.fragment_builders import S, packet

IDLE = 120 * S
ACTIVE = 1800 * S
T0 = 1_700_000_000 * S


def mixed_fragments(seed: int = 7) -> list:
    """Fragments of many keys in arrival order: one-fragment keys, keys with several (idle,
    active and TCP end-of-flow cuts), scopes, VLANs, IPv6, ICMP, attributes, open flows."""
    rng = random.Random(seed)
    hosts = ["10.0.0.1", "10.0.0.9", "192.168.1.20", "2001:db8::1", "2001:db8::ff"]
    fragments = []
    for _ in range(400):
        v6 = rng.random() < 0.3
        src, dst = rng.sample(hosts[3:] if v6 else hosts[:3], 2)
        protocol = rng.choice([6, 17, 58 if v6 else 1, 47])
        sport, dport = (128, 0) if protocol in (1, 58) else (rng.randrange(1, 5), 80)
        if protocol == 1:
            sport = 8
        flags = rng.choice([0, TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK])
        fragment = packet(T0 + rng.randrange(0, 4000) * S, src, sport, dst, dport,
                          protocol=protocol, flags=flags if protocol == 6 else 0,
                          vlan_id=rng.choice([-1, -1, 7]), scope=rng.choice(["", "", "s-é%'"]),
                          size=rng.randrange(40, 1500))
        if rng.random() < 0.1:
            fragment = fragment._replace(open_at_end=True)
        if rng.random() < 0.1:
            fragment = fragment._replace(attributes=(("action", "ACCEPT"), ("vpc_id", "v")))
        fragments.append(fragment)
    fragments.append(fragments[0])  # the same fragment object twice counts twice, as before
    return fragments


def per_key_rows(fragments: list) -> list:
    by_key: dict = {}
    for fragment in fragments:
        by_key.setdefault(fragment.key, []).append(fragment)
    return [row for group in by_key.values() for row in advance(group, IDLE, ACTIVE, None)[0]]


def test_advance_all_gives_advance_key_by_key_in_order_of_first_appearance():
    fragments = mixed_fragments()
    rows = advance_all(fragments, IDLE, ACTIVE)
    assert rows == per_key_rows(fragments)
    assert len({r.fragment.key for r in rows}) < len(rows)  # some keys gave several rows
    assert all(type(row) is type(expected) for row, expected in zip(
        rows, per_key_rows(fragments), strict=True))


def test_to_flow_records_gives_to_flow_record_row_by_row():
    rows = per_key_rows(mixed_fragments(11))
    expected = [to_flow_record(row, "vpc_flow_logs") for row in rows]
    got = list(to_flow_records(rows, "vpc_flow_logs"))
    assert repr(got) == repr(expected)
    assert all(list(record) == list(FLOW_COLUMN_NAMES) for record in got)


def test_timestamps_are_exact_over_the_whole_datetime_range():
    rng = random.Random(3)
    smallest = (datetime(1, 1, 1, tzinfo=UTC) - timestamp(0)) // timedelta(microseconds=1)
    largest = (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
               - timestamp(0)) // timedelta(microseconds=1)
    values = [0, -1, 1, smallest, largest, 951_782_400 * S - 1, 951_868_800 * S, T0 + 999_999]
    values += [rng.randrange(smallest, largest + 1) for _ in range(20_000)]
    for value, converted in zip(values, timestamps(values), strict=True):
        assert converted == timestamp(value) and converted.tzinfo is UTC


def test_the_id_is_the_hash_of_the_ascii_of_source_key_and_first_seen():
    for scope in ["", "sensor-a", "é'\"%s\\"]:
        fragment = packet(T0 - 7, "2001:db8::1", 5, "10.0.0.1", 6, vlan_id=4095, scope=scope)
        hashed = fragment.key if scope else fragment.key[:-1]
        for source in ["pcap", "100%'é"]:
            [row] = advance([fragment], IDLE, ACTIVE, None)[0]
            text = ascii((source, hashed, T0 - 7)).encode("ascii")
            expected = hashlib.blake2b(text, digest_size=16).hexdigest()
            assert to_flow_record(row, source)["id"] == expected
            assert next(to_flow_records([row], source))["id"] == expected


def test_a_merged_flow_and_its_packets_give_the_same_record_in_a_batch():
    packets = [packet(T0, "10.0.0.9", 4, "10.0.0.1", 80, flags=TCP_SYN),
               packet(T0 + 5, "10.0.0.1", 80, "10.0.0.9", 4, flags=TCP_SYN | TCP_ACK)]
    assert (list(to_flow_records(advance_all([merge(packets)], IDLE, ACTIVE), "pcap"))
            == list(to_flow_records(advance_all(packets, IDLE, ACTIVE), "pcap")))
