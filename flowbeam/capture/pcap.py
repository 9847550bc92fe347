"""Classic pcap: the file header's layout and the walk from record header to record header.

A capture holds millions of records and Python costs ~100 ns per statement, so record headers
are found by a speculative vectorised walk (see ``_speculate``) that leaves to a plain
``struct.unpack_from`` loop only the few records its guess misses and stretches of records
too big for it to pay. Their fields come from the header words the walk gathered to find
them (``_WalkScratch``): one NumPy gather per chunk, or per stretch the Python loop walked.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from flowbeam.capture.records import RecordBatch
from flowbeam.capture.source import CaptureDamagedError, Source

MAX_CAPLEN = 256 << 10  # a classic pcap record claiming more is corrupt (libpcap's own limit)

PCAP_MAGICS = {  # magic -> (nanosecond timestamps, record header length)
    0xA1B2C3D4: (False, 16),
    0xA1B23C4D: (True, 16),
    0xA1B2CD34: (False, 24),  # Alexey Kuznetzov's modified pcap: 8 more bytes per record header
}
PCAP_FILE_HEADER = 24

# The pcap header's link type is its low 16 bits; above them sit reserved bits, the FCS-present
# bit (0x04000000) and the FCS length (bits 28-31). Masking with 0x0FFFFFFF would keep the
# FCS-present bit, so this is libpcap's current LT_LINKTYPE mask instead.
_LINKTYPE_MASK = 0x0000FFFF

# Speculative walk tuning. Its cost grows with bytes, the Python loop's with records: measured
# here, the crossover is at ~600 bytes per record, and below 64 KiB the setup is not worth it.
# A chunk is judged by its own records, not its predecessor's: bulk transfers come in bursts
# about a chunk long, so the previous chunk's mix often says the opposite of the next one's.
_SPECULATE_MIN_BYTES = 64 << 10
_SPECULATE_MAX_RECORD_BYTES = 512
_PYTHON_RUN_RECORDS = 1024  # Python-loop run between re-judging the record mix (~0.3 ms)
_RESUME_RECORDS = 16  # walked in Python past the record a speculation could not place
_MAX_SPECULATIONS = 8  # candidate searches per chunk (e.g. when ts_sec crosses 2^16 s)
_MAX_REPAIRS = 64  # Python steps per speculation (false candidates, unguessed headers)

_Pieces = list[tuple[np.ndarray, np.ndarray]]  # what a walk found: header positions and words


@dataclass(frozen=True)
class _PcapLayout:
    """How one classic pcap file stores its record headers."""

    order: str  # struct byte-order prefix: "<" or ">"
    header_len: int  # 16, or 24 for the modified format
    nanosecond: bool
    linktype: int
    header_dtype: np.dtype = field(init=False)
    # (caplen,) of the record header at a position; the skipped bytes spare the hot loop an add
    caplen_at: Callable[[bytes | bytearray, int], tuple[int]] = field(init=False)

    def __post_init__(self) -> None:
        fields = {
            "names": ["sec", "frac", "caplen", "wirelen"],
            "formats": [self.order + "u4"] * 4,
            "offsets": [0, 4, 8, 12],
            "itemsize": self.header_len,
        }
        object.__setattr__(self, "header_dtype", np.dtype(fields))
        object.__setattr__(self, "caplen_at", struct.Struct(self.order + "8xI").unpack_from)

    def header_view(self, buf: bytearray, end: int) -> np.ndarray:
        """A structured array whose element i is the record header starting at byte i."""
        count = end - self.header_len + 1
        return np.ndarray((max(count, 0),), self.header_dtype, buf, 0, (1,))

    def header_words(self, buf: bytearray, end: int, offsets: np.ndarray) -> np.ndarray:
        """The record headers at ``offsets`` as rows of uint32 words (sec, frac, caplen, ...).

        One opaque ``V16``/``V24`` gather: ~3x faster than gathering the structured
        ``header_view``, whose unaligned fields NumPy copies one at a time.
        """
        count = max(end - self.header_len + 1, 0)
        raw = np.ndarray((count,), f"V{self.header_len}", buf, 0, (1,))[offsets]
        return raw.view(self.order + "u4").reshape(len(offsets), self.header_len // 4)

    @property
    def ts_sec_high_offset(self) -> int:
        """Where the upper 16 bits of ts_sec sit in a record header."""
        return 2 if self.order == "<" else 0


def pcap_layout(head: bytes | bytearray) -> _PcapLayout:
    """The record layout a classic pcap file header (its first 24 bytes) declares."""
    if len(head) < PCAP_FILE_HEADER:
        raise CaptureDamagedError(
            0, f"file ends inside the pcap file header ({len(head)} of 24 bytes)"
        )
    order = "<" if struct.unpack_from("<I", head)[0] in PCAP_MAGICS else ">"
    magic, _, _, _, _, _, linktype = struct.unpack_from(order + "IHHiIII", head)
    nanosecond, header_len = PCAP_MAGICS[magic]
    return _PcapLayout(order, header_len, nanosecond, linktype & _LINKTYPE_MASK)


def read_pcap(source: Source) -> Iterator[RecordBatch]:
    layout = pcap_layout(source.buf[: min(source.end, PCAP_FILE_HEADER)])
    source.start = PCAP_FILE_HEADER
    return walk_pcap_records(source, layout)


def walk_pcap_records(source: Source, layout: _PcapLayout) -> Iterator[RecordBatch]:
    """The records from ``source.start`` on, which must be a record header (the one after
    the file header, or one a split read resynchronised on: ``splits``)."""
    speculate = True  # until the end of a chunk shows records too big for it to pay
    scratch = _WalkScratch()
    while True:
        buf, pos, end = source.buf, source.start, source.end
        offsets, stop = _walk_pcap(buf, pos, end, layout, speculate, scratch)
        if len(offsets):
            speculate = _speculation_pays(offsets[-_PYTHON_RUN_RECORDS:], stop)
            batch, damaged = _pcap_batch(buf, end, source.base, offsets, scratch.words, layout)
            if len(batch):
                yield batch
            if damaged is not None:
                raise damaged
        source.start = stop
        need = _pcap_record_need(buf, stop, end, source.base, layout)
        if source.eof:
            if stop < end:
                raise _pcap_truncation(buf, stop, end, source.base, layout)
            return
        source.fill(need)


@dataclass
class _WalkScratch:
    """What one walk (``walk_pcap_records``) carries from chunk to chunk; every walk has its
    own, so walks in concurrent threads never share one.

    ``mask`` takes ``_candidate_headers``' comparisons: a fresh 2 MB array per comparison
    costs more in page faults than the comparison itself. ``words`` are the header words
    (``_PcapLayout.header_words``) of the records the last ``_walk_pcap`` found: the walk
    gathered them anyway, and ``_pcap_batch`` takes its fields from them.
    """

    mask: np.ndarray = field(default_factory=lambda: np.empty(0, np.bool_))
    words: np.ndarray | None = None


def _pcap_record_need(buf: bytearray, pos: int, end: int, base: int, layout: _PcapLayout) -> int:
    """Bytes the record at ``pos`` needs in the buffer; raises if its header is impossible."""
    if end - pos < layout.header_len:
        return layout.header_len
    caplen = layout.caplen_at(buf, pos)[0]
    if caplen > MAX_CAPLEN:
        raise CaptureDamagedError(base + pos, f"record claims {caplen} captured bytes")
    return layout.header_len + caplen


def _pcap_truncation(
    buf: bytearray, pos: int, end: int, base: int, layout: _PcapLayout
) -> CaptureDamagedError:
    have = end - pos
    if have < layout.header_len:
        reason = f"file ends inside a record header ({have} of {layout.header_len} bytes)"
    else:
        caplen = layout.caplen_at(buf, pos)[0]
        got = have - layout.header_len
        reason = f"file ends inside a record's data ({got} of {caplen} captured bytes)"
    return CaptureDamagedError(base + pos, reason)


def _pcap_batch(
    buf: bytearray, end: int, base: int, offsets: np.ndarray, words: np.ndarray, layout: _PcapLayout
) -> tuple[RecordBatch, CaptureDamagedError | None]:
    """The records at ``offsets`` (header positions in ``buf``) as a batch, their fields
    taken from their header ``words``.

    A record claiming more than MAX_CAPLEN bytes ends the batch: the walk may have stepped
    over it when the chunk was big enough, so it is checked here, vectorised.
    """
    caplen = words[:, 2].astype(np.int64)
    damaged = None
    too_big = np.flatnonzero(caplen > MAX_CAPLEN)
    if too_big.size:
        first = int(too_big[0])
        damaged = CaptureDamagedError(
            base + int(offsets[first]), f"record claims {int(caplen[first])} captured bytes"
        )
        words, caplen, offsets = words[:first], caplen[:first], offsets[:first]
    fraction = words[:, 1] // 1000 if layout.nanosecond else words[:, 1]
    ts_us = words[:, 0].astype(np.int64)
    ts_us *= 1_000_000
    ts_us += fraction
    batch = RecordBatch(
        data=np.frombuffer(buf, np.uint8, end),
        offsets=offsets + layout.header_len,
        caplen=caplen,
        wirelen=words[:, 3].astype(np.int64),
        ts_us=ts_us,
        linktype=np.full(len(offsets), layout.linktype, np.int32),
        file_offsets=offsets + base,
    )
    return batch, damaged


def _walk_pcap(
    buf: bytearray,
    pos: int,
    end: int,
    layout: _PcapLayout,
    speculate: bool = True,
    scratch: _WalkScratch | None = None,
) -> tuple[np.ndarray, int]:
    """Header positions of the complete records in ``buf[pos:end]`` and where the walk stopped.

    Speculation runs to the end of the chunk unless its guess fails, and then resumes a few
    records further on; the Python loop runs in short stretches, each followed by a look at
    the size of the records it walked, so a chunk switches to speculation as soon as its
    records get small. Records claiming more than MAX_CAPLEN bytes are not stopped at (see
    ``_pcap_batch``). ``scratch``, when given, lends the walk its mask and receives the
    records' header words.
    """
    scratch = _WalkScratch() if scratch is None else scratch
    if len(scratch.mask) < (end - pos) // 2:  # first chunk, or a grown buffer
        scratch.mask = np.empty(len(buf) // 2, np.bool_)
    pieces: _Pieces = []
    searches = 0
    while True:
        speculating = (
            speculate and searches < _MAX_SPECULATIONS and end - pos >= _SPECULATE_MIN_BYTES
        )
        if speculating:
            searches += 1
            start = pos
            pos, finished = _speculate(buf, pos, end, layout, pieces, scratch.mask)
            if finished:
                break
            if pos == start:  # candidates too dense: this chunk is for the Python loop
                searches = _MAX_SPECULATIONS
        budget = _RESUME_RECORDS if speculating else _PYTHON_RUN_RECORDS
        offsets, stop = _walk_pcap_scalar(buf, pos, end, layout, budget)
        pieces.append((offsets, layout.header_words(buf, end, offsets)))
        if len(offsets) < budget:  # the chunk ends here
            pos = stop
            break
        if not speculating:
            speculate = _speculation_pays(offsets, stop)
        pos = stop
    offsets, scratch.words = _concat(pieces, layout)
    return offsets, pos


def _speculation_pays(offsets: np.ndarray, stop: int) -> bool:
    """Whether the records at ``offsets`` (ending at ``stop``) are small enough to speculate."""
    return stop - int(offsets[0]) < _SPECULATE_MAX_RECORD_BYTES * len(offsets)


def _concat(pieces: _Pieces, layout: _PcapLayout) -> tuple[np.ndarray, np.ndarray]:
    """A walk's pieces as one array of header positions and one of their header words."""
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return np.empty(0, np.int64), np.empty((0, layout.header_len // 4), np.uint32)
    return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


def _walk_pcap_scalar(
    buf: bytearray, pos: int, end: int, layout: _PcapLayout, limit: int = sys.maxsize
) -> tuple[np.ndarray, int]:
    """The reference walk: one ``unpack_from`` per record (~4-6M records/s), at most
    ``limit`` records."""
    caplen_at = layout.caplen_at
    header_len = layout.header_len
    last = end - header_len
    found: list[int] = []
    append = found.append
    for _ in range(limit):
        if pos > last:
            break
        following = pos + header_len + caplen_at(buf, pos)[0]
        if following > end:
            break
        append(pos)
        pos = following
    return np.array(found, np.int64), pos


def _speculate(
    buf: bytearray, pos: int, end: int, layout: _PcapLayout, pieces: _Pieces, mask: np.ndarray
) -> tuple[int, bool]:
    """Walk records from ``pos`` (a known header) with NumPy instead of a Python loop.

    Guess: every record header in the chunk has the same upper 16 bits of ts_sec as the one at
    ``pos`` (true unless the capture crosses a 2^16 s, ~18 h, boundary). Every byte position
    holding those two bytes is a candidate; payload bytes add a few false candidates. Each
    candidate's successor (position + header + caplen) is computed at once; a run of
    candidates where each is its predecessor's successor, started from a known header, is
    exactly the chain of real headers. Where the chain skips candidates (false ones) the walk
    jumps to the successor; a successor that is no candidate but still has the guessed ts_sec
    (a header the plausibility filter dropped) is stepped over in Python. Nothing but the
    successor rule decides a position, so the result is the Python loop's, record for record.
    Appends the verified header positions and their header words to ``pieces``; returns
    (stop, finished): not finished when a header breaks the guess or the Python steps run
    out.
    """
    last = end - layout.header_len
    if pos > last:
        return pos, True
    links = _candidate_links(buf, pos, last, end, layout, mask)
    if links is None:
        return pos, False
    candidates, words, successors, breaks = links
    high = layout.ts_sec_high_offset
    guess = buf[pos + high : pos + high + 2]
    for _ in range(_MAX_REPAIRS):
        first = int(np.searchsorted(candidates, pos))
        if first < len(candidates) and candidates[first] == pos:
            index = np.searchsorted(breaks, first)
            run_end = int(breaks[index]) if index < len(breaks) else len(candidates) - 1
            following = int(successors[run_end])
            if following > end:  # the run's last record is cut by the end of the chunk
                pieces.append((candidates[first:run_end], words[first:run_end]))
                return int(candidates[run_end]), True
            pieces.append((candidates[first : run_end + 1], words[first : run_end + 1]))
        elif buf[pos + high : pos + high + 2] != guess:
            return pos, False
        else:
            following = pos + layout.header_len + layout.caplen_at(buf, pos)[0]
            if following > end:
                return pos, True
            single = np.array([pos], np.int64)
            pieces.append((single, layout.header_words(buf, end, single)))
        pos = following
        if pos > last:
            return pos, True
    return pos, False


def _candidate_links(
    buf: bytearray, pos: int, last: int, end: int, layout: _PcapLayout, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The candidate headers in [pos, last], their header words, their successors, and the
    indices where a candidate's successor is not the next candidate (the chain breaks there).

    When false candidates break the chain often enough to use up most of ``_speculate``'s
    Python steps (payloads echoing the timestamp; each false candidate makes two breaks),
    those that cannot be headers (caplen above MAX_CAPLEN or wirelen, a fraction of a second
    too big) are dropped. Below that, stepping over them costs less than the filtering.
    """
    candidates = _candidate_headers(buf, pos, last, layout, mask)
    if candidates is None:
        return None
    # Whole candidate headers in one gather: cheaper than gathering even one unaligned field.
    words = layout.header_words(buf, last + layout.header_len, candidates)
    caplen = words[:, 2]
    successors = caplen.astype(np.int64)
    successors += candidates
    successors += layout.header_len
    breaks = np.flatnonzero(successors[:-1] != candidates[1:])
    if len(breaks) > _MAX_REPAIRS:
        limit = 1_000_000_000 if layout.nanosecond else 1_000_000
        keep = (caplen <= MAX_CAPLEN) & (caplen <= words[:, 3]) & (words[:, 1] < limit)
        candidates, words, successors = candidates[keep], words[keep], successors[keep]
        breaks = np.flatnonzero(successors[:-1] != candidates[1:])
    return candidates, words, successors, breaks


def _candidate_headers(
    buf: bytearray, pos: int, last: int, layout: _PcapLayout, mask: np.ndarray
) -> np.ndarray | None:
    """Sorted positions in [pos, last] whose ts_sec upper 16 bits equal those at ``pos``.

    Two uint16 views (even and odd byte alignment) compare the whole chunk at memory speed.
    Returns None when the candidates are too dense to be mostly real headers (e.g. ts_sec
    is 0 and the payload is zeros): the Python walk is cheaper then. The density is checked
    on the lists of matches: a separate count would be one more pass over the chunk.
    The comparisons go to ``mask`` (see ``_WalkScratch``), at least (last - pos) // 2 long.
    """
    high = pos + layout.ts_sec_high_offset
    value = int.from_bytes(buf[high : high + 2], sys.byteorder)
    found = []
    total = 0
    for first in (high, high + 1):
        count = (last + layout.ts_sec_high_offset - first) // 2 + 1
        if count <= 0:
            continue
        equal = np.equal(np.frombuffer(buf, np.uint16, count, first), value, out=mask[:count])
        matches = np.flatnonzero(equal)
        total += len(matches)
        if total > (last - pos) // 32 + 1:
            return None
        matches *= 2
        matches += first - layout.ts_sec_high_offset
        found.append(matches)
    candidates = np.concatenate(found)
    candidates.sort(kind="stable")  # two sorted runs: a linear merge
    return candidates
