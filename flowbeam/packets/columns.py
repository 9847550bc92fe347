"""``PacketColumns``: the flow fields of decoded IP packets, one NumPy array per field.

Every decoder (capture files today, Pub/Sub packet batches next) produces these and the
fragment aggregator consumes them, so the hot path never builds a Python object per packet.
``build_columns`` is the one way to make them from array-likes, so dtypes never drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PacketColumns:
    """The flow-relevant fields of decoded IP packets, one array element per packet.

    Addresses are two unsigned 64-bit halves so keys sort and compare as numbers; an IPv4
    address is ``hi = 0, lo = address``. ICMP and ICMPv6 carry type/code in the port columns
    as the Community ID spec pairs them (echo request and reply map to the same key).
    """

    ts_us: np.ndarray  # int64
    ip_version: np.ndarray  # uint8: 4 or 6
    protocol: np.ndarray  # uint8: IP protocol number of the transport (after IPv6 ext headers)
    src_hi: np.ndarray  # uint64
    src_lo: np.ndarray  # uint64
    dst_hi: np.ndarray  # uint64
    dst_lo: np.ndarray  # uint64
    src_port: np.ndarray  # int32 (0 when the protocol has none)
    dst_port: np.ndarray  # int32
    vlan_id: np.ndarray  # int32: outermost 802.1Q tag, -1 when untagged
    ip_bytes: np.ndarray  # int64: IP total length (IPv6: 40 + payload length)
    frame_bytes: np.ndarray  # int64: original frame length on the wire
    tcp_flags: np.ndarray  # uint8: 0 for non-TCP

    def __len__(self) -> int:
        return len(self.ts_us)


COLUMN_DTYPES: dict[str, np.dtype] = {
    "ts_us": np.dtype(np.int64),
    "ip_version": np.dtype(np.uint8),
    "protocol": np.dtype(np.uint8),
    "src_hi": np.dtype(np.uint64),
    "src_lo": np.dtype(np.uint64),
    "dst_hi": np.dtype(np.uint64),
    "dst_lo": np.dtype(np.uint64),
    "src_port": np.dtype(np.int32),
    "dst_port": np.dtype(np.int32),
    "vlan_id": np.dtype(np.int32),
    "ip_bytes": np.dtype(np.int64),
    "frame_bytes": np.dtype(np.int64),
    "tcp_flags": np.dtype(np.uint8),
}
COLUMN_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PacketColumns))


def build_columns(**arrays: object) -> PacketColumns:
    """Build ``PacketColumns`` from array-likes, coerced to the documented dtypes.

    Every column must be given, all of the same length; tests and other decoders use this so
    that dtypes never drift from what downstream sorting and reduction code expects.
    """
    missing = set(COLUMN_NAMES) - set(arrays)
    extra = set(arrays) - set(COLUMN_NAMES)
    if missing or extra:
        raise TypeError(f"build_columns: missing {sorted(missing)}, unexpected {sorted(extra)}")
    cols = {name: np.asarray(arrays[name], dtype=COLUMN_DTYPES[name]) for name in COLUMN_NAMES}
    lengths = {len(a) for a in cols.values()}
    if len(lengths) > 1:
        raise ValueError(f"build_columns: columns have different lengths {sorted(lengths)}")
    return PacketColumns(**cols)


def empty_columns() -> PacketColumns:
    """Zero-length ``PacketColumns`` with the right dtypes."""
    return PacketColumns(**{n: np.empty(0, dtype=COLUMN_DTYPES[n]) for n in COLUMN_NAMES})


def concat_columns(parts: list[PacketColumns]) -> PacketColumns:
    """Concatenate several ``PacketColumns`` in order (e.g. all decode() results and flush())."""
    if not parts:
        return empty_columns()
    return PacketColumns(
        **{n: np.concatenate([getattr(p, n) for p in parts]) for n in COLUMN_NAMES}
    )
