"""A VPC Flow Logs record as a flow fragment: one direction of a flow over one capture interval.

The two records of a conversation (one per direction) share the flow key, scoped by the
network interface (the key's last element): the same conversation seen on two interfaces
(the client's and the server's) stays two rows, so no byte is counted twice in one row.
The records' ``start``/``end`` (seconds) become ``first_us``/``last_us``; ``bytes`` are IP
bytes already, as flowbeam counts them.

Who initiated the flow (``src`` of the row), from the best evidence a record has:

- ``tcp-flags`` (v3+): AWS reports the OR of FIN (1), SYN (2), RST (4) and SYN-ACK (18) over
  the interval and no plain ACK. A SYN without ACK (2, or 3 with a FIN in a short connection)
  is the initiator's opening: the record's sender is the initiator, its SYN at ``start``. A
  SYN-ACK (18, 19) is the responder's answer: the *other* side sent the first packet, so that
  side is recorded as the first sender;
- otherwise the earlier ``start`` wins (the sender of the earliest packet, as for packets).
  ``flow-direction`` (ingress/egress) says which way the record's traffic crossed the
  interface, not who started the conversation, so it is not evidence of the initiator.

Attributes (the VPC columns of the row): ``action``, ``account_id``, ``vpc_id``,
``subnet_id``, ``instance_id`` and ``flow_direction``. The latter is said from the
initiator's side: the record's own direction when its sender is the fragment's initiator,
the reverse otherwise (the responder's egress is the initiator's ingress). A TCP record of a
format without ``tcp-flags`` also sets ``src_tcp_flags``/``dst_tcp_flags`` to NULL: its flags
are unknown, where 0 would say "none were sent".
"""

from __future__ import annotations

import ipaddress

from flowbeam.flows.fragment import NO_TIME, SIDE_A, SIDE_B, Fragment, order_key
from flowbeam.flows.protocols import PROTO_TCP, TCP_ACK, TCP_SYN
from flowbeam.vpc.records import VpcRecord

SECOND_US = 1_000_000
NO_VLAN = -1
_REVERSE = {"ingress": "egress", "egress": "ingress"}
# Record attribute -> flow column, for the attributes that are the same in both directions.
_COLUMNS = (("action", "action"), ("account_id", "account_id"), ("vpc_id", "vpc_id"),
            ("subnet_id", "subnet_id"), ("instance_id", "instance_id"))


def _halves(address: str) -> tuple[int, int, int]:
    ip = ipaddress.ip_address(address)
    value = int(ip)
    return ip.version, value >> 64, value & (2**64 - 1)


def to_fragment(record: VpcRecord) -> Fragment:
    """The fragment of a flow record (``record.is_flow``; the parser checked its fields)."""
    version, s_hi, s_lo = _halves(record.srcaddr)
    _, d_hi, d_lo = _halves(record.dstaddr)
    key, sender = order_key(version, record.protocol, NO_VLAN, s_hi, s_lo, record.srcport or 0,
                            d_hi, d_lo, record.dstport or 0, record.interface_id or "")
    other = SIDE_B if sender == SIDE_A else SIDE_A
    flags = (record.tcp_flags or 0) if record.protocol == PROTO_TCP else 0
    opens = bool(flags & TCP_SYN) and not flags & TCP_ACK
    answers = bool(flags & TCP_SYN) and bool(flags & TCP_ACK)
    first_us, last_us = record.start * SECOND_US, record.end * SECOND_US
    counts = (record.packets, record.bytes, flags)
    empty = (0, 0, 0)
    a_counts, b_counts = (counts, empty) if sender == SIDE_A else (empty, counts)
    attributes = {column: getattr(record, name) for name, column in _COLUMNS}
    direction = record.flow_direction
    attributes["flow_direction"] = _REVERSE.get(direction, direction) if answers else direction
    pairs = [(c, v) for c, v in attributes.items() if v is not None]
    if record.protocol == PROTO_TCP and record.tcp_flags is None:
        pairs += [("dst_tcp_flags", None), ("src_tcp_flags", None)]  # unknown, not "none"
    return Fragment(
        key=key, first_us=first_us, last_us=last_us,
        a_packets=a_counts[0], a_bytes=a_counts[1],
        b_packets=b_counts[0], b_bytes=b_counts[1],
        a_flags=a_counts[2], b_flags=b_counts[2],
        first_sender=other if answers else sender,
        syn_us=first_us if opens else NO_TIME,
        syn_sender=sender if opens else SIDE_A,
        open_at_end=False,
        attributes=tuple(sorted(pairs)),
    )
