"""Progress of a long local run: files done of the files matched, packets, rate, elapsed time.

Beam's local runners decode captures in the launching process, so the launcher sets the number
of files it matched (``PROGRESS.start``) and the decoding DoFn reports to the same object. Every
``EVERY_S`` seconds it shows one line, a progress bar redrawn in place when stderr is a
terminal, else a log line (a log file or CI keeps every line). On a distributed runner each
worker has its own copy with no total ("?"); Dataflow's own UI shows progress there.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

LOG = logging.getLogger(__name__)
EVERY_S = 5.0
BAR_WIDTH = 30


class RunProgress:
    """Counts files and packets for the whole run and shows them every ``EVERY_S`` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 stream: TextIO | None = None) -> None:
        self._clock = clock
        self._stream = stream
        self.start(None)

    def start(self, total_files: int | None) -> None:
        """A new run over ``total_files`` files (None: unknown)."""
        self.total_files = total_files
        self.files = 0
        self.packets = 0
        self._started = self._last = self._clock()
        self._drawn = False

    def add(self, packets: int = 0, files: int = 0) -> None:
        """``packets`` more decoded, ``files`` more done; shows a line when one is due."""
        self.packets += packets
        self.files += files
        now = self._clock()
        if now - self._last >= EVERY_S:
            self._last = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        """``3/10 files, 1,200,000 packets, 240,000 packets/s, 5 s``."""
        elapsed = (self._clock() if now is None else now) - self._started
        total = "?" if self.total_files is None else f"{self.total_files:,}"
        rate = self.packets / elapsed if elapsed > 0 else 0.0
        return (f"{self.files:,}/{total} files, {self.packets:,} packets, "
                f"{rate:,.0f} packets/s, {elapsed:.0f} s")

    def bar(self, now: float | None = None) -> str:
        """The line behind a bar of files done, for a terminal."""
        done = self.files / self.total_files if self.total_files else 0.0
        filled = min(BAR_WIDTH, int(done * BAR_WIDTH))
        return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.line(now)}"

    def finish(self) -> None:
        """End a bar drawn in place with a newline, so the summary starts on its own line."""
        if self._drawn:
            self._output().write("\n")
            self._drawn = False

    def _output(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _show(self, now: float) -> None:
        output = self._output()
        if self.total_files and output.isatty():
            output.write(f"\r{self.bar(now)}")
            output.flush()
            self._drawn = True
        else:
            LOG.warning("flowbeam: progress: %s", self.line(now))


PROGRESS = RunProgress()
