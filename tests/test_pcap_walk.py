"""The vectorised classic-pcap walk against the plain Python loop, on captures built to defeat
its guesses: payloads full of the timestamp's upper bytes, fake header chains, real headers
its plausibility filter drops, ts_sec crossing 2^16 s boundaries, record-size bursts that
switch it between speculation and the Python loop, and every chunk boundary in between.

The Python loop (``_walk_pcap_scalar``) is the reference: the walk must find the same header
positions and stop at the same byte, and a read must give the same records and damage errors.
"""

from __future__ import annotations

import io
import random
import struct

import numpy as np
import pytest

import flowbeam.capture.pcap as capture_pcap
from flowbeam.capture.reader import CaptureDamagedError, read_capture

TS = 0x6591_F349  # 2024-01-01: the upper 16 bits 0x6591 are what the walk guesses


def _header(order: str, header_len: int, sec: int, frac: int, caplen: int, wirelen: int) -> bytes:
    return struct.pack(order + "IIII", sec, frac, caplen, wirelen) + b"\0" * (header_len - 16)


def _file_header(order: str, header_len: int) -> bytes:
    magic = 0xA1B2CD34 if header_len == 24 else 0xA1B2C3D4
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)


def _fake_chain(rng: random.Random, order: str, header_len: int, sec: int, room: int) -> bytes:
    """Plausible record headers chained to each other, to sit inside a payload."""
    out = b""
    while len(out) + header_len < room:
        caplen = rng.randrange(0, min(80, room - len(out) - header_len) + 1)
        out += _header(order, header_len, sec, rng.randrange(10**6), caplen, caplen)
        out += rng.randbytes(caplen)
    return out


