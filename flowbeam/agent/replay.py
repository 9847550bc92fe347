"""Packets from a capture file, with their own timestamps (``--replay``).

For back-filling archived captures into the streaming path, and for tests that need no
interface. The file is read with the project's reader (pcap or pcapng, either byte order,
gzip'd or not), so a file the batch pipeline reads replays the same packets.

Pacing: by default as fast as possible; with ``speed`` X the packets are released at X times
the rate they were captured. The capture clock the batcher sees is the file's own: in fast
mode the latest packet's time, when paced the file time that corresponds to now. So
``--batch_seconds`` means seconds of capture time either way, and a batch never spans more.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from flowbeam.agent.live import TICK_S, CaptureSetupError
from flowbeam.capture.pcap import MAX_CAPLEN
from flowbeam.capture.reader import capture_kind, read_capture
from flowbeam.capture.writer import CapturedPacket

GZIP_MAGIC = b"\x1f\x8b"


def open_capture(path: str) -> BinaryIO:
    """Open a capture file, decompressing gzip; raises ``CaptureSetupError`` if it is not one."""
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == GZIP_MAGIC
        # Returned open: the caller reads it to the end.
        stream = gzip.open(path, "rb") if gzipped else open(path, "rb")  # noqa: SIM115
    except OSError as error:
        raise CaptureSetupError(f"cannot read {path}: {error.strerror}") from None
    try:
        head = stream.read(4)
    except (OSError, EOFError) as error:
        stream.close()
        raise CaptureSetupError(f"cannot read {path}: {error}") from None
    if capture_kind(head) is None:
        stream.close()
        raise CaptureSetupError(f"{path} is not a pcap or pcapng file")
    stream.seek(0)
    return stream


class ReplaySource:
    """The packets of one capture file, optionally paced at ``speed`` times real time."""

    snaplen = MAX_CAPLEN  # the largest record a classic pcap may hold

    def __init__(self, path: str, speed: float | None = None) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive, not {speed}")
        self._stream = open_capture(path)
        self._speed = speed
        self._clock_us = 0  # file time reached so far
        self._start: tuple[float, int] | None = None  # (monotonic s, file µs) of the first packet

    def chunks(self, stop: threading.Event) -> Iterator[tuple[int, list[CapturedPacket]]]:
        """Yield (link type, packets) in file order; a capture error propagates after the
        packets before it (``CaptureDamagedError``)."""
        current = None  # link type of the packets being gathered
        for records in read_capture(self._stream):
            data = records.data.tobytes()  # one copy per chunk; the reader reuses its buffer
            packets: list[CapturedPacket] = []
            for offset, caplen, wirelen, ts_us, linktype in zip(
                records.offsets.tolist(), records.caplen.tolist(), records.wirelen.tolist(),
                records.ts_us.tolist(), records.linktype.tolist(), strict=True,
            ):
                if self._speed is not None:  # (the first packet never waits: current is set)
                    for _ in self._wait_until(ts_us, stop):
                        if packets:
                            yield current, packets
                            packets = []
                        yield current, []
                if stop.is_set():  # (after the wait: a packet not yet due is not sent)
                    if packets:
                        yield current, packets
                    return
                if linktype != current and packets:
                    yield current, packets
                    packets = []
                current = linktype
                packets.append(CapturedPacket(ts_us * 1000, data[offset : offset + caplen],
                                              wirelen))
                self._clock_us = max(self._clock_us, ts_us)
            if packets:
                yield current, packets

    def _wait_until(self, ts_us: int, stop: threading.Event) -> Iterator[None]:
        """Sleep until the packet at ``ts_us`` is due, yielding every tick while waiting."""
        if self._start is None:
            self._start = (time.monotonic(), ts_us)
        started_s, first_us = self._start
        due_s = started_s + (ts_us - first_us) / 1e6 / self._speed
        while not stop.is_set():
            wait = due_s - time.monotonic()
            if wait <= 0:
                return
            stop.wait(min(wait, TICK_S))
            yield

    def now_us(self) -> int:
        """The file time the replay has reached (see the module doc)."""
        if self._speed is None or self._start is None:
            return self._clock_us
        started_s, first_us = self._start
        return max(self._clock_us,
                   first_us + round((time.monotonic() - started_s) * self._speed * 1e6))

    def kernel_drops(self) -> int:
        """A file drops nothing."""
        return 0

    def close(self) -> None:
        self._stream.close()
