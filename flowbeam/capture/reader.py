"""Stream classic pcap and pcapng captures into ``RecordBatch`` columns, chunk by chunk.

The input may be any binary stream, seekable or not (Beam's ``ReadableFile.open()`` gives
gzip-decompressing and remote streams), so it is read strictly sequentially, ~4 MB at a time,
into one reused buffer; a record cut by the end of a chunk is carried over to the next one.
Memory therefore stays flat whatever the file size. The format is recognised by its magic
number, never by the file name.

Speed is the design constraint: a capture holds millions of records and Python costs ~100 ns
per statement. Classic pcap record headers are found by a speculative vectorised walk (see
``_speculate``) that falls back to a plain ``struct.unpack_from`` loop whenever its guess does
not hold, and their fields are gathered with one NumPy structured-view gather per chunk. pcapng
is rarer and far more varied, so it takes a straightforward per-block Python loop.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from flowbeam.capture.records import RecordBatch

__all__ = [
    "CaptureDamagedError",
    "CaptureFormatError",
    "CaptureStats",
    "capture_kind",
    "read_capture",
]

MAX_CAPLEN = 256 << 10  # a classic pcap record claiming more is corrupt (libpcap's own limit)
MAX_BLOCK = 16 << 20  # a known pcapng block claiming more is corrupt; unknown ones are skipped

_PCAP_MAGICS = {  # magic -> (nanosecond timestamps, record header length)
    0xA1B2C3D4: (False, 16),
    0xA1B23C4D: (True, 16),
    0xA1B2CD34: (False, 24),  # Alexey Kuznetzov's modified pcap: 8 more bytes per record header
}
_PCAP_FILE_HEADER = 24

_SHB = 0x0A0D0D0A  # a palindrome: readable before the section's byte order is known
_IDB = 0x00000001
_OPB = 0x00000002
_SPB = 0x00000003
_EPB = 0x00000006
_BYTE_ORDER_MAGIC_LE = b"\x4d\x3c\x2b\x1a"
_BYTE_ORDER_MAGIC_BE = b"\x1a\x2b\x3c\x4d"
_BLOCK_NAMES = {
    _SHB: "a Section Header Block",
    _IDB: "an Interface Description Block",
    _OPB: "an Obsolete Packet Block",
    _SPB: "a Simple Packet Block",
    _EPB: "an Enhanced Packet Block",
}
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14
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


class _CaptureError(ValueError):
    """A capture problem located at a byte offset of the (decompressed) stream."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(offset, reason)
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (at byte {self.offset})"


class CaptureFormatError(_CaptureError):
    """The stream is not a capture at all: unknown magic or block structure at offset 0."""


class CaptureDamagedError(_CaptureError):
    """The capture is truncated or corrupt after some good records (those were yielded)."""


@dataclass
class CaptureStats:
    """Counters a caller may pass to ``read_capture`` and read after (or during) iteration."""

    kind: str | None = None  # "pcap" or "pcapng" once the header has been read
    records: int = 0  # records yielded
    batches: int = 0  # batches yielded
    bytes_read: int = 0  # bytes read from the (decompressed) stream so far


def capture_kind(first_bytes: bytes) -> str | None:
    """Name the capture format from a file's first 4+ bytes: "pcap", "pcapng" or None."""
    if len(first_bytes) < 4:
        return None
    little, big = struct.unpack("<I", first_bytes[:4])[0], struct.unpack(">I", first_bytes[:4])[0]
    if little in _PCAP_MAGICS or big in _PCAP_MAGICS:
        return "pcap"
    if little == _SHB:
        return "pcapng"
    return None


