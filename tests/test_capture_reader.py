"""Tests of the streaming capture reader (and, through round trips, of the capture writer).

Expected values are computed from the packets written, independently of the reader; real
captures are checked against dpkt as a peer.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import random
import struct
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import flowbeam.capture.pcap as capture_pcap
from flowbeam.capture.reader import (
    CaptureDamagedError,
    CaptureFormatError,
    CaptureStats,
    capture_kind,
    read_capture,
)
from flowbeam.capture.records import RecordBatch
from flowbeam.capture.writer import CapturedPacket, write_pcap, write_pcapng

PCAPS = Path(__file__).resolve().parents[2] / "shared/data/pcaps"

BASE_NS = 1_700_000_000_123_456_789  # 2023-11-14, with a sub-microsecond part


# --------------------------------------------------------------------------------------------
# Helpers


def _packets(count: int = 20, seed: int = 7) -> list[CapturedPacket]:
    """Packets of varied sizes (some snaplen-cut: wirelen > caplen) and irregular times."""
    rng = random.Random(seed)
    packets = []
    ts_ns = BASE_NS
    for index in range(count):
        data = rng.randbytes(rng.choice([0, 1, 14, 60, 61, 62, 63, 590, 1514]))
        wirelen = len(data) + 100 if index % 5 == 3 else None
        packets.append(CapturedPacket(ts_ns, data, wirelen))
        ts_ns += rng.randrange(1, 3_000_000_000)
    return packets


def _read_all(stream, chunk_size: int = 4 << 20, stats: CaptureStats | None = None):
    """(ts_us, caplen, wirelen, linktype, file_offset, data) per record, in order.

    Each batch is turned into rows before the next is read: the reader reuses its buffer.
    """
    batches = read_capture(stream, chunk_size, stats=stats)
    return [record for batch in batches for record in _records(batch)]


def _records(batch: RecordBatch) -> list[tuple[int, int, int, int, int, bytes]]:
    assert len(batch) > 0
    assert batch.data.dtype == np.uint8
    assert batch.offsets.dtype == np.int64 and batch.caplen.dtype == np.int64
    assert batch.wirelen.dtype == np.int64 and batch.ts_us.dtype == np.int64
    assert batch.linktype.dtype == np.int32 and batch.file_offsets.dtype == np.int64
    rows = []
    for index in range(len(batch)):
        start, caplen = int(batch.offsets[index]), int(batch.caplen[index])
        rows.append((
            int(batch.ts_us[index]), caplen, int(batch.wirelen[index]),
            int(batch.linktype[index]), int(batch.file_offsets[index]),
            batch.data[start : start + caplen].tobytes(),
        ))
    return rows


def _expected_pcap(packets: list[CapturedPacket], linktype: int = 1, header_len: int = 16):
    """What a pcap written from ``packets`` must read back as, computed from first principles."""
    rows, offset = [], 24
    for packet in packets:
        ts_us = packet.ts_ns // 1000  # µs files drop the sub-µs part; ns files are floored
        wirelen = len(packet.data) if packet.wirelen is None else packet.wirelen
        rows.append((ts_us, len(packet.data), wirelen, linktype, offset, packet.data))
        offset += header_len + len(packet.data)
    return rows


def _pcap_bytes(packets: list[CapturedPacket], **options) -> bytes:
    stream = io.BytesIO()
    assert write_pcap(stream, packets, **options) == len(packets)
    return stream.getvalue()


@pytest.fixture(params=["speculative", "python-loop"])
def walk(request, monkeypatch):
    """Run a test with each classic-pcap walk (the speculative one even on tiny chunks)."""
    threshold = 0 if request.param == "speculative" else 1 << 62
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", threshold)
    return request.param


# pcapng blocks built by hand, so the tests do not depend on the writer for the rarer blocks.

def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _block(order: str, block_type: int, body: bytes) -> bytes:
    body = _pad(body)
    total = 12 + len(body)
    return struct.pack(order + "II", block_type, total) + body + struct.pack(order + "I", total)


def _shb(order: str) -> bytes:
    return _block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def _option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + _pad(value)


def _idb(order: str, linktype: int, snaplen: int = 0, tsresol: int | None = None,
         tsoffset: int | None = None) -> bytes:
    options = _option(order, 2, b"eth0")  # if_name, to be skipped
    if tsresol is not None:
        options += _option(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        options += _option(order, 14, struct.pack(order + "q", tsoffset))
    options += struct.pack(order + "HH", 0, 0)
    return _block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + options)


def _epb(order: str, interface: int, ticks: int, data: bytes, wirelen: int | None = None) -> bytes:
    wirelen = len(data) if wirelen is None else wirelen
    header = struct.pack(order + "IIIII", interface, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                         wirelen)
    return _block(order, 6, header + data)


def _opb(order: str, interface: int, ticks: int, data: bytes) -> bytes:
    header = struct.pack(order + "HHIIII", interface, 0, ticks >> 32, ticks & 0xFFFFFFFF,
                         len(data), len(data))
    return _block(order, 2, header + data)


def _spb(order: str, wirelen: int, data: bytes) -> bytes:
    return _block(order, 3, struct.pack(order + "I", wirelen) + data)


def _offsets(blocks: list[bytes]) -> list[int]:
    """Stream offset of each block."""
    offsets, total = [], 0
    for block in blocks:
        offsets.append(total)
        total += len(block)
    return offsets


# --------------------------------------------------------------------------------------------
# Classic pcap round trips


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("nanosecond", [False, True])
def test_pcap_round_trip(walk, byteorder, nanosecond):
    packets = _packets(200)
    data = _pcap_bytes(packets, linktype=113, byteorder=byteorder, nanosecond=nanosecond)
    magic = data[:4] if byteorder == "big" else data[3::-1]
    assert magic.hex() == ("a1b23c4d" if nanosecond else "a1b2c3d4")
    stats = CaptureStats()
    rows = _read_all(io.BytesIO(data), stats=stats)
    assert rows == _expected_pcap(packets, linktype=113)
    assert stats == CaptureStats(kind="pcap", records=200, batches=1, bytes_read=len(data))


def test_pcap_timestamps_exact():
    packets = [
        CapturedPacket(0, b"a"),
        CapturedPacket(999, b"b"),  # below a microsecond: floors to 0
        CapturedPacket(1_000_999, b"c"),
        CapturedPacket(BASE_NS, b"d"),
        CapturedPacket(4_294_967_295_999_999_999, b"e"),  # the last second pcap can hold
    ]
    expected = [0, 0, 1000, 1_700_000_000_123_456, 4_294_967_295_999_999]
    for nanosecond in (False, True):
        data = _pcap_bytes(packets, nanosecond=nanosecond)
        assert [row[0] for row in _read_all(io.BytesIO(data))] == expected


def test_pcap_linktype_fcs_bits_are_masked():
    # Ethernet whose frames end with a 4-byte FCS: length 1 in bits 28-31, P bit 0x04000000.
    data = _pcap_bytes(_packets(3), linktype=0x1400_0001)
    assert [row[3] for row in _read_all(io.BytesIO(data))] == [1, 1, 1]


def test_pcap_writer_cuts_frames_to_snaplen():
    data = _pcap_bytes([CapturedPacket(BASE_NS, bytes(range(100)))], snaplen=64)
    assert _read_all(io.BytesIO(data)) == [
        (BASE_NS // 1000, 64, 100, 1, 24, bytes(range(64)))
    ]


def test_modified_pcap_magic_has_24_byte_headers():
    header = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1)
    records = [(1_600_000_000, 5, b"\x01" * 60), (1_600_000_001, 999_999, b"\x02" * 7)]
    body = b"".join(struct.pack("<IIIIIHBx", sec, usec, len(payload), len(payload), 2, 8, 4)
                    + payload for sec, usec, payload in records)
    assert _read_all(io.BytesIO(header + body)) == [
        (1_600_000_000_000_005, 60, 60, 1, 24, b"\x01" * 60),
        (1_600_000_001_999_999, 7, 7, 1, 24 + 24 + 60, b"\x02" * 7),
    ]


def test_capture_kind():
    assert capture_kind(bytes.fromhex("d4c3b2a1")) == "pcap"
    assert capture_kind(bytes.fromhex("a1b2c3d4")) == "pcap"
    assert capture_kind(bytes.fromhex("4d3cb2a1")) == "pcap"
    assert capture_kind(bytes.fromhex("a1b23c4d")) == "pcap"
    assert capture_kind(bytes.fromhex("34cdb2a1")) == "pcap"
    assert capture_kind(bytes.fromhex("0a0d0d0a1a2b3c4d")) == "pcapng"
    assert capture_kind(b"GIF89a") is None
    assert capture_kind(b"\xd4\xc3") is None


# --------------------------------------------------------------------------------------------
# Chunking and streams


@pytest.mark.parametrize("chunk_size", [1, 64, 100, 1000, 4 << 20])
def test_pcap_chunk_boundaries(walk, chunk_size):
    packets = _packets(60)
    packets.insert(30, CapturedPacket(BASE_NS + 5, bytes(range(256)) * 40))  # 10 KB > chunk
    data = _pcap_bytes(packets)
    stats = CaptureStats()
    rows = _read_all(io.BytesIO(data), chunk_size, stats)  # each batch is used up before the next
    assert rows == _expected_pcap(packets)
    if chunk_size < 1000:
        assert stats.batches > 10


def test_pcapng_chunk_boundaries():
    packets = [CapturedPacket(BASE_NS + i, bytes([i]) * (i * 37 % 300), None, i % 2)
               for i in range(50)]
    packets.append(CapturedPacket(BASE_NS + 99, b"\xab" * 5000, 6000, 1))
    stream = io.BytesIO()
    write_pcapng(stream, packets, linktypes=(1, 101))
    whole = _read_all(io.BytesIO(stream.getvalue()))
    assert len(whole) == 51
    assert whole[-1][:4] == ((BASE_NS + 99) // 1000, 5000, 6000, 101)
    for chunk_size in (1, 64, 333):
        assert _read_all(io.BytesIO(stream.getvalue()), chunk_size) == whole


class _ReadOnly:
    """A non-seekable stream with only ``read``, returning short reads (like a socket)."""

    def __init__(self, data: bytes, most: int = 7) -> None:
        self._data = data
        self._pos = 0
        self._most = most

    def read(self, size: int = -1) -> bytes:
        size = self._most if size < 0 else min(size, self._most)
        piece = self._data[self._pos : self._pos + size]
        self._pos += len(piece)
        return piece


class _ShortReadinto(io.RawIOBase):
    """A non-seekable raw stream whose ``readinto`` fills at most 5 bytes per call."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        piece = self._data[self._pos : self._pos + min(5, len(target))]
        target[: len(piece)] = piece
        self._pos += len(piece)
        return len(piece)


