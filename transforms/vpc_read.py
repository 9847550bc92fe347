"""Reading VPC Flow Logs: files and CloudWatch Logs subscription records to ``VpcRecord``s.

Two kinds of file, told apart by their first character once decompressed (Beam's ``fileio``
opens them, so local, gs:// and s3:// paths all work; it decompresses ``.gz`` files, and gzip
data named otherwise, as Firehose names its objects, is recognised by its magic number):

- flow logs as AWS delivers them to S3: text lines, the first a header naming the fields;
- subscription envelopes (``{"messageType": ...}``), as Firehose writes them: their log
  events go through the same de-duplication as the envelopes read from Kinesis.

Only flow records (log-status OK, or no log-status field) leave this module; NODATA and
SKIPDATA records are counted. Nothing raises: a line that is no record, an envelope that
is not one (not gzip, not JSON, KPL-aggregated), a file that cannot be read, each becomes a
dead letter with the reason, and the lines around it still count.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.deduplicate import DeduplicatePerKey
from apache_beam.utils.timestamp import Duration

from flowbeam.vpc.envelopes import (
    CONTROL_MESSAGE,
    GZIP_MAGIC,
    Envelope,
    EnvelopeError,
    LogEvent,
    decode_record,
    documents_in,
    envelope_of,
)
from flowbeam.vpc.records import SKIPDATA, LineReader, RecordError
from transforms import counters
from transforms.dead_letters import DEAD_LETTER_TAG, dead_letter
from transforms.file_matching import distinct_paths, open_spread

EVENTS_TAG = "events"
READ_STAGE = "read_vpc_file"
PARSE_STAGE = "parse_vpc_record"
ENVELOPE_STAGE = "decode_envelope"
# How long a streaming job remembers a log event id (Kinesis redelivers within minutes).
DEDUP_WINDOW_S = 3600


class _Records:
    """Counts what a reader read and keeps only the flow records."""

    def __init__(self) -> None:
        self._records = counters.counter(counters.VPC_RECORDS)
        self._nodata = counters.counter(counters.VPC_NODATA)
        self._skipdata = counters.counter(counters.VPC_SKIPDATA)
        self._malformed = counters.counter(counters.VPC_MALFORMED)

    def read(self, reader: LineReader, line: str, source: str, offset: int | None,
             where: str) -> Iterator[Any]:
        """The flow record of ``line`` (or its dead letter), counted."""
        try:
            record = reader.read(line)
        except RecordError as error:
            self._malformed.inc()
            yield TaggedOutput(DEAD_LETTER_TAG, dead_letter(
                PARSE_STAGE, f"{where}: {error.reason}", source, offset, line.rstrip("\n")))
            return
        if record is None:
            return
        if record.is_flow:
            self._records.inc()
            yield record
        elif record.log_status == SKIPDATA:
            self._skipdata.inc()
        else:
            self._nodata.inc()


class _ReadVpcFileFn(beam.DoFn):
    """One file in: flow records, log events (``EVENTS_TAG``) and dead letters out."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._records = _Records()
        self._files = counters.counter(counters.VPC_FILES_READ)
        self._unreadable = counters.counter(counters.FILES_UNREADABLE)

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        offset = 0
        try:
            with readable.open(mime_type="application/octet-stream",
                               compression_type=CompressionTypes.AUTO) as opened:
                stream = _gunzipped(opened)
                first, blank = stream.readline(), 0
                while first and not first.strip():
                    offset, blank = offset + len(first), blank + 1
                    first = stream.readline()
                if first.lstrip().startswith(b"{"):
                    yield from self._envelopes(path, first + stream.read(), offset)
                else:
                    reader = LineReader(self._names)
                    for number, line in enumerate(_lines(first, stream), start=blank + 1):
                        yield from self._records.read(
                            reader, line.decode("utf-8", "replace"), path, offset,
                            f"line {number}")
                        offset += len(line)
        except (OSError, EOFError, zlib.error) as error:
            self._unreadable.inc()
            yield TaggedOutput(DEAD_LETTER_TAG, dead_letter(
                READ_STAGE, f"cannot read file: {error}", path, offset))
            return
        self._files.inc()

    def _envelopes(self, path: str, data: bytes, start: int) -> Iterator[Any]:
        """The events of a file of envelopes (``data``, from offset ``start`` of the file)."""
        try:
            for offset, document in documents_in(data.decode("utf-8", "replace")):
                yield from _envelope_events(envelope_of, document, path, start + offset)
        except EnvelopeError as error:
            counters.counter(counters.VPC_BAD_ENVELOPES).inc()
            yield TaggedOutput(DEAD_LETTER_TAG, dead_letter(ENVELOPE_STAGE, error.reason, path))


