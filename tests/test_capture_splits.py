"""Split reads (``flowbeam.capture.splits``, ``transforms.capture_ranges``): a capture read as
byte ranges gives exactly the rows, counts and dead letters of one sequential read."""

from __future__ import annotations

import collections
import struct
from pathlib import Path

import pytest
from apache_beam.pvalue import TaggedOutput

from flowbeam.capture.pcap import pcap_layout
from flowbeam.capture.reader import CaptureDamagedError, read_capture
from flowbeam.capture.splits import (
    DEFAULT_LOOKBACK,
    RangeOutcome,
    pcap_resync,
    pcapng_resync,
    plan_ranges,
    settle_ranges,
)
from flowbeam.capture.writer import CapturedPacket, write_pcap, write_pcapng
from flowbeam.flows.engine import advance
from flowbeam.flows.records import to_flow_record
from flowbeam.packets.range_decode import CaptureRange, FragmentSettings
from flowbeam.packets.to_fragments import PacketsToFragments
from tests.test_pcap_pipeline import read_errors, read_flows, summary_of
from tests.test_peer_nfstream import DATA
from transforms.capture_ranges import FOLDED_TAG, DecodeRangeFn, KeepSettledFn, SettleRangesFn
from transforms.dead_letters import DEAD_LETTER_TAG

IDLE_US, ACTIVE_US = 120_000_000, 1_800_000_000
SETTINGS = FragmentSettings(IDLE_US, ACTIVE_US)
CAPTURES = sorted(DATA.glob("*.pcap*")) if DATA.is_dir() else []
shared = pytest.mark.skipif(not CAPTURES, reason=f"{DATA} is absent")


def rows_of(fragments) -> list:
    """The flow records the engine makes of fragments, in a canonical order."""
    by_key = collections.defaultdict(list)
    for fragment in fragments:
        by_key[fragment.key].append(fragment)
    rows = [to_flow_record(row, "pcap") for key_fragments in by_key.values()
            for row in advance(key_fragments, IDLE_US, ACTIVE_US, None)[0]]
    return sorted((sorted(row.items()) for row in rows), key=repr)


def whole_read(path: Path) -> tuple[list, tuple]:
    """Rows and counts of the sequential read (the reference)."""
    step = PacketsToFragments(IDLE_US, ACTIVE_US)
    fragments, damage = [], None
    with open(path, "rb") as stream:
        try:
            for batch in read_capture(stream):
                fragments += step.add(batch)
        except CaptureDamagedError as error:
            damage = (error.offset, error.reason)
    fragments += step.finish()
    malformed = {reason: count for reason, count in step.malformed.items() if count}
    return rows_of(fragments), (step.packets, step.bytes, malformed, damage)


def split_read(path: Path, split_bytes: int, lookback: int = DEFAULT_LOOKBACK):
    """Rows and counts of a split read through the real DoFns, or None when the file was
    sent to the whole read instead."""
    size = path.stat().st_size
    decode = DecodeRangeFn(SETTINGS, lookback=lookback, chunk_size=1 << 16)
    ranges = plan_ranges(size, split_bytes)
    parts, summaries = [], []
    for index, (start, end) in enumerate(ranges):
        part = CaptureRange(str(path), index, len(ranges), start, end, size)
        for out in decode.process(part):
            if isinstance(out, TaggedOutput):
                summaries.append(out.value[1])
            else:
                parts.append(out)
    settled = list(SettleRangesFn(SETTINGS).process((str(path), summaries)))
    verdict = next(out for out in settled if not isinstance(out, TaggedOutput))[1]
    if verdict.whole:
        return None
    keep = KeepSettledFn()
    fragments = [fragment for part in parts
                 for kept in keep.process(part, {str(path): verdict}) for fragment in kept]
    fragments += [fragment for out in settled
                  if isinstance(out, TaggedOutput) and out.tag == FOLDED_TAG
                  for fragment in out.value]
    counted = sorted(summaries, key=lambda s: s.index)[:verdict.valid]
    malformed = collections.Counter()
    for summary in counted:
        malformed.update(summary.malformed)
    dead = [out.value for out in settled
            if isinstance(out, TaggedOutput) and out.tag == DEAD_LETTER_TAG]
    damage = (dead[0]["offset"], dead[0]["reason"]) if dead else None
    counts = (sum(s.packets for s in counted), sum(s.bytes for s in counted),
              dict(malformed), damage)
    return rows_of(fragments), counts


# --- planning and resynchronisation ---------------------------------------------------------