@pytest.mark.parametrize("wrapper", [_ReadOnly, _ShortReadinto])
def test_non_seekable_streams(wrapper):
    packets = _packets(40)
    data = _pcap_bytes(packets, byteorder="big", nanosecond=True)
    stream = wrapper(data)
    assert not getattr(stream, "seekable", lambda: False)()
    assert _read_all(stream, 256) == _expected_pcap(packets)


def test_gzip_stream(tmp_path):
    packets = _packets(300)
    path = tmp_path / "capture.pcap.gz"
    with gzip.open(path, "wb") as compressed:
        write_pcap(compressed, packets)
    with gzip.open(path, "rb") as stream:
        assert _read_all(stream, 4096) == _expected_pcap(packets)


def test_beam_compressed_stream(tmp_path):
    filesystems = pytest.importorskip("apache_beam.io.filesystems")
    packets = _packets(100)
    path = tmp_path / "capture.pcapng.gz"
    with gzip.open(path, "wb") as compressed:
        write_pcapng(compressed, packets)
    with filesystems.FileSystems.open(str(path)) as stream:  # Beam's CompressedFile: read() only
        rows = _read_all(stream, 1000)
    assert [row[:4] for row in rows] == [
        (p.ts_ns // 1000, len(p.data), len(p.data) if p.wirelen is None else p.wirelen, 1)
        for p in packets
    ]


def test_pcapng_file_named_pcap_is_detected_by_magic(tmp_path):
    path = tmp_path / "looks-classic.pcap"
    with path.open("wb") as stream:
        write_pcapng(stream, _packets(5), linktypes=(101,))
    stats = CaptureStats()
    with path.open("rb") as stream:
        rows = _read_all(stream, stats=stats)
    assert stats.kind == "pcapng"
    assert [row[3] for row in rows] == [101] * 5


def test_memory_stays_flat_on_a_long_stream():
    """A stream far bigger than the chunk is read in chunk-sized pieces, never whole."""
    packets = [CapturedPacket(BASE_NS + i * 1000, bytes(60)) for i in range(20_000)]
    data = _pcap_bytes(packets)
    sizes = []
    for batch in read_capture(io.BytesIO(data), chunk_size=64 << 10):
        sizes.append(batch.data.size)
    assert sum(len(packet.data) + 16 for packet in packets) + 24 == len(data)
    assert max(sizes) <= 64 << 10
    assert len(sizes) >= len(data) // (64 << 10)


# --------------------------------------------------------------------------------------------
# pcapng


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_pcapng_writer_round_trip_three_interfaces(byteorder):
    linktypes = (1, 113, 101)
    resolutions = (6, 9, 0x80 | 10)  # µs, ns, 1/1024 s
    packets = [CapturedPacket(BASE_NS + i * 777_777_777, bytes([i]) * (i % 70), None, i % 3)
               for i in range(30)]
    stream = io.BytesIO()
    write_pcapng(stream, packets, linktypes=linktypes, byteorder=byteorder, tsresol=resolutions)
    rows = _read_all(io.BytesIO(stream.getvalue()))

    def expected_us(packet: CapturedPacket) -> int:
        if packet.interface == 2:  # 2^-10 s ticks, each step floored
            ticks = packet.ts_ns * 1024 // 1_000_000_000
            return ticks * 1_000_000 // 1024
        return packet.ts_ns // 1000

    assert [row[:4] for row in rows] == [
        (expected_us(p), len(p.data), len(p.data), linktypes[p.interface]) for p in packets
    ]
    assert [row[5] for row in rows] == [p.data for p in packets]
    assert rows[2][0] == (BASE_NS + 2 * 777_777_777) * 1024 // 10**9 * 10**6 // 1024
    assert rows[1][0] == (BASE_NS + 777_777_777) // 1000


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_hand_built_blocks(order):
    t0 = 1_600_000_000_000_000  # µs
    blocks = [
        _shb(order),
        _block(order, 0x0BAD, b"custom block payload"),  # skipped
        _idb(order, 1),  # interface 0: µs
        _idb(order, 113, tsresol=9, tsoffset=100),  # interface 1: ns, +100 s
        _idb(order, 101, snaplen=8, tsresol=0x80 | 20),  # interface 2: 2^-20 s
        _spb(order, 50, b"\x11" * 50),  # before any timestamp: 0
        _epb(order, 1, (t0 * 1000 + 999), b"\x22" * 10, 1514),
        _block(order, 4, b"\x00" * 8),  # NRB: skipped
        _spb(order, 70, b"\x33" * 40),  # snaplen-cut SPB: previous packet's time
        _opb(order, 2, (5 << 20) + (1 << 19), b"\x44" * 8),  # 5.5 s
        _block(order, 5, b"\x00" * 20),  # ISB: skipped
        _block(order, 0x12345678, b"unknown"),  # unknown: skipped
        _epb(order, 0, t0 + 1, b""),
    ]
    offsets = _offsets(blocks)
    rows = _read_all(io.BytesIO(b"".join(blocks)))
    assert rows == [
        (0, 50, 50, 1, offsets[5], b"\x11" * 50),
        (t0 + 100_000_000, 10, 1514, 113, offsets[6], b"\x22" * 10),
        (t0 + 100_000_000, 40, 70, 1, offsets[8], b"\x33" * 40),
        (5_500_000, 8, 8, 101, offsets[9], b"\x44" * 8),
        (t0 + 1, 0, 0, 1, offsets[12], b""),
    ]


def test_pcapng_two_sections_with_different_byte_orders():
    first = [_shb("<"), _idb("<", 1), _epb("<", 0, 1_000_000, b"le")]
    second = [_shb(">"), _idb(">", 101, tsresol=3), _idb(">", 113),
              _epb(">", 1, 2_000_000, b"be-113"), _epb(">", 0, 3_000, b"be-101")]
    blocks = first + second
    offsets = _offsets(blocks)
    assert _read_all(io.BytesIO(b"".join(blocks)), chunk_size=32) == [
        (1_000_000, 2, 2, 1, offsets[2], b"le"),
        (2_000_000, 6, 6, 113, offsets[6], b"be-113"),
        (3_000_000, 6, 6, 101, offsets[7], b"be-101"),
    ]


def test_pcapng_section_resets_interfaces():
    blocks = [_shb("<"), _idb("<", 1), _shb("<"), _epb("<", 0, 1, b"x")]
    with pytest.raises(CaptureDamagedError) as raised:
        _read_all(io.BytesIO(b"".join(blocks)))
    assert raised.value.offset == _offsets(blocks)[3]
    assert raised.value.reason == "packet for undeclared interface 0"


def test_pcapng_unknown_block_bigger_than_the_buffer_is_streamed_past():
    blocks = [_shb("<"), _idb("<", 1), _block("<", 0x40000BAD, bytes(5000)),
              _epb("<", 0, 42, b"after")]
    offsets = _offsets(blocks)
    for chunk_size in (64, 100, 4 << 20):
        stats = CaptureStats()
        rows = _read_all(io.BytesIO(b"".join(blocks)), chunk_size, stats)
        assert rows == [(42, 5, 5, 1, offsets[3], b"after")]
        assert stats.bytes_read == sum(map(len, blocks))


def test_pcapng_truncated_inside_a_skipped_big_block():
    blocks = [_shb("<"), _idb("<", 1), _epb("<", 0, 1, b"a"), _block("<", 77, bytes(5000))]
    data = b"".join(blocks)[:-10]
    with pytest.raises(CaptureDamagedError) as raised:
        _read_all(io.BytesIO(data), chunk_size=64)
    assert raised.value.offset == _offsets(blocks)[3]
    assert raised.value.reason == "file ends inside a block (5002 of 5012 bytes)"


def test_writer_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="interface 2 has no link type"):
        write_pcapng(io.BytesIO(), [CapturedPacket(0, b"", None, 2)], linktypes=(1, 113))
    with pytest.raises(ValueError, match="one value per link type"):
        write_pcapng(io.BytesIO(), [], linktypes=(1, 113), tsresol=(6,))
    with pytest.raises(ValueError, match="byteorder"):
        write_pcap(io.BytesIO(), [], byteorder="middle")


