"""Column batches passed between the capture reader and the packet decoder.

Both are plain NumPy arrays so the hot path (millions of packets per second) never builds a
Python object per packet; only the rare unusual packet takes a per-packet slow path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RecordBatch:
    """Consecutive records of one capture file, as parallel arrays over one byte buffer.

    ``data`` may be a view of a buffer the reader reuses: a consumer must finish with a batch
    before asking the reader for the next one.
    """

    data: np.ndarray  # uint8: the bytes the offsets point into
    offsets: np.ndarray  # int64: start of each record's captured bytes in ``data``
    caplen: np.ndarray  # int64: bytes captured (may be less than wirelen: snaplen)
    wirelen: np.ndarray  # int64: original length of the frame on the wire
    ts_us: np.ndarray  # int64: capture time, microseconds since the Unix epoch (UTC)
    linktype: np.ndarray  # int32: LINKTYPE_* of the interface that captured the record
    file_offsets: np.ndarray  # int64: byte offset of each record's header in the file

    def __len__(self) -> int:
        return len(self.offsets)


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
