"""Classic pcap: the file header's layout and the walk from record header to record header.

A capture holds millions of records and Python costs ~100 ns per statement, so record headers
are found by a speculative vectorised walk (see ``_speculate``) that falls back to a plain
``struct.unpack_from`` loop whenever its guess does not hold, and their fields are gathered
with one NumPy structured-view gather per chunk.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.capture.source import CaptureDamagedError, Source

MAX_CAPLEN = 256 << 10  # a classic pcap record claiming more is corrupt (libpcap's own limit)

PCAP_MAGICS = {  # magic -> (nanosecond timestamps, record header length)
    0xA1B2C3D4: (False, 16),
    0xA1B23C4D: (True, 16),
    0xA1B2CD34: (False, 24),  # Alexey Kuznetzov's modified pcap: 8 more bytes per record header
}
PCAP_FILE_HEADER = 24

# The pcap header's link type is its low 16 bits; above them sit reserved bits, the FCS-present
# bit (0x04000000) and the FCS length (bits 28-31). Masking with 0x0FFFFFFF would keep the
# FCS-present bit, so this is libpcap's current LT_LINKTYPE mask instead.
_LINKTYPE_MASK = 0x0000FFFF

# Speculative walk tuning. Its cost grows with bytes, the Python loop's with records: measured
# here, the crossover is at ~600 bytes per record, and below 64 KiB the setup is not worth it.
_SPECULATE_MIN_BYTES = 64 << 10
_SPECULATE_MAX_RECORD_BYTES = 512
_MAX_SPECULATIONS = 8  # restarts per chunk (e.g. when ts_sec crosses a 2^16 s boundary)
_MAX_REPAIRS = 64  # false candidates stepped over per speculation before giving up


@dataclass(frozen=True)
class _PcapLayout:
    """How one classic pcap file stores its record headers."""

    order: str  # struct byte-order prefix: "<" or ">"
    header_len: int  # 16, or 24 for the modified format
    nanosecond: bool
    linktype: int
    header_dtype: np.dtype = field(init=False)
    caplen_at: Callable[[bytes | bytearray, int], tuple[int]] = field(init=False)

    def __post_init__(self) -> None:
        fields = {
            "names": ["sec", "frac", "caplen", "wirelen"],
            "formats": [self.order + "u4"] * 4,
            "offsets": [0, 4, 8, 12],
            "itemsize": self.header_len,
        }
        object.__setattr__(self, "header_dtype", np.dtype(fields))
        object.__setattr__(self, "caplen_at", struct.Struct(self.order + "I").unpack_from)

    def header_view(self, buf: bytearray, end: int) -> np.ndarray:
        """A structured array whose element i is the record header starting at byte i."""
        count = end - self.header_len + 1
        return np.ndarray((max(count, 0),), self.header_dtype, buf, 0, (1,))

    @property
    def ts_sec_high_offset(self) -> int:
        """Where the upper 16 bits of ts_sec sit in a record header."""
        return 2 if self.order == "<" else 0


def pcap_layout(head: bytes | bytearray) -> _PcapLayout:
    """The record layout a classic pcap file header (its first 24 bytes) declares."""
    if len(head) < PCAP_FILE_HEADER:
        raise CaptureDamagedError(
            0, f"file ends inside the pcap file header ({len(head)} of 24 bytes)"
        )
    order = "<" if struct.unpack_from("<I", head)[0] in PCAP_MAGICS else ">"
    magic, _, _, _, _, _, linktype = struct.unpack_from(order + "IHHiIII", head)
    nanosecond, header_len = PCAP_MAGICS[magic]
    return _PcapLayout(order, header_len, nanosecond, linktype & _LINKTYPE_MASK)


def read_pcap(source: Source) -> Iterator[RecordBatch]:
    layout = pcap_layout(source.buf[: min(source.end, PCAP_FILE_HEADER)])
    source.start = PCAP_FILE_HEADER
    return walk_pcap_records(source, layout)


def walk_pcap_records(source: Source, layout: _PcapLayout) -> Iterator[RecordBatch]:
    """The records from ``source.start`` on, which must be a record header (the one after
    the file header, or one a split read resynchronised on: ``splits``)."""
    speculate = True  # until a chunk shows records too big for it to pay
    while True:
        buf, pos, end = source.buf, source.start, source.end
        offsets, stop = _walk_pcap(buf, pos, end, layout, speculate)
        if len(offsets):
            speculate = stop - pos < _SPECULATE_MAX_RECORD_BYTES * len(offsets)
            batch, damaged = _pcap_batch(buf, end, source.base, offsets, layout)
            if len(batch):
                yield batch
            if damaged is not None:
                raise damaged
        source.start = stop
        need = _pcap_record_need(buf, stop, end, source.base, layout)
        if source.eof:
            if stop < end:
                raise _pcap_truncation(buf, stop, end, source.base, layout)
            return
        source.fill(need)


def _pcap_record_need(buf: bytearray, pos: int, end: int, base: int, layout: _PcapLayout) -> int:
    """Bytes the record at ``pos`` needs in the buffer; raises if its header is impossible."""
    if end - pos < layout.header_len:
        return layout.header_len
    caplen = layout.caplen_at(buf, pos + 8)[0]
    if caplen > MAX_CAPLEN:
        raise CaptureDamagedError(base + pos, f"record claims {caplen} captured bytes")
    return layout.header_len + caplen


def _pcap_truncation(
    buf: bytearray, pos: int, end: int, base: int, layout: _PcapLayout
) -> CaptureDamagedError:
    have = end - pos
    if have < layout.header_len:
        reason = f"file ends inside a record header ({have} of {layout.header_len} bytes)"
    else:
        caplen = layout.caplen_at(buf, pos + 8)[0]
        got = have - layout.header_len
        reason = f"file ends inside a record's data ({got} of {caplen} captured bytes)"
    return CaptureDamagedError(base + pos, reason)


def _pcap_batch(
    buf: bytearray, end: int, base: int, offsets: np.ndarray, layout: _PcapLayout
) -> tuple[RecordBatch, CaptureDamagedError | None]:
    """Gather the header fields of the records at ``offsets`` (header positions in ``buf``).

    A record claiming more than MAX_CAPLEN bytes ends the batch: the walk may have stepped
    over it when the chunk was big enough, so it is checked here, vectorised.
    """
    headers = layout.header_view(buf, end)[offsets]
    caplen = headers["caplen"].astype(np.int64)
    damaged = None
    too_big = np.flatnonzero(caplen > MAX_CAPLEN)
    if too_big.size:
        first = int(too_big[0])
        damaged = CaptureDamagedError(
            base + int(offsets[first]), f"record claims {int(caplen[first])} captured bytes"
        )
        headers, caplen, offsets = headers[:first], caplen[:first], offsets[:first]
    fraction = headers["frac"].astype(np.int64)
    if layout.nanosecond:
        fraction //= 1000
    batch = RecordBatch(
        data=np.frombuffer(buf, np.uint8, end),
        offsets=offsets + layout.header_len,
        caplen=caplen,
        wirelen=headers["wirelen"].astype(np.int64),
        ts_us=headers["sec"].astype(np.int64) * 1_000_000 + fraction,
        linktype=np.full(len(offsets), layout.linktype, np.int32),
        file_offsets=offsets + base,
    )
    return batch, damaged


def _walk_pcap(
    buf: bytearray, pos: int, end: int, layout: _PcapLayout, speculate: bool = True
) -> tuple[np.ndarray, int]:
    """Header positions of the complete records in ``buf[pos:end]`` and where the walk stopped.

    Records claiming more than MAX_CAPLEN bytes are not stopped at (see ``_pcap_batch``).
    """
    pieces: list[np.ndarray] = []
    for _ in range(_MAX_SPECULATIONS if speculate else 0):
        if end - pos < _SPECULATE_MIN_BYTES:
            break
        pos, finished = _speculate(buf, pos, end, layout, pieces)
        if finished:
            return _concat(pieces), pos
    offsets, pos = _walk_pcap_scalar(buf, pos, end, layout)
    pieces.append(offsets)
    return _concat(pieces), pos


def _concat(pieces: list[np.ndarray]) -> np.ndarray:
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return np.empty(0, np.int64)
    return np.concatenate(pieces)


def _walk_pcap_scalar(
    buf: bytearray, pos: int, end: int, layout: _PcapLayout
) -> tuple[np.ndarray, int]:
    """The reference walk: one ``unpack_from`` per record (~4-6M records/s)."""
    caplen_at = layout.caplen_at
    header_len = layout.header_len
    last = end - header_len
    found: list[int] = []
    append = found.append
    while pos <= last:
        following = pos + header_len + caplen_at(buf, pos + 8)[0]
        if following > end:
            break
        append(pos)
        pos = following
    return np.array(found, np.int64), pos


def _speculate(
    buf: bytearray, pos: int, end: int, layout: _PcapLayout, pieces: list[np.ndarray]
) -> tuple[int, bool]:
    """Walk records from ``pos`` (a known header) with NumPy instead of a Python loop.

    Guess: every record header in the chunk has the same upper 16 bits of ts_sec as the one at
    ``pos`` (true unless the capture crosses a 2^16 s, ~18 h, boundary). Every byte position
    holding those two bytes is a candidate; payload bytes add a few false candidates. Each
    candidate's successor (position + header + caplen) is computed at once; a run of
    candidates where each is its predecessor's successor is exactly the chain of real headers
    starting at ``pos``. Where the chain skips candidates (false ones) the walk jumps to the
    successor; where the successor is not a candidate the guess failed and the walk returns
    ``(position, False)`` for the caller to speculate again or walk in Python.
    Appends the verified header positions to ``pieces``; returns (stop, finished).
    """
    last = end - layout.header_len
    if pos > last:
        return pos, True
    candidates = _candidate_headers(buf, pos, last, layout)
    if candidates is None:
        return pos, False
    successors = candidates + layout.header_len
    successors += layout.header_view(buf, end)["caplen"][candidates]
    breaks = np.flatnonzero(successors[:-1] != candidates[1:])
    first = 0
    for _ in range(_MAX_REPAIRS):
        index = np.searchsorted(breaks, first)
        run_end = int(breaks[index]) if index < len(breaks) else len(candidates) - 1
        following = int(successors[run_end])
        if following > end:  # the run's last record is cut by the end of the chunk
            pieces.append(candidates[first:run_end])
            return int(candidates[run_end]), True
        pieces.append(candidates[first : run_end + 1])
        if following > last:
            return following, True
        first = int(np.searchsorted(candidates, following))
        if first == len(candidates) or candidates[first] != following:
            return following, False
    return following, False


def _candidate_headers(
    buf: bytearray, pos: int, last: int, layout: _PcapLayout
) -> np.ndarray | None:
    """Sorted positions in [pos, last] whose ts_sec upper 16 bits equal those at ``pos``.

    Two uint16 views (even and odd byte alignment) compare the whole chunk at memory speed.
    Returns None when the candidates are too dense to be mostly real headers (e.g. ts_sec
    is 0 and the payload is zeros): the Python walk is cheaper then.
    """
    high = pos + layout.ts_sec_high_offset
    value = int.from_bytes(buf[high : high + 2], sys.byteorder)
    found = []
    total = 0
    for first in (high, high + 1):
        count = (last + layout.ts_sec_high_offset - first) // 2 + 1
        if count <= 0:
            continue
        matches = np.frombuffer(buf, np.uint16, count, first) == value
        total += int(np.count_nonzero(matches))
        if total > (last - pos) // 32 + 1:
            return None
        found.append(np.flatnonzero(matches) * 2 + (first - layout.ts_sec_high_offset))
    candidates = np.concatenate(found)
    candidates.sort(kind="stable")  # two sorted runs: a linear merge
    return candidates