def _payload(rng: random.Random, order: str, header_len: int, sec: int, high: bytes) -> bytes:
    """A payload of one of the kinds that mislead the walk's guesses."""
    kind = rng.randrange(6)
    size = rng.choice([0, 1, 15, 16, 40, 60, 200, 600, 1400])
    if kind == 0:
        return rng.randbytes(size)
    if kind == 1:  # copies of the ts_sec upper bytes at random places
        data = bytearray(rng.randbytes(size))
        for _ in range(size // 8):
            at = rng.randrange(max(size - 1, 1))
            data[at : at + 2] = high
        return bytes(data[:size])
    if kind == 2:
        return _fake_chain(rng, order, header_len, sec, size)
    if kind == 3:  # a fake header whose caplen points at a real header further on
        return _header(order, header_len, sec, 5, size, size) + rng.randbytes(size)
    if kind == 4:  # a fake header with a caplen far beyond the chunk
        return _header(order, header_len, sec, 5, 200_000, 200_000) + rng.randbytes(size)
    return bytes(size)


def _capture(seed: int, count: int, order: str = "<", header_len: int = 16,
             second_step: int = 0) -> tuple[bytes, list[int]]:
    """A classic pcap of adversarial records, and the file offsets of its record headers.

    ``second_step``: seconds between records, to cross 2^16 s boundaries of ts_sec.
    Some real headers are implausible (wirelen below caplen, a fraction of 10^6 or more):
    the walk may filter them out of its candidates but must still find them.
    """
    rng = random.Random(seed)
    data, offsets, sec = _file_header(order, header_len), [], TS
    for index in range(count):
        high = struct.pack(order + "I", sec)[2:4] if order == "<" else struct.pack(">I", sec)[:2]
        payload = _payload(rng, order, header_len, sec, high)
        wirelen = len(payload) + (rng.randrange(100) if index % 4 else 0)
        frac = rng.randrange(10**6)
        if index % 97 == 5:
            wirelen = max(len(payload) - 1, 0)
        if index % 89 == 7:
            frac = 10**6 + index
        offsets.append(len(data))
        data += _header(order, header_len, sec, frac, len(payload), wirelen) + payload
        sec += second_step
    return data, offsets


@pytest.fixture
def always_speculate(monkeypatch):
    """Speculate on the tiniest input and never hand a chunk to the Python loop for its size."""
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MAX_RECORD_BYTES", 1 << 40)


def _agree(buf: bytearray, pos: int, end: int, layout) -> list[int]:
    reference, stop = capture_pcap._walk_pcap_scalar(buf, pos, end, layout)
    fast, fast_stop = capture_pcap._walk_pcap(buf, pos, end, layout)
    assert fast.dtype == np.int64
    assert fast.tolist() == reference.tolist()
    assert fast_stop == stop
    return reference.tolist()


@pytest.mark.parametrize(("order", "header_len"), [("<", 16), (">", 16), ("<", 24)])
@pytest.mark.parametrize("second_step", [0, 300])
def test_walk_matches_the_python_loop_at_every_kind_of_chunk_end(
    always_speculate, order, header_len, second_step
):
    data, offsets = _capture(1, 1500, order, header_len, second_step)
    layout = capture_pcap.pcap_layout(data[:24])
    buf = bytearray(data)
    assert _agree(buf, 24, len(buf), layout) == offsets
    rng = random.Random(2)
    for _ in range(40):  # chunks starting at a header and ending anywhere
        start = rng.choice(offsets)
        end = rng.randrange(start, len(buf) + 1)
        _agree(buf, start, end, layout)


def test_walk_with_dense_timestamp_bytes_and_few_repairs(always_speculate, monkeypatch):
    """Every false candidate must be stepped over, also when repairs run out early."""
    for repairs in (1, 4, 64):
        monkeypatch.setattr(capture_pcap, "_MAX_REPAIRS", repairs)
        data, offsets = _capture(3, 800)
        layout = capture_pcap.pcap_layout(data[:24])
        assert _agree(bytearray(data), 24, len(data), layout) == offsets


def test_walk_across_more_ts_sec_boundaries_than_speculations(always_speculate):
    data, offsets = _capture(4, 600, second_step=1 << 14)  # a new upper half every 4 records
    layout = capture_pcap.pcap_layout(data[:24])
    assert _agree(bytearray(data), 24, len(data), layout) == offsets


def test_walk_switches_between_speculation_and_the_python_loop(monkeypatch):
    """Bursts of big records send the walk to the Python loop, small ones bring it back."""
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
    monkeypatch.setattr(capture_pcap, "_PYTHON_RUN_RECORDS", 8)
    rng = random.Random(5)
    data, offsets = _file_header("<", 16), []
    for burst in range(40):
        size = 1400 if burst % 2 else 60
        for _ in range(rng.randrange(1, 60)):
            offsets.append(len(data))
            data += _header("<", 16, TS, 1, size, size) + rng.randbytes(size)
    layout = capture_pcap.pcap_layout(data[:24])
    buf = bytearray(data)
    assert _agree(buf, 24, len(buf), layout) == offsets
    for start in offsets[::37]:
        _agree(buf, start, len(buf) - 1, layout)


def _read(data: bytes, chunk_size: int):
    rows, error = [], None
    try:
        for batch in read_capture(io.BytesIO(data), chunk_size):
            rows.append(np.stack([batch.file_offsets, batch.caplen, batch.wirelen, batch.ts_us]))
    except CaptureDamagedError as exc:
        error = (exc.offset, exc.reason)
    return (np.concatenate(rows, axis=1).tolist() if rows else []), error


@pytest.mark.parametrize("chunk_size", [4096, 65536, 1 << 20])
def test_reads_agree_with_the_python_loop_on_damaged_captures(monkeypatch, chunk_size):
    """Same records and the same damage error (offset, reason) as the Python loop."""
    data, offsets = _capture(6, 2500, second_step=40)
    damaged = bytearray(data)
    struct.pack_into("<I", damaged, offsets[1700] + 8, capture_pcap.MAX_CAPLEN + 1)
    cases = [data, data[:-5], data[: offsets[2000] + 9], bytes(damaged)]
    results = {}
    for mode, min_bytes, record_bytes in (("python", 1 << 62, 512), ("vector", 0, 1 << 40)):
        monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", min_bytes)
        monkeypatch.setattr(capture_pcap, "_SPECULATE_MAX_RECORD_BYTES", record_bytes)
        results[mode] = [_read(case, chunk_size) for case in cases]
    assert results["vector"] == results["python"]
    complete, _ = results["python"][0]
    assert [row[0] for row in zip(*complete, strict=True)] == offsets
    assert results["python"][3][1][0] == offsets[1700]
