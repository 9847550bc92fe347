"""The packet batch: what the capture agent publishes and the streaming pipeline reads.

This module is the contract between the two sides, so both import the names below and
neither spells an attribute name itself. A batch is one Pub/Sub message:

- ``data``: a classic pcap file (24-byte global header, then 16-byte record headers with
  microsecond timestamps), gzip'd when the ``compression`` attribute says ``gzip``. A plain
  pcap file because any tool reads one (``tcpdump -r``, Wireshark, dpkt, ``read_capture``),
  so a batch pulled by hand can be inspected without flowbeam.
- attributes (all strings, as Pub/Sub requires): see the ``ATTR_*`` constants.

One batch holds packets of one link type only (a classic pcap header has one), so a pcapng
capture that mixes link types becomes several batches.

Event time: ``ts`` is the FIRST packet's time in ms since the epoch, meant for
``ReadFromPubSub(timestamp_attribute=TIMESTAMP_ATTRIBUTE)``. The first packet, not the last:
a runner that estimates the watermark from message timestamps then never moves it past a
packet still inside a batch in flight.

Order and duplicates: Pub/Sub may deliver batches out of order and more than once (the agent
retries, and a spooled batch may be sent again after a crash). ``(sensor, session, sequence)``
identifies a batch; within one session sequence numbers are contiguous from 0, so a gap is a
batch the agent counted as dropped.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flowbeam.capture.writer import PCAP_MAGIC_US, CapturedPacket, write_pcap

FORMAT_VERSION = "1"

ATTR_FORMAT = "flowbeam_batch"  # FORMAT_VERSION: a reader refuses versions it does not know
ATTR_SENSOR = "sensor"  # where the packets were captured (default: the agent's host name)
ATTR_SESSION = "session"  # one agent run: sequence numbers restart with every session
ATTR_SEQUENCE = "sequence"  # 0, 1, 2... within the session
ATTR_LINKTYPE = "linktype"  # LINKTYPE_* of every packet in the batch (also in the pcap header)
ATTR_PACKETS = "packets"  # number of pcap records
ATTR_FIRST_PACKET_US = "first_packet_us"  # earliest packet time, µs since the epoch
ATTR_LAST_PACKET_US = "last_packet_us"  # latest packet time, µs since the epoch
ATTR_TS = "ts"  # first packet time in ms since the epoch: the message's event time
ATTR_KERNEL_DROPS = "kernel_drops"  # packets the kernel dropped since the previous batch
ATTR_COMPRESSION = "compression"  # COMPRESSION_GZIP or COMPRESSION_NONE

TIMESTAMP_ATTRIBUTE = ATTR_TS
COMPRESSION_GZIP = "gzip"
COMPRESSION_NONE = "none"
COMPRESSIONS = (COMPRESSION_GZIP, COMPRESSION_NONE)

# Pub/Sub refuses messages over 10 MB (data plus attributes). A batch's pcap bytes are capped
# well below that (gzip can add a few bytes to incompressible data), which also bounds what a
# reader must hold for one message.
MAX_BATCH_BYTES = 8_000_000
PCAP_HEADER_BYTES = 24
RECORD_HEADER_BYTES = 16
# gzip level 1: on the shared real captures it saves 54% of the bytes against 56% at level 6,
# at 2-5 times the speed (README, "Live capture").
GZIP_LEVEL = 1

_REQUIRED = (ATTR_FORMAT, ATTR_SENSOR, ATTR_SESSION, ATTR_SEQUENCE, ATTR_LINKTYPE, ATTR_PACKETS,
             ATTR_FIRST_PACKET_US, ATTR_LAST_PACKET_US, ATTR_TS, ATTR_KERNEL_DROPS,
             ATTR_COMPRESSION)
_INTEGERS = (ATTR_SEQUENCE, ATTR_LINKTYPE, ATTR_PACKETS, ATTR_FIRST_PACKET_US,
             ATTR_LAST_PACKET_US, ATTR_TS, ATTR_KERNEL_DROPS)


class BatchFormatError(ValueError):
    """A message is not a readable packet batch; the text says what is wrong with it."""


@dataclass(frozen=True)
class BatchInfo:
    """A batch's attributes, parsed and checked."""

    sensor: str
    session: str
    sequence: int
    linktype: int
    packets: int
    first_packet_us: int
    last_packet_us: int
    kernel_drops: int
    compression: str


