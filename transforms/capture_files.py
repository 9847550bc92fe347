"""``DecodeCaptures``: capture files (local, globs, gs://, s3://, .gz) to batches of fragments.

Files are matched and opened with Beam's own ``fileio`` (so every Beam filesystem and
compression works), then each file is streamed through the capture reader, the packet decoder
and the fragment aggregator in one DoFn: a file's packets never leave the worker as Python
objects, only its pre-aggregated fragments do.

Nothing is lost silently: a file that is not a capture, a damaged one (after its good records
became fragments), an unreadable one, each become one dead letter naming the file, the byte
offset and the reason. Malformed packets are counted per reason in Beam metrics.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.pvalue import TaggedOutput

from flowbeam.capture.reader import CaptureDamagedError, CaptureFormatError, read_capture
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.to_fragments import PacketsToFragments
from transforms import counters
from transforms.dead_letters import DEAD_LETTER_TAG, dead_letter

LOG = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0


class _Progress:
    """Logs a progress line every few seconds while a long file is decoded."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._started = self._last = time.monotonic()
        self.packets = 0

    def add(self, packets: int) -> None:
        self.packets += packets
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            rate = self.packets / max(now - self._started, 1e-9)
            LOG.warning("flowbeam: %s: %d packets so far (%.0f packets/s)",
                        self._path, self.packets, rate)


class _DecodeCaptureFileFn(beam.DoFn):
    """One capture file in, lists of fragments out (dead letters on ``DEAD_LETTER_TAG``)."""

    def __init__(self, idle_timeout_us: int, active_timeout_us: int, byte_accounting: str) -> None:
        self._idle_us = idle_timeout_us
        self._active_us = active_timeout_us
        self._byte_accounting = byte_accounting
        self._files = counters.counter(counters.FILES_READ)
        self._failed = counters.counter(counters.FILES_FAILED)
        self._damaged = counters.counter(counters.FILES_DAMAGED)
        self._packets = counters.counter(counters.PACKETS)
        self._bytes = counters.counter(counters.BYTES)

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        step = PacketsToFragments(self._idle_us, self._active_us, self._byte_accounting)
        self._reported_packets = self._reported_bytes = 0
        progress = _Progress(path)
        try:
            with readable.open(mime_type="application/octet-stream",
                               compression_type=CompressionTypes.AUTO) as stream:
                for batch in read_capture(stream):
                    progress.add(len(batch))
                    yield from self._counted(step, step.add(batch))
        except CaptureFormatError as error:
            self._failed.inc()
            LOG.error("flowbeam: %s: %s", path, error.reason)
            yield TaggedOutput(DEAD_LETTER_TAG,
                               dead_letter("read_capture", error.reason, path, error.offset))
            return
        except CaptureDamagedError as error:
            self._damaged.inc()
            LOG.error("flowbeam: %s: damaged at byte %d: %s", path, error.offset, error.reason)
            yield TaggedOutput(DEAD_LETTER_TAG,
                               dead_letter("read_capture", error.reason, path, error.offset))
        except (OSError, EOFError, zlib.error) as error:
            # Unreadable path, permission denied, corrupt or truncated gzip stream: the
            # packets read before the failure still become flows.
            self._damaged.inc()
            reason = f"cannot read file: {error}"
            LOG.error("flowbeam: %s: %s", path, reason)
            yield TaggedOutput(DEAD_LETTER_TAG,
                               dead_letter("read_capture", reason, path, None))
        self._files.inc()
        yield from self._counted(step, step.finish())
        for reason, count in step.malformed.items():
            counters.malformed_counter(reason).inc(count)
        for linktype in sorted(step.unknown_linktypes):
            LOG.warning("flowbeam: %s: link type %d is not supported; its packets were skipped",
                        path, linktype)

    def _counted(self, step: PacketsToFragments,
                 fragments: list[Fragment]) -> Iterator[list[Fragment]]:
        """Report the packets and bytes decoded since the last call; pass the fragments on."""
        self._packets.inc(step.packets - self._reported_packets)
        self._bytes.inc(step.bytes - self._reported_bytes)
        self._reported_packets, self._reported_bytes = step.packets, step.bytes
        if fragments:
            yield fragments


class DecodeCaptures(beam.PTransform):
    """File patterns in; a tagged result: ``fragments`` (lists of Fragment) and dead letters."""

    def __init__(self, idle_timeout_s: float, active_timeout_s: float,
                 byte_accounting: str = "ip") -> None:
        super().__init__()
        self._decode = _DecodeCaptureFileFn(
            round(idle_timeout_s * 1_000_000), round(active_timeout_s * 1_000_000),
            byte_accounting)

    def expand(self, patterns: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return (
            patterns
            | "MatchFiles" >> fileio.MatchAll(
                empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "ReadMatches" >> fileio.ReadMatches(skip_directories=True)
            | "Reshuffle" >> beam.Reshuffle()
            | "DecodeFiles" >> beam.ParDo(self._decode).with_outputs(
                DEAD_LETTER_TAG, main="fragments")
        )
