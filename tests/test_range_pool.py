"""A big local capture decoded as byte ranges in local worker processes
(``flowbeam.packets.range_pool``, ``--decode_processes``): the whole read's rows and counts.

The pool runs real worker processes (from a forkserver) over real files; ranges are made tiny
so that the shared captures are cut in many places. The reference is the sequential read.
"""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from flowbeam.capture.splits import DEFAULT_LOOKBACK
from flowbeam.packets.range_decode import CaptureRange, FragmentSettings
from flowbeam.packets.range_pool import WorkerDied, _Workers, decode_in_processes, pool_ranges
from flowbeam.packets.range_worker import decode_range_job
from pipelines.options import OptionsError
from pipelines.pcap_flows import decode_processes_of
from tests.test_capture_splits import (
    ACTIVE_US,
    CAPTURES,
    IDLE_US,
    adversarial_packets,
    rows_of,
    shared,
    true_headers,
    whole_read,
    write,
)
from transforms import counters
from transforms.capture_files import DecodeCaptures

SETTINGS = FragmentSettings(IDLE_US, ACTIVE_US)


def pooled(path: Path, range_bytes: int, processes: int = 2, **options) -> tuple | None:
    """Rows and counts of the pool's read, or None when it sends the file to the whole read."""
    read = decode_in_processes(str(path), path.stat().st_size, SETTINGS, processes,
                               range_bytes=range_bytes, chunk_size=1 << 16, **options)
    if read.settlement.whole:
        return None
    summaries = read.summaries
    malformed: dict[str, int] = {}
    for summary in summaries:
        for reason, count in summary.malformed.items():
            malformed[reason] = malformed.get(reason, 0) + count
    damage = summaries[-1].outcome.damage
    counts = (sum(s.packets for s in summaries), sum(s.bytes for s in summaries), malformed,
              None if damage is None else (damage.offset, damage.reason))
    return rows_of([fragment for part in read.fragments for fragment in part]), counts


def test_ranges_come_in_a_multiple_of_the_processes_and_small_files_are_one_range():
    assert pool_ranges(1000, 2, range_bytes=1000) == [(0, 1000)]
    assert pool_ranges(5000, 1, range_bytes=100) == [(0, 5000)]
    assert pool_ranges(1001, 2, range_bytes=1000) == [(0, 500), (500, 1001)]
    assert pool_ranges(2500, 2, range_bytes=1000) == [(0, 625), (625, 1250), (1250, 1875),
                                                      (1875, 2500)]
    assert len(pool_ranges(10_000, 3, range_bytes=1000)) == 12


@shared
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_every_shared_capture_gives_the_whole_reads_rows_and_counts(path):
    expected = whole_read(path)
    size = path.stat().st_size
    for range_bytes in (max(300, size // 16), size // 2):
        assert pooled(path, range_bytes) == expected, range_bytes


def test_payloads_that_look_like_record_headers_give_the_same_rows(tmp_path):
    for name in ("adversarial.pcap", "adversarial.pcapng"):
        path = write(tmp_path / name, adversarial_packets())
        assert pooled(path, 997, processes=3) == whole_read(path)


def test_damage_ends_the_file_where_the_whole_read_ends_it(tmp_path):
    data = bytearray(write(tmp_path / "a.pcap", adversarial_packets()).read_bytes())
    header = true_headers(bytes(data))[120]
    data[header + 8:header + 12] = (1 << 30).to_bytes(4, "little")  # an impossible caplen
    path = tmp_path / "damaged.pcap"
    path.write_bytes(bytes(data))
    expected = whole_read(path)
    assert expected[1][3][0] == header
    assert pooled(path, 2000) == expected


def test_ranges_that_cannot_resynchronise_send_the_file_to_the_whole_read(tmp_path):
    path = write(tmp_path / "a.pcap", adversarial_packets())
    read = decode_in_processes(str(path), path.stat().st_size, SETTINGS, 2, range_bytes=3000,
                               lookback=64)
    assert read.settlement.whole
    assert read.settlement.reason == (
        "ranges 2 and 3 disagree on the record at their boundary (9139 vs 8971)")
    assert read.fragments == [] and read.summaries == []


# --- in the pipeline ---------------------------------------------------------------------

def check_pipeline(path: Path, reference: Path | None = None, **options) -> dict[str, int]:
    """Run ``DecodeCaptures`` on one file: its fragments' rows and its dead letters must be
    the whole read's (of ``reference``, the same capture uncompressed, if given); returns
    the run's counters."""
    rows, (packets, nbytes, _, damage) = whole_read(reference or path)
    pipeline = TestPipeline(runner="FnApiRunner", options=PipelineOptions([]))
    decoded = pipeline | beam.Create([str(path)]) | DecodeCaptures(
        IDLE_US / 1e6, ACTIVE_US / 1e6, chunk_size=1 << 16, **options)
    assert_that(decoded["fragments"] | beam.FlatMap(lambda batch: batch)
                | beam.combiners.ToList() | beam.Map(rows_of), equal_to([rows]),
                label="Rows")
    assert_that(decoded["dead_letters"]
                | beam.Map(lambda letter: (letter["offset"], letter["reason"])),
                equal_to([damage] if damage else []), label="DeadLetters")
    result = pipeline.run()
    result.wait_until_finish()
    counts = {metric.key.metric.name: metric.committed for metric in
              result.metrics().query(MetricsFilter().with_namespace(counters.NAMESPACE))[
                  "counters"]}
    assert (counts[counters.PACKETS], counts[counters.BYTES]) == (packets, nbytes)
    return counts


def test_decode_captures_with_processes_gives_the_one_process_result(tmp_path, caplog):
    data = bytearray(write(tmp_path / "a.pcap", adversarial_packets()).read_bytes())
    header = true_headers(bytes(data))[300]
    data[header + 8:header + 12] = (1 << 30).to_bytes(4, "little")
    path = tmp_path / "damaged.pcap"
    path.write_bytes(bytes(data))
    for options in ({}, {"decode_processes": 2, "pool_range_bytes": 4000}):
        counts = check_pipeline(path, **options)
        assert (counts[counters.FILES_READ], counts[counters.FILES_DAMAGED]) == (1, 1)
    undamaged = write(tmp_path / "b.pcap", adversarial_packets())
    with caplog.at_level(logging.WARNING):
        check_pipeline(undamaged, decode_processes=2, pool_range_bytes=3000, lookback=64)
    assert (f"{undamaged}: read whole instead of in ranges: ranges 2 and 3 disagree on the "
            "record at their boundary (9139 vs 8971)") in caplog.text


def test_compressed_and_foreign_files_are_left_to_the_whole_read(tmp_path):
    """The pool reads local, uncompressed captures only; the rest is read (and reported) in
    this process as before."""
    plain = write(tmp_path / "a.pcap", adversarial_packets())
    compressed = tmp_path / "a.pcap.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    assert check_pipeline(compressed, plain, decode_processes=2, pool_range_bytes=4000)[
        counters.FILES_READ] == 1
    not_capture = tmp_path / "notes.pcap"
    not_capture.write_bytes(b"hello, not a capture" * 100)
    pipeline = TestPipeline(runner="FnApiRunner", options=PipelineOptions([]))
    decoded = pipeline | beam.Create([str(not_capture)]) | DecodeCaptures(
        120, 1800, decode_processes=2, pool_range_bytes=100)
    assert_that(decoded["dead_letters"]
                | beam.Map(lambda letter: (letter["offset"], letter["reason"])),
                equal_to([(0, "not a pcap or pcapng file (magic 0x68656c6c)")]))
    pipeline.run().wait_until_finish()


# --- the option -------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "workers", "split_mb", "expected"), [
    (["--runner=FnApiRunner"], 1, 0.0, os.cpu_count()),
    (["--runner=FnApiRunner"], 2, 0.0, 1),  # Beam's worker processes use the cores
    (["--runner=FnApiRunner"], 1, 256.0, 1),  # the file goes to Beam's ranges
    (["--runner=DataflowRunner"], 1, 256.0, 1),
    (["--runner=FnApiRunner", "--decode_processes=3"], 1, 0.0, 3),
    (["--runner=DataflowRunner", "--decode_processes=4"], 1, 256.0, 4),
])
def test_decode_processes_default_to_the_cores_of_the_in_process_runner(
        argv, workers, split_mb, expected):
    assert decode_processes_of(PipelineOptions(argv), workers, split_mb) == expected


