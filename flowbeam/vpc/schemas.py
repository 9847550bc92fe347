"""The two tables the VPC pipeline writes besides ``flow_logs``: ``subnet_traffic`` and
``denied_flows``. Described with ``flowbeam.flows.schema.Column`` like the flow table, so the
Parquet and BigQuery schemas of every table come from one definition each."""

from __future__ import annotations

from dataclasses import dataclass

from flowbeam.flows.schema import Column


@dataclass(frozen=True)
class ExtraTable:
    """A table beside the flow table: its name (BigQuery table and Parquet file prefix),
    columns, day-partitioning column, clustering columns and description."""

    name: str
    columns: tuple[Column, ...]
    partition_field: str
    clustering: tuple[str, ...]
    description: str


SUBNET_TRAFFIC = ExtraTable(
    "subnet_traffic",
    (
        Column("id", "STRING", True,
               "Deterministic row id (hash of the other key columns): the BigQuery insert id."),
        Column("minute", "TIMESTAMP", True,
               "The minute (UTC) in which the counted records' capture intervals started."),
        Column("subnet", "STRING", True,
               "The subnet: its id, or its CIDR when the id is unknown."),
        Column("subnet_name", "STRING", False, "The subnet's Name tag (or name in the file)."),
        Column("vpc_id", "STRING", False, "The subnet's VPC, when known."),
        Column("direction", "STRING", True,
               "inbound: traffic to an address of the subnet; outbound: from one. Traffic "
               "between two addresses of the subnet counts both ways."),
        Column("action", "STRING", False, "ACCEPT or REJECT; NULL when the log has no action."),
        Column("flows", "INT64", True,
               "Flow log records (one direction of one flow over one capture interval)."),
        Column("packets", "INT64", True, "Packets of those records."),
        Column("bytes", "INT64", True, "IP bytes of those records."),
    ),
    partition_field="minute",
    clustering=("subnet", "direction", "action"),
    description=(
        "flowbeam per-subnet traffic from VPC Flow Logs: per subnet, minute, direction and "
        "action. A streaming job writes one row per key and arrival minute: SUM the counts."),
)

DENIED_FLOWS = ExtraTable(
    "denied_flows",
    (
        Column("id", "STRING", True,
               "Deterministic row id (hash of the record): the BigQuery insert id."),
        Column("start_at", "TIMESTAMP", True, "Start of the record's capture interval (UTC)."),
        Column("end_at", "TIMESTAMP", True, "End of the record's capture interval (UTC)."),
        Column("interface_id", "STRING", False, "The network interface that logged it."),
        Column("account_id", "STRING", False, "The interface's AWS account."),
        Column("vpc_id", "STRING", False, "The interface's VPC."),
        Column("subnet_id", "STRING", False, "The interface's subnet (from the record)."),
        Column("instance_id", "STRING", False, "The interface's instance."),
        Column("protocol", "STRING", True, "tcp, udp, icmp, ... or the IP protocol number."),
        Column("ip_protocol", "INT64", True, "IP protocol number."),
        Column("src_addr", "STRING", True, "Source address of the rejected traffic."),
        Column("dst_addr", "STRING", True, "Destination address of the rejected traffic."),
        Column("src_port", "INT64", False, "Source port (0 for ICMP in VPC Flow Logs)."),
        Column("dst_port", "INT64", False, "Destination port."),
        Column("src_subnet", "STRING", False, "Subnet of src_addr (as flow_logs.src_subnet)."),
        Column("dst_subnet", "STRING", False, "Subnet of dst_addr."),
        Column("packets", "INT64", True, "Packets rejected in the interval."),
        Column("bytes", "INT64", True, "IP bytes rejected in the interval."),
        Column("tcp_flags", "INT64", False, "OR of the TCP flags (v3+ logs)."),
        Column("flow_direction", "STRING", False, "ingress or egress (v5+ logs)."),
        Column("reject_reason", "STRING", False, "Why it was rejected, e.g. BPA (v8+ logs)."),
    ),
    partition_field="start_at",
    clustering=("dst_subnet", "src_addr"),
    description="flowbeam denial log: every REJECT record of the VPC Flow Logs read.",
)

EXTRA_TABLES = (SUBNET_TRAFFIC, DENIED_FLOWS)