# --------------------------------------------------------------------------------------------
# Damage


def _collect_until_error(data: bytes, chunk_size: int = 4 << 20, error=CaptureDamagedError):
    rows = []
    with pytest.raises(error) as raised:
        for batch in read_capture(io.BytesIO(data), chunk_size):
            rows.extend(_records(batch))
    return rows, raised.value


@pytest.mark.parametrize("chunk_size", [64, 4 << 20])
def test_pcap_truncated_inside_a_record_header(walk, chunk_size):
    packets = _packets(30)
    data = _pcap_bytes(packets)
    expected = _expected_pcap(packets)
    cut = expected[-1][4] + 5  # 5 bytes into the last record's header
    rows, error = _collect_until_error(data[:cut], chunk_size)
    assert rows == expected[:-1]
    assert (error.offset, error.reason) == (
        expected[-1][4], "file ends inside a record header (5 of 16 bytes)")


@pytest.mark.parametrize("chunk_size", [64, 4 << 20])
def test_pcap_truncated_inside_record_data(walk, chunk_size):
    packets = _packets(30)
    packets[-1] = CapturedPacket(BASE_NS, bytes(1000))
    data = _pcap_bytes(packets)
    expected = _expected_pcap(packets)
    rows, error = _collect_until_error(data[:-1], chunk_size)
    assert rows == expected[:-1]
    assert (error.offset, error.reason) == (
        expected[-1][4], "file ends inside a record's data (999 of 1000 captured bytes)")