def test_zero_decode_processes_is_refused():
    with pytest.raises(OptionsError, match="--decode_processes must be 1 or more, got 0"):
        decode_processes_of(PipelineOptions(["--decode_processes=0"]))


# --- the workers' allocator -------------------------------------------------------------

FAULTS = """
import resource, sys
from flowbeam.capture.reader import read_capture
from flowbeam.packets.range_worker import keep_freed_memory
from flowbeam.packets.to_fragments import PacketsToFragments

def decode():
    step = PacketsToFragments(120_000_000, 1_800_000_000)
    with open(sys.argv[2], "rb") as stream:
        for batch in read_capture(stream):
            step.add(batch)
    step.finish()

if sys.argv[1] == "kept":
    keep_freed_memory()
decode()  # the first time every page is new
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    decode()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@shared
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_workers_reuse_freed_arrays_instead_of_faulting_them_in_again():
    capture = CAPTURES[0].parent / "sv_denial6-6.pcap"

    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS, mode, str(capture)],
                                  check=True, capture_output=True, text=True,
                                  cwd=Path(__file__).parents[1]).stdout)

    default, kept = faults("default"), faults("kept")
    assert default > 10_000  # pages of freed arrays faulted in again, batch after batch
    assert kept < default // 10


# --- workers that fail --------------------------------------------------------------------

class _ExitWhenUnpickled:
    """A job that ends the worker process reading it (``os._exit``): a worker killed."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_worker_that_fails_or_dies_is_reported(tmp_path):
    workers = _Workers(2)
    try:
        results = workers.run([("not", "a", "job", 0), _ExitWhenUnpickled()])
        with pytest.raises(RuntimeError, match=r"(?s)^a range decoding process failed:\n"
                           r"Traceback.*AttributeError: 'str' object has no attribute 'path'"):
            next(results)
    finally:
        workers.stop()
    path = write(tmp_path / "a.pcap", adversarial_packets())
    size = path.stat().st_size
    workers = _Workers(2)
    try:
        results = workers.run([(CaptureRange(str(path), 0, 2, 0, size // 2, size), SETTINGS,
                                DEFAULT_LOOKBACK, 1 << 16), _ExitWhenUnpickled()])
        assert next(results)[1].packets > 0
        with pytest.raises(WorkerDied, match=r"^a decoding process ended \(exit code 3\)$"):
            next(results)
    finally:
        workers.stop()


def test_a_range_whose_file_vanished_sends_the_file_to_the_whole_read(tmp_path):
    part = CaptureRange(str(tmp_path / "gone.pcap"), 1, 2, 100, 200, 200)
    fragments, summary = decode_range_job((part, SETTINGS, DEFAULT_LOOKBACK, 1 << 16))
    assert fragments == []
    assert summary.outcome.problem == (
        f"cannot be read as a range: [Errno 2] No such file or directory: '{part.path}'")