def read_capture(
    stream: BinaryIO, chunk_size: int = 4 << 20, *, stats: CaptureStats | None = None
) -> Iterator[RecordBatch]:
    """Yield the records of a pcap or pcapng stream as batches, one per chunk read.

    Each batch's ``data`` is a view of a buffer reused for the next chunk: finish with a batch
    before asking for the next one. A file that is not a capture raises ``CaptureFormatError``
    before anything is yielded; a truncated or corrupt one yields every complete record before
    the damage, then raises ``CaptureDamagedError``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    stats = CaptureStats() if stats is None else stats
    source = _Source(stream, chunk_size)
    source.fill(_PCAP_FILE_HEADER)
    head = bytes(source.buf[: min(source.end, 4)])
    stats.kind = capture_kind(head)
    if stats.kind is None:
        raise CaptureFormatError(0, f"not a pcap or pcapng file ({_describe_magic(head)})")
    records = _read_pcap(source) if stats.kind == "pcap" else _read_pcapng(source)
    for batch in records:
        stats.records += len(batch)
        stats.batches += 1
        stats.bytes_read = source.base + source.end
        yield batch
    stats.bytes_read = source.base + source.end


def _describe_magic(head: bytes) -> str:
    if not head:
        return "empty file"
    if len(head) < 4:
        return f"only {len(head)} bytes"
    return f"magic 0x{head.hex()}"


class _Source:
    """A sequential stream read into one reusable buffer.

    ``buf[start:end]`` holds bytes read but not yet consumed; ``base`` is the stream offset of
    ``buf[0]``. ``fill`` moves the unconsumed tail to the front and reads until the buffer is
    full or the stream ends, so every chunk after the first starts with the carried-over
    partial record. The buffer is replaced, never resized: a NumPy view of a yielded batch may
    still hold it, and a bytearray with views cannot change size.
    """

    def __init__(self, stream: BinaryIO, chunk_size: int) -> None:
        self._stream = stream
        self._readinto = getattr(stream, "readinto", None)
        self.buf = bytearray(chunk_size)
        self.start = 0
        self.end = 0
        self.base = 0
        self.eof = False

    def fill(self, need: int = 0) -> None:
        """Compact, grow the buffer to at least ``need`` bytes, then read until it is full."""
        keep = self.end - self.start
        if need > len(self.buf):
            grown = bytearray(need)
            grown[:keep] = self.buf[self.start : self.end]
            self.buf = grown
        elif self.start:
            self.buf[:keep] = self.buf[self.start : self.end]
        self.base += self.start
        self.start = 0
        self.end = keep
        self._read_until(len(self.buf))

    def discard(self, nbytes: int) -> int:
        """Consume ``nbytes`` without keeping them (huge skippable blocks); returns the count."""
        have = self.end - self.start
        if nbytes <= have:
            self.start += nbytes
            return nbytes
        dropped = have
        while dropped < nbytes and not self.eof:
            self.base += self.end
            self.start = self.end = 0
            self._read_until(min(len(self.buf), nbytes - dropped))
            dropped += self.end
        self.start = self.end
        return dropped

    def _read_until(self, limit: int) -> None:
        """Read into ``buf[end:limit]`` until it is full or the stream ends (short reads OK)."""
        view = memoryview(self.buf)
        while self.end < limit and not self.eof:
            if self._readinto is not None:
                got = self._readinto(view[self.end : limit])
            else:  # e.g. Beam's CompressedFile, which only has read()
                data = self._stream.read(limit - self.end)
                got = len(data)
                view[self.end : self.end + got] = data
            if not got:
                self.eof = True
            else:
                self.end += got
        view.release()


# ---------------------------------------------------------------------------------------------
# Classic pcap


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


def _pcap_layout(source: _Source) -> _PcapLayout:
    if source.end < _PCAP_FILE_HEADER:
        raise CaptureDamagedError(
            0, f"file ends inside the pcap file header ({source.end} of 24 bytes)"
        )
    order = "<" if struct.unpack_from("<I", source.buf)[0] in _PCAP_MAGICS else ">"
    magic, _, _, _, _, _, linktype = struct.unpack_from(order + "IHHiIII", source.buf)
    nanosecond, header_len = _PCAP_MAGICS[magic]
    return _PcapLayout(order, header_len, nanosecond, linktype & _LINKTYPE_MASK)


def _read_pcap(source: _Source) -> Iterator[RecordBatch]:
    layout = _pcap_layout(source)
    source.start = _PCAP_FILE_HEADER
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


# ---------------------------------------------------------------------------------------------
# pcapng


@dataclass(frozen=True)
class _Interface:
    linktype: int
    snaplen: int
    to_us: Callable[[int], int]  # timestamp ticks -> µs since the epoch


def _ticks_to_us(tsresol: int, offset_s: int) -> Callable[[int], int]:
    """Converter for ``if_tsresol`` (10^-n s, or 2^-n s with the high bit) plus ``if_tsoffset``.

    Floors to whole microseconds, exactly (Python integers).
    """
    offset_us = offset_s * 1_000_000
    exponent = tsresol & 0x7F
    if tsresol & 0x80:
        return lambda ticks: ((ticks * 1_000_000) >> exponent) + offset_us
    if exponent >= 6:
        divisor = 10 ** (exponent - 6)
        return lambda ticks: ticks // divisor + offset_us
    multiplier = 10 ** (6 - exponent)
    return lambda ticks: ticks * multiplier + offset_us


class _Section:
    """Byte order and interfaces of the current pcapng section, and the last timestamp seen."""

    def __init__(self) -> None:
        self.last_ts_us = 0  # Simple Packet Blocks carry no time: they reuse the previous one
        self.start("<")

    def start(self, order: str) -> None:
        self.order = order
        self.interfaces: list[_Interface] = []
        self.u32 = struct.Struct(order + "I").unpack_from
        self.epb = struct.Struct(order + "IIIII").unpack_from
        self.opb = struct.Struct(order + "HHIIII").unpack_from
        self.option = struct.Struct(order + "HH").unpack_from
        self.idb = struct.Struct(order + "HHI").unpack_from


@dataclass
class _Columns:
    """Per-record values collected by the pcapng block loop, turned into arrays per chunk."""

    offsets: list[int] = field(default_factory=list)
    caplen: list[int] = field(default_factory=list)
    wirelen: list[int] = field(default_factory=list)
    ts_us: list[int] = field(default_factory=list)
    linktype: list[int] = field(default_factory=list)
    file_offsets: list[int] = field(default_factory=list)

    def batch(self, buf: bytearray, end: int) -> RecordBatch:
        return RecordBatch(
            data=np.frombuffer(buf, np.uint8, end),
            offsets=np.array(self.offsets, np.int64),
            caplen=np.array(self.caplen, np.int64),
            wirelen=np.array(self.wirelen, np.int64),
            ts_us=np.array(self.ts_us, np.int64),
            linktype=np.array(self.linktype, np.int32),
            file_offsets=np.array(self.file_offsets, np.int64),
        )


@dataclass
class _Stop:
    """Why the block loop stopped: more bytes needed (``need`` at ``pos``) or damage."""

    pos: int
    need: int = 0
    block_type: int | None = None
    error: _CaptureError | None = None


def _read_pcapng(source: _Source) -> Iterator[RecordBatch]:
    section = _Section()
    while True:
        columns = _Columns()
        stop = _walk_pcapng(source.buf, source.start, source.end, source.base, section, columns)
        if columns.offsets:
            yield columns.batch(source.buf, source.end)
        if stop.error is not None:
            raise stop.error
        source.start = stop.pos
        skippable = stop.block_type is not None and stop.block_type not in _BLOCK_NAMES
        if stop.need > MAX_BLOCK and not skippable:
            name = _BLOCK_NAMES.get(stop.block_type, "a block")
            raise _structure_error(source.base + stop.pos, f"{name} claims {stop.need} bytes")
        if source.eof:
            if stop.pos < source.end:
                raise _pcapng_truncation(source, stop)
            return
        if skippable and stop.need > len(source.buf):
            _skip_block(source, stop, section)
        else:
            source.fill(stop.need)


def _skip_block(source: _Source, stop: _Stop, section: _Section) -> None:
    """Stream past an unknown block too big to buffer, checking its trailing length."""
    offset = source.base + stop.pos
    dropped = source.discard(stop.need - 4)
    source.fill(4)
    if dropped < stop.need - 4 or source.end < 4:
        have = dropped + source.end
        raise CaptureDamagedError(offset, f"file ends inside a block ({have} of {stop.need} bytes)")
    trailer = section.u32(source.buf, source.start)[0]
    if trailer != stop.need:
        raise CaptureDamagedError(
            offset, f"block's trailing length {trailer} differs from its length {stop.need}"
        )
    source.start += 4


def _pcapng_truncation(source: _Source, stop: _Stop) -> CaptureDamagedError:
    have = source.end - stop.pos
    if stop.block_type is None:
        reason = f"file ends inside a block header ({have} of {stop.need} bytes)"
    else:
        name = _BLOCK_NAMES.get(stop.block_type, "a block")
        reason = f"file ends inside {name} ({have} of {stop.need} bytes)"
    return CaptureDamagedError(source.base + stop.pos, reason)


def _walk_pcapng(
    buf: bytearray, pos: int, end: int, base: int, section: _Section, out: _Columns
) -> _Stop:
    """Walk the complete blocks in ``buf[pos:end]``, collecting packets into ``out``."""
    while True:
        if end - pos < 8:
            return _Stop(pos, 8)
        block_type = section.u32(buf, pos)[0]
        if block_type == _SHB:
            if end - pos < 12:
                return _Stop(pos, 12)
            error = _start_section(buf, pos, base, section)
            if error is not None:
                return _Stop(pos, error=error)
        length = section.u32(buf, pos + 4)[0]
        error = _check_length(buf, pos, end, base, length, block_type, section)
        if error is not None:
            return _Stop(pos, error=error)
        if pos + length > end:
            return _Stop(pos, length, block_type)
        error = None
        if block_type in (_EPB, _OPB):
            error = _packet_block(buf, pos, base, length, block_type, section, out)
        elif block_type == _SPB:
            error = _simple_packet_block(buf, pos, base, length, section, out)
        elif block_type == _IDB:
            error = _interface_block(buf, pos, base, length, section)
        if error is not None:
            return _Stop(pos, error=error)
        pos += length


def _structure_error(offset: int, reason: str) -> _CaptureError:
    """At offset 0 the file is not pcapng at all; anywhere else it is damaged."""
    if offset == 0:
        return CaptureFormatError(0, f"not a pcap or pcapng file ({reason})")
    return CaptureDamagedError(offset, reason)


def _start_section(buf: bytearray, pos: int, base: int, section: _Section) -> _CaptureError | None:
    magic = bytes(buf[pos + 8 : pos + 12])
    if magic == _BYTE_ORDER_MAGIC_LE:
        section.start("<")
    elif magic == _BYTE_ORDER_MAGIC_BE:
        section.start(">")
    else:
        return _structure_error(
            base + pos, f"Section Header Block with byte-order magic 0x{magic.hex()}"
        )
    return None


def _check_length(
    buf: bytearray, pos: int, end: int, base: int, length: int, block_type: int,
    section: _Section,
) -> _CaptureError | None:
    """Validate a block's length fields (the trailing one only once the block is buffered)."""
    minimum = 28 if block_type == _SHB else 12
    if length % 4:
        return _structure_error(base + pos, f"block length {length} is not a multiple of 4")
    if length < minimum:
        return _structure_error(base + pos, f"block length {length} is smaller than {minimum}")
    if pos + length <= end:
        trailer = section.u32(buf, pos + length - 4)[0]
        if trailer != length:
            return _structure_error(
                base + pos, f"block's trailing length {trailer} differs from its length {length}"
            )
    return None


