"""What the capture readers share: the chunked stream buffer and the capture errors.

``reader`` picks the format; ``pcap`` and ``pcapng`` walk the records. All of them read one
``Source`` and raise these errors, so they live here, below all three.
"""

from __future__ import annotations

from typing import BinaryIO


class CaptureError(ValueError):
    """A capture problem located at a byte offset of the (decompressed) stream."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(offset, reason)
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (at byte {self.offset})"


class CaptureFormatError(CaptureError):
    """The stream is not a capture at all: unknown magic or block structure at offset 0."""


class CaptureDamagedError(CaptureError):
    """The capture is truncated or corrupt after some good records (those were yielded)."""


class Source:
    """A sequential stream read into one reusable buffer.

    ``buf[start:end]`` holds bytes read but not yet consumed; ``base`` is the stream offset of
    ``buf[0]``. ``fill`` moves the unconsumed tail to the front and reads until the buffer is
    full or the stream ends, so every chunk after the first starts with the carried-over
    partial record. The buffer is replaced, never resized: a NumPy view of a yielded batch may
    still hold it, and a bytearray with views cannot change size.
    """

    def __init__(self, stream: BinaryIO, chunk_size: int) -> None:
        self._stream = stream
        self._readinto = getattr(stream, "readinto", None)
        self.buf = bytearray(chunk_size)
        self.start = 0
        self.end = 0
        self.base = 0
        self.eof = False

    def fill(self, need: int = 0) -> None:
        """Compact, grow the buffer to at least ``need`` bytes, then read until it is full."""
        keep = self.end - self.start
        if need > len(self.buf):
            grown = bytearray(need)
            grown[:keep] = self.buf[self.start : self.end]
            self.buf = grown
        elif self.start:
            self.buf[:keep] = self.buf[self.start : self.end]
        self.base += self.start
        self.start = 0
        self.end = keep
        self._read_until(len(self.buf))

    def discard(self, nbytes: int) -> int:
        """Consume ``nbytes`` without keeping them (huge skippable blocks); returns the count."""
        have = self.end - self.start
        if nbytes <= have:
            self.start += nbytes
            return nbytes
        dropped = have
        while dropped < nbytes and not self.eof:
            self.base += self.end
            self.start = self.end = 0
            self._read_until(min(len(self.buf), nbytes - dropped))
            dropped += self.end
        self.start = self.end
        return dropped

    def _read_until(self, limit: int) -> None:
        """Read into ``buf[end:limit]`` until it is full or the stream ends (short reads OK)."""
        view = memoryview(self.buf)
        while self.end < limit and not self.eof:
            if self._readinto is not None:
                got = self._readinto(view[self.end : limit])
            else:  # e.g. Beam's CompressedFile, which only has read()
                data = self._stream.read(limit - self.end)
                got = len(data)
                view[self.end : self.end + got] = data
            if not got:
                self.eof = True
            else:
                self.end += got
        view.release()
