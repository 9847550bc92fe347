"""A few seconds of ``benchmarks/fuzz_captures.py``: mutated real captures through the reader,
the decoder and the aggregator raise only the documented damage errors, never hang, and lose
no record (packets in fragments + skipped packets = records read). The long run is the
script itself (see its docstring)."""

from __future__ import annotations

import io
import random
import struct

import pytest

from benchmarks.fuzz_captures import check_input, fuzz, load_seeds, make_seed, mutate
from flowbeam.capture.reader import read_capture
from flowbeam.packets.to_fragments import PacketsToFragments
from tests.test_pcap_pipeline import udp_frame
from tests.test_peer_nfstream import DATA

SEEDS = load_seeds()


def test_every_seed_reads_cleanly_before_mutation():
    """Seeds are cut after their last whole record and hold at least one record each."""
    assert len(SEEDS) == 1 + (len(list(DATA.glob("*.pcap*"))) if DATA.is_dir() else 0)
    for seed in SEEDS:
        outcome = check_input(seed.data, 4096)
        assert (outcome.kind, outcome.records > 0) == ("read", True), seed.name
        assert outcome.packets + outcome.skipped == outcome.records


def test_mutations_are_reproducible_and_change_the_bytes():
    seed = SEEDS[0]
    first = [mutate(seed, random.Random(n)) for n in range(50)]
    assert first == [mutate(seed, random.Random(n)) for n in range(50)]
    assert sum(data != seed.data for data in first) >= 45


def test_five_hundred_fuzzed_captures_find_nothing():
    # A fixed number of inputs, not a time budget: the test must not depend on the machine's
    # speed or load (the long runs are benchmarks/fuzz_captures.py's job).
    report = fuzz(SEEDS, count=500, seed=20261201, timeout_s=5.0)
    assert report.failures == []
    assert report.inputs == 500
    # Every kind of outcome happens: the mutations reach past the file header.
    assert set(report.outcomes) == {"read", "damaged", "not a capture"}
    assert report.records == report.packets + report.skipped


def test_the_accounting_catches_a_lost_packet(monkeypatch):
    """The check itself: an aggregator that forgets its last fragments fails it."""
    monkeypatch.setattr(PacketsToFragments, "finish", lambda self: [])
    with pytest.raises(AssertionError, match="packets decoded but 0 in fragments"):
        check_input(SEEDS[0].data, 4096)


def test_a_pcap_seed_locates_its_length_and_linktype_fields():
    header = bytes.fromhex("d4c3b2a1" "0200" "0400") + bytes(8) + (65535).to_bytes(4, "little")
    header += (1).to_bytes(4, "little")
    record = bytes(8) + (3).to_bytes(4, "little") * 2 + b"abc"
    seed = make_seed("two records and a cut one", header + record * 2 + record[:10])
    assert seed.data == header + record * 2
    assert seed.lengths == ((16, 4), (32, 4), (36, 4), (51, 4), (55, 4))
    assert seed.linktypes == ((20, 4),)


def pcapng_one_packet(tsresol: int, ticks: int, frame: bytes) -> bytes:
    """A little-endian pcapng: a section, one Ethernet interface with ``if_tsresol``, one
    Enhanced Packet Block at ``ticks``."""
    shb = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)
    options = struct.pack("<HHB3x", 9, 1, tsresol) + struct.pack("<HH", 0, 0)
    idb_length = 16 + len(options) + 4
    idb = struct.pack("<IIHHI", 1, idb_length, 1, 0, 65535) + options + struct.pack(
        "<I", idb_length)
    padded = frame + bytes(-len(frame) % 4)
    epb_length = 28 + len(padded) + 4
    epb = struct.pack("<IIIIIII", 6, epb_length, 0, ticks >> 32, ticks & 0xFFFFFFFF,
                      len(frame), len(frame)) + padded + struct.pack("<I", epb_length)
    return shb + idb + epb


def test_a_pcapng_time_beyond_int64_is_a_skipped_packet_not_a_crash():
    """Found by the long run (seed 7: 67 of 1,000,000 inputs): if_tsresol 0 (seconds) with a
    64-bit tick count is ~1.8e25 µs, which no int64 holds; it raised OverflowError."""
    frame = udp_frame()
    outcome = check_input(pcapng_one_packet(0, (1 << 64) - 1, frame), 4096)
    assert (outcome.kind, outcome.records, outcome.packets, outcome.skipped) == (
        "read", 1, 0, 1)
    step = PacketsToFragments(1, 1)
    for batch in read_capture(io.BytesIO(pcapng_one_packet(0, (1 << 64) - 1, frame))):
        step.add(batch)
    assert dict(step.malformed) == {"timestamp_out_of_range": 1}
    # The same packet at a sane time (10^6 ticks of 1 s) is a flow.
    assert check_input(pcapng_one_packet(0, 10**6, frame), 4096).packets == 1
