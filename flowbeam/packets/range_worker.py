"""A worker process of ``flowbeam.packets.range_pool``: ``python -m flowbeam.packets.range_worker``.

It reads pickled jobs (a ``CaptureRange`` and how to decode it) from stdin until stdin
closes, decodes each range of its local capture file and writes, for each job in order, a
pickled ``("ok", (fragment lists, RangeSummary))`` or ``("error", traceback text)`` to the
stdout it started with (its own prints go to stderr, so they cannot garble a result).

A plain interpreter running this module, rather than ``multiprocessing``: a multiprocessing
child imports its parent's ``__main__`` module again, and the pipeline's main module imports
Beam (~2.4 s of CPU per worker, ~150 MB each). This one imports only NumPy and the decoder.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import sys
import traceback
from typing import BinaryIO

from flowbeam.capture.splits import RangeOutcome
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.range_decode import (
    CaptureRange,
    FragmentSettings,
    RangeSummary,
    decode_range,
    unreadable,
)

RangeJob = tuple[CaptureRange, FragmentSettings, int, int]  # range, settings, lookback, chunk
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


def decode_range_job(job: RangeJob) -> tuple[list[list[Fragment]], RangeSummary]:
    """One range's fragment lists and summary (a file that cannot be opened is a problem
    of the range: the file is then read whole, which reports it)."""
    part, settings, lookback, chunk_size = job
    try:
        stream = open(part.path, "rb")  # noqa: SIM115 (closed below, once open)
    except OSError as error:
        return [], RangeSummary(part.index, RangeOutcome(problem=unreadable(error)))
    with stream:
        *fragments, summary = decode_range(stream, part, settings, lookback=lookback,
                                           chunk_size=chunk_size)
    return fragments, summary


def keep_freed_memory() -> None:
    """glibc's allocator keeps freed memory for the next batch's arrays.

    Every batch makes NumPy arrays of 0.2-2 MB; by default glibc maps each with ``mmap`` and
    returns it to the system when freed, so the next batch takes a page fault for every 4 KB
    it touches again (~170,000 faults reading the 20M-packet capture, a sixth of its read
    CPU). Allocating them from the heap and trimming it only past 256 MB makes them reusable.
    Elsewhere than glibc this does nothing.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MB from the heap
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    mallopt(_M_TOP_PAD, 64 << 20)


def serve(jobs: BinaryIO, results: BinaryIO) -> None:
    """Answer every job read from ``jobs`` on ``results``, in order, until ``jobs`` ends."""
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:
            return
        try:
            answer: tuple = ("ok", decode_range_job(job))
        except Exception:  # a bug: the parent raises it with this traceback
            answer = ("error", traceback.format_exc())
        pickle.dump(answer, results, protocol=pickle.HIGHEST_PROTOCOL)
        results.flush()


def main() -> None:
    results = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr
    keep_freed_memory()
    serve(sys.stdin.buffer, results)


if __name__ == "__main__":
    main()
