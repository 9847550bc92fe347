"""Flow keys and fragments: what every source hands the flow engine.

A *fragment* is a partial observation of one flow: one packet, what a decoder pre-aggregated
from one capture file or one Pub/Sub batch, or one VPC Flow Logs record. Its key is
direction-independent (endpoint ``a`` sorts before endpoint ``b``), and its counts say which
side sent what, so fragments of both directions merge by plain addition.

Streaming state pickles these classes by module path: keep them here (a Dataflow job updated
with ``--update`` must still unpickle its state).
"""

from __future__ import annotations

from operator import attrgetter
from typing import NamedTuple

# (ip_version, protocol, vlan_id, a_hi, a_lo, a_port, b_hi, b_lo, b_port, scope); endpoint a
# sorts before endpoint b, so both directions of a conversation share the key. vlan_id -1:
# untagged. scope: where the flow was observed (a capture agent's sensor name, a VPC network
# interface id; "" when the source has none), so two sensors never merge each other's traffic.
FlowKey = tuple[int, int, int, int, int, int, int, int, int, str]

SIDE_A = 0
SIDE_B = 1
NO_TIME = -1


class Fragment(NamedTuple):
    """Counts of one flow key over [first_us, last_us]; ``a``/``b`` are the key's endpoints."""

    key: FlowKey
    first_us: int
    last_us: int
    a_packets: int
    a_bytes: int
    b_packets: int
    b_bytes: int
    a_flags: int
    b_flags: int
    first_sender: int  # SIDE_A or SIDE_B: who sent the earliest packet
    syn_us: int  # time of the earliest pure SYN (SYN without ACK), NO_TIME if none
    syn_sender: int  # who sent it
    open_at_end: bool  # the input ended less than idle_us after last_us (a forced end)
    # Source-specific columns of the flow record, as sorted (column, value) pairs: e.g. a VPC
    # record's action and account. Packets have none.
    attributes: tuple[tuple[str, object], ...] = ()


class Continuation(NamedTuple):
    """What streaming keeps of a flow whose earlier rows were already emitted."""

    key: FlowKey
    src_side: int  # the flow's initiator, fixed by its first row
    last_us: int  # last packet of the emitted rows
    a_flags: int  # TCP flags of the whole flow so far (to recognise its end)
    b_flags: int


def order_key(
    ip_version: int, protocol: int, vlan_id: int,
    src_hi: int, src_lo: int, src_port: int,
    dst_hi: int, dst_lo: int, dst_port: int, scope: str = "",
) -> tuple[FlowKey, int]:
    """The direction-independent key of a packet and the side (SIDE_A/SIDE_B) that sent it."""
    if (src_hi, src_lo, src_port) <= (dst_hi, dst_lo, dst_port):
        return (ip_version, protocol, vlan_id, src_hi, src_lo, src_port,
                dst_hi, dst_lo, dst_port, scope), SIDE_A
    return (ip_version, protocol, vlan_id, dst_hi, dst_lo, dst_port,
            src_hi, src_lo, src_port, scope), SIDE_B


def merge(fragments: list[Fragment]) -> Fragment:
    """One fragment covering all of ``fragments`` (same key, any order)."""
    if len(fragments) == 1:
        return fragments[0]
    earliest = min(fragments, key=_start_order)
    latest = max(fragments, key=attrgetter("last_us"))
    syns = [f for f in fragments if f.syn_us != NO_TIME]
    first_syn = min(syns, key=_syn_order) if syns else None
    a_flags = b_flags = 0
    for f in fragments:
        a_flags |= f.a_flags
        b_flags |= f.b_flags
    return Fragment(
        key=earliest.key,
        first_us=earliest.first_us,
        last_us=latest.last_us,
        a_packets=sum(f.a_packets for f in fragments),
        a_bytes=sum(f.a_bytes for f in fragments),
        b_packets=sum(f.b_packets for f in fragments),
        b_bytes=sum(f.b_bytes for f in fragments),
        a_flags=a_flags,
        b_flags=b_flags,
        first_sender=earliest.first_sender,
        syn_us=first_syn.syn_us if first_syn else NO_TIME,
        syn_sender=first_syn.syn_sender if first_syn else SIDE_A,
        open_at_end=latest.open_at_end,
        attributes=_merged_attributes(fragments),
    )


def _merged_attributes(fragments: list[Fragment]) -> tuple[tuple[str, object], ...]:
    """Each attribute's value from the earliest fragment that has it (ties as ``merge``),
    but two: ``action`` is REJECT when any fragment was rejected (a flow denied one way was
    not accepted), and ``flow_direction`` (said from the initiator's side) comes first from
    the fragment that decided the initiator (the first pure SYN, as ``initiator``)."""
    if not any(f.attributes for f in fragments):
        return ()
    merged: dict[str, object] = {}
    ordered = sorted(fragments, key=_start_order)
    syns = [f for f in fragments if f.syn_us != NO_TIME]
    deciding = [min(syns, key=_syn_order)] if syns else []
    for f in ordered:
        for name, value in f.attributes:
            merged.setdefault(name, value)
    for f in deciding + ordered:
        direction = dict(f.attributes).get("flow_direction")
        if direction is not None:
            merged["flow_direction"] = direction
            break
    if any(("action", "REJECT") in f.attributes for f in fragments):
        merged["action"] = "REJECT"
    return tuple(sorted(merged.items()))


def _start_order(f: Fragment) -> tuple[int, int]:
    return f.first_us, f.first_sender


def _syn_order(f: Fragment) -> tuple[int, int]:
    return f.syn_us, f.syn_sender


def initiator(fragment: Fragment) -> int:
    """The side that started the flow: the sender of a pure SYN when seen, else of the
    earliest packet."""
    return fragment.syn_sender if fragment.syn_us != NO_TIME else fragment.first_sender