def encode_batch(
    packets: Sequence[CapturedPacket], *, linktype: int, sensor: str, session: str,
    sequence: int, kernel_drops: int, snaplen: int, compression: str = COMPRESSION_GZIP,
) -> tuple[bytes, dict[str, str]]:
    """The message data and attributes of one batch of packets (in capture order)."""
    if not packets:
        raise ValueError("a batch needs at least one packet")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    stream = io.BytesIO()
    write_pcap(stream, packets, linktype=linktype, snaplen=snaplen)
    data = stream.getvalue()
    if compression == COMPRESSION_GZIP:
        data = gzip.compress(data, GZIP_LEVEL, mtime=0)
    first_us = min(packet.ts_ns for packet in packets) // 1000
    last_us = max(packet.ts_ns for packet in packets) // 1000
    attributes = {
        ATTR_FORMAT: FORMAT_VERSION,
        ATTR_SENSOR: sensor,
        ATTR_SESSION: session,
        ATTR_SEQUENCE: str(sequence),
        ATTR_LINKTYPE: str(linktype),
        ATTR_PACKETS: str(len(packets)),
        ATTR_FIRST_PACKET_US: str(first_us),
        ATTR_LAST_PACKET_US: str(last_us),
        ATTR_TS: str(first_us // 1000),
        ATTR_KERNEL_DROPS: str(kernel_drops),
        ATTR_COMPRESSION: compression,
    }
    return data, attributes


def batch_info(attributes: Mapping[str, str]) -> BatchInfo:
    """Parse and check a message's attributes; raises ``BatchFormatError``."""
    missing = [name for name in _REQUIRED if name not in attributes]
    if missing:
        raise BatchFormatError(f"not a flowbeam packet batch: missing attributes {missing}")
    if attributes[ATTR_FORMAT] != FORMAT_VERSION:
        raise BatchFormatError(
            f"unknown batch format version {attributes[ATTR_FORMAT]!r} (this reader knows "
            f"{FORMAT_VERSION!r}): upgrade the pipeline")
    if attributes[ATTR_COMPRESSION] not in COMPRESSIONS:
        raise BatchFormatError(f"unknown compression {attributes[ATTR_COMPRESSION]!r}")
    numbers = {}
    for name in _INTEGERS:
        try:
            numbers[name] = int(attributes[name])
        except ValueError:
            raise BatchFormatError(
                f"attribute {name} is not an integer: {attributes[name]!r}") from None
    return BatchInfo(
        sensor=attributes[ATTR_SENSOR], session=attributes[ATTR_SESSION],
        sequence=numbers[ATTR_SEQUENCE], linktype=numbers[ATTR_LINKTYPE],
        packets=numbers[ATTR_PACKETS], first_packet_us=numbers[ATTR_FIRST_PACKET_US],
        last_packet_us=numbers[ATTR_LAST_PACKET_US], kernel_drops=numbers[ATTR_KERNEL_DROPS],
        compression=attributes[ATTR_COMPRESSION])


def decode_batch(data: bytes, attributes: Mapping[str, str]) -> bytes:
    """The batch's pcap file bytes (for ``read_capture``); raises ``BatchFormatError``.

    Checks the attributes, undoes the compression (refusing to inflate beyond
    ``MAX_BATCH_BYTES``: a damaged or hostile message cannot exhaust memory), and checks that
    the pcap header agrees with the ``linktype`` attribute.
    """
    info = batch_info(attributes)
    if info.compression == COMPRESSION_GZIP:
        inflater = zlib.decompressobj(wbits=31)  # 31: gzip framing
        try:
            pcap = inflater.decompress(data, MAX_BATCH_BYTES + 1)
        except zlib.error as error:
            raise BatchFormatError(f"batch data is not valid gzip: {error}") from None
        if len(pcap) > MAX_BATCH_BYTES:
            raise BatchFormatError(f"batch inflates to more than {MAX_BATCH_BYTES} bytes")
        if not inflater.eof:
            raise BatchFormatError("batch data is truncated gzip")
    else:
        pcap = bytes(data)
    if len(pcap) < PCAP_HEADER_BYTES:
        raise BatchFormatError(f"batch data is {len(pcap)} bytes, shorter than a pcap header")
    magic, linktype = struct.unpack_from("<I", pcap)[0], struct.unpack_from("<I", pcap, 20)[0]
    if magic != PCAP_MAGIC_US:
        raise BatchFormatError(f"batch data is not a little-endian µs pcap (magic 0x{magic:08x})")
    if linktype != info.linktype:
        raise BatchFormatError(
            f"pcap header says link type {linktype}, the linktype attribute {info.linktype}")
    return pcap
