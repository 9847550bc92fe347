"""boto3 calls of the Kinesis reader: the client, ListShards, and one shard's GetRecords loop
with throttling and expired iterators handled in place.

Nothing here raises for an AWS error: a streaming DoFn that raises is retried by Dataflow
forever, with the same error each time. A throttled call (ProvisionedThroughputExceeded,
LimitExceeded) backs off exponentially with jitter; an expired iterator is re-obtained after the
last record handed on; any other error is counted, logged without credentials, and retried
after the same backoff. botocore's own retries are off, so every retry is visible in a counter.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from flowbeam.kinesis_shards import Shard, ShardCursor, ShardStart, backoff_seconds
from transforms import counters

_LOG = logging.getLogger(__name__)

THROTTLING_ERRORS = frozenset({"ProvisionedThroughputExceededException",
                               "LimitExceededException", "ThrottlingException",
                               "KMSThrottlingException"})
EXPIRED_ITERATOR = "ExpiredIteratorException"
GET_RECORDS_LIMIT = 10_000  # the most Kinesis returns per call


@dataclass(frozen=True)
class KinesisConnection:
    """Where the stream is. Credentials come the usual boto3 way (environment, profile, role)
    and are never held here, so this can be pickled with a DoFn and logged."""

    region: str | None = None
    endpoint_url: str | None = None

    def client(self) -> Any:
        config = Config(retries={"mode": "standard", "total_max_attempts": 1},
                        connect_timeout=10, read_timeout=30)
        return boto3.session.Session().client("kinesis", region_name=self.region,
                                              endpoint_url=self.endpoint_url, config=config)


def error_code(error: Exception) -> str:
    """The AWS error code of a ClientError, else the exception's class name."""
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "ClientError"))
    return type(error).__name__


def count_error(error: Exception, shard_id: str) -> None:
    """Count ``error`` in the flowbeam counter that names its kind; log the unusual ones."""
    code = error_code(error)
    if code in THROTTLING_ERRORS:
        counters.counter(counters.KINESIS_THROTTLED).inc()
    elif code == EXPIRED_ITERATOR:
        counters.counter(counters.KINESIS_EXPIRED_ITERATORS).inc()
    else:
        counters.counter(counters.KINESIS_ERRORS).inc()
        _LOG.warning("kinesis: %s on %s (will retry): %s", code, shard_id, error)


def list_shards(client: Any, stream: str) -> list[Shard]:
    """Every shard of ``stream`` still in its retention, following NextToken pages."""
    shards: list[Shard] = []
    arguments: dict[str, Any] = {"StreamName": stream}
    while True:
        answer = client.list_shards(**arguments)
        shards.extend(Shard.from_listing(entry) for entry in answer.get("Shards", []))
        token = answer.get("NextToken")
        if not token:
            return shards
        arguments = {"NextToken": token}


def arrival_micros(moment: datetime) -> int:
    """A record's ApproximateArrivalTimestamp in microseconds since the epoch (exact)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Fetch:
    """One GetRecords answer: records, whether the shard ended (closed and read to its end),
    and whether the reader is at the tip of the shard (MillisBehindLatest == 0)."""

    records: list[dict[str, Any]]
    ended: bool
    caught_up: bool


@dataclass
class ShardReader:
    """Reads one shard from ``position`` on, keeping its iterator between calls."""

    client: Any
    stream: str
    shard_id: str
    position: ShardStart
    rng: random.Random
    retry_at: float = 0.0  # time.monotonic() before which this shard is not called again
    _iterator: str | None = None
    _failures: int = 0
    _ended: bool = False

    @staticmethod
    def of(client: Any, stream: str, cursor: ShardCursor, rng: random.Random) -> ShardReader:
        return ShardReader(client, stream, cursor.shard_id, cursor.start, rng)

    def ready(self, now: float) -> bool:
        return now >= self.retry_at

    def advance(self, sequence_number: str) -> None:
        """The record ``sequence_number`` was handed on: an iterator obtained from now on
        starts after it."""
        self.position = ShardStart.after(sequence_number)

    def fetch(self) -> Fetch | None:
        """The next records, or None when the call failed (counted; retried after a backoff).
        An ended shard keeps answering ``ended`` without calling Kinesis."""
        if self._ended:
            return Fetch([], ended=True, caught_up=True)
        try:
            if self._iterator is None:
                self._iterator = self.client.get_shard_iterator(
                    StreamName=self.stream, ShardId=self.shard_id,
                    **self.position.iterator_arguments())["ShardIterator"]
            answer = self.client.get_records(ShardIterator=self._iterator,
                                             Limit=GET_RECORDS_LIMIT)
        except (ClientError, BotoCoreError) as error:
            self.failed(error)
            if error_code(error) == EXPIRED_ITERATOR:
                self._iterator = None
                self.retry_at = 0.0  # a fresh iterator is not throttled: ask again at once
            return None
        self._failures = 0
        self._iterator = answer.get("NextShardIterator")
        self._ended = self._iterator is None
        return Fetch(answer.get("Records", []), ended=self._ended,
                     caught_up=answer.get("MillisBehindLatest", 0) == 0)

    def failed(self, error: Exception) -> None:
        """Count ``error`` and wait before calling for this shard again."""
        count_error(error, self.shard_id)
        self._failures += 1
        self.retry_at = time.monotonic() + backoff_seconds(self._failures, self.rng)