def test_pcap_file_header_only_and_cut_file_header():
    header = _pcap_bytes([])
    assert len(header) == 24 and list(read_capture(io.BytesIO(header))) == []
    rows, error = _collect_until_error(header[:10])
    assert rows == []
    assert (error.offset, error.reason) == (
        0, "file ends inside the pcap file header (10 of 24 bytes)")


@pytest.mark.parametrize("caplen", [0xFFFFFFFF, 300_000])
def test_pcap_impossible_caplen(walk, caplen):
    packets = _packets(10)
    data = bytearray(_pcap_bytes([*packets, CapturedPacket(BASE_NS, bytes(400_000))],
                                 snaplen=1 << 20))
    expected = _expected_pcap(packets)
    bad = expected[-1][4] + 16 + len(packets[-1].data)
    struct.pack_into("<I", data, bad + 8, caplen)
    rows, error = _collect_until_error(bytes(data))
    assert rows == expected
    assert (error.offset, error.reason) == (bad, f"record claims {caplen} captured bytes")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a pcap or pcapng file (empty file)"),
        (b"\xd4\xc3", "not a pcap or pcapng file (only 2 bytes)"),
        (b"<!DOCTYPE html><html></html>", "not a pcap or pcapng file (magic 0x3c21444f)"),
        (bytes(range(256)) * 100, "not a pcap or pcapng file (magic 0x00010203)"),
    ],
)
def test_not_a_capture(data, reason):
    rows, error = _collect_until_error(data, error=CaptureFormatError)
    assert rows == []
    assert (error.offset, error.reason) == (0, reason)
    assert str(error) == f"{reason} (at byte 0)"
    assert isinstance(error, ValueError)


