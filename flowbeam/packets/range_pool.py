"""A big local capture decoded on every core: its byte ranges in worker processes.

Beam's in-process runner decodes a file on one core. Its multi-process mode puts a whole Beam
SDK worker on each core, which on this project's 2-core machine cost as much as the second
core saved (a Beam import and a gRPC channel per worker, every fragment sent between
processes). Here the file's split read (``flowbeam.capture.splits``: exact, boundaries
included) runs on plain worker processes instead (``flowbeam.packets.range_worker``): they
import only flowbeam and NumPy, open the file themselves and send back only fragments and the
range summaries, which are small next to the packets.

The ranges are dealt out in turn (range ``i`` to worker ``i mod n``: they are of equal size)
and settled and folded here in range order as their results arrive (``settle_ranges``,
``fold_ranges``), so a file's rows are exactly its whole read's. When the ranges do not fit
together, or a worker dies, ``decode_in_processes`` says so and the caller reads the file
whole; nothing of the ranges is kept then, which is why their fragments wait here until the
file is settled.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flowbeam.capture.splits import DEFAULT_LOOKBACK, Settlement, equal_ranges, settle_ranges
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.range_decode import (
    DEFAULT_CHUNK_SIZE,
    CaptureRange,
    FragmentSettings,
    RangeSummary,
)
from flowbeam.packets.range_state import RangeState
from flowbeam.packets.range_worker import RangeJob
from flowbeam.packets.to_fragments import fold_ranges

# Ranges of about this size: a few per process on a capture of a few GB, so that a slow one
# leaves little idle time at the end, each costing a few MB of re-read at its edges.
POOL_RANGE_BYTES = 256 << 20
_RESULTS_AHEAD = 2  # results a worker may have ready beyond the one being folded


class WorkerDied(Exception):
    """A worker process ended before answering all of its jobs."""


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
    read = PooledRead(Settlement(0, False))
    workers = _Workers(min(processes, len(parts)))
    try:
        results = workers.run([(part, settings, lookback, chunk_size) for part in parts])
        folded = fold_ranges(_settled_states(results, read, on_range),
                             settings.idle_timeout_us, settings.active_timeout_us,
                             settings.sensor)
    except WorkerDied as error:
        return PooledRead(Settlement(0, True, str(error)))
    finally:
        workers.stop()
    if read.settlement.whole:
        return PooledRead(read.settlement)
    if folded:
        read.fragments.append(folded)
    return read


class _Workers:
    """Worker processes (``python -m flowbeam.packets.range_worker``) and a thread per worker
    that reads its results as they come, so that a worker never waits for the fold to take
    its result (at most ``_RESULTS_AHEAD`` wait per worker)."""

    def __init__(self, count: int) -> None:
        # The workers import the parent's flowbeam, wherever that was found.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
        self._processes = [
            subprocess.Popen([sys.executable, "-m", "flowbeam.packets.range_worker"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            for _ in range(count)]
        self._results = [queue.Queue(_RESULTS_AHEAD) for _ in range(count)]
        self._readers: list[threading.Thread] = []
        self._stopping = threading.Event()

    def run(self, jobs: list[RangeJob]) -> Iterator[tuple[list[list[Fragment]], RangeSummary]]:
        """Each job's result, in the order of ``jobs``; raises ``WorkerDied``."""
        count = len(self._processes)
        for index, process in enumerate(self._processes):
            mine = jobs[index::count]
            reader = threading.Thread(target=self._read, args=(index, len(mine)), daemon=True,
                                      name=f"range-worker-{index}")
            reader.start()
            self._readers.append(reader)
            try:
                for job in mine:
                    pickle.dump(job, process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                process.stdin.close()
            except OSError:  # it died already: its reader says so
                pass
        for index in range(len(jobs)):
            status, value = self._results[index % count].get()
            if status == "error":
                raise RuntimeError(f"a range decoding process failed:\n{value}")
            if status == "died":
                raise WorkerDied(value)
            yield value

    def stop(self) -> None:
        """End the workers, finished or not (a settled file needs nothing more of them)."""
        self._stopping.set()
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for reader in self._readers:
            reader.join()
        for process in self._processes:
            process.stdout.close()

    def _read(self, index: int, answers: int) -> None:
        process = self._processes[index]
        for _ in range(answers):
            try:
                answer: Any = pickle.load(process.stdout)
            except (EOFError, OSError, pickle.UnpicklingError, ValueError):
                answer = ("died", f"a decoding process ended (exit code {process.wait()})")
            if not self._put(index, answer) or answer[0] != "ok":
                return

    def _put(self, index: int, answer: Any) -> bool:
        """Queue an answer for ``run``, unless the workers are being stopped."""
        while not self._stopping.is_set():
            try:
                self._results[index].put(answer, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


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