def _packet_block(
    buf: bytearray, pos: int, base: int, length: int, block_type: int, section: _Section,
    out: _Columns,
) -> _CaptureError | None:
    """Enhanced Packet Block (type 6) or Obsolete Packet Block (type 2): same layout."""
    if length < 32:
        return CaptureDamagedError(base + pos, f"packet block length {length} is below 32")
    if block_type == _EPB:
        interface, high, low, caplen, wirelen = section.epb(buf, pos + 8)
    else:
        interface, _, high, low, caplen, wirelen = section.opb(buf, pos + 8)
    if interface >= len(section.interfaces):
        return CaptureDamagedError(base + pos, f"packet for undeclared interface {interface}")
    if caplen > length - 32:
        return CaptureDamagedError(
            base + pos, f"packet block claims {caplen} captured bytes in a {length}-byte block"
        )
    described = section.interfaces[interface]
    ts_us = described.to_us((high << 32) | low)
    section.last_ts_us = ts_us
    _append(out, pos + 28, caplen, wirelen, ts_us, described.linktype, base + pos)
    return None


def _simple_packet_block(
    buf: bytearray, pos: int, base: int, length: int, section: _Section, out: _Columns
) -> _CaptureError | None:
    """Simple Packet Block: interface 0, no timestamp, captured length implied by the block."""
    if length < 16:
        return CaptureDamagedError(base + pos, f"Simple Packet Block length {length} is below 16")
    if not section.interfaces:
        return CaptureDamagedError(base + pos, "Simple Packet Block before any interface")
    described = section.interfaces[0]
    wirelen = section.u32(buf, pos + 8)[0]
    caplen = min(wirelen, length - 16)
    if described.snaplen:
        caplen = min(caplen, described.snaplen)
    _append(out, pos + 12, caplen, wirelen, section.last_ts_us, described.linktype, base + pos)
    return None