def test_small_files_are_one_range_and_big_ones_equal_ranges():
    assert plan_ranges(100, 100) == [(0, 100)]
    assert plan_ranges(100, 0) == [(0, 100)]
    assert plan_ranges(1000, 300) == [(0, 250), (250, 500), (500, 750), (750, 1000)]


def udp_frame(payload: bytes, port: int = 5000) -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack(">HHHH", port, 53, 8 + len(payload), 0)
    return b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\x08\x00" + ip + udp + payload


def fake_records(ts_s: int, total: int, record: int = 40) -> bytes:
    """Bytes that look like a chain of pcap records (a capture of a capture download)."""
    out = b""
    while len(out) + 16 + record <= total:
        out += struct.pack("<IIII", ts_s, 1, record, record) + bytes(range(record))
    return out


def adversarial_packets(count: int = 400, base_s: int = 1_600_000_000) -> list[CapturedPacket]:
    packets = []
    for index in range(count):
        size = 200 + 37 * (index % 23)  # fake chains that end mid-payload and exactly at it
        payload = fake_records(base_s + index // 50, size) if index % 3 else bytes(size)
        packets.append(CapturedPacket((base_s + index // 50) * 10**9 + index * 1000,
                                      udp_frame(payload, 5000 + index % 7)))
    return packets


def write(path: Path, packets, **kwargs) -> Path:
    with open(path, "wb") as stream:
        (write_pcapng if path.suffix == ".pcapng" else write_pcap)(stream, packets, **kwargs)
    return path


def true_headers(data: bytes) -> list[int]:
    pos, found = 24, []
    while pos + 16 <= len(data):
        found.append(pos)
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
    return found


def test_resync_reaches_the_range_on_real_headers_despite_payloads_full_of_headers(tmp_path):
    """The lock may be a false header in a payload whose chain rejoins the real one; the
    record the range starts with must be real."""
    data = write(tmp_path / "a.pcap", adversarial_packets()).read_bytes()
    layout = pcap_layout(data[:24])
    anchor = struct.unpack_from("<I", data, 24)[0]
    real = set(true_headers(data))
    for first in range(100, len(data) - 3000, 197):
        found = pcap_resync(bytearray(data[first:]), 2000, layout, True, anchor)
        assert found is not None, first
        pos = first + found
        while pos < first + 2000:
            pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
        assert pos in real, first


def test_resync_prefers_the_real_header_to_its_ghost_four_bytes_on(tmp_path):
    data = write(tmp_path / "a.pcap", [CapturedPacket(1_600_000_000 * 10**9 + i * 1000,
                                                      udp_frame(b"\xff" * 60))
                                       for i in range(200)]).read_bytes()
    layout = pcap_layout(data[:24])
    anchor = struct.unpack_from("<I", data, 24)[0]
    header = true_headers(data)[50]
    # The window starts 2 bytes before a real header: its ghost (header + 4) is inside.
    found = pcap_resync(bytearray(data[header - 2:header + 4000]), 1000, layout, False, anchor)
    assert header - 2 + found in set(true_headers(data))


def test_pcapng_resync_finds_block_boundaries(tmp_path):
    data = write(tmp_path / "a.pcapng", adversarial_packets(100)).read_bytes()
    blocks, pos = set(), 0
    while pos < len(data):
        blocks.add(pos)
        pos += struct.unpack_from("<I", data, pos + 4)[0]
    for first in range(200, len(data) - 3000, 412):
        found = pcapng_resync(bytearray(data[first:]), 1500, "<", True)
        assert found is not None and first + found in blocks


def test_ranges_that_disagree_send_the_file_to_the_whole_read():
    def outcome(first: int, after: int, **kw) -> RangeOutcome:
        return RangeOutcome(first_owned=first, next_after=after, **kw)

    assert settle_ranges([outcome(24, 500), outcome(500, 900)]).valid == 2
    assert settle_ranges([outcome(24, 500), outcome(504, 900)]).whole
    assert settle_ranges([outcome(24, 500), outcome(500, 900, problem="x")]).whole
    assert settle_ranges([outcome(24, 500, late_declarations=1), outcome(500, 9)]).whole
    damaged = CaptureDamagedError(400, "record claims 999999 captured bytes")
    assert settle_ranges([outcome(24, 400, damage=damaged), outcome(700, 900)]).valid == 1


# --- split reads equal the whole read ------------------------------------------------------

@shared
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_every_shared_capture_gives_the_same_rows_from_any_number_of_ranges(path):
    expected = whole_read(path)
    size = path.stat().st_size
    for split_bytes in (max(300, size // 40), max(997, size // 7), size // 2 + 1):
        assert split_read(path, split_bytes) == expected, split_bytes


# With a lookback smaller than a record or than the distance from a first IP fragment to
# its later ones, a range cannot resynchronise (the file is read whole: still the same rows)
# or cannot give the later fragments their ports (the documented limit): small lookbacks
# exercise the resynchronisation on every capture but that one.
@shared
@pytest.mark.parametrize("path", [p for p in CAPTURES if "fragments" not in p.name],
                         ids=lambda p: p.name)
def test_small_lookbacks_resynchronise_mid_file_with_the_same_rows(path):
    expected = whole_read(path)
    size = path.stat().st_size
    for split_bytes, lookback in ((max(300, size // 60), 2000), (max(997, size // 20), 5000)):
        got = split_read(path, split_bytes, lookback)
        assert got is None or got == expected, (split_bytes, lookback)


@pytest.mark.parametrize("name", ["adversarial.pcap", "adversarial.pcapng"])
def test_payloads_that_look_like_record_headers_give_the_same_rows(tmp_path, name):
    path = write(tmp_path / name, adversarial_packets())
    expected = whole_read(path)
    for split_bytes, lookback in ((311, 1500), (1999, 4000), (5000, DEFAULT_LOOKBACK)):
        assert split_read(path, split_bytes, lookback) == expected


def test_damage_is_reported_once_and_ends_the_file_as_in_the_whole_read(tmp_path):
    data = bytearray(write(tmp_path / "a.pcap", adversarial_packets()).read_bytes())
    header = true_headers(bytes(data))[200]
    data[header + 8:header + 12] = struct.pack("<I", 1 << 30)  # an impossible caplen
    path = tmp_path / "damaged.pcap"
    path.write_bytes(bytes(data))
    expected = whole_read(path)
    assert expected[1][3][0] == header
    for split_bytes in (500, 3000, len(data) // 3):
        assert split_read(path, split_bytes) == expected


# --- through the pipeline ------------------------------------------------------------------

@shared
def test_the_pipeline_gives_the_same_flows_and_summary_from_ranges(tmp_path, capsys):
    from pipelines.pcap_flows import run

    capture = DATA / "ppp_example.pcap"
    results = []
    for split_mb in ("0", "0.3"):
        out = tmp_path / split_mb
        assert run(["--input", str(capture), "--output", str(out), "--split_mb", split_mb,
                    "--runner=FnApiRunner"]) == 0
        summary = summary_of(capsys.readouterr().out)
        for varies in ("elapsed", "packets/s", "rows written"):  # time, output directory
            del summary[varies]
        rows = sorted((sorted(row.items()) for row in read_flows(out)), key=repr)
        results.append((rows, summary, read_errors(out)))
    assert results[0] == results[1]


# --- flow state across range boundaries ----------------------------------------------------

def tcp_frame(flags: int, reply: bool = False) -> bytes:
    hosts = [bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])]
    src, dst = (hosts[1], hosts[0]) if reply else hosts
    ports = (80, 40000) if reply else (40000, 80)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, src, dst)
    tcp = struct.pack(">HHIIBBHHH", *ports, 0, 0, 0x50, flags, 1000, 0, 0)
    return b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\x08\x00" + ip + tcp


SYN, ACK, FIN = 0x02, 0x10, 0x01


def connection() -> list[bytes]:
    return ([tcp_frame(SYN), tcp_frame(SYN | ACK, True)] + [tcp_frame(ACK)] * 30
            + [tcp_frame(FIN | ACK), tcp_frame(FIN | ACK, True)] + [tcp_frame(ACK)] * 20)


# A 5-tuple reused within the idle timeout after a FIN exchange in an earlier range, and the
# active-timeout rows of a flow crossing boundaries: the fold of the ranges' states
# (flowbeam.packets.range_state) cuts them as the whole read does.
@pytest.mark.parametrize("frames", [
    pytest.param(connection() + connection(), id="port-reuse"),
    pytest.param([tcp_frame(ACK)] * 120, id="active-timeout"),
])
def test_flow_state_across_a_boundary(tmp_path, frames):
    step_ns = 60 * 10**9 if len(frames) == 120 else 10**6
    packets = [CapturedPacket(1_600_000_000 * 10**9 + index * step_ns, frame)
               for index, frame in enumerate(frames)]
    path = write(tmp_path / "a.pcap", packets)
    expected = whole_read(path)
    assert all(split_read(path, split_bytes) == expected for split_bytes in (1000, 2000, 3000))