def test_pcapng_with_a_bad_byte_order_magic_is_not_a_capture():
    data = bytearray(_shb("<") + _idb("<", 1))
    data[8:12] = b"\x01\x02\x03\x04"
    rows, error = _collect_until_error(bytes(data), error=CaptureFormatError)
    assert rows == []
    assert (error.offset, error.reason) == (
        0, "not a pcap or pcapng file (Section Header Block with byte-order magic 0x01020304)")


def _pcapng_with_damaged_third_packet(damage) -> tuple[bytes, list[int]]:
    blocks = [_shb("<"), _idb("<", 1)] + [_epb("<", 0, i, bytes([i]) * 9) for i in range(5)]
    blocks[4] = damage(bytearray(blocks[4]))
    return b"".join(blocks), _offsets(blocks)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda b: b[:4] + struct.pack("<I", 46) + b[8:], "block length 46 is not a multiple of 4"),
        (lambda b: b[:4] + struct.pack("<I", 8) + b[8:], "block length 8 is smaller than 12"),
        (lambda b: b[:-4] + struct.pack("<I", 40),
         "block's trailing length 40 differs from its length 44"),
        (lambda b: b[:20] + struct.pack("<I", 13) + b[24:],
         "packet block claims 13 captured bytes in a 44-byte block"),
        (lambda b: b[:8] + struct.pack("<I", 3) + b[12:], "packet for undeclared interface 3"),
        (lambda b: b[:4] + struct.pack("<I", 0x7FFFFFF0) + b[8:],
         "an Enhanced Packet Block claims 2147483632 bytes"),
    ],
)
def test_pcapng_damaged_block(damage, reason):
    data, offsets = _pcapng_with_damaged_third_packet(damage)
    for chunk_size in (64, 4 << 20):
        rows, error = _collect_until_error(data, chunk_size)
        assert [row[5] for row in rows] == [b"\x00" * 9, b"\x01" * 9]
        assert (error.offset, error.reason) == (offsets[4], reason)


