"""Flow records: the engine's ``EmittedRow``s as ``flow_logs`` rows (dicts of the columns of
``flowbeam.flows.schema``), what every sink writes.

Vocabulary: the engine emits *rows* (a merged fragment, its initiator, a status); a *record* is
the same row as the dict of schema columns, with addresses as text and a deterministic id.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

from flowbeam.flows.community_id import community_id
from flowbeam.flows.engine import EmittedRow
from flowbeam.flows.fragment import SIDE_A, FlowKey
from flowbeam.flows.protocols import PROTO_TCP, protocol_name
from flowbeam.flows.schema import FLOW_COLUMN_NAMES

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Every record has every column; source-specific ones (a fragment's attributes) default NULL.
_NULL_COLUMNS = dict.fromkeys(FLOW_COLUMN_NAMES)


def packed_address(ip_version: int, hi: int, lo: int) -> bytes:
    """The 4- or 16-byte network-order form of an address held as two 64-bit halves."""
    if ip_version == 4:
        return lo.to_bytes(4, "big")
    return struct.pack("!QQ", hi, lo)


def address_text(ip_version: int, packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if ip_version == 4 else socket.AF_INET6, packed)


def timestamp(us: int) -> datetime:
    """A UTC datetime from microseconds since the epoch (exact, no float rounding)."""
    return _EPOCH + timedelta(microseconds=us)


def row_id(key: FlowKey, first_us: int, source: str) -> str:
    """Deterministic row id: the same flow row always gets the same id (BigQuery insert id).

    An unscoped key hashes as the 9-field key did before scopes existed, so re-processing old
    captures yields the ids already in a user's table (and a merge on ``id`` finds them). The
    scope goes into the hash only when there is one; it is ASCII-escaped so any name is safe.
    """
    hashed = key if key[-1] else key[:-1]
    digest = hashlib.blake2b(
        ascii((source, hashed, first_us)).encode("ascii"), digest_size=16)
    return digest.hexdigest()


def to_flow_record(row: EmittedRow, source: str) -> dict[str, Any]:
    """The ``flow_logs`` row of an emitted flow row, oriented initiator -> responder."""
    f = row.fragment
    ip_version, protocol, vlan_id, a_hi, a_lo, a_port, b_hi, b_lo, b_port, scope = f.key
    a_addr = packed_address(ip_version, a_hi, a_lo)
    b_addr = packed_address(ip_version, b_hi, b_lo)
    if row.src_side == SIDE_A:
        src, dst, src_port, dst_port = a_addr, b_addr, a_port, b_port
        src_counts = (f.a_bytes, f.a_packets, f.a_flags)
        dst_counts = (f.b_bytes, f.b_packets, f.b_flags)
    else:
        src, dst, src_port, dst_port = b_addr, a_addr, b_port, a_port
        src_counts = (f.b_bytes, f.b_packets, f.b_flags)
        dst_counts = (f.a_bytes, f.a_packets, f.a_flags)
    is_tcp = protocol == PROTO_TCP
    record = {
        **_NULL_COLUMNS,
        "id": row_id(f.key, f.first_us, source),
        "community_id": community_id(protocol, src, dst, src_port, dst_port),
        "protocol": protocol_name(protocol),
        "ip_protocol": protocol,
        "ip_version": ip_version,
        "src_addr": address_text(ip_version, src),
        "dst_addr": address_text(ip_version, dst),
        "src_port": src_port,
        "dst_port": dst_port,
        "first_seen_at": timestamp(f.first_us),
        "last_seen_at": timestamp(f.last_us),
        "src_bytes": src_counts[0],
        "dst_bytes": dst_counts[0],
        "src_packets": src_counts[1],
        "dst_packets": dst_counts[1],
        "src_tcp_flags": src_counts[2] if is_tcp else None,
        "dst_tcp_flags": dst_counts[2] if is_tcp else None,
        "vlan_id": vlan_id if vlan_id >= 0 else None,
        "status": row.status,
        "source": source,
        "sensor": scope or None,
    }
    if f.attributes:
        record.update(f.attributes)
    return record
