"""Per-subnet traffic and the denial log, from VPC Flow Logs records (pure).

Per-subnet traffic counts *records* (each one direction of one flow over one capture
interval), so it needs no flow assembly and is as timely as the records: a record counts as
``outbound`` for the subnet of its ``srcaddr`` and ``inbound`` for the subnet of its
``dstaddr``, in the minute its capture interval started; addresses in no known subnet are
not counted. The same packets logged by two interfaces (the sender's and the receiver's,
both in the VPC) are two records, as AWS reports them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, NamedTuple

from flowbeam.flows.protocols import protocol_name
from flowbeam.flows.records import timestamp
from flowbeam.vpc.fragments import SECOND_US
from flowbeam.vpc.records import VpcRecord
from flowbeam.vpc.subnets import SubnetMatcher

INBOUND = "inbound"
OUTBOUND = "outbound"
MINUTE_S = 60


class TrafficKey(NamedTuple):
    """What ``subnet_traffic`` counts by."""

    minute_s: int
    subnet: str
    subnet_name: str | None
    vpc_id: str | None
    direction: str
    action: str | None


class TrafficCounts(NamedTuple):
    flows: int
    packets: int
    bytes: int
    # Which records were counted: the sum (mod 2**63) of their ``record_digest``s. It makes a
    # row's id: the same records give the same id in any order, in any run; others another.
    digest: int = 0


MEASURES = ("flows", "packets", "bytes")
DIGEST_MODULUS = 2 ** 63  # within Beam's signed 64-bit integer coding


def record_digest(record: VpcRecord) -> int:
    """A 63-bit digest of one flow record (its every field)."""
    digest = hashlib.blake2b(ascii(record).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % DIGEST_MODULUS


def traffic_keys(record: VpcRecord, matcher: SubnetMatcher
                 ) -> list[tuple[TrafficKey, TrafficCounts]]:
    """The (key, counts) a flow record adds to ``subnet_traffic``: none, one or two."""
    minute_s = record.start // MINUTE_S * MINUTE_S
    counts = TrafficCounts(1, record.packets, record.bytes, record_digest(record))
    found = []
    for direction, address in ((OUTBOUND, record.srcaddr), (INBOUND, record.dstaddr)):
        subnet = matcher.match(address)
        if subnet is not None:
            found.append((TrafficKey(minute_s, subnet.label, subnet.name, subnet.vpc_id,
                                     direction, record.action), counts))
    return found


def add_counts(counts: Iterable[tuple[int, int, int, int]]) -> TrafficCounts:
    """The sum of several (flows, packets, bytes, digest) of one key (Beam's combine
    function; digests add modulo 2**63, so the order of records does not matter)."""
    flows = packets = octets = digest = 0
    for more_flows, more_packets, more_bytes, more_digest in counts:
        flows, packets, octets = flows + more_flows, packets + more_packets, octets + more_bytes
        digest = (digest + more_digest) % DIGEST_MODULUS
    return TrafficCounts(flows, packets, octets, digest)


def _row_id(*parts: object) -> str:
    return hashlib.blake2b(ascii(parts).encode("ascii"), digest_size=16).hexdigest()


def traffic_row(key: TrafficKey, counts: TrafficCounts) -> dict[str, Any]:
    """A ``subnet_traffic`` row. Its id is the key's and the counted records' (their digest):
    a re-run over the same records writes the same ids (a BigQuery MERGE keeps one row),
    while other records of the same key (a streaming job's next arrival minute, a resumed
    back-fill, another file of the same minutes) make rows of their own, which ``SUM``
    adds up."""
    return {
        "id": _row_id(tuple(key), counts.digest),
        "minute": timestamp(key.minute_s * SECOND_US),
        "subnet": key.subnet,
        "subnet_name": key.subnet_name,
        "vpc_id": key.vpc_id,
        "direction": key.direction,
        "action": key.action,
        "flows": counts.flows,
        "packets": counts.packets,
        "bytes": counts.bytes,
    }


def denial_row(record: VpcRecord, matcher: SubnetMatcher) -> dict[str, Any]:
    """The ``denied_flows`` row of a REJECT record."""
    src_subnet, dst_subnet = matcher.match(record.srcaddr), matcher.match(record.dstaddr)
    return {
        "id": _row_id(record),
        "start_at": timestamp(record.start * SECOND_US),
        "end_at": timestamp(record.end * SECOND_US),
        "interface_id": record.interface_id,
        "account_id": record.account_id,
        "vpc_id": record.vpc_id,
        "subnet_id": record.subnet_id,
        "instance_id": record.instance_id,
        "protocol": protocol_name(record.protocol),
        "ip_protocol": record.protocol,
        "src_addr": record.srcaddr,
        "dst_addr": record.dstaddr,
        "src_port": record.srcport,
        "dst_port": record.dstport,
        "src_subnet": src_subnet.label if src_subnet else None,
        "dst_subnet": dst_subnet.label if dst_subnet else None,
        "packets": record.packets,
        "bytes": record.bytes,
        "tcp_flags": record.tcp_flags,
        "flow_direction": record.flow_direction,
        "reject_reason": record.reject_reason,
    }


def denial_log_line(row: dict[str, Any]) -> str:
    """One structured (JSON) log line for a denial, for ``--log_denied``."""
    fields = {name: value.isoformat() if hasattr(value, "isoformat") else value
              for name, value in row.items() if name != "id" and value is not None}
    return "flowbeam denied " + json.dumps(fields, sort_keys=True)
