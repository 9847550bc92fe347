"""Sending batches to Pub/Sub without losing one silently.

The capture loop must never wait on the network (the kernel drops packets while it waits), so
``submit`` only queues; one sender thread publishes with a few batches in flight. A failed
publish puts the batch back at the head of the queue and the sender backs off (0.5 s doubling
to 30 s, one batch at a time as a probe) until a publish succeeds. Memory is bounded by
``max_pending_bytes`` of unacknowledged batches; beyond it batches go to the disk spool when
there is one, and are counted as dropped only when that is full too (or absent). A batch
Pub/Sub refuses outright (over its size limit, say) is counted as dropped too, not retried
forever in front of all the others (from the spool it is kept as ``*.rejected``). Every batch
is therefore published, still pending, spooled or counted as dropped: the summary says which.

The google-cloud-pubsub client's own retries are switched off (``retry=None``): it would
otherwise hold a failing batch for up to 10 minutes without telling anyone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from google.api_core import exceptions
from google.cloud import pubsub_v1

from flowbeam.agent.spool import Message, Spool

LOG = logging.getLogger(__name__)

IN_FLIGHT = 4  # batches awaiting an answer while Pub/Sub is healthy
ATTEMPT_TIMEOUT_S = 30.0
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# Errors no retry can cure (a message over Pub/Sub's limits, say): the batch is counted as
# dropped instead of blocking every batch behind it forever.
PERMANENT_ERRORS = (exceptions.InvalidArgument, ValueError, TypeError)


@dataclass
class PublishStats:
    """What happened to the batches handed to the publisher."""

    published_batches: int = 0
    published_packets: int = 0
    published_bytes: int = 0  # message data bytes (what Pub/Sub bills, with the attributes)
    failures: int = 0  # publish attempts that failed (each was retried)
    spooled_batches: int = 0  # batches written to the spool (sent later, or by the next run)
    dropped_batches: int = 0  # batches lost because memory and spool were full
    dropped_packets: int = 0
    last_error: str = ""


class Publisher:
    """Publishes ``Message``s to one topic from a background thread (see the module doc)."""

    def __init__(self, client: pubsub_v1.PublisherClient, topic: str, *,
                 max_pending_bytes: int, spool: Spool | None = None) -> None:
        self._client = client
        self._topic = topic
        self._max_pending_bytes = max_pending_bytes
        self._spool = spool
        self.stats = PublishStats()
        self._queue: deque[Message] = deque()
        self._pending_bytes = 0  # memory batches not yet acknowledged (queued or in flight)
        self._in_flight = 0
        self._healthy = True
        self._delay = BACKOFF_INITIAL_S
        self._retry_at = 0.0
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="flowbeam-publisher", daemon=True)
        self._thread.start()

    def submit(self, message: Message) -> None:
        """Queue one batch; never blocks on the network."""
        with self._cond:
            if self._pending_bytes + message.size <= self._max_pending_bytes:
                self._queue.append(message)
                self._pending_bytes += message.size
            elif self._spool is not None and self._spool.put(message):
                self.stats.spooled_batches += 1
            else:
                self._drop(message, "memory and spool full" if self._spool else "memory full")
            self._cond.notify_all()

    @property
    def pending_batches(self) -> int:
        """Batches in memory not yet acknowledged (queued or in flight)."""
        with self._cond:
            return len(self._queue) + self._in_flight

    @property
    def spooled_files(self) -> int:
        """Batches waiting in the spool directory (0 without one)."""
        with self._cond:
            return 0 if self._spool is None else self._spool.files

    def close(self, drain_seconds: float) -> None:
        """Stop after sending what is queued, waiting at most ``drain_seconds`` for it.

        Batches already in flight are waited for (at most ``ATTEMPT_TIMEOUT_S``), so none is
        left in an unknown state. What memory still holds then goes to the spool (if any); the
        rest is counted as dropped.
        """
        deadline = time.monotonic() + drain_seconds
        with self._cond:
            while self._queue or self._in_flight or self._has_spooled_work():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._stopping = True
            self._cond.notify_all()
            while self._in_flight:
                self._cond.wait()
            leftovers = list(self._queue)
            self._queue.clear()
        self._thread.join()
        for message in leftovers:
            self._pending_bytes -= message.size
            if self._spool is not None and self._spool.put(message):
                self.stats.spooled_batches += 1
            else:
                self._drop(message, "not sent before shutdown")

    def _has_spooled_work(self) -> bool:
        return self._spool is not None and self._spool.bytes > 0 and self._healthy

    def _drop(self, message: Message, why: str) -> None:
        self.stats.dropped_batches += 1
        self.stats.dropped_packets += message.packets
        LOG.warning("batch of %d packets dropped: %s", message.packets, why)

    def _next_locked(self) -> Message | None:
        if self._queue:
            return self._queue.popleft()
        return self._spool.claim_oldest() if self._spool is not None else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    wait = self._retry_at - time.monotonic()
                    window = IN_FLIGHT if self._healthy else 1
                    message = None
                    if wait <= 0 and self._in_flight < window:
                        message = self._next_locked()
                    if message is not None:
                        break
                    self._cond.wait(wait if wait > 0 else None)
                self._in_flight += 1
            try:
                future = self._client.publish(self._topic, message.data, retry=None,
                                              timeout=ATTEMPT_TIMEOUT_S, **message.attributes)
            except Exception as error:  # e.g. the client was shut down under us
                self._done(message, error)
            else:
                future.add_done_callback(
                    lambda done, message=message: self._done(message, done.exception()))

    def _done(self, message: Message, error: BaseException | None) -> None:
        """Account for one attempt: acknowledged, or back to the queue with a backoff."""
        with self._cond:
            self._in_flight -= 1
            if error is None:
                self.stats.published_batches += 1
                self.stats.published_packets += message.packets
                self.stats.published_bytes += message.size
                if message.spool_path is not None:
                    self._spool.remove(message)
                else:
                    self._pending_bytes -= message.size
                self._healthy = True
                self._delay = BACKOFF_INITIAL_S
            elif isinstance(error, PERMANENT_ERRORS):
                self.stats.failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}".splitlines()[0]
                if message.spool_path is not None:
                    self._spool.set_aside(message, ".rejected")
                else:
                    self._pending_bytes -= message.size
                self._drop(message, f"Pub/Sub refuses it ({self.stats.last_error})")
            else:
                self.stats.failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}".splitlines()[0]
                now = time.monotonic()
                if now >= self._retry_at:  # a new failure, not the rest of a burst in flight
                    self._delay = (BACKOFF_INITIAL_S if self._healthy
                                   else min(self._delay * 2, BACKOFF_MAX_S))
                    self._retry_at = now + self._delay
                    LOG.warning("publish failed (%s); retrying in %.1f s",
                                self.stats.last_error, self._delay)
                self._healthy = False
                if message.spool_path is not None:
                    self._spool.release(message)
                else:
                    self._queue.appendleft(message)
            self._cond.notify_all()