def test_pcapng_truncated_inside_a_block_and_a_block_header():
    blocks = [_shb(">"), _idb(">", 1), _epb(">", 0, 7, b"abc"), _epb(">", 0, 8, b"defg")]
    data, offsets = b"".join(blocks), _offsets(blocks)
    rows, error = _collect_until_error(data[:-3])
    assert [row[5] for row in rows] == [b"abc"]
    assert (error.offset, error.reason) == (
        offsets[3], "file ends inside an Enhanced Packet Block (33 of 36 bytes)")
    rows, error = _collect_until_error(data[: offsets[3] + 6], chunk_size=64)
    assert [row[5] for row in rows] == [b"abc"]
    assert (error.offset, error.reason) == (
        offsets[3], "file ends inside a block header (6 of 8 bytes)")


# --------------------------------------------------------------------------------------------
# The speculative walk against the plain loop


def _walks_agree(data: bytes) -> list[int]:
    """Walk a pcap's records both ways over the whole buffer; return the header positions."""
    layout = capture_pcap._PcapLayout("<", 16, False, 1)
    buf = bytearray(data)
    reference, stop = capture_pcap._walk_pcap_scalar(buf, 24, len(buf), layout)
    fast, fast_stop = capture_pcap._walk_pcap(buf, 24, len(buf), layout)
    assert fast.dtype == np.int64
    assert fast.tolist() == reference.tolist()
    assert fast_stop == stop
    return reference.tolist()


