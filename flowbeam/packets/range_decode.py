"""One byte range of a capture decoded into fragments, wherever it runs.

A split read's range (``flowbeam.capture.splits``) is decoded the same way by a Beam worker
(``transforms.capture_ranges.DecodeRangeFn``) and by a local worker process
(``flowbeam.packets.range_pool``): ``decode_range`` feeds its primer records to
``PacketsToFragments.prime``, its own to ``add`` and the records after it to ``resolve``, and
ends with a ``RangeSummary``: the range's counts, its boundary records and the flow state it
hands over to its file's fold (``fold_ranges``). Counts travel in the summary, never as the
range goes, so that a file whose ranges do not fit together (read whole instead) is counted
once.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from flowbeam.capture.source import CaptureError
from flowbeam.capture.splits import DEFAULT_LOOKBACK, OWNED, PRIMER, RangeOutcome, read_range
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.range_state import RangeState
from flowbeam.packets.to_fragments import PacketsToFragments

DEFAULT_CHUNK_SIZE = 4 << 20  # bytes read from the file at a time


class FragmentSettings(NamedTuple):
    """How packets become fragments (``PacketsToFragments``' arguments)."""

    idle_timeout_us: int
    active_timeout_us: int
    byte_accounting: str = "ip"
    sensor: str = ""


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
    """What one range read found and counted, for its file's settlement and fold."""

    index: int
    outcome: RangeOutcome
    packets: int = 0
    bytes: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    unknown_linktypes: tuple[int, ...] = ()
    state: RangeState = field(default_factory=RangeState.empty)


def decode_range(stream: BinaryIO, part: CaptureRange, settings: FragmentSettings, *,
                 lookback: int = DEFAULT_LOOKBACK, chunk_size: int = DEFAULT_CHUNK_SIZE
                 ) -> Iterator[list[Fragment] | RangeSummary]:
    """The range's final fragments as they come (lists), then its ``RangeSummary``.

    A range that cannot be read (I/O error, the file changed) does not raise: its summary's
    ``outcome.problem`` says why, and the file is then read whole (``settle_ranges``).
    """
    step = PacketsToFragments(*settings, heads=part.index > 0)
    outcome = RangeOutcome()
    try:
        for role, batch in read_range(stream, part.size, part.start, part.end, outcome,
                                      lookback=lookback, lookahead=lookback,
                                      chunk_size=chunk_size):
            if role == PRIMER:
                step.prime(batch)
                continue
            fragments = step.add(batch) if role == OWNED else step.resolve(batch)
            if fragments:
                yield fragments
    except (CaptureError, OSError, EOFError, zlib.error) as error:
        outcome.problem = unreadable(error)
    fragments, state = step.finish_range()
    if fragments:
        yield fragments
    yield RangeSummary(part.index, outcome, step.packets, step.bytes,
                       {reason: count for reason, count in step.malformed.items() if count},
                       tuple(sorted(step.unknown_linktypes)), state)


def unreadable(error: Exception) -> str:
    """Why a range could not be read (``RangeOutcome.problem``): its file is read whole."""
    return f"cannot be read as a range: {error}"