def _append(
    out: _Columns, offset: int, caplen: int, wirelen: int, ts_us: int, linktype: int,
    file_offset: int,
) -> None:
    out.offsets.append(offset)
    out.caplen.append(caplen)
    out.wirelen.append(wirelen)
    out.ts_us.append(ts_us)
    out.linktype.append(linktype)
    out.file_offsets.append(file_offset)


def _interface_block(
    buf: bytearray, pos: int, base: int, length: int, section: _Section
) -> _CaptureError | None:
    """Interface Description Block: link type, snaplen, if_tsresol and if_tsoffset options."""
    if length < 20:
        return CaptureDamagedError(
            base + pos, f"Interface Description Block length {length} is below 20"
        )
    linktype, _, snaplen = section.idb(buf, pos + 8)
    tsresol, tsoffset = 6, 0
    option, options_end = pos + 16, pos + length - 4
    while option + 4 <= options_end:
        code, size = section.option(buf, option)
        value = option + 4
        if code == 0 or value + size > options_end:
            break
        if code == _OPT_IF_TSRESOL and size >= 1:
            tsresol = buf[value]
        elif code == _OPT_IF_TSOFFSET and size == 8:
            tsoffset = struct.unpack_from(section.order + "q", buf, value)[0]
        option = value + (size + 3) // 4 * 4
    section.interfaces.append(_Interface(linktype, snaplen, _ticks_to_us(tsresol, tsoffset)))
    return None
