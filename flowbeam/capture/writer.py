"""Write classic pcap and pcapng captures from packets in memory.

Tests use it to build captures with exact, known contents, and the synthetic-traffic generator
uses it to build benchmark captures of millions of packets. Both need the same three things:
nothing but ``struct`` (so the files are an independent check of the reader, not of a library
the reader might share bugs with), streaming output (the packet iterable may be a generator of
millions of packets, so the file is never built in memory), and speed (headers are packed with
precompiled ``struct.Struct`` objects and written in ~1 MB batches).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

_FLUSH_BYTES = 1 << 20  # write when this many bytes are pending: few large writes, flat memory

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_EPB = 0x00000006
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_IF_TSRESOL = 9

_NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class CapturedPacket:
    """One captured frame, as a capture file stores it."""

    ts_ns: int  # capture time, ns since the Unix epoch
    data: bytes  # frame bytes as captured (may be shorter than wirelen)
    wirelen: int | None = None  # original frame length on the wire; defaults to len(data)
    interface: int = 0  # pcapng interface index (position in ``linktypes``)


def _prefix(byteorder: str) -> str:
    if byteorder == "little":
        return "<"
    if byteorder == "big":
        return ">"
    raise ValueError(f"byteorder must be 'little' or 'big', not {byteorder!r}")


def _write_batched(stream: BinaryIO, records: Iterable[tuple[bytes, bytes, bytes]]) -> int:
    """Write each record's (header, data, trailer) joined into ~1 MB writes; return the count.

    One ``write`` per record would cost a call (often a syscall) per packet; one per file
    would hold the whole capture in memory.
    """
    parts: list[bytes] = []
    pending = count = 0
    for header, data, trailer in records:
        parts += (header, data, trailer)
        pending += len(header) + len(data) + len(trailer)
        count += 1
        if pending >= _FLUSH_BYTES:
            stream.write(b"".join(parts))
            parts.clear()
            pending = 0
    if parts:
        stream.write(b"".join(parts))
    return count


def write_pcap(
    stream: BinaryIO,
    packets: Iterable[CapturedPacket],
    *,
    linktype: int = 1,
    byteorder: Literal["little", "big"] = "little",
    nanosecond: bool = False,
    snaplen: int = 262144,
) -> int:
    """Write a classic pcap file (24-byte file header, 16-byte record headers).

    ``nanosecond`` selects magic a1b23c4d (timestamps in ns) instead of a1b2c3d4 (µs, the
    sub-microsecond part is dropped). Frames longer than ``snaplen`` are cut to ``snaplen``
    bytes, as a capture would; their wire length is kept. Returns the number of packets written.
    """
    end = _prefix(byteorder)
    magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
    stream.write(struct.pack(end + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
    return _write_batched(stream, _pcap_records(packets, end, nanosecond, snaplen))


def _pcap_records(
    packets: Iterable[CapturedPacket], end: str, nanosecond: bool, snaplen: int
) -> Iterator[tuple[bytes, bytes, bytes]]:
    pack_header = struct.Struct(end + "IIII").pack
    divisor = 1 if nanosecond else 1000
    for packet in packets:
        data = packet.data
        wirelen = len(data) if packet.wirelen is None else packet.wirelen
        if len(data) > snaplen:
            data = data[:snaplen]
        seconds, fraction = divmod(packet.ts_ns, _NS_PER_S)
        yield pack_header(seconds, fraction // divisor, len(data), wirelen), data, b""


def _ts_units_converter(tsresol: int) -> Callable[[int], int]:
    """Return a function from ns since the epoch to ticks of an ``if_tsresol`` resolution.

    ``tsresol`` is the option's byte: high bit clear means 10^-n s, high bit set 2^-n s.
    """
    exponent = tsresol & 0x7F
    if tsresol & 0x80:
        scale = 1 << exponent
        return lambda ts_ns: ts_ns * scale // _NS_PER_S
    if exponent >= 9:
        scale = 10 ** (exponent - 9)
        return lambda ts_ns: ts_ns * scale
    divisor = 10 ** (9 - exponent)
    return lambda ts_ns: ts_ns // divisor


def _pcapng_block(end: str, block_type: int, body: bytes) -> bytes:
    """Frame ``body`` (already padded to 4 bytes) as a pcapng block with both length fields."""
    total = 12 + len(body)
    return struct.pack(end + "II", block_type, total) + body + struct.pack(end + "I", total)


def _pcapng_head(end: str, linktypes: Sequence[int], resolutions: Sequence[int]) -> bytes:
    """Section Header Block (section length unknown: -1) plus one IDB per interface."""
    shb_body = struct.pack(end + "IHHq", PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1)
    blocks = [_pcapng_block(end, PCAPNG_SHB, shb_body)]
    for linktype, tsresol in zip(linktypes, resolutions, strict=True):
        options = b""
        if tsresol != 6:
            options = struct.pack(end + "HHB3x", OPT_IF_TSRESOL, 1, tsresol)
            options += struct.pack(end + "HH", 0, 0)  # opt_endofopt
        body = struct.pack(end + "HHI", linktype, 0, 0) + options
        blocks.append(_pcapng_block(end, PCAPNG_IDB, body))
    return b"".join(blocks)


def write_pcapng(
    stream: BinaryIO,
    packets: Iterable[CapturedPacket],
    *,
    linktypes: Sequence[int] = (1,),
    byteorder: Literal["little", "big"] = "little",
    tsresol: int | Sequence[int] = 6,
) -> int:
    """Write a one-section pcapng file: SHB, one IDB per link type, then one EPB per packet.

    ``packet.interface`` indexes ``linktypes``. ``tsresol`` is the ``if_tsresol`` byte (6: µs,
    9: ns, 0x80 | n: 2^-n s), either one value for every interface or one per interface; the
    option is written only where it differs from the default 6. Returns the packets written.
    """
    end = _prefix(byteorder)
    resolutions = [tsresol] * len(linktypes) if isinstance(tsresol, int) else list(tsresol)
    if len(resolutions) != len(linktypes):
        raise ValueError("tsresol needs one value per link type")
    stream.write(_pcapng_head(end, linktypes, resolutions))
    return _write_batched(stream, _epb_records(packets, end, resolutions))


def _epb_records(
    packets: Iterable[CapturedPacket], end: str, resolutions: Sequence[int]
) -> Iterator[tuple[bytes, bytes, bytes]]:
    to_units = [_ts_units_converter(resolution) for resolution in resolutions]
    pack_header = struct.Struct(end + "IIIIIII").pack
    pack_trailer = struct.Struct(end + "I").pack
    paddings = [b"", b"\0\0\0", b"\0\0", b"\0"]
    for packet in packets:
        data = packet.data
        caplen = len(data)
        wirelen = caplen if packet.wirelen is None else packet.wirelen
        interface = packet.interface
        if not 0 <= interface < len(to_units):
            raise ValueError(f"packet interface {interface} has no link type")
        units = to_units[interface](packet.ts_ns)
        padding = paddings[caplen & 3]
        total = 32 + caplen + len(padding)
        header = pack_header(PCAPNG_EPB, total, interface, units >> 32, units & 0xFFFFFFFF,
                             caplen, wirelen)
        yield header, data, padding + pack_trailer(total)
