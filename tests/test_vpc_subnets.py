"""Subnets: longest-prefix matching, the file formats, and EC2 DescribeSubnets against a real
moto server on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import json

import pytest

from flowbeam.vpc.schemas import SUBNET_TRAFFIC
from flowbeam.vpc.subnets import (
    Subnet,
    SubnetMatcher,
    SubnetsError,
    load_subnets,
)
from pipelines.vpc_flows import run
from tests.test_pcap_pipeline import read_flows
from tests.test_vpc_pipeline import read_table
from transforms.vpc_subnets import Ec2Subnets, describe_subnets

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
               "region_name": "us-east-1"}

WIDE = Subnet("subnet-wide", "wide", "vpc-1", ("10.0.0.0/16",))
NARROW = Subnet("subnet-narrow", None, "vpc-1", ("10.0.1.0/28", "2001:db8:1::/64"))


def test_the_longest_prefix_wins_for_ipv4_and_ipv6():
    matcher = SubnetMatcher([WIDE, NARROW])
    assert matcher.match("10.0.1.5") is NARROW
    assert matcher.match("10.0.1.16") is WIDE  # just past the /28
    assert matcher.match("10.0.255.255") is WIDE
    assert matcher.match("10.1.0.0") is None
    assert matcher.match("2001:db8:1::abcd") is NARROW
    assert matcher.match("2001:db8:2::1") is None
    assert matcher.match(None) is None and matcher.match("not an address") is None
    assert SubnetMatcher().match("10.0.1.5") is None


def test_a_block_claimed_twice_goes_to_the_first_label():
    twin = Subnet("subnet-aaa", "other vpc", "vpc-2", ("10.0.0.0/16",))
    assert SubnetMatcher([WIDE, twin]).match("10.0.3.3") is twin


def test_csv_file():
    text = ("cidr,subnet_id,name,vpc_id\n10.0.0.0/16,subnet-wide,wide,vpc-1\n"
            "10.0.1.0/28,subnet-narrow,,vpc-1\n2001:db8:1::/64,subnet-narrow,,vpc-1\n"
            "192.168.7.9/24,,lab,\n")
    assert load_subnets("subnets.csv", text) == [
        WIDE, NARROW, Subnet("192.168.7.0/24", "lab", None, ("192.168.7.0/24",))]
    with pytest.raises(SubnetsError, match=r"^subnets\.csv: the CSV header has no 'cidr' column"):
        load_subnets("subnets.csv", "block,name\n10.0.0.0/8,x\n")
    with pytest.raises(SubnetsError, match=r"subnets.csv line 2: not a CIDR block: '10.0.0/33'"):
        load_subnets("subnets.csv", "cidr\n10.0.0/33\n")


def test_json_file_as_a_list_or_as_describe_subnets_output():
    listed = [{"cidr": "10.0.0.0/16", "subnet_id": "subnet-wide", "name": "wide",
               "vpc_id": "vpc-1"},
              {"cidrs": ["10.0.1.0/28", "2001:db8:1::/64"], "subnet_id": "subnet-narrow",
               "vpc_id": "vpc-1"}]
    assert load_subnets("s.json", json.dumps(listed)) == [WIDE, NARROW]
    described = {"Subnets": [
        {"SubnetId": "subnet-narrow", "VpcId": "vpc-1", "CidrBlock": "10.0.1.0/28",
         "Ipv6CidrBlockAssociationSet": [
             {"Ipv6CidrBlock": "2001:db8:1::/64", "Ipv6CidrBlockState": {"State": "associated"}},
             {"Ipv6CidrBlock": "2001:db8:9::/64",
              "Ipv6CidrBlockState": {"State": "disassociated"}}]},
        {"SubnetId": "subnet-wide", "VpcId": "vpc-1", "CidrBlock": "10.0.0.0/16",
         "Tags": [{"Key": "team", "Value": "x"}, {"Key": "Name", "Value": "wide"}]}]}
    assert load_subnets("s.json", json.dumps(described)) == [NARROW, WIDE]
    with pytest.raises(SubnetsError, match=r"^s\.json: entry 0 has no cidr$"):
        load_subnets("s.json", '[{"name": "x"}]')
    with pytest.raises(SubnetsError, match=r"^s\.json: not JSON: "):
        load_subnets("s.json", "cidr\n10.0.0.0/8\n")


def make_subnets(client) -> tuple[dict[str, str], str]:
    """A VPC with an IPv6 block and three named subnets, the "db" one also with an IPv6 /64;
    returns name -> subnet id, and that /64."""
    vpc = client.create_vpc(CidrBlock="10.20.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
    ids = {}
    for name, cidr in (("web", "10.20.1.0/24"), ("db", "10.20.2.0/28"), ("batch", "10.20.3.0/24")):
        subnet = client.create_subnet(
            VpcId=vpc["VpcId"], CidrBlock=cidr,
            TagSpecifications=[{"ResourceType": "subnet",
                                "Tags": [{"Key": "Name", "Value": name}]}])["Subnet"]
        ids[name] = subnet["SubnetId"]
    [vpc] = client.describe_vpcs(VpcIds=[vpc["VpcId"]])["Vpcs"]
    block = vpc["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]  # a /56
    ipv6 = str(next(ipaddress.ip_network(block).subnets(new_prefix=64)))
    client.associate_subnet_cidr_block(SubnetId=ids["db"], Ipv6CidrBlock=ipv6)
    return ids, ipv6


def test_describe_subnets_from_ec2(ec2_endpoint, monkeypatch):
    url, client = ec2_endpoint
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    ids, ipv6 = make_subnets(client)
    subnets = describe_subnets(Ec2Subnets("us-east-1", url, 1800))
    # moto's default VPC has unnamed default subnets (172.31.0.0/16) besides ours.
    by_name = {s.name: s for s in subnets if s.name}
    assert {name: (s.label, s.vpc_id is not None, s.cidrs) for name, s in by_name.items()} == {
        "web": (ids["web"], True, ("10.20.1.0/24",)),
        "db": (ids["db"], True, ("10.20.2.0/28", ipv6)),
        "batch": (ids["batch"], True, ("10.20.3.0/24",))}
    matcher = SubnetMatcher(subnets)
    assert matcher.match("10.20.2.9").label == ids["db"]
    assert matcher.match(str(ipaddress.ip_network(ipv6)[77])).label == ids["db"]
    assert matcher.match("10.20.2.16") is None


def test_the_pipeline_takes_its_subnets_from_ec2(ec2_endpoint, vpc_inputs, monkeypatch,
                                                  tmp_path, capsys):
    url, client = ec2_endpoint
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    vpc = client.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    dmz = client.create_subnet(
        VpcId=vpc, CidrBlock="10.0.0.0/24",
        TagSpecifications=[{"ResourceType": "subnet",
                            "Tags": [{"Key": "Name", "Value": "dmz"}]}])["Subnet"]["SubnetId"]
    flow_log, _, _ = vpc_inputs
    output = tmp_path / "out"
    assert run(["--input", str(flow_log), "--output", str(output), "--subnets_from_ec2",
                "--ec2_endpoint", url, "--aws_region", "us-east-1"]) == 0
    # AWS's TCP example: the server 10.0.0.62 is in the dmz subnet, the client in none.
    assert {(r["src_subnet"], r["dst_subnet"]) for r in read_flows(output)} == {(None, dmz)}
    traffic = read_table(output, SUBNET_TRAFFIC)
    assert {(r["subnet"], r["subnet_name"], r["vpc_id"]) for r in traffic} == {(dmz, "dmz", vpc)}
    # Without permission to call EC2 (no credentials at all), the job does not start.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    capsys.readouterr()
    assert run(["--input", str(flow_log), "--output", str(output), "--subnets_from_ec2",
                "--ec2_endpoint", url, "--aws_region", "us-east-1"]) == 2
    assert capsys.readouterr().err == ("flowbeam: error: --subnets_from_ec2: DescribeSubnets "
                                       "failed: Unable to locate credentials\n")
