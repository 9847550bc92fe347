"""VPC records as fragments and flow rows, per-subnet traffic and denial rows, on AWS's
documented examples. Expected rows are reasoned out from the lines in each test."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from flowbeam.flows.engine import END_OF_FLOW, IDLE_TIMEOUT, advance
from flowbeam.flows.fragment import merge
from flowbeam.flows.records import to_flow_record
from flowbeam.vpc.aggregates import (
    INBOUND,
    OUTBOUND,
    TrafficCounts,
    TrafficKey,
    add_counts,
    denial_row,
    record_digest,
    traffic_keys,
    traffic_row,
)
from flowbeam.vpc.fields import parse_format
from flowbeam.vpc.fragments import to_fragment
from flowbeam.vpc.records import parse_record
from flowbeam.vpc.subnets import Subnet, SubnetMatcher
from tests.test_vpc_records import doc_lines

IDLE, ACTIVE = 120_000_000, 1_800_000_000
TCP_FLAG_FORMAT = parse_format(
    "version vpc-id subnet-id instance-id interface-id account-id type srcaddr dstaddr srcport "
    "dstport pkt-srcaddr pkt-dstaddr protocol bytes packets start end action tcp-flags "
    "log-status")
TRAFFIC_PATH_FORMAT = parse_format(
    "version srcaddr dstaddr srcport dstport protocol start end type packets bytes account-id "
    "vpc-id subnet-id instance-id interface-id region az-id sublocation-type sublocation-id "
    "action tcp-flags pkt-srcaddr pkt-dstaddr pkt-src-aws-service pkt-dst-aws-service "
    "traffic-path flow-direction log-status")


def rows(records):
    """The flow rows of ``records`` at the end of the input (``advance`` per flow key)."""
    by_key = defaultdict(list)
    for record in records:
        fragment = to_fragment(record)
        by_key[fragment.key].append(fragment)
    found = []
    for fragments in by_key.values():
        emitted, kept, _, _ = advance(fragments, IDLE, ACTIVE, None)
        assert kept == []
        found += [to_flow_record(row, "vpc_flow_logs") for row in emitted]
    return found


def utc(seconds):
    return datetime.fromtimestamp(seconds, UTC)


def summary(row):
    return (row["src_addr"], row["src_port"], row["dst_addr"], row["dst_port"],
            row["src_packets"], row["src_bytes"], row["dst_packets"], row["dst_bytes"],
            row["src_tcp_flags"], row["dst_tcp_flags"], row["status"])


def test_syn_and_syn_ack_records_make_one_row_from_the_client():
    syn, syn_ack = (parse_record(line, TCP_FLAG_FORMAT)
                    for line in doc_lines("3 vpc-abcdefab012345678")[:2])
    [row] = rows([syn_ack, syn])
    # 52.213.180.42:43416 sent SYN (2), 8 packets / 568 bytes; the server SYN-ACK (18), 7/376.
    assert summary(row) == ("52.213.180.42", 43416, "10.0.0.62", 5001, 8, 568, 7, 376, 2, 18,
                            IDLE_TIMEOUT)
    assert (row["first_seen_at"], row["last_seen_at"]) == (utc(1566848875), utc(1566848933))
    assert (row["source"], row["sensor"], row["action"], row["account_id"], row["vpc_id"],
            row["subnet_id"], row["instance_id"], row["flow_direction"]) == (
        "vpc_flow_logs", "eni-1235b8ca123456789", "ACCEPT", "123456789010",
        "vpc-abcdefab012345678", "subnet-aaaaaaaa012345678", "i-01234567890123456", None)
    assert (row["protocol"], row["ip_version"], row["vlan_id"]) == ("tcp", 4, None)


def test_a_syn_ack_alone_still_names_the_client_as_initiator():
    syn_ack = parse_record(doc_lines("3 vpc-abcdefab012345678")[1], TCP_FLAG_FORMAT)
    [row] = rows([syn_ack])
    assert summary(row) == ("52.213.180.42", 43416, "10.0.0.62", 5001, 0, 0, 7, 376, 0, 18,
                            IDLE_TIMEOUT)


def test_a_connection_over_two_intervals_ends_with_both_fins():
    lines = doc_lines("3 vpc-abcdefab012345678")
    # Port 43418: SYN (70 packets, 100701 bytes) / SYN-ACK (12, 632) in the first interval,
    # FIN from both sides in the second (client 15774 / 23294588, server 1219 / 63388).
    records = [parse_record(line, TCP_FLAG_FORMAT) for line in lines[2:6]]
    [row] = rows(records)
    assert summary(row) == ("52.213.180.42", 43418, "10.0.0.62", 5001, 70 + 15774,
                            100701 + 23294588, 12 + 1219, 632 + 63388, 2 | 1, 18 | 1,
                            END_OF_FLOW)
    assert (row["first_seen_at"], row["last_seen_at"]) == (utc(1566848875), utc(1566849113))


def test_flow_direction_is_the_initiators_and_interfaces_stay_apart():
    ingress, egress = (parse_record(line, TRAFFIC_PATH_FORMAT) for line in doc_lines("5 "))
    # The instance 10.0.0.71 opened (SYN+FIN = 3, egress) to S3, which answered SYN-ACK+FIN.
    [row] = rows([ingress, egress])
    assert summary(row) == ("10.0.0.71", 34210, "52.95.128.179", 80, 7, 471, 14, 15044, 3, 19,
                            END_OF_FLOW)
    assert (row["flow_direction"], row["instance_id"], row["account_id"]) == (
        "egress", "i-0c50d5961bcb2d47b", "123456789012")
    # The same conversation logged by a second interface is a second row, counted apart.
    other = [r.__class__(**{**r.__dict__, "interface_id": "eni-2"}) for r in (ingress, egress)]
    both = rows([ingress, egress, *other])
    assert sorted((r["sensor"], r["src_bytes"], r["dst_bytes"]) for r in both) == [
        ("eni-1235b8ca123456789", 471, 15044), ("eni-2", 471, 15044)]


def test_a_flow_rejected_one_way_is_rejected():
    request, reply = (parse_record(line) for line in doc_lines("2 123456789010 eni-1235b8ca1234"
                                                                "56789 ")[3:5])
    assert (request.action, reply.action) == ("ACCEPT", "REJECT")
    [row] = rows([reply, request])
    # ICMP (ports 0): the ping from 203.0.113.12 started first (1432917027 < 1432917094).
    assert summary(row) == ("203.0.113.12", 0, "172.31.16.139", 0, 4, 336, 4, 336, None, None,
                            IDLE_TIMEOUT)
    assert (row["action"], row["protocol"]) == ("REJECT", "icmp")
    assert (row["first_seen_at"], row["last_seen_at"]) == (utc(1432917027), utc(1432917142))


def test_merged_direction_comes_from_the_fragment_that_decided_the_initiator():
    line = ("5 {src} {dst} 6 {start} 200 IPv4 1 60 1 - - - eni-1 - - - - {action} {flags} - - "
            "- - - {direction} OK")
    # The reply (no flags) is logged from 100 s, the client's SYN only from 150 s: the SYN
    # decides the initiator, so its direction is the row's; one REJECT makes the row's action.
    late_syn = to_fragment(parse_record(line.format(
        src="10.0.0.1 10.0.0.2 40000", dst="80", start=150, action="ACCEPT", flags=2,
        direction="egress"), TRAFFIC_PATH_FORMAT))
    early_reply = to_fragment(parse_record(line.format(
        src="10.0.0.2 10.0.0.1 80", dst="40000", start=100, action="REJECT", flags=0,
        direction="ingress"), TRAFFIC_PATH_FORMAT))
    merged = dict(merge([early_reply, late_syn]).attributes)
    assert merged == {"account_id": "1", "action": "REJECT", "flow_direction": "egress"}
    # Without a SYN the earliest fragment decides: the reply's sender, whose traffic entered.
    plain = to_fragment(parse_record(line.format(
        src="10.0.0.1 10.0.0.2 40000", dst="80", start=150, action="ACCEPT", flags=0,
        direction="egress"), TRAFFIC_PATH_FORMAT))
    assert dict(merge([plain, early_reply]).attributes)["flow_direction"] == "ingress"


MATCHER = SubnetMatcher([
    Subnet("subnet-a", "app", "vpc-1", ("172.31.16.0/20",)),
    Subnet("subnet-b", "db", "vpc-1", ("172.31.16.128/25", "2001:db8:1234:a102::/64")),
])


def test_traffic_keys_per_known_side():
    request, reply = (parse_record(line) for line in doc_lines("2 123456789010 eni-1235b8ca1234"
                                                                "56789 ")[3:5])
    # 203.0.113.12 is in no subnet; 172.31.16.139 is in both: the /25 (subnet-b) wins.
    minute = 1432917027 // 60 * 60
    assert traffic_keys(request, MATCHER) == [
        (TrafficKey(minute, "subnet-b", "db", "vpc-1", INBOUND, "ACCEPT"),
         TrafficCounts(1, 4, 336, record_digest(request)))]
    assert traffic_keys(reply, MATCHER) == [
        (TrafficKey(1432917094 // 60 * 60, "subnet-b", "db", "vpc-1", OUTBOUND, "REJECT"),
         TrafficCounts(1, 4, 336, record_digest(reply)))]
    inside = parse_record("2 1 eni-1 172.31.16.5 172.31.17.9 1 2 6 3 400 1432917030 "
                          "1432917090 ACCEPT OK")
    assert [(k.subnet, k.direction) for k, _ in traffic_keys(inside, MATCHER)] == [
        ("subnet-a", OUTBOUND), ("subnet-a", INBOUND)]
    # Digests add modulo 2**63, so any order of records sums to the same one.
    assert add_counts([TrafficCounts(1, 4, 336, 2 ** 63 - 1), TrafficCounts(2, 3, 100, 5)]) == (
        3, 7, 436, 4)
    key = TrafficKey(minute, "subnet-b", "db", "vpc-1", INBOUND, "ACCEPT")
    row = traffic_row(key, TrafficCounts(3, 7, 436, 4))
    assert {k: v for k, v in row.items() if k != "id"} == {
        "minute": utc(1432917000), "subnet": "subnet-b", "subnet_name": "db",
        "vpc_id": "vpc-1", "direction": INBOUND, "action": "ACCEPT", "flows": 3, "packets": 7,
        "bytes": 436}
    # The id is the key's and the records': the same records again (a re-run) give the same
    # id; other records of the same key (a later back-fill) another one, added up by SUM.
    assert row["id"] == traffic_row(key, TrafficCounts(9, 9, 9, 4))["id"]
    assert row["id"] != traffic_row(key, TrafficCounts(3, 7, 436, 5))["id"]
    assert len({record_digest(record) for record in (request, reply, inside)}) == 3


def test_denial_row_of_a_reject_record():
    reject = parse_record(doc_lines("2 123456789010 eni-1235b8ca123456789 172.31.9.69")[0])
    assert {k: v for k, v in denial_row(reject, MATCHER).items() if k != "id"} == {
        "start_at": utc(1418530010), "end_at": utc(1418530070),
        "interface_id": "eni-1235b8ca123456789", "account_id": "123456789010", "vpc_id": None,
        "subnet_id": None, "instance_id": None, "protocol": "tcp", "ip_protocol": 6,
        "src_addr": "172.31.9.69", "dst_addr": "172.31.9.12", "src_port": 49761,
        "dst_port": 3389, "src_subnet": None, "dst_subnet": None, "packets": 20, "bytes": 4249,
        "tcp_flags": None, "flow_direction": None, "reject_reason": None}


def test_an_ipv6_record_is_a_flow_and_matches_an_ipv6_subnet():
    [line] = doc_lines("2 123456789010 eni-1235b8ca123456789 2001:")
    record = parse_record(line)
    [row] = rows([record])
    assert summary(row) == ("2001:db8:1234:a100:8d6e:3477:df66:f105", 34892,
                            "2001:db8:1234:a102:3304:8879:34cf:4071", 22, 54, 8855, 0, 0, None,
                            None, IDLE_TIMEOUT)  # TCP, but a v2 log has no tcp-flags: NULL
    assert (row["ip_version"], row["first_seen_at"], row["last_seen_at"]) == (
        6, utc(1477913708), utc(1477913820))
    # 2001:db8:1234:a102::/64 is subnet-b's second block.
    assert traffic_keys(record, MATCHER) == [
        (TrafficKey(1477913708 // 60 * 60, "subnet-b", "db", "vpc-1", INBOUND, "ACCEPT"),
         TrafficCounts(1, 54, 8855, record_digest(record)))]
