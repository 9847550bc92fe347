"""Fuzz the capture reader, the packet decoder and the aggregator with mutated real captures.

    nice .venv/bin/python benchmarks/fuzz_captures.py --inputs 1000000 --seed 1

Seeds: the start of every capture in ../shared/data/pcaps (every format, byte order, link
type there) and a small synthetic one. Each input is one seed with a few mutations: flipped
bits, a cut, an absurd value in a length field (pcap record lengths, pcapng block and capture
lengths, the snaplen), another link type in a link-type field (every one flowbeam decodes and
some it does not), a deleted or duplicated range, inserted random bytes. Each input is read
with a random chunk size (so records straddle chunk ends) and decoded and aggregated by
``PacketsToFragments``, the step every packet source runs.

What must hold for every input:
- the only exceptions are the documented damage errors (``CaptureDamagedError``,
  ``CaptureFormatError``);
- no input takes longer than ``--timeout`` seconds (a hang or a quadratic blow-up);
- nothing is lost: packets in fragments = packets decoded, and packets decoded + packets
  skipped (``PacketsToFragments.malformed``, per reason) = records read. A damaged file's
  records after the damage are never read, so they appear on neither side.

Prints the number of inputs, their rate, the outcomes, and every failure (with the seed and
input number that rebuild it); exits 1 when there was one. ``tests/test_fuzz_capture.py`` runs
a few seconds of it.
"""

from __future__ import annotations

import argparse
import io
import random
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flowbeam.capture.reader import (
    CaptureDamagedError,
    CaptureFormatError,
    CaptureStats,
    read_capture,
)
from flowbeam.capture.writer import write_pcap
from flowbeam.packets.error_reasons import TRUNCATED_TRANSPORT
from flowbeam.packets.to_fragments import PacketsToFragments
from flowbeam.synthetic import generate_packets, plan_traffic

PCAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcaps"
SEED_BYTES = 6000  # the start of each capture (at least one record): keeps an input fast
IDLE_US, ACTIVE_US = 120_000_000, 1_800_000_000
# Every link type flowbeam decodes, then some it does not.
LINKTYPES = (0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 9, 105, 127, 147, 0xFFFF)
ABSURD = (0, 1, 15, 16, 17, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


@dataclass(frozen=True)
class Seed:
    """A capture's first bytes and where its length and link-type fields are."""

    name: str
    data: bytes
    order: str  # struct byte order of its fields
    lengths: tuple[tuple[int, int], ...]  # (offset, size) of length fields
    linktypes: tuple[tuple[int, int], ...]  # (offset, size) of link-type fields


def _pcap_fields(data: bytes, order: str) -> tuple[int, list, list]:
    """(end of the last whole record, length fields, link-type fields) of a classic pcap."""
    lengths, offset = [(16, 4)], 24  # snaplen, then each record's caplen and wirelen
    while offset + 16 <= len(data):
        end = offset + 16 + struct.unpack_from(order + "I", data, offset + 8)[0]
        if end > len(data) or (end > SEED_BYTES and len(lengths) > 1):
            break
        lengths += [(offset + 8, 4), (offset + 12, 4)]
        offset = end
    return offset, lengths, [(20, 4)]


def _pcapng_fields(data: bytes, order: str) -> tuple[int, list, list]:
    """(end of the last whole block, length fields, link-type fields) of a pcapng."""
    lengths, linktypes, offset = [], [], 0
    while offset + 12 <= len(data):
        kind, length = struct.unpack_from(order + "II", data, offset)
        if length < 12 or offset + length > len(data) or (
                offset + length > SEED_BYTES and kind in (3, 6) and len(lengths) > 2):
            break
        lengths.append((offset + 4, 4))
        if kind == 1:  # Interface Description Block
            linktypes.append((offset + 8, 2))
        elif kind == 6:  # Enhanced Packet Block: captured and original lengths
            lengths += [(offset + 20, 4), (offset + 24, 4)]
        offset += length
    return offset, lengths, linktypes


def make_seed(name: str, data: bytes) -> Seed:
    """A capture's first ``SEED_BYTES`` or its first record, whichever is longer, cut after
    the last whole record (so an unmutated seed reads cleanly), with its length and link-type
    fields located."""
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        order = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
        end, lengths, linktypes = _pcapng_fields(data, order)
    else:
        order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        end, lengths, linktypes = _pcap_fields(data, order)
    return Seed(name, data[:end], order, tuple(lengths), tuple(linktypes))


def load_seeds(directory: Path = PCAPS) -> list[Seed]:
    """The first ``SEED_BYTES`` of every shared capture, and a synthetic capture."""
    synthetic = io.BytesIO()
    write_pcap(synthetic, list(generate_packets(plan_traffic(flows=8, packets=60, seed=3))))
    seeds = [make_seed("synthetic", synthetic.getvalue()[:SEED_BYTES])]
    for path in sorted(directory.glob("*.pcap*")) if directory.is_dir() else []:
        with open(path, "rb") as stream:
            seeds.append(make_seed(path.name, stream.read(1 << 17)))
    return seeds


def mutate(seed: Seed, rng: random.Random) -> bytes:
    """One to four random mutations of the seed's bytes."""
    data = bytearray(seed.data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        if kind == 0 and data:  # flipped bits
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:  # a cut
            del data[rng.randrange(len(data)):]
        elif kind in (2, 3) and seed.lengths:  # an absurd length
            offset, size = rng.choice(seed.lengths)
            value = rng.choice(ABSURD) if kind == 2 else rng.randrange(1 << (8 * size))
            if offset + size <= len(data):
                data[offset:offset + size] = struct.pack(
                    seed.order + ("I" if size == 4 else "H"), value & ((1 << (8 * size)) - 1))
        elif kind == 4 and seed.linktypes:  # another link type
            offset, size = rng.choice(seed.linktypes)
            if offset + size <= len(data):
                data[offset:offset + size] = struct.pack(
                    seed.order + ("I" if size == 4 else "H"), rng.choice(LINKTYPES))
        elif kind == 5 and data:  # a range deleted or duplicated
            start = rng.randrange(len(data))
            end = min(len(data), start + rng.randint(1, 200))
            if rng.random() < 0.5:
                del data[start:end]
            else:
                data[start:start] = data[start:end]
        elif kind == 6:  # random bytes inserted
            at = rng.randint(0, len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 64))
    return bytes(data)


class FuzzTimeout(Exception):
    """An input took longer than the time limit."""


@dataclass
class Outcome:
    """How one input ended: "read", "damaged" or "not a capture"; records and packets."""

    kind: str
    records: int
    packets: int
    skipped: int


def check_input(data: bytes, chunk_size: int) -> Outcome:
    """Read, decode and aggregate one input; raise AssertionError when the counts disagree."""
    stats = CaptureStats()
    step = PacketsToFragments(IDLE_US, ACTIVE_US)
    in_fragments = 0
    kind = "read"
    try:
        for batch in read_capture(io.BytesIO(data), chunk_size, stats=stats):
            in_fragments += sum(f.a_packets + f.b_packets for f in step.add(batch))
    except CaptureFormatError:
        kind = "not a capture"
    except CaptureDamagedError:
        kind = "damaged"
    in_fragments += sum(f.a_packets + f.b_packets for f in step.finish())
    # A packet whose transport header was cut is counted under TRUNCATED_TRANSPORT but still
    # decoded (ports 0), so it is not a skipped one.
    skipped = sum(count for reason, count in step.malformed.items()
                  if reason != TRUNCATED_TRANSPORT)
    assert in_fragments == step.packets, (
        f"{step.packets} packets decoded but {in_fragments} in fragments")
    assert step.packets + skipped == stats.records, (
        f"{stats.records} records read, {step.packets} decoded + {skipped} skipped "
        f"({dict(step.malformed)})")
    return Outcome(kind, stats.records, step.packets, skipped)


@dataclass
class Report:
    inputs: int = 0
    outcomes: Counter = field(default_factory=Counter)
    records: int = 0
    packets: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)


