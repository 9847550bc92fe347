"""What the classic-pcap walk reuses to save work: the header words it gathered while walking
(``_pcap_batch`` takes every field from them instead of gathering the headers again) and the
comparison mask it keeps from chunk to chunk (``_WalkScratch``).

The ground truth is the bytes themselves: every column of a read must be what the record
header at its ``file_offsets`` says, on the adversarial captures of ``test_pcap_walk``.
"""

from __future__ import annotations

import io
import random
import struct

import numpy as np
import pytest

import flowbeam.capture.pcap as capture_pcap
from flowbeam.capture.reader import CaptureDamagedError, read_capture
from tests.test_pcap_walk import _capture

NANOSECOND_MAGIC = 0xA1B23C4D


@pytest.fixture(params=["vector", "python"])
def mode(request, monkeypatch):
    """Speculate on the tiniest input, or never: the two sources of header words."""
    if request.param == "vector":
        monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
        monkeypatch.setattr(capture_pcap, "_SPECULATE_MAX_RECORD_BYTES", 1 << 40)
    else:
        monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 1 << 62)
    return request.param


def _columns_from_the_headers(
    data: bytes, chunk_size: int, order: str, header_len: int, nanosecond: bool
) -> tuple[int, int | None]:
    """Read ``data``, checking every column against the header bytes; returns the record
    count and the offset of the damage the read ended with (None: none)."""
    count = 0
    try:
        for batch in read_capture(io.BytesIO(data), chunk_size):
            for index, at in enumerate(batch.file_offsets.tolist()):
                sec, frac, caplen, wirelen = struct.unpack_from(order + "IIII", data, at)
                us = frac // 1000 if nanosecond else frac
                assert batch.ts_us[index] == sec * 1_000_000 + us
                assert (batch.caplen[index], batch.wirelen[index]) == (caplen, wirelen)
                assert batch.linktype[index] == 1
                start = int(batch.offsets[index])
                record = data[at + header_len : at + header_len + caplen]
                assert batch.data[start : start + caplen].tobytes() == record
            count += len(batch)
    except CaptureDamagedError as exc:
        return count, exc.offset
    return count, None


@pytest.mark.parametrize(
    ("order", "header_len", "nanosecond"),
    [("<", 16, False), (">", 16, False), ("<", 24, False), ("<", 16, True), (">", 16, True)],
)
@pytest.mark.parametrize("chunk_size", [700, 4096, 65536, 1 << 20])  # 700: the buffer grows
def test_every_column_is_what_the_record_header_says(
    mode, order, header_len, nanosecond, chunk_size
):
    data, offsets = _capture(8, 1200, order, header_len, second_step=37)
    if nanosecond:
        data = struct.pack(order + "I", NANOSECOND_MAGIC) + data[4:]
    read = _columns_from_the_headers(data, chunk_size, order, header_len, nanosecond)
    assert read == (len(offsets), None)
    cut = data[: offsets[900] + 9]  # damage: the records before it are read all the same
    read = _columns_from_the_headers(cut, chunk_size, order, header_len, nanosecond)
    assert read == (900, offsets[900])


def test_the_walk_hands_on_the_words_of_the_headers_it_found(mode):
    data, offsets = _capture(9, 1500, second_step=11)
    layout = capture_pcap.pcap_layout(data[:24])
    buf = bytearray(data)
    scratch = capture_pcap._WalkScratch()
    rng = random.Random(10)
    for _ in range(30):
        start = rng.choice(offsets)
        end = rng.randrange(start, len(buf) + 1)
        found, _ = capture_pcap._walk_pcap(buf, start, end, layout, True, scratch)
        expected = layout.header_words(buf, end, found)
        assert scratch.words.shape == expected.shape
        assert scratch.words.tolist() == expected.tolist()


def test_a_walk_keeps_its_mask_until_its_buffer_grows(monkeypatch):
    monkeypatch.setattr(capture_pcap, "_SPECULATE_MIN_BYTES", 0)
    data, offsets = _capture(11, 600)
    layout = capture_pcap.pcap_layout(data[:24])
    buf = bytearray(data)
    scratch = capture_pcap._WalkScratch()
    capture_pcap._walk_pcap(buf, 24, len(buf), layout, True, scratch)
    mask = scratch.mask
    assert len(mask) >= len(buf) // 2
    for start in offsets[::60]:
        found, _ = capture_pcap._walk_pcap(buf, start, len(buf), layout, True, scratch)
        assert found.tolist() == [at for at in offsets if at >= start]
        assert scratch.mask is mask
    grown = bytearray(data + bytes(len(data)))  # zeros: a record of ts_sec 0 and caplen 0
    found, _ = capture_pcap._walk_pcap(grown, 24, len(grown), layout, True, scratch)
    assert found[: len(offsets)].tolist() == offsets
    assert scratch.mask is not mask
    assert len(scratch.mask) >= len(grown) // 2
    assert np.array_equal(scratch.words, layout.header_words(grown, len(grown), found))
