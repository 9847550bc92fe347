"""A big local capture decoded on every core: its byte ranges in worker processes.

Beam's in-process runner decodes a file on one core. Its multi-process mode puts a whole Beam
SDK worker on each core, which on this project's 2-core machine cost as much as the second
core saved (a Beam import and a gRPC channel per worker, every fragment sent between
processes). Here the file's split read (``flowbeam.capture.splits``: exact, boundaries
included) runs on a pool of plain worker processes instead: they import only flowbeam and
NumPy (started from a ``forkserver``, never forked from a process that holds Beam's threads),
open the file themselves and send back only fragments and the range summaries, which are
small next to the packets. The 20M-packet benchmark capture decodes in about 7.5 s on two
processes against about 13 s in one.

The ranges are settled and folded here, in range order as their results arrive
(``settle_ranges``, ``fold_ranges``), so a file's rows are exactly its whole read's. When the
ranges do not fit together, or the pool breaks (a worker killed), ``decode_in_processes``
says so and the caller reads the file whole; nothing of the ranges is kept then, which is why
their fragments wait here until the file is settled.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from flowbeam.capture.splits import DEFAULT_LOOKBACK, Settlement, equal_ranges, settle_ranges
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.range_decode import (
    DEFAULT_CHUNK_SIZE,
    CaptureRange,
    FragmentSettings,
    RangeSummary,
    decode_range,
)
from flowbeam.packets.range_state import RangeState
from flowbeam.packets.to_fragments import fold_ranges

# Ranges of about this size: a few per process on a capture of a few GB, so that a slow one
# leaves little idle time at the end, each costing a few MB of re-read at its edges.
POOL_RANGE_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


@dataclass
class PooledRead:
    """A file's ranges decoded by ``decode_in_processes``.

    ``settlement.whole``: the file must be read whole instead (``reason`` says why) and
    nothing else here counts. Otherwise ``summaries`` are the counted ranges' (in order,
    their states already folded) and ``fragments`` all of the file's fragments.
    """

    settlement: Settlement
    summaries: list[RangeSummary] = field(default_factory=list)
    fragments: list[list[Fragment]] = field(default_factory=list)


def pool_ranges(size: int, processes: int, range_bytes: int = POOL_RANGE_BYTES
                ) -> list[tuple[int, int]]:
    """Ranges of about ``range_bytes`` for a ``size``-byte file, as many as a multiple of
    ``processes`` so that they all finish together; one range (no pool) for a file no
    bigger than ``range_bytes``."""
    if processes < 2 or size <= range_bytes:
        return [(0, size)]
    per_process = -(-size // (range_bytes * processes))
    return equal_ranges(size, per_process * processes)


def decode_in_processes(path: str, size: int, settings: FragmentSettings, processes: int, *,
                        range_bytes: int = POOL_RANGE_BYTES, lookback: int = DEFAULT_LOOKBACK,
                        chunk_size: int = DEFAULT_CHUNK_SIZE,
                        on_range: Callable[[RangeSummary], None] | None = None) -> PooledRead:
    """Decode the local, uncompressed capture ``path`` (``size`` bytes) as ranges on
    ``processes`` worker processes (``pool_ranges``): its settled and folded fragments.
    ``on_range`` sees each counted range's summary as it arrives (progress)."""
    bounds = pool_ranges(size, processes, range_bytes)
    parts = [CaptureRange(path, index, len(bounds), start, end, size)
             for index, (start, end) in enumerate(bounds)]
    jobs = [(part, settings, lookback, chunk_size) for part in parts]
    read = PooledRead(Settlement(0, False))
    with ProcessPoolExecutor(min(processes, len(parts)), mp_context=_context(),
                             initializer=keep_freed_memory) as pool:
        try:
            results = _in_order(pool, jobs, ahead=2 * processes)
            folded = fold_ranges(_settled_states(results, read, on_range),
                                 settings.idle_timeout_us, settings.active_timeout_us,
                                 settings.sensor)
        except BrokenProcessPool as error:
            pool.shutdown(cancel_futures=True)
            return PooledRead(Settlement(0, True, f"a decoding process ended: {error}"))
        if len(read.summaries) < len(parts):
            pool.shutdown(cancel_futures=True)  # whole, or damage: later ranges do not count
    if read.settlement.whole:
        return PooledRead(read.settlement)
    if folded:
        read.fragments.append(folded)
    return read


def decode_range_job(job: tuple[CaptureRange, FragmentSettings, int, int]
                     ) -> tuple[list[list[Fragment]], RangeSummary]:
    """In a worker process: one range's fragment lists and summary."""
    part, settings, lookback, chunk_size = job
    with open(part.path, "rb") as stream:
        *fragments, summary = decode_range(stream, part, settings, lookback=lookback,
                                           chunk_size=chunk_size)
    return fragments, summary


def _in_order(pool: ProcessPoolExecutor, jobs: list, ahead: int
              ) -> Iterator[tuple[list[list[Fragment]], RangeSummary]]:
    """``decode_range_job`` over ``jobs`` in the pool, results in order, at most ``ahead``
    jobs submitted but not yet consumed: the results of a big file's ranges do not pile up
    in memory behind a slow one."""
    pending: collections.deque[Future] = collections.deque()
    for job in jobs:
        pending.append(pool.submit(decode_range_job, job))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _settled_states(results: Iterator[tuple[list[list[Fragment]], RangeSummary]],
                    read: PooledRead, on_range: Callable[[RangeSummary], None] | None
                    ) -> Iterator[RangeState]:
    """The counted ranges' states in order, for the fold, as the results arrive; ``read``
    gets their fragments and summaries (without the state) and the file's settlement. Stops
    at the first range that ends the file (damage) or sends it to the whole read."""
    outcomes = []
    for fragments, summary in results:
        outcomes.append(summary.outcome)
        read.settlement = settle_ranges(outcomes)
        if read.settlement.whole:
            return
        read.fragments += fragments
        read.summaries.append(dataclasses.replace(summary, state=RangeState.empty()))
        if on_range is not None:
            on_range(summary)
        yield summary.state
        if summary.outcome.damage is not None:
            return  # the file ends here, as its whole read does


def keep_freed_memory() -> None:
    """In a worker: glibc's allocator keeps freed memory for the next batch's arrays.

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


def _context() -> multiprocessing.context.BaseContext:
    """Workers from a ``forkserver`` that has imported this module (and so NumPy and the
    decoder) once: each starts in milliseconds, without the caller's threads or Beam."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context
