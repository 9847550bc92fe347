"""Split reads in Beam: one big capture decoded as byte ranges by many workers.

``flowbeam.capture.splits`` says which records each range owns and how the ranges' reads
combine; this module runs it:

- ``PlanRangesFn`` cuts each big, uncompressed, seekable capture into ranges (others go on to
  the whole-file read, unchanged);
- ``DecodeRangeFn`` decodes one range: primers before it and records after it only complete IP
  fragments (``PacketsToFragments.prime``/``resolve``); it emits ``(path, index, fragments)``
  and one ``RangeSummary`` with the range's counts, boundary records and the flow state it
  hands over (``flowbeam.packets.range_state``);
- ``SettleRangesFn`` combines a file's summaries (``settle_ranges``): it counts the file once
  (files read, packets, bytes, malformed packets), reports damage once, and sends the file to
  the whole-file read when the ranges do not fit together; otherwise it folds the counted
  ranges' states in order (``fold_ranges``) into the rows that cross range boundaries;
- ``KeepSettledFn`` drops the fragments of ranges that do not count (after damage, or of a
  file read whole instead).

Counts are therefore made from the summaries, never while decoding a range, so a file read
twice (ranges, then whole) is counted once, as in a run without splits.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import TaggedOutput

from flowbeam.capture.reader import capture_kind
from flowbeam.capture.source import CaptureError
from flowbeam.capture.splits import (
    DEFAULT_LOOKBACK,
    OWNED,
    PRIMER,
    RangeOutcome,
    plan_ranges,
    read_range,
    settle_ranges,
)
from flowbeam.packets.range_state import RangeState
from flowbeam.packets.to_fragments import PacketsToFragments, fold_ranges
from transforms import counters
from transforms.capture_reports import damaged_file, report_skipped
from transforms.fragment_coder import FragmentBatch
from transforms.progress import PROGRESS

LOG = logging.getLogger(__name__)
RANGES_TAG = "ranges"
SUMMARIES_TAG = "summaries"
WHOLE_TAG = "whole"
FOLDED_TAG = "folded"
_FOLDED_BATCH = 10_000  # fragments per output element of the fold


@dataclass(frozen=True)
class CaptureRange:
    """Bytes ``[start, end)`` of a ``size``-byte capture: range ``index`` of ``count``."""

    path: str
    index: int
    count: int
    start: int
    end: int
    size: int


@dataclass
class RangeSummary:
    """What one range read found and counted, for ``SettleRangesFn``."""

    index: int
    outcome: RangeOutcome
    packets: int = 0
    bytes: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    unknown_linktypes: tuple[int, ...] = ()
    state: RangeState = field(default_factory=RangeState.empty)


class PlanRangesFn(beam.DoFn):
    """A path in: the path itself (main output: read it whole) or its ranges (``RANGES_TAG``).

    Only an uncompressed capture bigger than ``split_bytes`` whose stream can seek is split;
    anything odd (unreadable, not a capture) is left to the whole read, which reports it.
    """

    def __init__(self, split_bytes: int) -> None:
        self._split_bytes = split_bytes

    def process(self, path: str) -> Iterator[Any]:
        ranges = self._ranges(path)
        if len(ranges) < 2:
            yield path
            return
        size = ranges[-1][1]
        for index, (start, end) in enumerate(ranges):
            yield TaggedOutput(RANGES_TAG,
                               CaptureRange(path, index, len(ranges), start, end, size))

    def _ranges(self, path: str) -> list[tuple[int, int]]:
        if self._split_bytes <= 0 or (CompressionTypes.detect_compression_type(path)
                                      != CompressionTypes.UNCOMPRESSED):
            return []
        try:
            size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
            if size <= self._split_bytes:
                return []
            with _open(path) as stream:
                if capture_kind(stream.read(4)) is None or not stream.seekable():
                    return []
        except (OSError, BeamIOError, IndexError):
            return []
        return plan_ranges(size, self._split_bytes)


def _open(path: str) -> Any:
    return FileSystems.open(path, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED)


@beam.typehints.with_output_types(tuple[str, int, FragmentBatch])
class DecodeRangeFn(beam.DoFn):
    """One ``CaptureRange`` in: ``(path, index, fragments)`` and one ``RangeSummary``."""

    def __init__(self, idle_timeout_us: int, active_timeout_us: int, byte_accounting: str,
                 sensor: str, lookback: int = DEFAULT_LOOKBACK,
                 chunk_size: int = 4 << 20) -> None:
        self._step_args = (idle_timeout_us, active_timeout_us, byte_accounting, sensor)
        self._lookback = lookback
        self._chunk_size = chunk_size

    def process(self, part: CaptureRange) -> Iterator[Any]:
        step = PacketsToFragments(*self._step_args, heads=part.index > 0)
        outcome = RangeOutcome()
        try:
            with _open(part.path) as stream:
                for role, batch in read_range(
                        stream, part.size, part.start, part.end, outcome,
                        lookback=self._lookback, lookahead=self._lookback,
                        chunk_size=self._chunk_size):
                    if role == PRIMER:
                        step.prime(batch)
                        continue
                    if role == OWNED:
                        PROGRESS.add(packets=len(batch))
                        fragments = step.add(batch)
                    else:
                        fragments = step.resolve(batch)
                    if fragments:
                        yield part.path, part.index, fragments
        except (CaptureError, OSError, EOFError, zlib.error) as error:
            outcome.problem = f"cannot be read as a range: {error}"
        fragments, state = step.finish_range()
        if fragments:
            yield part.path, part.index, fragments
        yield TaggedOutput(SUMMARIES_TAG, (part.path, RangeSummary(
            part.index, outcome, step.packets, step.bytes,
            {reason: count for reason, count in step.malformed.items() if count},
            tuple(sorted(step.unknown_linktypes)), state)))


@dataclass(frozen=True)
class Verdict:
    """How a split file's ranges count: those below ``valid``, unless read ``whole``."""

    valid: int
    whole: bool


