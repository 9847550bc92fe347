"""Stream classic pcap and pcapng captures into ``RecordBatch`` columns, chunk by chunk.

The input may be any binary stream, seekable or not (Beam's ``ReadableFile.open()`` gives
gzip-decompressing and remote streams), so it is read strictly sequentially, ~4 MB at a time,
into one reused buffer (``source.Source``); a record cut by the end of a chunk is carried over
to the next one. Memory therefore stays flat whatever the file size. The format is recognised
by its magic number, never by the file name; ``pcap`` and ``pcapng`` then walk the records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from flowbeam.capture.pcap import PCAP_FILE_HEADER, PCAP_MAGICS, read_pcap
from flowbeam.capture.pcapng import SHB, read_pcapng
from flowbeam.capture.records import RecordBatch
from flowbeam.capture.source import CaptureDamagedError, CaptureFormatError, Source

__all__ = [
    "CaptureDamagedError",
    "CaptureFormatError",
    "CaptureStats",
    "capture_kind",
    "read_capture",
]


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
    if little in PCAP_MAGICS or big in PCAP_MAGICS:
        return "pcap"
    if little == SHB:
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
    source = Source(stream, chunk_size)
    source.fill(PCAP_FILE_HEADER)
    head = bytes(source.buf[: min(source.end, 4)])
    stats.kind = capture_kind(head)
    if stats.kind is None:
        raise CaptureFormatError(0, f"not a pcap or pcapng file ({_describe_magic(head)})")
    records = read_pcap(source) if stats.kind == "pcap" else read_pcapng(source)
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
