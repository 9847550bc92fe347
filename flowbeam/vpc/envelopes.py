"""CloudWatch Logs subscription envelopes: what a subscription delivers to Kinesis or Firehose.

Each Kinesis record's data is one gzip'd JSON object::

    {"messageType": "DATA_MESSAGE", "owner": "123456789012", "logGroup": "...",
     "logStream": "...", "subscriptionFilters": [...],
     "logEvents": [{"id": "...", "timestamp": 1466330686000, "message": "<a flow log line>"}]}

CloudWatch Logs also sends a ``CONTROL_MESSAGE`` when the subscription is created (to check
the destination): it carries no flow log and is skipped. Firehose writes the gzip'd objects
one after another into its S3 files, so a file holds a sequence of JSON objects.

Delivery is at least once (Kinesis retries, a re-read shard), so the same log event can
arrive twice: its ``id`` is unique per event of a log group, and the pipeline keeps each
``LogEvent.key`` (log group, log stream and id) once.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DATA_MESSAGE = "DATA_MESSAGE"
CONTROL_MESSAGE = "CONTROL_MESSAGE"
GZIP_MAGIC = b"\x1f\x8b"
# Records aggregated by the Kinesis Producer Library start with this magic number.
KPL_MAGIC = b"\xf3\x89\x9a\xc2"


class EnvelopeError(ValueError):
    """Data that is not a subscription envelope; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LogEvent:
    """One log event of a DATA_MESSAGE: one flow log line. ``source`` names where it came
    from (``logGroup/logStream``), for dead letters."""

    id: str
    timestamp_ms: int
    message: str
    source: str

    @property
    def key(self) -> str:
        """What identifies the event: its id within its log group and stream."""
        return f"{self.source}/{self.id}"


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope; a CONTROL_MESSAGE has no events."""

    message_type: str
    owner: str | None
    log_group: str | None
    log_stream: str | None
    events: tuple[LogEvent, ...]


def decode_record(data: bytes) -> Envelope:
    """The envelope in one Kinesis record's data (gzip'd JSON); raises ``EnvelopeError``."""
    if data[:4] == KPL_MAGIC:
        raise EnvelopeError("a KPL-aggregated record: CloudWatch Logs subscriptions never "
                            "aggregate, so this stream has another producer")
    if data[:2] != GZIP_MAGIC:
        raise EnvelopeError(f"not gzip data (starts with {data[:8]!r})")
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise EnvelopeError(f"corrupt gzip data: {error}") from None
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EnvelopeError(f"not JSON after gunzip: {error}") from None
    return envelope_of(document)


def envelope_of(document: Any) -> Envelope:
    """An envelope from its parsed JSON; raises ``EnvelopeError`` for anything else."""
    if not isinstance(document, dict):
        raise EnvelopeError(f"not a subscription envelope: a JSON {type(document).__name__}")
    message_type = document.get("messageType")
    if message_type == CONTROL_MESSAGE:
        return Envelope(CONTROL_MESSAGE, document.get("owner"), document.get("logGroup"),
                        document.get("logStream"), ())
    if message_type != DATA_MESSAGE:
        raise EnvelopeError(f"not a subscription envelope: messageType {message_type!r}")
    source = f"{document.get('logGroup')}/{document.get('logStream')}"
    events = document.get("logEvents")
    if not isinstance(events, list):
        raise EnvelopeError("DATA_MESSAGE without a logEvents list")
    try:
        parsed = tuple(LogEvent(str(e["id"]), int(e["timestamp"]), str(e["message"]), source)
                       for e in events)
    except (KeyError, TypeError, ValueError) as error:
        raise EnvelopeError(f"a log event without id, timestamp or message: {error!r}") from None
    return Envelope(DATA_MESSAGE, document.get("owner"), document.get("logGroup"),
                    document.get("logStream"), parsed)


def documents_in(text: str) -> Iterator[tuple[int, Any]]:
    """The JSON documents of a file of envelopes (concatenated, as Firehose writes them, or
    one per line), with the character offset of each. Raises ``EnvelopeError`` at the first
    text that is not JSON: nothing after it can be framed."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return
        try:
            document, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise EnvelopeError(f"not JSON at offset {position}: {error.msg}") from None
        yield position, document
        position = end
