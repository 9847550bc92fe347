"""Decode captured frames (``RecordBatch``) into the flow fields of IP packets (``PacketColumns``).

``PacketDecoder`` sorts each batch by link type and sends it down two paths that must agree
packet for packet: the vectorised path (``vector_path``, and its second stage
``vector_headers`` for IPv4 options, IPv6 extension chains and fragments) for all but the
truly odd packets, and the per-packet path (``slow_path``) for those, whose malformed packets
are counted in ``PacketDecoder.errors`` by reason (``error_reasons``). It then merges their
rows back into capture order and completes the IP fragments of both paths together, across
batches (``fragment_rows``, ``ip_fragments``).

Flows are keyed on the outermost IP header: tunnels (GRE, IP-in-IP, ...) are reported as their
own IP protocol with ports 0 and never decapsulated. ICMP (protocol 1) and ICMPv6 (58) put
type/code in the port columns the way Community ID v1 does, by protocol number whatever the IP
version (see ``ICMP_COUNTERPARTS``).

Rules for packets the capture cut short (caplen < wirelen), chosen so that bytes are never lost:

* ``ip_bytes`` always comes from the IP header (IPv4 total length, IPv6 40 + payload length),
  not from what was captured, so a snaplen-cut packet still counts its full size.
* A transport header cut after its ports keeps the ports; a TCP header cut before the flags
  byte reports flags 0. A transport header cut before its ports (ICMP: before type and code) is
  still emitted, with ports 0, and counted as ``errors["truncated_transport"]``: the packet did
  belong to some flow of that protocol between those hosts, and dropping it would lose bytes.
* The transport is only read within the IP payload (up to the IP total length), never from
  link-layer padding after it.

IP fragments: a non-first fragment gets the ports of its first fragment, even from an earlier
batch; one still waiting at ``flush()`` (end of the file) is emitted with ports 0. Both
fragment tables are bounded by ``max_tracked_fragments``.

Output rows are in capture order; a waiting fragment released by its first fragment is emitted
right after that first fragment (with its own ``ts_us``, ``ip_bytes`` and ``frame_bytes``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.packets.columns import COLUMN_NAMES, PacketColumns, build_columns, empty_columns
from flowbeam.packets.error_reasons import (
    NOT_IP,
    TIMESTAMP_OUT_OF_RANGE,
    TRUNCATED_TRANSPORT,
    UNKNOWN_LINKTYPE,
)
from flowbeam.packets.fragment_rows import Columns, complete_fragments, rows_to_columns
from flowbeam.packets.ip_fragments import FRAGMENT_KEY_BYTES, FragmentPackets, FragmentTracker
from flowbeam.packets.slow_path import Malformed, slow_ip, slow_link, slow_ports
from flowbeam.packets.vector_gather import take_rows
from flowbeam.packets.vector_path import VECTOR_LINKS, LinkFunction, vector_decode

# 9999-12-31T23:59:59.999999Z: the last instant a flow row (and a BigQuery TIMESTAMP) can hold.
MAX_TIMESTAMP_US = 253_402_300_799_999_999


# --- The decoder -------------------------------------------------------------------------------

class PacketDecoder:
    """Stateful per capture file/stream: tracks IPv4/IPv6 fragments across batches.

    Use one instance per capture file (or stream), call ``decode`` on its batches in order and
    ``flush`` once at the end. ``errors`` counts skipped or damaged packets by reason
    (cumulative); ``unknown_linktypes`` collects link types we cannot decode.
    """

    def __init__(self, max_tracked_fragments: int = 65536) -> None:
        self.errors: collections.Counter[str] = collections.Counter()
        self.unknown_linktypes: set[int] = set()
        self._fragments = FragmentTracker(max_tracked_fragments)

    def decode(self, batch: RecordBatch) -> PacketColumns:
        """Flow fields of the packets of ``batch`` that yielded an IP flow observation."""
        in_range = batch.ts_us <= MAX_TIMESTAMP_US
        if not in_range.all():
            # A capture writer's garbage timestamps: counted, not turned into flows that no
            # sink could store.
            self.errors[TIMESTAMP_OUT_OF_RANGE] += int(np.count_nonzero(~in_range))
            batch = _select_records(batch, in_range)
        return self._decode(batch, vectorised=True)

    def flush(self) -> PacketColumns:
        """Non-first fragments whose first fragment never came, with ports 0 (end of file)."""
        rows = self._fragments.drain()
        if not rows:
            return empty_columns()
        return build_columns(**rows_to_columns(rows))

    def _decode(self, batch: RecordBatch, vectorised: bool) -> PacketColumns:
        """``vectorised=False`` sends every packet through the slow path (tests compare both)."""
        n = len(batch)
        if n == 0:
            return empty_columns()
        data = np.ascontiguousarray(batch.data, dtype=np.uint8)
        linktype = np.asarray(batch.linktype)
        parts = _Parts()
        slow_idx: list[np.ndarray] = []
        for value, idx in _group_by_linktype(linktype):
            link = VECTOR_LINKS.get(value)
            if link is None:
                self.errors[UNKNOWN_LINKTYPE] += len(idx)
                self.unknown_linktypes.add(value)
            elif not vectorised:
                slow_idx.append(idx)
            else:
                self._vector_group(batch, data, idx, link, slow_idx, parts)
        self._slow_decode(batch, data, _sorted_union(slow_idx), parts)
        positions, cols = parts.merged()
        if parts.fragments:
            fragments = parts.fragments[0]
            if len(parts.fragments) > 1:
                fragments = FragmentPackets(*(np.concatenate(field)
                                              for field in zip(*parts.fragments, strict=True)))
            cols = complete_fragments(cols, positions, fragments, self._fragments)
        return build_columns(**cols)

    def _vector_group(
        self, batch: RecordBatch, data: np.ndarray, idx: np.ndarray, link: LinkFunction,
        slow_idx: list[np.ndarray], parts: _Parts,
    ) -> None:
        """Vectorised decode of one link type's packets into ``parts``; the rest is added to
        ``slow_idx``."""
        found = link(data, take_rows(batch.offsets, idx), take_rows(batch.caplen, idx))
        ok = found.ok
        ip_offset, version, vlan = found.ip_offset, found.version, found.vlan
        if not ok.all():
            not_ip = int(np.count_nonzero(found.not_ip))
            if not_ip:  # a Counter keeps zero counts: add only real ones
                self.errors[NOT_IP] += not_ip
            slow_idx.append(idx[~ok & ~found.not_ip])
            keep = np.flatnonzero(ok)
            idx, ip_offset, version, vlan = idx[keep], ip_offset[keep], version[keep], vlan[keep]
        pos, cols, others = vector_decode(batch, data, idx, ip_offset, version, vlan)
        parts.add(pos, cols, () if others is None else others.fragments)
        if others is not None:
            if others.truncated:
                self.errors[TRUNCATED_TRANSPORT] += others.truncated
            if len(others.rest):
                slow_idx.append(others.rest)

    def _slow_decode(
        self, batch: RecordBatch, data: np.ndarray, idx: np.ndarray, parts: _Parts
    ) -> None:
        """Decode the packets at ``idx`` one by one into ``parts``.

        Per-packet values are converted to Python ints up front and packets are read through
        memoryview slices (no copy): NumPy scalar indexing would cost more than the parsing.
        """
        if not len(idx):
            return
        positions: list[int] = []
        rows: list[tuple] = []
        fragment_positions: list[int] = []
        firsts: list[bool] = []
        keys: list[bytes] = []
        buffer = memoryview(data)
        packets = zip(
            idx.tolist(), batch.offsets[idx].tolist(), batch.caplen[idx].tolist(),
            batch.linktype[idx].tolist(), batch.ts_us[idx].tolist(), batch.wirelen[idx].tolist(),
            strict=True,
        )
        for i, start, caplen, linktype, ts_us, wirelen in packets:
            pkt = buffer[start : start + caplen]
            try:
                row, key, first = self._slow_packet(pkt, linktype, ts_us, wirelen)
            except Malformed as bad:
                self.errors[bad.reason] += 1
                continue
            positions.append(i)
            rows.append(row)
            if key is not None:
                fragment_positions.append(i)
                firsts.append(first)
                keys.append(key)
        parts.add(np.asarray(positions, dtype=np.int64), rows_to_columns(rows),
                  [FragmentPackets(np.asarray(fragment_positions, dtype=np.int64),
                                   np.asarray(firsts, dtype=bool),
                                   np.frombuffer(b"".join(keys), dtype=FRAGMENT_KEY_BYTES))])

    def _slow_packet(
        self, pkt: memoryview, linktype: int, ts_us: int, wirelen: int
    ) -> tuple[tuple, bytes | None, bool]:
        """(the packet's row, its fragment key or None, whether it is a first fragment).

        A non-first fragment's row has ports 0 until fragment tracking completes it.
        """
        ip_at, expected_version, vlan = slow_link(pkt, linktype)
        ip = slow_ip(pkt, ip_at, expected_version)
        later_fragment = ip.fragment_key is not None and not ip.first_fragment
        if later_fragment:
            src_port = dst_port = flags = 0
        else:
            src_port, dst_port, flags, missing = slow_ports(pkt, ip)
            if missing:
                self.errors[TRUNCATED_TRANSPORT] += 1
        row = (ts_us, ip.version, ip.protocol, ip.src_hi, ip.src_lo, ip.dst_hi, ip.dst_lo,
               src_port, dst_port, vlan, ip.ip_bytes, wirelen, flags)
        return row, ip.fragment_key, ip.first_fragment


# --- Splitting a batch by link type, and merging the paths back --------------------------------

class _Parts:
    """The rows each decode path made of a batch, each part in capture order, and the
    fragments among them."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, Columns]] = []
        self.fragments: list[FragmentPackets] = []

    def add(self, pos: np.ndarray, cols: Columns, fragments: Sequence[FragmentPackets] = ()
            ) -> None:
        if len(pos):
            self.parts.append((pos, cols))
        self.fragments.extend(part for part in fragments if len(part.pos))

    def merged(self) -> tuple[np.ndarray, Columns]:
        """All rows in capture order (one row per packet): (packet positions, columns)."""
        if not self.parts:
            return np.empty(0, dtype=np.int64), rows_to_columns([])
        if len(self.parts) == 1:
            return self.parts[0]
        pos = np.concatenate([p for p, _ in self.parts])
        # Stable sort of a few sorted runs: a linear merge for NumPy's timsort.
        order = np.argsort(pos, kind="stable")
        cols = {name: np.concatenate([c[name] for _, c in self.parts])[order]
                for name in COLUMN_NAMES}
        return pos[order], cols


def _group_by_linktype(linktype: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(link type, positions) per link type present; one cheap check for single-type batches."""
    first = int(linktype[0])
    if (linktype == first).all():
        return [(first, np.arange(len(linktype)))]
    return [(int(v), np.flatnonzero(linktype == v)) for v in np.unique(linktype)]


def _sorted_union(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)) if len(parts) > 1 else parts[0]


def _select_records(batch: RecordBatch, mask: np.ndarray) -> RecordBatch:
    """The records of ``batch`` where ``mask`` is true (over the same byte buffer)."""
    return dataclasses.replace(
        batch, offsets=batch.offsets[mask], caplen=batch.caplen[mask],
        wirelen=batch.wirelen[mask], ts_us=batch.ts_us[mask], linktype=batch.linktype[mask],
        file_offsets=batch.file_offsets[mask])
