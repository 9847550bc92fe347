"""Split reads: one capture read as byte ranges by several workers, with the records of one read.

A huge capture read by one worker is a single-core job however big the cluster is. Here it is
cut into byte ranges (``plan_ranges``) and each range is read on its own (``read_range``):

- **Ownership.** A record belongs to the range where its header *starts*. Each range reads on
  past its end to finish its last record, so the ranges' records partition the file's.
- **The file header** (pcap: the 24-byte header; pcapng: the leading Section Header and
  Interface Description Blocks) is read from the start of the file by every range, so every
  range knows the link types, byte order and timestamp resolution.
- **Resynchronisation.** A range does not start at its ``start`` (mid-record, in general) but
  ``lookback`` bytes earlier, on the first position from which a chain of plausible record
  headers (pcap: ``caplen <= wirelen``, caplen within libpcap's limit, a valid fraction of a
  second, neighbours' times within a day; pcapng: block type, equal leading and trailing
  lengths) runs without a break up to ``start``. A false start inside a packet's payload
  (a capture of a capture download: payloads full of record headers) must chain exactly from
  payload to payload across the real headers for ``lookback`` bytes to survive; it almost
  never does, and where a false chain rejoins the real one before ``start`` the records owned
  are the real ones anyway. The records between the lock and ``start`` are only handed over
  as primers (IP fragment context), never as the range's own.
- **Verification** (``settle_ranges``): every range reports the first record header at or
  after its start and at or after its end. Consecutive ranges must agree (range k's "after
  end" is range k+1's "after start"); a range that could not lock, or a pcapng range holding
  a section or interface declared after the head (the next ranges decoded without it), makes
  the whole file fall back to one sequential read. A damaged range ends the file there, as
  the sequential read does: the ranges after it are dropped, and only the damaged range
  reports the damage.

IP fragments (``PacketsToFragments.prime``/``resolve``): a later fragment needs the ports of
its first fragment, which may lie in another range. The ``PRIMER`` records (``lookback``
bytes before ``start``) are decoded only to remember first fragments; the primers' own
rows, waiting fragments and counts are dropped. The ``AHEAD`` records (``lookahead`` bytes
past ``end``) are decoded only to release the range's waiting fragments; their own rows and
counts are dropped. Rule: every record is emitted and counted by exactly one range, and a
later fragment gets the same ports as in the sequential read when its first fragment lies
within ``lookback`` bytes before it or ``lookahead`` bytes after it (1 MiB each by default:
thousands of packets; fragments of one datagram travel together). Beyond that it keeps
ports 0, as a sequential read does at the end of a file.

Flow state: a flow crossing a boundary (idle gaps, a 5-tuple reused after a FIN exchange in an
earlier range, active-timeout chains) is cut as in the sequential read: each range sets aside
the packets whose rows depend on the ranges before, and the file's ranges are folded in order
(``flowbeam.packets.range_state``), exactly while the capture's time disorder stays within the
fragment aggregator's ``max_disorder_us``, as for the sequential read itself.

Limits: a pcapng Simple Packet Block takes the time of the previous packet, known only if one
lies in the lookback; a capture spanning more than ``MAX_SPAN_S`` is read whole (its ranges do
not resynchronise). Gzip'd files and streams that cannot seek are not split (the caller reads
them whole).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np

from flowbeam.capture.pcap import (
    MAX_CAPLEN,
    PCAP_FILE_HEADER,
    _PcapLayout,
    pcap_layout,
    walk_pcap_records,
)
from flowbeam.capture.pcapng import pcapng_head, read_pcapng
from flowbeam.capture.reader import capture_kind
from flowbeam.capture.records import RecordBatch
from flowbeam.capture.source import CaptureDamagedError, Source

DEFAULT_LOOKBACK = 1 << 20  # bytes decoded before a range (IP fragment context, resync)
CHAIN = 8  # plausible record headers in a row that a resynchronisation needs at least
MAX_NEIGHBOUR_GAP_S = 86_400  # consecutive records further apart in time look like noise
MAX_SPAN_S = 366 * 86_400  # a record this far in time from the file's first is noise
_CHAIN_MARGIN = CHAIN * (MAX_CAPLEN + 24)  # bytes past ``start`` a chain check may need
PRIMER, OWNED, AHEAD = "primer", "owned", "ahead"


def plan_ranges(size: int, split_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of about ``split_bytes`` covering a file of ``size`` bytes.

    A file no bigger than ``split_bytes`` (or ``split_bytes <= 0``: splitting off) is one
    range. Ranges are of equal size, so the last one is not a sliver.
    """
    if split_bytes <= 0 or size <= split_bytes:
        return [(0, size)]
    return equal_ranges(size, -(-size // split_bytes))


def equal_ranges(size: int, count: int) -> list[tuple[int, int]]:
    """``count`` ``[start, end)`` byte ranges of (nearly) equal size covering ``size`` bytes."""
    bounds = [size * index // count for index in range(count + 1)]
    return list(itertools.pairwise(bounds))


@dataclass
class RangeOutcome:
    """What a range read found, for ``settle_ranges``; filled in while ``read_range`` runs.

    ``first_owned`` / ``next_after``: file offset of the first record header at or after the
    range's start / end (a damaged record's header, or the file size at its end, count).
    """

    first_owned: int | None = None
    next_after: int | None = None
    damage: CaptureDamagedError | None = None  # damage at an offset the range owns
    problem: str = ""  # why this range's read cannot be used (the file is then read whole)
    late_declarations: int = 0  # pcapng SHB/IDB after the head, in this range


def read_range(
    stream: BinaryIO, size: int, start: int, end: int, outcome: RangeOutcome, *,
    lookback: int = DEFAULT_LOOKBACK, lookahead: int = DEFAULT_LOOKBACK,
    chunk_size: int = 4 << 20,
) -> Iterator[tuple[str, RecordBatch]]:
    """(role, batch) pairs of the records of ``[start, end)`` of a seekable capture.

    Roles: ``PRIMER`` records (up to ``lookback`` bytes before ``start``), the range's own
    (``OWNED``), then ``AHEAD`` records (up to ``lookahead`` bytes past ``end``), both only
    for context. ``outcome`` is filled in as the read goes; damage the range owns is recorded
    there, not raised. A file that is not a capture raises ``CaptureFormatError`` (ranges are
    planned only for captures, so this means the file changed).
    """
    stream.seek(0)
    head = stream.read(PCAP_FILE_HEADER + 4)  # and the first record's seconds
    kind = capture_kind(head)
    if kind == "pcap":
        layout = pcap_layout(head)
        lock = _pcap_lock(stream, size, start, lookback, layout, head[PCAP_FILE_HEADER:])
        if lock is None:
            outcome.problem = "found no chain of record headers"
            return
        records = walk_pcap_records(_source_at(stream, lock, chunk_size), layout)
        head_end = PCAP_FILE_HEADER
    else:
        stream.seek(0)
        section, head_end = pcapng_head(Source(stream, 1 << 16))
        lock = _pcapng_lock(stream, size, start, lookback, head_end, section.order)
        if lock is None:
            outcome.problem = "found no chain of blocks"
            return
        records = read_pcapng(_source_at(stream, lock, chunk_size), section)
    yield from _split_roles(records, size, start, end, end + lookahead, outcome)
    if kind == "pcapng":
        outcome.late_declarations = sum(
            1 for offset in section.declared if max(start, head_end) <= offset < end)


def _source_at(stream: BinaryIO, offset: int, chunk_size: int) -> Source:
    stream.seek(offset)
    source = Source(stream, chunk_size)
    source.base = offset
    source.fill()
    return source


def _split_roles(
    records: Iterator[RecordBatch], size: int, start: int, end: int, stop: int,
    outcome: RangeOutcome,
) -> Iterator[tuple[str, RecordBatch]]:
    """Cut the batches at ``start`` and ``end`` by record header offset; stop past ``stop``."""
    try:
        for batch in records:
            offsets = batch.file_offsets
            cuts = np.searchsorted(offsets, [start, end, stop])
            if outcome.first_owned is None and cuts[0] < len(batch):
                outcome.first_owned = int(offsets[cuts[0]])
            if outcome.next_after is None and cuts[1] < len(batch):
                outcome.next_after = int(offsets[cuts[1]])
            for role, low, high in ((PRIMER, 0, cuts[0]), (OWNED, cuts[0], cuts[1]),
                                    (AHEAD, cuts[1], cuts[2])):
                if high > low:
                    yield role, _slice(batch, int(low), int(high))
            if cuts[2] < len(batch):
                return
    except CaptureDamagedError as error:
        if start <= error.offset < end:
            outcome.damage = error
        _found_at(outcome, start, end, error.offset)
        return
    _found_at(outcome, start, end, size)


def _found_at(outcome: RangeOutcome, start: int, end: int, offset: int) -> None:
    """The walk stopped at ``offset`` (damage or end of file): the boundary it stands for."""
    if outcome.first_owned is None and offset >= start:
        outcome.first_owned = offset
    if outcome.next_after is None and offset >= end:
        outcome.next_after = offset


def _slice(batch: RecordBatch, low: int, high: int) -> RecordBatch:
    """Records ``low:high`` of ``batch`` (views over the same buffer)."""
    part = slice(low, high)
    return replace(batch, offsets=batch.offsets[part], caplen=batch.caplen[part],
                   wirelen=batch.wirelen[part], ts_us=batch.ts_us[part],
                   linktype=batch.linktype[part], file_offsets=batch.file_offsets[part])


def _window(stream: BinaryIO, size: int, first: int, start: int) -> tuple[bytearray, bool]:
    """The bytes from ``first`` to far enough past ``start`` for a chain check; at EOF?"""
    last = min(size, start + _CHAIN_MARGIN)
    stream.seek(first)
    data = bytearray(stream.read(last - first))
    return data, first + len(data) >= size


# --- classic pcap ---------------------------------------------------------------------------

def _pcap_lock(
    stream: BinaryIO, size: int, start: int, lookback: int, layout: _PcapLayout,
    first_seconds: bytes,
) -> int | None:
    """The record header a range starts walking from (None: no chain found)."""
    first = start - lookback
    if first - 4 <= PCAP_FILE_HEADER or len(first_seconds) < 4:
        return PCAP_FILE_HEADER
    first -= 4  # the real header behind a ghost (``pcap_resync``)
    window, at_eof = _window(stream, size, first, start)
    anchor = struct.unpack(layout.order + "I", first_seconds)[0]
    found = pcap_resync(window, start - first, layout, at_eof, anchor)
    return None if found is None else first + found


def pcap_resync(window: bytearray, start: int, layout: _PcapLayout, at_eof: bool,
                anchor_s: int, chain: int = CHAIN) -> int | None:
    """The first position in ``window`` from which plausible record headers chain up to
    ``start`` (a position in ``window``) with at least ``chain`` of them; None if none does.

    ``anchor_s``: the file's first record's seconds; a header more than ``MAX_SPAN_S`` from
    it is implausible (a capture spanning more than a year is then read whole).

    ``at_eof``: the window ends where the file does, so a chain may end exactly there (one
    running past the end of the file before ``start`` is no chain: a false header's caplen).
    """
    count = len(window) - layout.header_len + 1
    if count <= 0:
        return None
    headers = layout.header_view(window, len(window))
    caplen, wirelen = headers["caplen"], headers["wirelen"]
    fraction_limit = 1_000_000_000 if layout.nanosecond else 1_000_000
    plausible = ((caplen <= MAX_CAPLEN) & (caplen <= wirelen) & (wirelen > 0)
                 & (headers["frac"] < fraction_limit)
                 & (np.abs(headers["sec"].astype(np.int64) - anchor_s) <= MAX_SPAN_S))
    check = struct.Struct(layout.order + "IIII").unpack_from
    # Every record with caplen == wirelen has a ghost 4 bytes on (its fraction read as
    # seconds, its wirelen as caplen) whose chain shadows the real one; the ghost of a header
    # just before a candidate comes first, so candidates start 4 bytes into the window and
    # each is checked for being a ghost.
    for candidate in (np.flatnonzero(plausible[4:]) + 4).tolist():
        if _pcap_chain(window, candidate, start, plausible, check, layout, at_eof, chain):
            ghost_of = candidate - 4
            if plausible[ghost_of] and _pcap_chain(
                    window, ghost_of, start, plausible, check, layout, at_eof, chain):
                return ghost_of
            return candidate
    return None


def _pcap_chain(window: bytearray, pos: int, start: int, plausible: np.ndarray, check,
                layout: _PcapLayout, at_eof: bool, chain: int) -> bool:
    links = 0
    previous = None
    while True:
        if pos >= len(plausible):  # the rest of the window holds no whole header
            return (at_eof and pos == len(window)) or (pos >= start and links >= chain)
        if not plausible[pos]:
            return False
        seconds, _, caplen, _ = check(window, pos)
        if previous is not None and abs(seconds - previous) > MAX_NEIGHBOUR_GAP_S:
            return False
        previous = seconds
        links += 1
        pos += layout.header_len + caplen
        if pos >= start and links >= chain:
            return True


# --- pcapng ---------------------------------------------------------------------------------

def _pcapng_lock(stream: BinaryIO, size: int, start: int, lookback: int, head_end: int,
                 order: str) -> int | None:
    first = start - lookback
    if first <= head_end:
        return head_end
    first += -first % 4  # blocks are 4-byte aligned: every length is a multiple of 4
    window, at_eof = _window(stream, size, first, start)
    found = pcapng_resync(window, start - first, order, at_eof)
    return None if found is None else first + found


def pcapng_resync(window: bytearray, start: int, order: str, at_eof: bool,
                  chain: int = CHAIN) -> int | None:
    """Like ``pcap_resync`` for pcapng blocks (``window`` starts 4-byte aligned): a block
    is plausible when its length is a multiple of 4, at least 12, at most ``MAX_BLOCK``
    (unknown block types may be longer: they are skipped over), and repeated at its end."""
    words = len(window) // 4
    if words < 3:
        return None
    values = np.frombuffer(window, np.dtype(order + "u4"), words).astype(np.int64)
    lengths = values[1:]
    trailer = np.arange(words - 1) + lengths // 4 - 1
    inside = trailer < words
    plausible = (lengths % 4 == 0) & (lengths >= 12) & ~inside  # trailer checked later
    plausible[inside] |= ((lengths[inside] % 4 == 0) & (lengths[inside] >= 12)
                          & (values[trailer[inside]] == lengths[inside]))
    for candidate in (np.flatnonzero(plausible) * 4).tolist():
        if _pcapng_chain(values, candidate, start, at_eof, chain):
            return candidate
    return None


def _pcapng_chain(values: np.ndarray, pos: int, start: int, at_eof: bool, chain: int) -> bool:
    links = 0
    end = len(values) * 4
    while True:
        if pos + 8 > end:
            return (at_eof and pos == end) or (pos >= start and links >= chain)
        length = int(values[pos // 4 + 1])
        if length % 4 or length < 12:
            return False
        if pos + length > end:  # a block longer than the window: its trailer is not here
            return not at_eof and pos >= start and links >= chain
        if int(values[(pos + length) // 4 - 1]) != length:
            return False
        links += 1
        pos += length
        if pos >= start and links >= chain:
            return True


# --- settling a file's ranges ---------------------------------------------------------------

@dataclass(frozen=True)
class Settlement:
    """How a split file's range reads combine: ranges ``[0, valid)`` count; ``whole``: the
    file must be read again sequentially instead (nothing of its ranges counts)."""

    valid: int
    whole: bool
    reason: str = ""


def settle_ranges(outcomes: Sequence[RangeOutcome]) -> Settlement:
    """Which range reads of one file (all of them, in range order) give the sequential read.

    See the module docstring: consecutive ranges must agree on the record header at their
    common boundary; damage ends the file; a pcapng section or interface declared after the
    head, or a range that found no record headers, means the file is read whole.
    """
    for index, outcome in enumerate(outcomes):
        if outcome.problem:
            return Settlement(0, True, f"range {index}: {outcome.problem}")
        if index and outcome.first_owned != outcomes[index - 1].next_after:
            return Settlement(0, True, f"ranges {index - 1} and {index} disagree on the "
                              f"record at their boundary ({outcomes[index - 1].next_after} "
                              f"vs {outcome.first_owned})")
        if outcome.damage is not None:
            return Settlement(index + 1, False)
        if outcome.late_declarations:
            return Settlement(0, True, f"range {index} declares a pcapng section or interface")
    return Settlement(len(outcomes), False)
