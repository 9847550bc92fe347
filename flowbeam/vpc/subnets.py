"""Subnets: which subnet an address is in (longest prefix), from a file or from EC2.

A subnet has one or more CIDR blocks (an IPv4 block and IPv6 blocks in AWS). Its ``label``
is what rows carry in ``src_subnet``/``dst_subnet`` and ``subnet_traffic.subnet``: the
subnet id (``subnet-0abc...``) when known, else its first CIDR, so a label always names one
subnet. Matching picks the longest prefix containing the address, so a /28 carved out of a
/16 wins over it.

Sources, all pure here (the EC2 call itself is the Beam layer's):

- a CSV file with a header: ``cidr`` (required), ``subnet_id``, ``name``, ``vpc_id``; rows
  with the same ``subnet_id`` are one subnet with several blocks;
- a JSON file: a list of objects with those keys (``cidr`` or a ``cidrs`` list), or the
  output of ``aws ec2 describe-subnets`` as it is;
- the pages of EC2 DescribeSubnets (``Subnets``: ``SubnetId``, ``VpcId``, ``CidrBlock``,
  ``Ipv6CidrBlockAssociationSet``, the ``Name`` tag).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import netaddr

# IPv6 blocks in these states are leaving or never came: not the subnet's.
_GONE_STATES = frozenset({"disassociating", "disassociated", "failing", "failed"})


class SubnetsError(ValueError):
    """A subnets file that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Subnet:
    """One subnet: its label (see the module docstring), name, VPC and CIDR blocks."""

    label: str
    name: str | None
    vpc_id: str | None
    cidrs: tuple[str, ...]


class SubnetMatcher:
    """Longest-prefix matching of addresses (text) to subnets; picklable, immutable.

    A table per (IP version, prefix length) from the network address to its subnet; a lookup
    tries the lengths present, longest first (a few dict lookups per address). A block named
    by two subnets (overlapping VPCs) belongs to the one whose label sorts first.
    """

    def __init__(self, subnets: Iterable[Subnet] = ()) -> None:
        self.subnets = tuple(sorted(subnets, key=lambda s: s.label))
        self._tables: dict[tuple[int, int], dict[int, Subnet]] = {}
        for subnet in self.subnets:
            for cidr in subnet.cidrs:
                network = netaddr.IPNetwork(cidr)
                table = self._tables.setdefault((network.version, network.prefixlen), {})
                table.setdefault(network.first, subnet)
        self._lengths = {
            version: sorted((length for v, length in self._tables if v == version),
                            reverse=True)
            for version in (4, 6)
        }

    def match(self, address: str | None) -> Subnet | None:
        """The subnet of the longest prefix containing ``address``; None when none does."""
        if address is None:
            return None
        try:
            ip = netaddr.IPAddress(address)
        except (netaddr.AddrFormatError, ValueError):
            return None
        value, bits = int(ip), (32 if ip.version == 4 else 128)
        for length in self._lengths[ip.version]:
            network = value >> (bits - length) << (bits - length)
            subnet = self._tables[(ip.version, length)].get(network)
            if subnet is not None:
                return subnet
        return None


def _cidr(text: str, where: str) -> str:
    try:
        return str(netaddr.IPNetwork(text.strip()).cidr)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise SubnetsError(f"{where}: not a CIDR block: {text!r}") from None


def _subnet(subnet_id: str | None, name: str | None, vpc_id: str | None,
            cidrs: Iterable[str]) -> Subnet:
    blocks = tuple(cidrs)
    return Subnet(subnet_id or blocks[0], name or None, vpc_id or None, blocks)


def _grouped(entries: Iterable[tuple[str | None, str | None, str | None, list[str]]]
             ) -> list[Subnet]:
    """Entries with the same subnet id merged into one subnet (their blocks in order); an
    entry without an id is a subnet of its own."""
    merged: dict[str | int, tuple[str | None, str | None, str | None, list[str]]] = {}
    for index, (subnet_id, name, vpc_id, cidrs) in enumerate(entries):
        merged.setdefault(subnet_id or index, (subnet_id, name, vpc_id, []))[3].extend(cidrs)
    return [_subnet(*entry) for entry in merged.values()]


def subnets_from_csv(text: str, where: str = "subnets file") -> list[Subnet]:
    """Subnets from CSV text with a header row (see the module docstring)."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "cidr" not in reader.fieldnames:
        raise SubnetsError(f"{where}: the CSV header has no 'cidr' column "
                           "(columns: cidr, subnet_id, name, vpc_id)")
    return _grouped(
        (row.get("subnet_id"), row.get("name"), row.get("vpc_id"),
         [_cidr(row["cidr"] or "", f"{where} line {reader.line_num}")])
        for row in reader)


def subnets_from_json(text: str, where: str = "subnets file") -> list[Subnet]:
    """Subnets from JSON text: a list of objects, or a DescribeSubnets response."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise SubnetsError(f"{where}: not JSON: {error}") from None
    if isinstance(document, Mapping) and "Subnets" in document:
        return subnets_from_describe([document])
    if not isinstance(document, list) or not all(isinstance(o, Mapping) for o in document):
        raise SubnetsError(f"{where}: expected a list of objects or a DescribeSubnets response")
    entries = []
    for index, item in enumerate(document):
        blocks = item.get("cidrs") or ([item["cidr"]] if item.get("cidr") else [])
        if not blocks:
            raise SubnetsError(f"{where}: entry {index} has no cidr")
        entries.append((item.get("subnet_id"), item.get("name"), item.get("vpc_id"),
                        [_cidr(str(b), f"{where} entry {index}") for b in blocks]))
    return _grouped(entries)


def load_subnets(path: str, text: str) -> list[Subnet]:
    """Subnets from a file's text: JSON when it ends in ``.json``, else CSV."""
    if path.lower().endswith(".json"):
        return subnets_from_json(text, path)
    return subnets_from_csv(text, path)


def subnets_from_describe(pages: Iterable[Mapping[str, Any]]) -> list[Subnet]:
    """Subnets from the pages of EC2 DescribeSubnets (IPv6 blocks unless disassociated)."""
    subnets = []
    for page in pages:
        for item in page.get("Subnets", []):
            blocks = [item["CidrBlock"]] if item.get("CidrBlock") else []
            blocks += [a["Ipv6CidrBlock"] for a in item.get("Ipv6CidrBlockAssociationSet", [])
                       if a.get("Ipv6CidrBlockState", {}).get("State") not in _GONE_STATES]
            if not blocks:
                continue
            name = next((t["Value"] for t in item.get("Tags", []) if t.get("Key") == "Name"),
                        None)
            subnets.append(Subnet(item["SubnetId"], name, item.get("VpcId"),
                                  tuple(_cidr(b, item["SubnetId"]) for b in blocks)))
    return subnets
