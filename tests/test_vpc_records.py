"""VPC Flow Logs records: formats and lines, on the real samples in ../shared/data/vpc.

Expected values are read off the sample lines by hand (AWS's field order is in each test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowbeam.vpc.fields import DEFAULT_FORMAT, FIELDS, FormatError, is_header, parse_format
from flowbeam.vpc.records import LineReader, RecordError, VpcRecord, parse_record

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vpc"
# Every field of versions 2 to 8 in version order: the format of the v5 and v8 samples
# (Elastic's test configuration logs them so; the v5 sample is its first 29 fields).
ALL_FIELDS = " ".join(f"${{{f.name}}}" for f in FIELDS)


def sample_lines(name: str) -> list[str]:
    return (SAMPLES / name).read_text().splitlines()


def doc_lines(prefix: str) -> list[str]:
    """The record lines of AWS's documented examples that start with ``prefix``."""
    return [line for line in sample_lines("awsdocs__flow-logs-records-examples.md")
            if line.startswith(prefix)]


def test_the_catalogue_has_every_field_of_versions_2_to_8():
    assert DEFAULT_FORMAT == (
        "version", "account-id", "interface-id", "srcaddr", "dstaddr", "srcport", "dstport",
        "protocol", "packets", "bytes", "start", "end", "action", "log-status")
    by_version = {}
    for field in FIELDS:
        by_version.setdefault(field.version, []).append(field.name)
    assert by_version[3] == ["vpc-id", "subnet-id", "instance-id", "tcp-flags", "type",
                             "pkt-srcaddr", "pkt-dstaddr"]
    assert by_version[4] == ["region", "az-id", "sublocation-type", "sublocation-id"]
    assert by_version[5] == ["pkt-src-aws-service", "pkt-dst-aws-service", "flow-direction",
                             "traffic-path"]
    assert len(by_version[7]) == 10 and all(n.startswith("ecs-") for n in by_version[7])
    assert by_version[8] == ["reject-reason"]


def test_formats_as_aws_takes_them_and_as_headers_write_them():
    assert parse_format("${version} ${srcaddr}  ${dstaddr}") == ("version", "srcaddr", "dstaddr")
    assert parse_format("version srcaddr dstaddr") == ("version", "srcaddr", "dstaddr")
    with pytest.raises(FormatError, match=r"^unknown field\(s\) in the log format: src-addr$"):
        parse_format("${version} ${src-addr}")
    with pytest.raises(FormatError, match=r"^field\(s\) named twice in the log format: srcaddr$"):
        parse_format("srcaddr dstaddr srcaddr")
    with pytest.raises(FormatError, match=r"^the log format names no field$"):
        parse_format("  ")
    assert is_header(["version", "vpc-id", "subnet-id"])
    assert not is_header(["2", "123456789010", "eni-1235b8ca123456789"])
    assert not is_header(["-", "eni-1235b8ca123456789", "10.0.1.5"])


def test_default_format_accept_reject_and_ipv6():
    accept, reject = doc_lines("2 123456789010 eni-1235b8ca123456789 172.31.")[:2]
    assert parse_record(accept) == VpcRecord(
        version=2, account_id="123456789010", interface_id="eni-1235b8ca123456789",
        srcaddr="172.31.16.139", dstaddr="172.31.16.21", srcport=20641, dstport=22,
        protocol=6, packets=20, bytes=4249, start=1418530010, end=1418530070,
        action="ACCEPT", log_status="OK")
    assert parse_record(reject).action == "REJECT" and parse_record(reject).dstport == 3389
    [ipv6] = [line for line in sample_lines("elastic-integrations__test-extra-samples.log")
              if "2001:db8" in line]
    record = parse_record(ipv6)
    assert (record.srcaddr, record.dstaddr) == ("2001:db8:1234:a100:8d6e:3477:df66:f105",
                                                "2001:db8:1234:a102:3304:8879:34cf:4071")
    assert (record.srcport, record.dstport, record.protocol, record.packets, record.bytes) == (
        34892, 22, 6, 54, 8855)
    assert record.is_flow and not record.is_denied


def test_nodata_and_skipdata_are_records_but_not_flows():
    nodata, skipdata = sample_lines("elastic-integrations__test-extra-samples.log")[1:3]
    record = parse_record(nodata)
    assert record == VpcRecord(version=2, account_id="123456789010",
                               interface_id="eni-1235b8ca123456789", start=1431280876,
                               end=1431280934, log_status="NODATA")
    assert not record.is_flow and not record.is_denied
    record = parse_record(skipdata)
    assert (record.interface_id, record.log_status, record.is_flow) == (
        "eni-11111111aaaaaaaaa", "SKIPDATA", False)


def test_v3_custom_format_from_the_header_with_tcp_flags():
    reader = LineReader()
    lines = sample_lines("elastic-beats__tcp-flag-sequence-skip-data.log")
    assert reader.read(lines[0]) is None  # the header
    skipdata = reader.read(lines[1])
    assert (skipdata.version, skipdata.vpc_id, skipdata.subnet_id, skipdata.instance_id,
            skipdata.account_id, skipdata.srcaddr, skipdata.start, skipdata.end,
            skipdata.log_status) == (3, "vpc-abcdefab012345678", "subnet-aaaaaaaa012345678",
                                     "i-01234567890123456", "123456789010", None, 1566848875,
                                     1566848933, "SKIPDATA")
    assert reader.read(lines[2]) is None  # blank line between the two concatenated files
    assert reader.read(lines[3]) is None  # the second header
    assert reader.read(lines[4]).log_status == "NODATA"
    # AWS's TCP flag sequence, same format: a client's SYN (2), the server's SYN-ACK (18).
    syn, syn_ack = (parse_record(line, reader.names)
                    for line in doc_lines("3 vpc-abcdefab012345678")[:2])
    assert (syn.srcaddr, syn.srcport, syn.dstaddr, syn.dstport, syn.pkt_srcaddr,
            syn.pkt_dstaddr, syn.protocol, syn.bytes, syn.packets, syn.tcp_flags,
            syn.type) == ("52.213.180.42", 43416, "10.0.0.62", 5001, "52.213.180.42",
                          "10.0.0.62", 6, 568, 8, 2, "IPv4")
    assert (syn_ack.srcaddr, syn_ack.bytes, syn_ack.packets, syn_ack.tcp_flags) == (
        "10.0.0.62", 376, 7, 18)