def _gunzipped(stream: Any) -> Any:
    """``stream``, decompressed if it is gzip data that its name did not announce (Firehose
    names its objects without ``.gz``; Beam decompresses by extension)."""
    head = stream.read(len(GZIP_MAGIC))
    stream.seek(0)
    return gzip.GzipFile(fileobj=stream) if head == GZIP_MAGIC else stream


def _lines(first: bytes, stream: Any) -> Iterator[bytes]:
    yield first
    yield from iter(stream.readline, b"")


def _envelope_events(decode: Callable[[Any], Envelope], data: Any, source: str,
                     offset: int | None, where: Any = None) -> Iterator[Any]:
    """The log events of one envelope as (key, event) on ``EVENTS_TAG``, counted; its dead
    letter when it is none (``where``: its payload, what finds the record again)."""
    try:
        envelope = decode(data)
    except EnvelopeError as error:
        counters.counter(counters.VPC_BAD_ENVELOPES).inc()
        yield TaggedOutput(DEAD_LETTER_TAG, dead_letter(ENVELOPE_STAGE, error.reason, source,
                                                        offset, where))
        return
    if envelope.message_type == CONTROL_MESSAGE:
        counters.counter(counters.VPC_CONTROL_MESSAGES).inc()
        return
    counters.counter(counters.VPC_ENVELOPES).inc()
    for event in envelope.events:
        yield TaggedOutput(EVENTS_TAG, (event.key, event))


class _DecodeSubscriptionRecordFn(beam.DoFn):
    """A Kinesis record (``.data``: a gzip'd envelope) in; its log events out."""

    def __init__(self, source: str) -> None:
        self._source = source

    def process(self, record: Any) -> Iterator[Any]:
        where = {"shard_id": getattr(record, "shard_id", None),
                 "sequence_number": getattr(record, "sequence_number", None)}
        yield from _envelope_events(decode_record, bytes(record.data), self._source, None, where)


class _ParseEventFn(beam.DoFn):
    """A de-duplicated log event in; its flow record (or dead letter) out."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._records = _Records()

    def process(self, keyed: tuple[str, LogEvent]) -> Iterator[Any]:
        _, event = keyed
        yield from self._records.read(LineReader(self._names), event.message, event.source,
                                      None, f"log event {event.id}")


def _first_event(events: Iterable[LogEvent]) -> LogEvent:
    """One of the copies of an event (they are equal; min makes the choice deterministic)."""
    return min(events, key=lambda event: (event.timestamp_ms, event.message))


class ParseLogEvents(beam.PTransform):
    """(key, LogEvent) pairs in: each event once, parsed with the format ``names``. Returns the
    tagged result: ``records`` and dead letters.

    Batch keeps one event per key over the whole input; streaming remembers each key for
    ``DEDUP_WINDOW_S`` (state per key, dropped by a timer), which covers Kinesis retries.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self._names = names

    def expand(self, events: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        if events.is_bounded:
            unique = events | "OncePerId" >> beam.CombinePerKey(_first_event)
        else:
            unique = events | "OncePerId" >> DeduplicatePerKey(
                processing_time_duration=Duration(seconds=DEDUP_WINDOW_S))
        return unique | "ParseEvents" >> beam.ParDo(_ParseEventFn(self._names)).with_outputs(
            DEAD_LETTER_TAG, main="records")


class ReadVpcFiles(beam.PTransform):
    """File patterns in; the tagged result: ``records`` (VpcRecord), ``events`` ((key,
    LogEvent) of envelope files, to ``ParseLogEvents``) and dead letters."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self._names = names

    def expand(self, patterns: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return (
            open_spread(distinct_paths(patterns))
            | "ReadFiles" >> beam.ParDo(_ReadVpcFileFn(self._names)).with_outputs(
                EVENTS_TAG, DEAD_LETTER_TAG, main="records")
        )


class DecodeSubscriptionRecords(beam.PTransform):
    """Kinesis records (``.data``: gzip'd envelopes) in; the tagged result: ``events``
    ((key, LogEvent), to ``ParseLogEvents``) and dead letters. ``source`` (the stream's name)
    names the records in dead letters."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self._source = source

    def expand(self, records: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return records | "DecodeEnvelopes" >> beam.ParDo(
            _DecodeSubscriptionRecordFn(self._source)).with_outputs(EVENTS_TAG, DEAD_LETTER_TAG)

