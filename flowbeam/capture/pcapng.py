"""pcapng: blocks, sections (each with its own byte order) and the interfaces they declare.

pcapng is rarer than classic pcap and far more varied (block types, per-interface link types
and timestamp resolutions, Simple Packet Blocks without a time), so it takes a straightforward
per-block Python loop rather than a vectorised walk.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.capture.source import CaptureDamagedError, CaptureError, CaptureFormatError, Source

MAX_BLOCK = 16 << 20  # a known pcapng block claiming more is corrupt; unknown ones are skipped

SHB = 0x0A0D0D0A  # a palindrome: readable before the section's byte order is known
_IDB = 0x00000001
_OPB = 0x00000002
_SPB = 0x00000003
_EPB = 0x00000006
_BYTE_ORDER_MAGIC_LE = b"\x4d\x3c\x2b\x1a"
_BYTE_ORDER_MAGIC_BE = b"\x1a\x2b\x3c\x4d"
_BLOCK_NAMES = {
    SHB: "a Section Header Block",
    _IDB: "an Interface Description Block",
    _OPB: "an Obsolete Packet Block",
    _SPB: "a Simple Packet Block",
    _EPB: "an Enhanced Packet Block",
}
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14


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
        self.declared: list[int] = []  # file offsets of the SHBs and IDBs walked (split reads)
        self.start("<")

    def start(self, order: str) -> None:
        self.order = order
        self.interfaces: list[_Interface] = []
        self.u32 = struct.Struct(order + "I").unpack_from
        self.epb = struct.Struct(order + "IIIII").unpack_from
        self.opb = struct.Struct(order + "HHIIII").unpack_from
        self.option = struct.Struct(order + "HH").unpack_from
        self.idb = struct.Struct(order + "HHI").unpack_from


_INT64_MAX = (1 << 63) - 1


def _int64_times(ts_us: list[int]) -> np.ndarray:
    """Timestamps as int64 µs. A corrupt resolution, offset or tick count can give a time no
    int64 holds (found by benchmarks/fuzz_captures.py): it becomes the int64 maximum, which
    the decoder counts as ``timestamp_out_of_range``, instead of failing the whole file."""
    try:
        return np.array(ts_us, np.int64)
    except OverflowError:
        return np.array([t if -_INT64_MAX <= t <= _INT64_MAX else _INT64_MAX for t in ts_us],
                        np.int64)


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
            ts_us=_int64_times(self.ts_us),
            linktype=np.array(self.linktype, np.int32),
            file_offsets=np.array(self.file_offsets, np.int64),
        )


@dataclass
class _Stop:
    """Why the block loop stopped: more bytes needed (``need`` at ``pos``) or damage."""

    pos: int
    need: int = 0
    block_type: int | None = None
    error: CaptureError | None = None


def read_pcapng(source: Source, section: _Section | None = None) -> Iterator[RecordBatch]:
    """The packets of the blocks from ``source.start`` on; ``section``: the state a split
    read starts with (``pcapng_head``), else a fresh one for a read from byte 0."""
    section = _Section() if section is None else section
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


def _skip_block(source: Source, stop: _Stop, section: _Section) -> None:
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


def _pcapng_truncation(source: Source, stop: _Stop) -> CaptureDamagedError:
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
        if block_type == SHB:
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
        if block_type in (SHB, _IDB):
            section.declared.append(base + pos)
        pos += length


def pcapng_head(source: Source) -> tuple[_Section, int]:
    """The byte order and interfaces the leading SHB and IDBs declare, and where they end.

    A split read (``splits``) starts mid-file with this state, so every range knows the link
    types and timestamp resolutions. A damaged head just ends early: the range holding the
    damage reports it, as the whole read would.
    """
    section = _Section()
    while True:
        if source.end - source.start < 12 and not source.eof:
            source.fill(12)
        buf, pos, base = source.buf, source.start, source.base
        if source.end - pos < 12:
            return section, base + pos
        block_type = section.u32(buf, pos)[0]
        if block_type == SHB:
            if _start_section(buf, pos, base, section) is not None:
                return section, base + pos
        elif block_type != _IDB:
            return section, base + pos
        length = section.u32(buf, pos + 4)[0]
        if length % 4 or not 12 <= length <= MAX_BLOCK:
            return section, base + pos
        if source.end - pos < length:
            if source.eof:
                return section, base + pos
            source.fill(length)
            continue
        if block_type == _IDB and _interface_block(buf, pos, base, length, section) is not None:
            return section, base + pos
        source.start = pos + length


def _structure_error(offset: int, reason: str) -> CaptureError:
    """At offset 0 the file is not pcapng at all; anywhere else it is damaged."""
    if offset == 0:
        return CaptureFormatError(0, f"not a pcap or pcapng file ({reason})")
    return CaptureDamagedError(offset, reason)


def _start_section(buf: bytearray, pos: int, base: int, section: _Section) -> CaptureError | None:
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
) -> CaptureError | None:
    """Validate a block's length fields (the trailing one only once the block is buffered)."""
    minimum = 28 if block_type == SHB else 12
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
) -> CaptureError | None:
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
) -> CaptureError | None:
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
) -> CaptureError | None:
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