class SettleRangesFn(beam.DoFn):
    """``(path, summaries)`` in: ``(path, Verdict)``, the file's counts and dead letter, the
    fragments of the fold of its ranges' states on ``FOLDED_TAG``, and the path on
    ``WHOLE_TAG`` when its ranges do not fit together."""

    def __init__(self, idle_timeout_us: int, active_timeout_us: int, sensor: str) -> None:
        self._fold_args = (idle_timeout_us, active_timeout_us, sensor)
        self._captures = counters.counter(counters.FILES_READ)
        self._damaged = counters.counter(counters.FILES_DAMAGED)
        self._packets = counters.counter(counters.PACKETS)
        self._bytes = counters.counter(counters.BYTES)

    def process(self, element: tuple[str, Iterable[RangeSummary]]) -> Iterator[Any]:
        path, summaries = element
        ordered = sorted(summaries, key=lambda summary: summary.index)
        settlement = settle_ranges([summary.outcome for summary in ordered])
        if settlement.whole:
            LOG.warning("flowbeam: %s: read whole instead of in ranges: %s", path,
                        settlement.reason)
            yield path, Verdict(0, True)
            yield TaggedOutput(WHOLE_TAG, path)
            return
        counted = ordered[:settlement.valid]
        PROGRESS.add(files=1)
        self._captures.inc()
        self._packets.inc(sum(summary.packets for summary in counted))
        self._bytes.inc(sum(summary.bytes for summary in counted))
        malformed: dict[str, int] = {}
        for summary in counted:
            for reason, count in summary.malformed.items():
                malformed[reason] = malformed.get(reason, 0) + count
        report_skipped(path, malformed,
                       {lt for summary in counted for lt in summary.unknown_linktypes})
        damage = counted[-1].outcome.damage
        if damage is not None:
            yield damaged_file(self._damaged, path, damage.reason, damage.offset)
        yield path, Verdict(settlement.valid, False)
        folded = fold_ranges((summary.state for summary in counted), *self._fold_args)
        for start in range(0, len(folded), _FOLDED_BATCH):
            yield TaggedOutput(FOLDED_TAG, folded[start:start + _FOLDED_BATCH])


@beam.typehints.with_output_types(FragmentBatch)
class KeepSettledFn(beam.DoFn):
    """``(path, index, fragments)`` in: the fragments, if their range counts (side input:
    the files' ``Verdict``s)."""

    def process(self, element: tuple[str, int, list], verdicts: dict[str, Verdict]
                ) -> Iterator[list]:
        path, index, fragments = element
        verdict = verdicts[path]
        if not verdict.whole and index < verdict.valid:
            yield fragments
