"""The one definition of a flow row: Parquet and BigQuery schemas are both derived from it.

Every source (pcap files, Pub/Sub packet batches, VPC Flow Logs) writes these columns, so a
query written against one works against all of them. Bytes are IP bytes (IP header and
payload, the IP total length), never link-layer bytes, so pcap and VPC Flow Logs agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    """One column of the flow_logs table."""

    name: str
    bigquery_type: str  # STRING, INT64, TIMESTAMP
    required: bool
    description: str

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW_TYPES[self.bigquery_type]


_ARROW_TYPES = {
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}

FLOW_COLUMNS: tuple[Column, ...] = (
    Column("id", "STRING", True,
           "Deterministic row id: hash of the flow key and first_seen_at. A re-run or a retried "
           "bundle yields the same id, so it is the BigQuery insert id."),
    Column("community_id", "STRING", True,
           "Community ID v1 (seed 0) of the 5-tuple, to join with Zeek, Suricata and Elastic "
           "data."),
    Column("protocol", "STRING", True,
           "Transport protocol name (tcp, udp, icmp, icmpv6, sctp), or the IP protocol number "
           "as text for any other protocol."),
    Column("ip_protocol", "INT64", True, "IP protocol number (6 tcp, 17 udp, 1 icmp, ...)."),
    Column("ip_version", "INT64", True, "4 or 6."),
    Column("src_addr", "STRING", True,
           "Address of the initiator: the sender of the earliest packet, or of the TCP SYN."),
    Column("dst_addr", "STRING", True, "Address of the responder."),
    Column("src_port", "INT64", True,
           "Initiator's port; ICMP type for ICMP/ICMPv6; 0 for protocols without ports."),
    Column("dst_port", "INT64", True,
           "Responder's port; ICMP code (or the paired reply type, as Community ID does) for "
           "ICMP/ICMPv6; 0 for protocols without ports."),
    Column("first_seen_at", "TIMESTAMP", True, "Time of the first packet of this row (UTC, us)."),
    Column("last_seen_at", "TIMESTAMP", True, "Time of the last packet of this row (UTC, us)."),
    Column("src_bytes", "INT64", True,
           "IP bytes (IP total length) sent by the initiator in this row's interval."),
    Column("dst_bytes", "INT64", True, "IP bytes sent by the responder in this row's interval."),
    Column("src_packets", "INT64", True, "Packets sent by the initiator in this row's interval."),
    Column("dst_packets", "INT64", True, "Packets sent by the responder in this row's interval."),
    Column("src_tcp_flags", "INT64", False,
           "OR of the TCP flags the initiator sent (FIN=1 SYN=2 RST=4 PSH=8 ACK=16 URG=32 "
           "ECE=64 CWR=128); NULL when not TCP, or unknown (a VPC Flow Log without "
           "tcp-flags)."),
    Column("dst_tcp_flags", "INT64", False,
           "OR of the TCP flags the responder sent; NULL as src_tcp_flags."),
    Column("vlan_id", "INT64", False, "Outermost 802.1Q VLAN id; NULL when untagged."),
    Column("status", "STRING", True,
           "Why the row was emitted: idle_timeout, active_timeout (the flow goes on in a later "
           "row), end_of_flow (TCP FIN from both sides, or RST), forced_end (input ended while "
           "the flow was active)."),
    Column("source", "STRING", True, "Where the packets came from: pcap, pubsub or vpc_flow_logs."),
    Column("sensor", "STRING", False,
           "Where the flow was observed: the capture agent's (or --sensor's) name, or the "
           "network interface of a VPC Flow Logs record. Part of the flow key: two sensors "
           "that see the same 5-tuple write two rows. NULL when not given."),
    # VPC Flow Logs columns (NULL for other sources).
    Column("action", "STRING", False,
           "VPC Flow Logs: ACCEPT, or REJECT when a security group or network ACL rejected "
           "the traffic in either direction."),
    Column("account_id", "STRING", False, "VPC Flow Logs: the AWS account of the interface."),
    Column("vpc_id", "STRING", False, "VPC Flow Logs: the VPC of the interface."),
    Column("subnet_id", "STRING", False, "VPC Flow Logs: the subnet of the interface."),
    Column("instance_id", "STRING", False,
           "VPC Flow Logs: the instance of the interface (NULL for requester-managed ones)."),
    Column("flow_direction", "STRING", False,
           "VPC Flow Logs: ingress or egress, the way the initiator's traffic crossed the "
           "interface."),
    Column("src_subnet", "STRING", False,
           "Subnet of src_addr (its subnet id, or CIDR when the id is unknown) from the "
           "subnets given to the pipeline; NULL when in none."),
    Column("dst_subnet", "STRING", False, "Subnet of dst_addr, as src_subnet."),
)

FLOW_COLUMN_NAMES: tuple[str, ...] = tuple(column.name for column in FLOW_COLUMNS)


def arrow_schema(columns: Sequence[Column] = FLOW_COLUMNS) -> pa.Schema:
    """The Parquet (Arrow) schema of flow rows (or of another table's ``columns``), with the
    descriptions as field metadata."""
    return pa.schema(
        [
            pa.field(c.name, c.arrow_type, nullable=not c.required,
                     metadata={"description": c.description})
            for c in columns
        ]
    )


def records_to_arrow(records: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """Flow records as one Arrow table, converted column-wise in one call (~0.3 s per 100,000
    rows, where building Parquet rows value by value costs several times more)."""
    return pa.Table.from_pylist(records, schema=schema or arrow_schema())