def test_v5_record_with_every_field_up_to_version_5():
    [line] = sample_lines("elastic-integrations__test-v5-all-fields.log")
    names = parse_format(ALL_FIELDS)[:29]
    assert names[-1] == "traffic-path"
    assert parse_record(line, names) == VpcRecord(
        version=5, account_id="64111117617", interface_id="eni-069xxxxxb7a490",
        srcaddr="89.160.20.156", dstaddr="10.200.0.0", srcport=50041, dstport=33004,
        protocol=17, packets=52, bytes=1, start=164000066, end=1640000297, action="REJECT",
        log_status="OK", vpc_id="vpc-09676f97xxxxxb8a7", subnet_id="subnet-02d645xxxxxxxdbc0",
        instance_id="i-0axxxxxx1ad77", tcp_flags=1, type="IPv4", pkt_srcaddr="89.160.20.156",
        pkt_dstaddr="10.200.0.80", region="us-east-1", az_id="use1-az5",
        pkt_src_aws_service="AMAZON", pkt_dst_aws_service="CLOUDFRONT",
        flow_direction="ingress", traffic_path=1)


def test_v8_record_with_ecs_fields_and_reject_reason():
    [line] = sample_lines("elastic-integrations__test-v8-samples.log")
    record = parse_record(line, parse_format(ALL_FIELDS))
    assert (record.version, record.account_id, record.interface_id) == (3, "000000000000", None)
    assert (record.srcaddr, record.dstaddr, record.srcport, record.dstport) == (
        "2a02:cf40::", "1.128.0.0", 42910, 80)
    assert (record.protocol, record.packets, record.bytes, record.start, record.end) == (
        17, 51, 33615, 1755678754, 1755678775)
    assert (record.action, record.log_status, record.flow_direction, record.traffic_path) == (
        "REJECT", "NODATA", "ingress", None)
    assert record.ecs_cluster_arn == "arn:aws:ecs:us-east-1:000000000000:cluster/backend-cluster"
    assert (record.ecs_cluster_name, record.ecs_container_instance_id, record.ecs_container_id,
            record.ecs_second_container_id, record.ecs_service_name, record.ecs_task_id) == (
        "backend-cluster", "i-18de3682c033431da", "601a6500-efa", "dea79277-480",
        "payments-service", "e504f037-35c")
    assert record.ecs_task_definition_arn.endswith("task-definition/orders:12")
    assert record.ecs_task_arn.endswith("task/backend-cluster/e504f037-35c")
    assert record.reject_reason == "BPA"
    # A NODATA record (this synthetic one mixes address families): counted, never a flow.
    assert not record.is_flow and not record.is_denied


def test_custom_format_without_times_cannot_be_a_flow():
    reader = LineReader()
    header, nat, _ = sample_lines("elastic-beats__custom-nat-gateway.log")
    assert reader.read(header) is None
    with pytest.raises(RecordError) as error:
        reader.read(nat)
    assert error.value.reason == (
        "no protocol, start, end, packets, bytes: a record without them cannot be a flow")


@pytest.mark.parametrize(("line", "reason"), [
    ("2 1 eni-1 10.0.0.1 10.0.0.2 1 2 6 3 4 5", "11 values for a format of 14 fields"),
    ("2 1 eni-1 10.0.0.1 10.0.0.2 x 2 6 3 4 5 6 ACCEPT OK", "srcport is not a number: 'x'"),
    ("2 1 eni-1 10.0.0.1 10.0.0.2 -1 2 6 3 4 5 6 ACCEPT OK", "srcport is not a number: '-1'"),
    ("2 1 eni-1 10.0.0.1 10.0.0.2 1 70000 6 3 4 5 6 ACCEPT OK",
     "dstport 70000 is out of range (at most 65535)"),
    ("2 1 eni-1 10.0.0.300 10.0.0.2 1 2 6 3 4 5 6 ACCEPT OK",
     "srcaddr is not an IP address: '10.0.0.300'"),
    ("2 1 eni-1 10.0.0.1 ::1 1 2 6 3 4 5 6 ACCEPT OK",
     "srcaddr 10.0.0.1 and dstaddr ::1 are of different IP versions"),
    ("2 1 eni-1 10.0.0.1 10.0.0.2 1 2 6 3 4 9 6 ACCEPT OK", "start 9 is after end 6"),
    ("2 1 eni-1 10.0.0.1 10.0.0.2 1 2 6 3 4 5 6 ALLOW OK", "unknown action 'ALLOW'"),
    ("2 1 eni-1 10.0.0.1 10.0.0.2 1 2 6 3 4 5 6 ACCEPT FINE", "unknown log-status 'FINE'"),
])
def test_malformed_lines_say_why(line, reason):
    with pytest.raises(RecordError) as error:
        parse_record(line)
    assert error.value.reason == reason


def test_addresses_are_canonical_text():
    record = parse_record("2 1 eni-1 2001:DB8:0:0::1 2001:db8::0002 1 2 6 3 4 5 6 ACCEPT OK")
    assert (record.srcaddr, record.dstaddr) == ("2001:db8::1", "2001:db8::2")
