"""Flow records: the engine's ``EmittedRow``s as ``flow_logs`` rows (dicts of the columns of
``flowbeam.flows.schema``), what every sink writes.

Vocabulary: the engine emits *rows* (a merged fragment, its initiator, a status); a *record* is
the same row as the dict of schema columns, with addresses as text and a deterministic id.

A batch run builds one record per flow (~100,000 for a 20M-packet capture), so the per-row
work is kept small: addresses are formatted once per address (cached), the id's text is
formatted directly rather than by ``ascii`` of nested tuples, and ``to_flow_records``
converts timestamps in NumPy passes.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import repeat
from typing import Any

import numpy as np

from flowbeam.flows.community_id import community_id
from flowbeam.flows.engine import EmittedRow
from flowbeam.flows.fragment import SIDE_A
from flowbeam.flows.protocols import PROTO_TCP, protocol_name
from flowbeam.flows.schema import FLOW_COLUMN_NAMES

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_US = 86_400_000_000
# Rows per NumPy pass of ``to_flow_records``: enough to amortise NumPy's per-call cost, few
# enough that a large shard's records are not all built before the first is passed on.
_CHUNK = 4096
# The columns after ``sensor`` are source-specific (a fragment's attributes): NULL by default.
_SOURCE_COLUMNS = dict.fromkeys(FLOW_COLUMN_NAMES[FLOW_COLUMN_NAMES.index("sensor") + 1:])


def packed_address(ip_version: int, hi: int, lo: int) -> bytes:
    """The 4- or 16-byte network-order form of an address held as two 64-bit halves."""
    if ip_version == 4:
        return lo.to_bytes(4, "big")
    return struct.pack("!QQ", hi, lo)


def address_text(ip_version: int, packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if ip_version == 4 else socket.AF_INET6, packed)


@lru_cache(maxsize=1 << 15)
def _endpoint(ip_version: int, hi: int, lo: int) -> tuple[bytes, str]:
    """An address's packed and text forms, cached: flows share addresses (the 20M capture's
    ~114,000 rows hold ~29,000 distinct ones), and a hit costs a fraction of formatting.
    Bounded: ~12 MB when full."""
    packed = packed_address(ip_version, hi, lo)
    return packed, address_text(ip_version, packed)


def timestamp(us: int) -> datetime:
    """A UTC datetime from microseconds since the epoch (exact, no float rounding)."""
    return _EPOCH + timedelta(microseconds=us)


def timestamps(us: Sequence[int]) -> list[datetime]:
    """``timestamp`` of each of ``us``: NumPy splits them into calendar fields (exact integer
    arithmetic, floored as ``timedelta`` does), so only the datetime constructor runs per value,
    several times cheaper than a ``timedelta`` added to the epoch."""
    micros = np.asarray(us, dtype=np.int64)
    days = micros // _DAY_US
    dates = days.astype("M8[D]")
    months = dates.astype("M8[M]")
    years = months.astype("M8[Y]").astype(np.int64)
    month = months.astype(np.int64) - years * 12 + 1
    day = (dates - months).astype(np.int64) + 1
    seconds, micro = np.divmod(micros - days * _DAY_US, 1_000_000)
    hour, seconds = np.divmod(seconds, 3600)
    minute, second = np.divmod(seconds, 60)
    return list(map(datetime, (years + 1970).tolist(), month.tolist(), day.tolist(),
                    hour.tolist(), minute.tolist(), second.tolist(), micro.tolist(), repeat(UTC)))


@lru_cache(maxsize=64)
def _id_formats(source: str) -> tuple[bytes, bytes]:
    """The row id's hashed text for ``source``, as %-formats of an unscoped and a scoped key.

    The id is the blake2b-128 of ``ascii((source, key, first_us))``: the same flow row always
    gets the same id (BigQuery insert id). An unscoped key hashes as the 9-field key did before
    scopes existed, so re-processing old captures yields the ids already in a user's table (and
    a merge on ``id`` finds them); the scope goes in only when there is one, ASCII-escaped so
    any name is safe. Formatting that text from the key's ints (whose ``%d`` is their repr)
    and the scope's ``ascii`` costs a third of ``ascii`` on the nested tuple.
    """
    prefix = "(" + ascii(source).replace("%", "%%") + ", ("
    key = ", ".join(["%d"] * 9)
    return ((prefix + key + "), %d)").encode("ascii"),
            (prefix + key + ", %s), %d)").encode("ascii"))


def to_flow_record(row: EmittedRow, source: str) -> dict[str, Any]:
    """The ``flow_logs`` row of an emitted flow row, oriented initiator -> responder."""
    fragment = row.fragment
    return _record(row, source, timestamp(fragment.first_us), timestamp(fragment.last_us))


def to_flow_records(rows: Sequence[EmittedRow], source: str) -> Iterator[dict[str, Any]]:
    """``to_flow_record`` of each of ``rows``, in order, with the timestamps converted by
    ``timestamps`` a chunk at a time (what a batch run uses)."""
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        times = timestamps([row.fragment.first_us for row in chunk]
                           + [row.fragment.last_us for row in chunk])
        firsts, lasts = times[:len(chunk)], times[len(chunk):]
        yield from map(_record, chunk, repeat(source), firsts, lasts)


def _record(row: EmittedRow, source: str, first_seen_at: datetime,
            last_seen_at: datetime) -> dict[str, Any]:
    """The record of ``row`` given its two timestamps. The literal lists the columns up to
    ``sensor`` in schema order and ``_SOURCE_COLUMNS`` the rest, so keys come in schema order."""
    fragment, src_side, status = row
    _, first_us, _, a_packets, a_bytes, b_packets, b_bytes, a_flags, b_flags = fragment[:9]
    ip_version, protocol, vlan_id, a_hi, a_lo, a_port, b_hi, b_lo, b_port, scope = fragment.key
    a_addr, a_text = _endpoint(ip_version, a_hi, a_lo)
    b_addr, b_text = _endpoint(ip_version, b_hi, b_lo)
    if src_side == SIDE_A:
        src, dst, src_text, dst_text, src_port, dst_port = (
            a_addr, b_addr, a_text, b_text, a_port, b_port)
        src_counts = (a_bytes, a_packets, a_flags)
        dst_counts = (b_bytes, b_packets, b_flags)
    else:
        src, dst, src_text, dst_text, src_port, dst_port = (
            b_addr, a_addr, b_text, a_text, b_port, a_port)
        src_counts = (b_bytes, b_packets, b_flags)
        dst_counts = (a_bytes, a_packets, a_flags)
    unscoped, scoped = _id_formats(source)  # the id's text (see there)
    if scope:
        id_text = scoped % (ip_version, protocol, vlan_id, a_hi, a_lo, a_port, b_hi, b_lo, b_port,
                            ascii(scope).encode("ascii"), first_us)
    else:
        id_text = unscoped % (ip_version, protocol, vlan_id, a_hi, a_lo, a_port,
                              b_hi, b_lo, b_port, first_us)
    is_tcp = protocol == PROTO_TCP
    record = {
        "id": hashlib.blake2b(id_text, digest_size=16).hexdigest(),
        "community_id": community_id(protocol, src, dst, src_port, dst_port),
        "protocol": protocol_name(protocol),
        "ip_protocol": protocol,
        "ip_version": ip_version,
        "src_addr": src_text,
        "dst_addr": dst_text,
        "src_port": src_port,
        "dst_port": dst_port,
        "first_seen_at": first_seen_at,
        "last_seen_at": last_seen_at,
        "src_bytes": src_counts[0],
        "dst_bytes": dst_counts[0],
        "src_packets": src_counts[1],
        "dst_packets": dst_counts[1],
        "src_tcp_flags": src_counts[2] if is_tcp else None,
        "dst_tcp_flags": dst_counts[2] if is_tcp else None,
        "vlan_id": vlan_id if vlan_id >= 0 else None,
        "status": status,
        "source": source,
        "sensor": scope or None,
        **_SOURCE_COLUMNS,
    }
    if fragment.attributes:
        record.update(fragment.attributes)
    return record