def test_speculative_walk_steps_over_fake_headers(monkeypatch):
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
    monkeypatch.setattr(capture_pcap, "_MAX_REPAIRS", 3)
    rng = random.Random(3)
    packets = []
    for index in range(3000):
        ts_ns = BASE_NS + index * 1_000_000
        fake = struct.pack("<IIII", ts_ns // 10**9, 0, rng.randrange(0, 2000), 60)
        payload = rng.randbytes(rng.randrange(0, 30)) + fake + rng.randbytes(rng.randrange(0, 90))
        packets.append(CapturedPacket(ts_ns, payload if index % 3 else payload[:20]))
    data = _pcap_bytes(packets)
    positions = _walks_agree(data)
    assert positions == [row[4] for row in _expected_pcap(packets)]
    assert _walks_agree(data[:-7]) == positions[:-1]


def test_speculative_walk_across_a_ts_sec_high_half_change(monkeypatch):
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
    start = 0x6000_0000 - 50  # upper 16 bits of ts_sec change after 50 s
    packets = [CapturedPacket((start + i) * 10**9, bytes(i % 200)) for i in range(400)]
    data = _pcap_bytes(packets)
    assert _walks_agree(data) == [row[4] for row in _expected_pcap(packets)]


def test_speculative_walk_with_dense_candidates(monkeypatch):
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
    packets = [CapturedPacket(i % 3, bytes(i % 50)) for i in range(500)]  # ts_sec 0, zero bytes
    data = _pcap_bytes(packets)
    assert _walks_agree(data) == [row[4] for row in _expected_pcap(packets)]


def test_speculative_walk_on_random_bytes(monkeypatch):
    """Garbage after a valid prefix: both walks must stop at the same place."""
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
    rng = random.Random(11)
    for _ in range(20):
        packets = _packets(rng.randrange(1, 40), seed=rng.randrange(1000))
        _walks_agree(_pcap_bytes(packets) + rng.randbytes(rng.randrange(0, 5000)))


# --------------------------------------------------------------------------------------------
# Real captures, against dpkt


def _real(name: str) -> Path:
    if not PCAPS.is_dir():
        pytest.skip(f"reference captures not found at {PCAPS}")
    return PCAPS / name


def _dpkt_pcap(path: Path) -> list[tuple[float, bytes]]:
    dpkt = pytest.importorskip("dpkt")
    records = []
    # NeedData is dpkt's signal for a truncated trailing record; the records before it stay.
    with path.open("rb") as stream, contextlib.suppress(dpkt.NeedData):
        records.extend(dpkt.pcap.Reader(stream))
    return records


@pytest.mark.parametrize(
    "name",
    ["ppp_nanosecs_big_endian.pcap", "zeek_get-to-ssh-server_nanosec.pcap",
     "nfs_ps_vue_bigendian.pcap", "zeek_echo-connections.pcap", "ppp_sll.pcap"],
)
def test_real_pcap_against_dpkt(walk, name):
    path = _real(name)
    peer = _dpkt_pcap(path)
    with path.open("rb") as stream:
        rows = _read_all(stream)
    assert len(rows) == len(peer) > 0
    assert [row[5] for row in rows] == [data for _, data in peer]
    for index in (0, -1):
        peer_ts = peer[index][0]
        if isinstance(peer_ts, Decimal):  # dpkt's exact type for nanosecond files
            assert rows[index][0] == int(peer_ts * 1_000_000)
        else:  # a float: agree within its precision
            assert abs(peer_ts * 1e6 - rows[index][0]) < 1.0


def test_real_nanosecond_pcap_exact_first_timestamp():
    path = _real("ppp_nanosecs_big_endian.pcap")
    header = path.read_bytes()[24:40]
    sec, nsec = struct.unpack(">II", header[:8])
    with path.open("rb") as stream:
        rows = _read_all(stream)
    assert rows[0][0] == sec * 1_000_000 + nsec // 1000
    assert rows[0][4] == 24


def test_real_truncated_capture():
    path = _real("sv_http-mime_truncated_file.pcap")
    peer = _dpkt_pcap(path)
    size = path.stat().st_size
    rows = []
    with path.open("rb") as stream, pytest.raises(CaptureDamagedError) as raised:
        for batch in read_capture(stream, chunk_size=1 << 20):
            rows.extend(_records(batch))
    assert len(rows) == len(peer) == 2696
    assert [row[5] for row in rows] == [data for _, data in peer]
    assert (raised.value.offset, raised.value.reason) == (
        size - 1, "file ends inside a record header (1 of 16 bytes)")


def _dpkt_pcapng_blocks(path: Path) -> list[tuple[int, int, int, bytes]]:
    """(ts_us, wirelen, linktype, data) per packet, from dpkt's block classes.

    ``dpkt.pcapng.Reader`` applies the first interface's resolution to every interface and
    reads one section only, so the peer walks the blocks itself with dpkt's block parsers.
    """
    pcapng = pytest.importorskip("dpkt.pcapng")
    data, pos, little = path.read_bytes(), 0, True
    interfaces: list[tuple[int, int, int]] = []
    packets = []
    while pos < len(data):
        if data[pos : pos + 4] == b"\n\r\r\n":
            little = data[pos + 8 : pos + 12] == b"\x4d\x3c\x2b\x1a"
            interfaces = []
        length = struct.unpack_from("<I" if little else ">I", data, pos + 4)[0]
        block = data[pos : pos + length]
        block_type = struct.unpack_from("<I" if little else ">I", block)[0]
        if block_type == 1:
            idb = (pcapng.InterfaceDescriptionBlockLE if little
                   else pcapng.InterfaceDescriptionBlock)(block)
            options = {opt.code: opt.data for opt in idb.opts}
            tsresol = options.get(9, b"\x06")[0]
            offset = struct.unpack("<q" if little else ">q", options[14])[0] if 14 in options else 0
            interfaces.append((idb.linktype, tsresol, offset))
        elif block_type == 6:
            epb = (pcapng.EnhancedPacketBlockLE if little else pcapng.EnhancedPacketBlock)(block)
            linktype, tsresol, offset = interfaces[epb.iface_id]
            ticks = (epb.ts_high << 32) | epb.ts_low
            if tsresol & 0x80:
                ts_us = ticks * 10**6 // 2 ** (tsresol & 0x7F)
            else:
                ts_us = ticks * 10**6 // 10**tsresol
            packets.append((ts_us + offset * 10**6, epb.pkt_len, linktype, bytes(epb.pkt_data)))
        pos += length
    return packets


@pytest.mark.parametrize(
    "name",
    ["nfs_dhcp_big_endian.pcapng", "ppp_ldap_mixed_linktypes.pcapng",
     "zeek_pcapng-multi-interface.pcapng", "cs_icmp_traceroute.pcapng"],
)
def test_real_pcapng_against_dpkt(name):
    path = _real(name)
    dpkt = pytest.importorskip("dpkt")
    with path.open("rb") as stream:
        reader_peer = list(dpkt.pcapng.Reader(stream))
    block_peer = _dpkt_pcapng_blocks(path)
    with path.open("rb") as stream:
        rows = _read_all(stream, chunk_size=256)
    assert len(rows) == len(reader_peer) == len(block_peer) > 0
    assert [row[5] for row in rows] == [data for _, data in reader_peer]
    assert [(row[0], row[2], row[3], row[5]) for row in rows] == block_peer
    assert (rows[0][0], rows[-1][0]) == (block_peer[0][0], block_peer[-1][0])


def test_real_pcapng_mixed_link_types():
    path = _real("ppp_ldap_mixed_linktypes.pcapng")
    with path.open("rb") as stream:
        rows = _read_all(stream)
    # The file declares 11 interfaces; the first four are EN10MB, EN10MB, LINUX_SLL, EN10MB,
    # and its 25 packets come from interfaces 5 4 9 10 3 8 2 6 0 (x16) 7.
    assert [row[3] for row in rows] == [1] * 6 + [113, 113] + [1] * 17
    assert rows[0][0] == ((256876 << 32) | 2386774297)  # interface 5 has the default µs
    assert rows[-1][0] == ((399864093 << 32) | 525297472) // 1000  # interface 7 has ns
