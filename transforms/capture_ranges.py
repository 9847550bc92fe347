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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import TaggedOutput

from flowbeam.capture.reader import capture_kind
from flowbeam.capture.splits import DEFAULT_LOOKBACK, RangeOutcome, plan_ranges, settle_ranges
from flowbeam.packets.range_decode import (
    DEFAULT_CHUNK_SIZE,
    CaptureRange,
    FragmentSettings,
    RangeSummary,
    decode_range,
    unreadable,
)
from flowbeam.packets.to_fragments import fold_ranges
from transforms.capture_reports import log_read_whole, report_ranges
from transforms.fragment_coder import FragmentBatch
from transforms.progress import PROGRESS

LOG = logging.getLogger(__name__)
RANGES_TAG = "ranges"
SUMMARIES_TAG = "summaries"
WHOLE_TAG = "whole"
FOLDED_TAG = "folded"
_FOLDED_BATCH = 10_000  # fragments per output element of the fold


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
        if self._split_bytes <= 0:
            return []
        size = splittable_size(path, self._split_bytes)
        return [] if size is None else plan_ranges(size, self._split_bytes)


def splittable_size(path: str, min_bytes: int) -> int | None:
    """The size of ``path`` if it can be read in byte ranges: an uncompressed capture bigger
    than ``min_bytes`` whose stream can seek. Else None: anything odd (unreadable, not a
    capture) is left to the whole read, which reports it."""
    if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return None
    try:
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        if size <= min_bytes:
            return None
        with _open(path) as stream:
            if capture_kind(stream.read(4)) is None or not stream.seekable():
                return None
    except (OSError, IndexError):  # BeamIOError included
        return None
    return size


def _open(path: str) -> Any:
    return FileSystems.open(path, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED)


@beam.typehints.with_output_types(tuple[str, int, FragmentBatch])
class DecodeRangeFn(beam.DoFn):
    """One ``CaptureRange`` in: ``(path, index, fragments)`` and one ``RangeSummary``."""

    def __init__(self, settings: FragmentSettings, lookback: int = DEFAULT_LOOKBACK,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._settings = settings
        self._lookback = lookback
        self._chunk_size = chunk_size

    def process(self, part: CaptureRange) -> Iterator[Any]:
        try:
            stream = _open(part.path)
        except OSError as error:  # BeamIOError included
            yield TaggedOutput(SUMMARIES_TAG, (part.path, RangeSummary(
                part.index, RangeOutcome(problem=unreadable(error)))))
            return
        with stream:
            for item in decode_range(stream, part, self._settings, lookback=self._lookback,
                                     chunk_size=self._chunk_size):
                if isinstance(item, RangeSummary):
                    PROGRESS.add(packets=item.packets)
                    yield TaggedOutput(SUMMARIES_TAG, (part.path, item))
                else:
                    yield part.path, part.index, item


@dataclass(frozen=True)
class Verdict:
    """How a split file's ranges count: those below ``valid``, unless read ``whole``."""

    valid: int
    whole: bool


class SettleRangesFn(beam.DoFn):
    """``(path, summaries)`` in: ``(path, Verdict)``, the file's counts and dead letter, the
    fragments of the fold of its ranges' states on ``FOLDED_TAG``, and the path on
    ``WHOLE_TAG`` when its ranges do not fit together."""

    def __init__(self, settings: FragmentSettings) -> None:
        self._fold_args = (settings.idle_timeout_us, settings.active_timeout_us,
                           settings.sensor)

    def process(self, element: tuple[str, Iterable[RangeSummary]]) -> Iterator[Any]:
        path, summaries = element
        ordered = sorted(summaries, key=lambda summary: summary.index)
        settlement = settle_ranges([summary.outcome for summary in ordered])
        if settlement.whole:
            log_read_whole(path, settlement.reason)
            yield path, Verdict(0, True)
            yield TaggedOutput(WHOLE_TAG, path)
            return
        counted = ordered[:settlement.valid]
        PROGRESS.add(files=1)
        yield from report_ranges(path, counted)
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