def _on_alarm(signum: int, frame: object) -> None:
    raise FuzzTimeout


def inputs(seeds: list[Seed], seed: int) -> Iterator[tuple[int, Seed, bytes, int]]:
    """(number, seed, mutated bytes, chunk size) forever; input ``i`` of random seed ``seed``
    is always the same, so a failure can be rebuilt from the two numbers."""
    number = 0
    while True:
        rng = random.Random(f"{seed}:{number}")
        chosen = rng.choice(seeds)
        yield number, chosen, mutate(chosen, rng), rng.choice((17, 64, 333, 4096, 1 << 20))
        number += 1


def fuzz(seeds: list[Seed], count: int, seed: int = 1, timeout_s: float = 5.0,
         max_seconds: float | None = None) -> Report:
    """Run ``count`` inputs (or until ``max_seconds``); every failure is kept in the report."""
    report = Report()
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for number, chosen, data, chunk in inputs(seeds, seed):
            if report.inputs >= count or (
                    max_seconds is not None and time.monotonic() - started > max_seconds):
                break
            report.inputs += 1
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                outcome = check_input(data, chunk)
            except FuzzTimeout:
                report.failures.append(f"input {number} ({chosen.name}, --seed {seed}): "
                                       f"over {timeout_s} s")
                continue
            except Exception:  # anything undocumented, or the accounting
                report.failures.append(f"input {number} ({chosen.name}, --seed {seed}, chunk "
                                       f"{chunk}):\n{traceback.format_exc()}")
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            report.outcomes[outcome.kind] += 1
            report.records += outcome.records
            report.packets += outcome.packets
            report.skipped += outcome.skipped
    finally:
        signal.signal(signal.SIGALRM, previous)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per input")
    args = parser.parse_args()
    seeds = load_seeds()
    started = time.monotonic()
    report = fuzz(seeds, args.inputs, args.seed, args.timeout)
    elapsed = time.monotonic() - started
    print(f"{report.inputs:,} inputs from {len(seeds)} seeds in {elapsed:.0f} s "
          f"({report.inputs / elapsed:,.0f}/s)")
    print(f"outcomes: {dict(report.outcomes)}")
    print(f"records read {report.records:,}: packets decoded {report.packets:,}, "
          f"skipped {report.skipped:,}")
    print(f"failures: {len(report.failures)}")
    for failure in report.failures[:20]:
        print(failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
