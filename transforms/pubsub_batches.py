"""``DecodePacketBatches``: Pub/Sub packet batches (``flowbeam capture``) to lists of fragments.

A message is one batch of a sensor's packets: a classic pcap file, gzip'd or not, with
attributes naming the sensor (the contract is ``flowbeam.agent.batch_format``). Each batch is
decoded as a capture of its own (``read_capture`` -> ``PacketsToFragments``), so its packets
never leave the worker as Python objects, only its pre-aggregated fragments do; a flow whose
packets span batches is merged by ``BuildFlows`` like a flow spanning capture files. The
sensor attribute scopes every flow key (two sensors never merge) and fills the sensor column.

A streaming runner retries a failing bundle forever (Dataflow does), so one bad message must
never raise: each one that cannot be decoded (not a capture, corrupt compression, a missing
attribute) becomes one dead letter naming the message id and the reason, and is counted. A
batch damaged part-way (cut, corrupt record) keeps the fragments of the packets before the
damage and gets a dead letter too, as a damaged capture file does.

Pub/Sub delivers at least once, and the agent may publish a batch twice (a retried publish,
a re-sent spool file): a batch seen before, by ``(sensor, session, sequence)``, is dropped and
counted (``_DropRedeliveredFn``), or its packets would count twice.

Beside the fragments, each batch holds the watermark at its first packet's time until its
sensor's next batch arrives (``_HoldUntilNextBatch``): flows close in the packets' own time,
on every runner, however late the batches arrive.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.trigger import (
    AccumulationMode,
    AfterAny,
    AfterCount,
    AfterProcessingTime,
    Repeatedly,
)
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindows, TimestampCombiner

from flowbeam.agent.batch_format import BatchFormatError, BatchInfo, batch_info, decode_batch
from flowbeam.capture.reader import CaptureDamagedError, read_capture
from flowbeam.flows.fragment import Fragment
from flowbeam.packets.to_fragments import PacketsToFragments
from transforms import counters
from transforms.dead_letters import DEAD_LETTER_TAG, dead_letter

LOG = logging.getLogger(__name__)
STAGE = "decode_batch"
CLOCK_TAG = "sensor_clock"
HOLD = "hold"  # this batch's time holds the watermark...
RELEASE = "release"  # ... until the sensor's next batch arrives
# A sensor that sends nothing for its idle timeout plus this long (processing time) stops
# holding the watermark: its next batch may reach Pub/Sub up to the agent's --batch_seconds
# (default 5) after its first packet, later when a publish is retried.
QUIET_MARGIN_S = 30.0
# Sequence numbers remembered above the first missing one: a gap that stays open (a batch the
# agent dropped) would grow the set forever, so beyond this many the gap counts as lost.
MAX_TRACKED_SEQUENCES = 1000
# A session not heard from for this long is forgotten: Pub/Sub keeps a message at most 7 days.
SESSION_MEMORY_S = 7 * 24 * 3600
NO_SESSION = ("", "")


def _fragments_of(step: PacketsToFragments,
                  pcap: bytes) -> tuple[list[Fragment], CaptureDamagedError | None]:
    """All fragments of one batch, and the damage that cut it short, if any: the records
    before the damage are good packets and still make flows, as in a damaged capture file."""
    fragments: list[Fragment] = []
    damage = None
    try:
        for records in read_capture(io.BytesIO(pcap)):
            fragments += step.add(records)
    except CaptureDamagedError as error:
        damage = error
    return fragments + step.finish(), damage


def _clock_elements(info: BatchInfo) -> Iterator[TaggedOutput]:
    """The batch's watermark hold, and the release of the previous batch's (see
    ``_HoldUntilNextBatch``); both carry the message's timestamp, this batch's first packet."""
    yield TaggedOutput(CLOCK_TAG, ((info.sensor, info.session, info.sequence), HOLD))
    if info.sequence > 0:
        yield TaggedOutput(CLOCK_TAG, ((info.sensor, info.session, info.sequence - 1), RELEASE))


def _session_key(message: PubsubMessage) -> tuple[tuple[str, str], tuple[int, PubsubMessage]]:
    """Key a message by its batch's (sensor, session), with its sequence number; a message
    that is no batch gets NO_SESSION and goes on to be refused by the decoder."""
    try:
        info = batch_info(dict(message.attributes or {}))
    except BatchFormatError:
        return NO_SESSION, (-1, message)
    return (info.sensor, info.session), (info.sequence, message)


def remember(seen: tuple[int, frozenset[int]] | None,
             sequence: int) -> tuple[int, frozenset[int]] | None:
    """The sequence numbers seen, as (all below N, and these above it), with ``sequence``
    added; None when it was seen before."""
    below, above = seen or (0, frozenset())
    if sequence < below or sequence in above:
        return None
    above = above | {sequence}
    if len(above) > MAX_TRACKED_SEQUENCES:
        below = min(above)  # the batches before it are not coming: stop waiting for them
    while below in above:
        above = above - {below}
        below += 1
    return below, above


class _DropRedeliveredFn(beam.DoFn):
    """Per (sensor, session): pass each batch once, drop (and count) any later copy.

    Before decoding, so a copy costs no decoding; the identity is the attributes', so a
    damaged copy read first stands for the batch (and gets its dead letter).
    """

    SEEN = ReadModifyWriteStateSpec("seen", coders.PickleCoder())
    FORGET = TimerSpec("forget", TimeDomain.REAL_TIME)

    def __init__(self, bounded: bool) -> None:
        self._bounded = bounded
        self._redelivered = counters.counter(counters.BATCHES_REDELIVERED)

    def process(self, element: tuple[tuple[str, str], tuple[int, PubsubMessage]],
                seen=beam.DoFn.StateParam(SEEN),
                forget=beam.DoFn.TimerParam(FORGET)) -> Iterator[PubsubMessage]:
        key, (sequence, message) = element
        if key == NO_SESSION:
            yield message
            return
        updated = remember(seen.read(), sequence)
        if updated is None:
            self._redelivered.inc()
            LOG.warning("flowbeam: message %s: batch %s/%s/%d seen before, dropped",
                        message.message_id, *key, sequence)
            return
        seen.write(updated)
        if not self._bounded:  # (a bounded input ends, and its state with it)
            forget.set(time.time() + SESSION_MEMORY_S)
        yield message

    @on_timer(FORGET)
    def forget_session(self, seen=beam.DoFn.StateParam(SEEN)) -> None:
        seen.clear()


class _DecodeBatchFn(beam.DoFn):
    """One Pub/Sub message in, one list of fragments out (dead letters on ``DEAD_LETTER_TAG``)."""

    def __init__(self, idle_timeout_us: int, active_timeout_us: int,
                 byte_accounting: str) -> None:
        self._idle_us = idle_timeout_us
        self._active_us = active_timeout_us
        self._byte_accounting = byte_accounting
        self._batches = counters.counter(counters.BATCHES_READ)
        self._damaged = counters.counter(counters.BATCHES_DAMAGED)
        self._failed = counters.counter(counters.BATCHES_FAILED)
        self._packets = counters.counter(counters.PACKETS)
        self._bytes = counters.counter(counters.BYTES)
        self._kernel_drops = counters.counter(counters.SENSOR_KERNEL_DROPS)

    def process(self, message: PubsubMessage) -> Iterator[Any]:
        message_id = message.message_id or ""
        attributes = dict(message.attributes or {})
        try:
            info = batch_info(attributes)
            pcap = decode_batch(message.data or b"", attributes)
        except BatchFormatError as error:
            yield self._refused(message_id, str(error), attributes)
            return
        yield from _clock_elements(info)
        step = PacketsToFragments(self._idle_us, self._active_us, self._byte_accounting,
                                  info.sensor)
        try:
            fragments, damage = _fragments_of(step, pcap)
        except Exception as error:
            # A decoder bug met by one strange batch must cost that batch, not the job:
            # Dataflow would retry the bundle forever and hold every sensor's flows back.
            yield self._refused(message_id, f"cannot decode batch: {error!r}", attributes)
            return
        if damage is not None:
            self._damaged.inc()
            LOG.error("flowbeam: message %s: damaged at byte %d: %s", message_id,
                      damage.offset, damage.reason)
            yield TaggedOutput(DEAD_LETTER_TAG, dead_letter(
                STAGE, damage.reason, message_id, damage.offset, payload=attributes))
        self._batches.inc()
        self._kernel_drops.inc(info.kernel_drops)
        self._packets.inc(step.packets)
        self._bytes.inc(step.bytes)
        for reason, count in step.malformed.items():
            counters.malformed_counter(reason).inc(count)
        if fragments:
            yield fragments

    def _refused(self, message_id: str, reason: str,
                 attributes: Mapping[str, str]) -> TaggedOutput:
        """A message none of whose packets could be read: counted, logged, one dead letter."""
        self._failed.inc()
        LOG.error("flowbeam: message %s: %s", message_id, reason)
        return TaggedOutput(DEAD_LETTER_TAG,
                            dead_letter(STAGE, reason, message_id, payload=attributes))


class _HoldUntilNextBatch(beam.PTransform):
    """A PCollection without elements whose watermark stays at the time of each sensor's
    latest batch until that sensor's next batch has arrived.

    Why: the flow engine closes a flow when the watermark passes its last packet plus the idle
    timeout, so the watermark must not pass a packet still to come. Dataflow's Pub/Sub reader
    holds it at the oldest message in the backlog, but a batch not yet published is in no
    backlog, and the DirectRunner's reader sets it to the wall clock after every pull: a
    replayed capture's flows would close before their later batches arrive, cut in two. So
    the packets' own clock, per sensor, holds it: batch N's HOLD element waits in a
    GroupByKey (its timestamp, the batch's first packet, held by OUTPUT_AT_EARLIEST) until
    batch N+1's RELEASE joins it, or until the sensor has been quiet for ``quiet_s`` of
    processing time (its flows then end by idle timeout, as they would in time).
    """

    def __init__(self, quiet_s: float) -> None:
        super().__init__()
        self._quiet_s = math.ceil(quiet_s)  # the trigger's proto takes whole seconds

    def expand(self, clock: beam.PCollection) -> beam.PCollection:
        return (
            clock
            | "HoldPerBatch" >> beam.WindowInto(
                GlobalWindows(),
                trigger=Repeatedly(AfterAny(AfterCount(2), AfterProcessingTime(self._quiet_s))),
                accumulation_mode=AccumulationMode.DISCARDING,
                timestamp_combiner=TimestampCombiner.OUTPUT_AT_EARLIEST)
            | "UntilNextBatch" >> beam.GroupByKey()
            | "NoElements" >> beam.FlatMap(lambda _: ()).with_output_types(list)
            # Back to the fragments' windowing (default trigger), so the two can be flattened.
            | "DefaultTrigger" >> beam.WindowInto(GlobalWindows())
        )


class DecodePacketBatches(beam.PTransform):
    """``PubsubMessage``s in (``ReadFromPubSub(with_attributes=True)``); out a dict:
    ``fragments`` (lists of Fragment, with the per-sensor watermark hold) and
    ``dead_letters``."""

    def __init__(self, idle_timeout_s: float, active_timeout_s: float,
                 byte_accounting: str = "ip") -> None:
        super().__init__()
        self._decode = _DecodeBatchFn(round(idle_timeout_s * 1_000_000),
                                      round(active_timeout_s * 1_000_000), byte_accounting)
        self._quiet_s = idle_timeout_s + QUIET_MARGIN_S

    def expand(self, messages: beam.PCollection) -> dict[str, beam.PCollection]:
        decoded = (
            messages
            | "BySession" >> beam.Map(_session_key)
            | "DropRedelivered" >> beam.ParDo(_DropRedeliveredFn(messages.is_bounded))
            | "DecodeBatches" >> beam.ParDo(self._decode).with_outputs(
                DEAD_LETTER_TAG, CLOCK_TAG, main="fragments")
        )
        fragments = decoded.fragments
        if not messages.is_bounded:  # (bounded: the watermark waits for all input anyway)
            held = decoded[CLOCK_TAG] | "SensorClock" >> _HoldUntilNextBatch(self._quiet_s)
            fragments = (fragments, held) | "WithSensorClock" >> beam.Flatten()
        return {"fragments": fragments, "dead_letters": decoded[DEAD_LETTER_TAG]}
