"""``DecodeCaptures``: capture files (local, globs, gs://, s3://, .gz) to batches of fragments.

Files are matched and opened with Beam's own ``fileio`` (so every Beam filesystem and
compression works), then each file is streamed through the capture reader, the packet decoder
and the fragment aggregator in one DoFn: a file's packets never leave the worker as Python
objects, only its pre-aggregated fragments do. A big local capture can instead be decoded as
byte ranges by a pool of local processes (``decode_processes``, ``flowbeam.packets.range_pool``),
with the same fragments and counts.

Nothing is lost silently: a file that is not a capture, a damaged one (after its good records
became fragments), an unreadable one, each become one dead letter naming the file, the byte
offset and the reason. Malformed packets are counted per reason in Beam metrics.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import TaggedOutput

from flowbeam.capture.reader import (
    CaptureDamagedError,
    CaptureFormatError,
    CaptureStats,
    read_capture,
)
from flowbeam.capture.splits import DEFAULT_LOOKBACK
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.range_decode import DEFAULT_CHUNK_SIZE, FragmentSettings
from flowbeam.packets.range_pool import POOL_RANGE_BYTES, PooledRead, decode_in_processes
from flowbeam.packets.to_fragments import PacketsToFragments
from transforms import counters
from transforms.capture_ranges import (
    FOLDED_TAG,
    RANGES_TAG,
    SUMMARIES_TAG,
    WHOLE_TAG,
    DecodeRangeFn,
    KeepSettledFn,
    PlanRangesFn,
    SettleRangesFn,
    splittable_size,
)
from transforms.capture_reports import (
    damaged_file,
    log_read_whole,
    report_ranges,
    report_skipped,
)
from transforms.dead_letters import DEAD_LETTER_TAG, dead_letter
from transforms.file_matching import distinct_paths, open_spread
from transforms.fragment_coder import FragmentBatch
from transforms.progress import PROGRESS

LOG = logging.getLogger(__name__)


@beam.typehints.with_output_types(FragmentBatch)
class _DecodeCaptureFileFn(beam.DoFn):
    """One capture file in, lists of fragments out (dead letters on ``DEAD_LETTER_TAG``).

    ``processes`` > 1: a local, uncompressed capture bigger than ``range_bytes`` is decoded
    in ranges by that many local processes (``decode_in_processes``; ``lookback`` and
    ``chunk_size`` as for a split read).
    """

    def __init__(self, settings: FragmentSettings, processes: int = 1,
                 range_bytes: int = POOL_RANGE_BYTES, lookback: int = DEFAULT_LOOKBACK,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._settings = settings
        self._processes = processes
        self._range_bytes = range_bytes
        self._range_options = {"lookback": lookback, "chunk_size": chunk_size}
        self._captures = counters.counter(counters.FILES_READ)
        self._damaged = counters.counter(counters.FILES_DAMAGED)
        self._not_captures = counters.counter(counters.FILES_FAILED)
        self._unreadable = counters.counter(counters.FILES_UNREADABLE)
        self._packets = counters.counter(counters.PACKETS)
        self._bytes = counters.counter(counters.BYTES)

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        try:
            pooled = self._in_processes(readable.metadata.path)
            if pooled is None:
                yield from self._decode(readable)
            else:
                yield from report_ranges(readable.metadata.path, pooled.summaries)
                yield from pooled.fragments
        finally:
            PROGRESS.add(files=1)

    def _in_processes(self, path: str) -> PooledRead | None:
        """The file decoded in ranges by local processes, or None: one process is asked
        for, the file is small, not local, compressed or no capture (the whole read says
        so), or its ranges do not fit together."""
        if self._processes < 2 or FileSystems.get_scheme(path) is not None:
            return None
        size = splittable_size(path, self._range_bytes)
        if size is None:
            return None
        pooled = decode_in_processes(
            path, size, self._settings, self._processes, range_bytes=self._range_bytes,
            on_range=lambda summary: PROGRESS.add(packets=summary.packets),
            **self._range_options)
        if pooled.settlement.whole:
            log_read_whole(path, pooled.settlement.reason)
            return None
        return pooled

    def _decode(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        step = PacketsToFragments(*self._settings)
        stats = CaptureStats()
        self._reported_packets = self._reported_bytes = 0
        opened = False
        try:
            with readable.open(mime_type="application/octet-stream",
                               compression_type=CompressionTypes.AUTO) as stream:
                opened = True
                for batch in read_capture(stream, stats=stats):
                    PROGRESS.add(packets=len(batch))
                    yield from self._counted(step, step.add(batch))
        except CaptureFormatError as error:
            yield self._refused(self._not_captures, path, error.reason, error.offset)
            return
        except CaptureDamagedError as error:
            yield damaged_file(self._damaged, path, error.reason, error.offset)
        except IsADirectoryError:
            yield self._refused(self._unreadable, path, "is a directory, not a capture file "
                                f"(to read the captures in it: {path.rstrip('/')}/*)")
            return
        except (OSError, EOFError, zlib.error) as error:
            if not opened:  # missing, permission denied: nothing was read
                yield self._refused(self._unreadable, path, f"cannot open file: {error}")
                return
            if stats.kind is None:
                # Random bytes named .gz, or a compressed file corrupt within the first read
                # (Beam decompresses 16 MB at a time): no capture header came out of it.
                yield self._refused(self._not_captures, path,
                                    f"no capture could be read from it: {error}", 0)
                return
            # A compressed stream corrupt after the capture header: the packets read before
            # the failure still become flows.
            yield damaged_file(self._damaged, path, f"cannot read file: {error}")
        self._captures.inc()
        yield from self._counted(step, step.finish())
        report_skipped(path, step.malformed, step.unknown_linktypes)

    @staticmethod
    def _refused(counter: Any, path: str, reason: str, offset: int | None = None) -> TaggedOutput:
        """A file none of whose packets could be read: counted, logged, one dead letter."""
        counter.inc()
        LOG.error("flowbeam: %s: %s", path, reason)
        return TaggedOutput(DEAD_LETTER_TAG, dead_letter("read_capture", reason, path, offset))

    def _counted(self, step: PacketsToFragments,
                 fragments: list[Fragment]) -> Iterator[list[Fragment]]:
        """Report the packets and bytes decoded since the last call; pass the fragments on."""
        self._packets.inc(step.packets - self._reported_packets)
        self._bytes.inc(step.bytes - self._reported_bytes)
        self._reported_packets, self._reported_bytes = step.packets, step.bytes
        if fragments:
            yield fragments


class DecodeCaptures(beam.PTransform):
    """File patterns in; ``{"fragments": lists of Fragment, "dead_letters": dead letters}``.

    A capture bigger than ``split_mb`` MB (uncompressed, seekable) is decoded as byte ranges
    by several workers (``transforms.capture_ranges``) with the same result as one read;
    ``split_mb <= 0`` (the default) reads every file whole, by ``decode_processes`` local
    processes when it is a big local capture (ranges of ``pool_range_bytes``).
    """

    def __init__(self, idle_timeout_s: float, active_timeout_s: float,
                 byte_accounting: str = "ip", sensor: str = "",
                 split_mb: float = 0.0, decode_processes: int = 1,
                 pool_range_bytes: int = POOL_RANGE_BYTES, **range_options: int) -> None:
        super().__init__()
        settings = FragmentSettings(round(idle_timeout_s * 1_000_000),
                                    round(active_timeout_s * 1_000_000), byte_accounting, sensor)
        # range_options: a range's lookback and chunk_size (tests make them tiny).
        self._decode = _DecodeCaptureFileFn(settings, decode_processes, pool_range_bytes,
                                            **range_options)
        self._split_bytes = round(split_mb * (1 << 20))
        self._settle_ranges = SettleRangesFn(settings)
        self._decode_range = DecodeRangeFn(settings, **range_options)

    def expand(self, patterns: beam.PCollection) -> dict[str, beam.PCollection]:
        planned = distinct_paths(patterns) | "PlanRanges" >> beam.ParDo(
            PlanRangesFn(self._split_bytes)).with_outputs(RANGES_TAG, main="whole")
        whole = self._read_whole(planned.whole, "")
        ranges = (
            planned[RANGES_TAG]
            | "ReshuffleRanges" >> beam.Reshuffle()
            | "DecodeRanges" >> beam.ParDo(self._decode_range).with_outputs(
                SUMMARIES_TAG, main="parts")
        )
        settled = (
            ranges[SUMMARIES_TAG]
            | "GroupRanges" >> beam.GroupByKey()
            | "SettleRanges" >> beam.ParDo(self._settle_ranges).with_outputs(
                DEAD_LETTER_TAG, WHOLE_TAG, FOLDED_TAG, main="verdicts")
        )
        kept = ranges.parts | "KeepSettledRanges" >> beam.ParDo(
            KeepSettledFn(), beam.pvalue.AsDict(settled.verdicts))
        # Files whose ranges do not fit together (see flowbeam.capture.splits): read whole.
        again = self._read_whole(settled[WHOLE_TAG], "Again")
        return {
            "fragments": (whole.fragments, kept, settled[FOLDED_TAG], again.fragments)
            | "AllFragments" >> beam.Flatten().with_output_types(FragmentBatch),
            "dead_letters": (whole[DEAD_LETTER_TAG], settled[DEAD_LETTER_TAG],
                             again[DEAD_LETTER_TAG])
            | "CaptureDeadLetters" >> beam.Flatten(),
        }

    def _read_whole(self, paths: beam.PCollection, suffix: str) -> beam.pvalue.DoOutputsTuple:
        return open_spread(paths, suffix) | f"DecodeFiles{suffix}" >> beam.ParDo(
            self._decode).with_outputs(DEAD_LETTER_TAG, main="fragments")
