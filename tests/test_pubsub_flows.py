"""The streaming pipeline: real captures published as packet batches, rows compared exactly
with the batch pipeline's on the same files (which are themselves checked against nfstream).

End to end: the capture agent replays the captures into the Pub/Sub emulator, the pipeline runs
as a user runs it (a subprocess, stopped with Ctrl-C) and writes Parquet files while it runs.
Unit: the decoding step in a TestPipeline, batch mode, where every timer fires at the end.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import grpc
import pyarrow.parquet as pq
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

from flowbeam.agent.batch_format import (
    ATTR_COMPRESSION,
    ATTR_SENSOR,
    COMPRESSION_GZIP,
    COMPRESSION_NONE,
    encode_batch,
)
from flowbeam.agent.replay import ReplaySource
from flowbeam.capture.writer import CapturedPacket
from flowbeam.flows.engine import FORCED_END, IDLE_TIMEOUT
from flowbeam.flows.schema import FLOW_COLUMN_NAMES
from pipelines.pcap_flows import run as run_pcap_pipeline
from pipelines.pubsub_flows import run as run_pubsub_pipeline
from tests.bigquery_emulator import EmulatorEndpoint
from tests.pubsub_emulator import create_topic, running_emulator, subscription_path, topic_path
from transforms.bigquery_config import STREAMING_INSERTS, BigQueryConfig, parse_table_spec
from transforms.bigquery_tables import cloud_client
from transforms.build_flows import BuildFlows
from transforms.pubsub_batches import MAX_TRACKED_SEQUENCES, DecodePacketBatches, remember

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT.parent / "shared" / "data" / "pcaps"
OUTPUT_EVERY_S = "2"  # --output_every: rows appear within seconds of their flows closing
# A short idle timeout (the same in both pipelines): flows close while the replay goes on, and
# the last ones once the sensors have been quiet for it plus QUIET_MARGIN_S.
IDLE_S = "5"
# (capture, sensor, packets per batch): small batches, so that many flows span batches that
# arrive in different pulls (the DirectRunner pulls 10 messages at a time). In time order
# (2010, then 2013): packets older than what another sensor already sent are late (README).
REPLAYS = [("tcpreplay_test.pcap", "west", 60), ("ppp_example.pcap", "east", 200)]


def capture_packets(path: Path) -> tuple[int, list[CapturedPacket]]:
    """A single-link-type capture's link type and packets, read as ``--replay`` reads them."""
    source = ReplaySource(str(path))
    chunks = list(source.chunks(threading.Event()))
    source.close()
    return chunks[0][0], [packet for _, packets in chunks for packet in packets]


def batches_of(path: Path, sensor: str, per_batch: int,
               compression: str = COMPRESSION_GZIP) -> list[tuple[bytes, dict[str, str]]]:
    """A capture as the agent's messages (data, attributes), for tests without the agent."""
    linktype, packets = capture_packets(path)
    return [encode_batch(packets[start:start + per_batch], linktype=linktype, sensor=sensor,
                         session="test", sequence=number, kernel_drops=0, snaplen=262144,
                         compression=compression)
            for number, start in enumerate(range(0, len(packets), per_batch))]


def read_rows(directory: Path) -> list[dict]:
    tables = [pq.read_table(name) for name in sorted(glob.glob(f"{directory}/flows-*.parquet"))]
    assert all(table.schema.names == list(FLOW_COLUMN_NAMES) for table in tables)
    return [row for table in tables for row in table.to_pylist()]


def read_errors(directory: Path) -> list[dict]:
    return [json.loads(line) for name in sorted(glob.glob(f"{directory}/errors-*.jsonl"))
            for line in Path(name).read_text().splitlines()]


def batch_pipeline_rows(capture: Path, sensor: str, output: Path,
                        *options: str) -> list[dict]:
    """What ``python -m pipelines.pcap_flows --input FILE --sensor S`` writes."""
    assert run_pcap_pipeline(["--input", str(capture), "--output", str(output),
                              "--sensor", sensor, "--runner=FnApiRunner", *options]) == 0
    return read_rows(output)


def comparable(row: dict, stream_ended: bool = True) -> tuple:
    """A row without ``id`` and ``source``: the source (``pubsub``, ``pcap``) is part of the
    hashed id, so both differ by design; every other column must be equal.

    ``stream_ended=False``: a running stream has no end of input, so a flow still within its
    idle timeout when a capture file ends (``forced_end`` in the batch pipeline) is closed by
    its idle timeout.
    """
    if not stream_ended and row["status"] == FORCED_END:
        row = {**row, "status": IDLE_TIMEOUT}
    return tuple(sorted((k, v) for k, v in row.items() if k not in ("id", "source")))


# --- the decoding step (TestPipeline, batch) -----------------------------------------------------


def message(data: bytes, attributes: dict[str, str], message_id: str) -> PubsubMessage:
    return PubsubMessage(data, attributes, message_id=message_id)


def test_batches_of_a_capture_give_the_batch_pipelines_rows(tmp_path):
    """Flows spanning batches merge exactly as in one file; each sensor scopes its own."""
    expected, messages = [], []
    for index, (name, sensor, per_batch) in enumerate(
            [("ppp_example.pcap", "east", 300), ("tcpreplay_test.pcap", "west", 40),
             ("tcpreplay_test.pcap", "north", 40)]):
        expected += batch_pipeline_rows(PCAPS / name, sensor, tmp_path / str(index))
        messages += [message(data, attributes, f"{sensor}-{number}") for number, (
            data, attributes) in enumerate(batches_of(PCAPS / name, sensor, per_batch))]
    assert len(messages) == 16 + 5 + 5
    # Copies of batches (a retried publish, a re-sent spool file) must not count twice.
    redelivered = [message(m.data, m.attributes, f"{m.message_id}-again") for m in messages[2:5]]
    with TestPipeline(runner="FnApiRunner") as pipeline:
        decoded = (pipeline | beam.Create(messages + redelivered)
                   | DecodePacketBatches(idle_timeout_s=120, active_timeout_s=1800))
        rows = decoded["fragments"] | BuildFlows(120, 1800, source="pubsub", shards=8)
        assert_that(rows | "Comparable" >> beam.Map(comparable),
                    equal_to([comparable(row) for row in expected]))
        assert_that(decoded["dead_letters"], equal_to([]), label="NoDeadLetters")


def test_sequence_numbers_are_remembered_compactly():
    seen = None
    for sequence in (0, 2, 1, 4):
        seen = remember(seen, sequence)
    assert seen == (3, frozenset({4}))
    assert remember(seen, 1) is None and remember(seen, 4) is None
    for sequence in range(5, 5 + MAX_TRACKED_SEQUENCES):  # batch 3 was dropped by the agent
        seen = remember(seen, sequence)
    assert seen == (5 + MAX_TRACKED_SEQUENCES, frozenset())  # ... and is given up on


def corrupt_gzip(data: bytes) -> bytes:
    """The gzip stream with its magic number damaged."""
    return data[:1] + bytes([data[1] ^ 0xFF]) + data[2:]


def without(attributes: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in attributes.items() if k != name}


@dataclass(frozen=True)
class BadMessage:
    """A message the decoder must refuse, and the dead letter's reason."""

    make: Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]]
    reason: str


BAD_MESSAGES = {
    "not-pcap": BadMessage(
        lambda data, attrs: (b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
                             {**attrs, ATTR_COMPRESSION: COMPRESSION_NONE}),
        "batch data is not a little-endian µs pcap (magic 0x20544547)"),
    "corrupt-gzip": BadMessage(
        lambda data, attrs: (corrupt_gzip(data), attrs),
        "batch data is not valid gzip: Error -3 while decompressing data: incorrect header "
        "check"),
    "no-sensor": BadMessage(
        lambda data, attrs: (data, without(attrs, ATTR_SENSOR)),
        "not a flowbeam packet batch: missing attributes ['sensor']"),
}


def bad_messages() -> dict[str, tuple[bytes, dict[str, str]]]:
    """Each kind of bad message, made from a batch of its own (a sensor of their own): two
    messages naming the same batch would be one batch delivered twice."""
    batches = batches_of(PCAPS / "tcpreplay_test.pcap", "south", 60)
    return {name: bad.make(*batch)
            for (name, bad), batch in zip(BAD_MESSAGES.items(), batches, strict=True)}


def test_bad_messages_become_dead_letters_and_the_rest_still_flows(tmp_path):
    good = batches_of(PCAPS / "tcpreplay_test.pcap", "west", 60)
    bad = bad_messages()
    messages = [message(*good[0], "good-0"), *(message(*bad[name], name) for name in bad),
                message(*good[1], "good-1"), message(*good[2], "good-2")]
    expected = batch_pipeline_rows(PCAPS / "tcpreplay_test.pcap", "west", tmp_path)
    with TestPipeline(runner="FnApiRunner") as pipeline:
        decoded = (pipeline | beam.Create(messages)
                   | DecodePacketBatches(idle_timeout_s=120, active_timeout_s=1800))
        rows = decoded["fragments"] | BuildFlows(120, 1800, source="pubsub", shards=8)
        assert_that(rows | "Comparable" >> beam.Map(comparable),
                    equal_to([comparable(row) for row in expected]))
        assert_that(
            decoded["dead_letters"]
            | beam.Map(lambda d: (d["stage"], d["source"], d["reason"], d["payload"])),
            equal_to([("decode_batch", name, BAD_MESSAGES[name].reason, bad[name][1])
                      for name in bad]),
            label="DeadLetters")


def test_a_batch_cut_inside_a_record_keeps_the_packets_before_the_cut():
    """The cut batch gives the fragments of the batch without its last record."""
    linktype, packets = capture_packets(PCAPS / "tcpreplay_test.pcap")
    batch = {"session": "test", "sequence": 0, "kernel_drops": 0, "snaplen": 262144,
             "compression": COMPRESSION_NONE, "linktype": linktype}
    data, attributes = encode_batch(packets, sensor="cut", **batch)
    whole = encode_batch(packets[:-1], sensor="whole", **batch)
    last_record_offset = len(data) - 16 - len(packets[-1].data)
    with TestPipeline(runner="FnApiRunner") as pipeline:
        decoded = (pipeline
                   | beam.Create([message(data[:-10], attributes, "cut"),
                                  message(*whole, "whole")])
                   | DecodePacketBatches(idle_timeout_s=120, active_timeout_s=1800))
        assert_that(
            decoded["fragments"]
            | beam.Map(lambda fragments: sorted(f._replace(key=f.key[:-1]) for f in fragments))
            | beam.combiners.ToList() | beam.Map(lambda both: both[0] == both[1] != []),
            equal_to([True]))
        assert_that(decoded["dead_letters"] | beam.Map(lambda d: (d["source"], d["offset"])),
                    equal_to([("cut", last_record_offset)]), label="DeadLetters")


# --- end to end: agent -> Pub/Sub emulator -> streaming pipeline -> Parquet ----------------------


@dataclass(frozen=True)
class Topic:
    """A topic on the Pub/Sub emulator at ``endpoint`` (host:port)."""

    endpoint: str
    path: str

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that must reach the emulator (agent, pipeline)."""
        return {**os.environ, "PUBSUB_EMULATOR_HOST": self.endpoint}

    def publish(self, data: bytes, attributes: dict[str, str]) -> str:
        """Publish one message; its id."""
        publisher = pubsub_v1.PublisherClient(
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(self.endpoint)))
        return publisher.publish(self.path, data, **attributes).result(timeout=30)


def replay(topic: Topic, capture: Path, sensor: str, per_batch: int) -> None:
    """``flowbeam capture --replay``: the agent publishes the capture's packets as batches."""
    done = subprocess.run(
        [sys.executable, "-m", "flowbeam.cli", "capture", "--replay", str(capture),
         "--topic", topic.path, "--sensor", sensor, "--batch_packets", str(per_batch),
         "--batch_seconds", "3600", "--progress_seconds", "0"],
        cwd=ROOT, env=topic.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def heartbeat(topic: Topic) -> None:
    """A batch without IP packets (one ARP frame) from a sensor of its own, as a live sensor
    keeps sending: it makes no row. The DirectRunner fires processing-time timers (the end of
    a quiet sensor's hold, the sink's files) only between bundles, and its Pub/Sub reader's
    pull waits up to 30 s on a quiet subscription: without traffic, output comes that late."""
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(28)
    topic.publish(*encode_batch([CapturedPacket(time.time_ns(), arp)], linktype=1,
                                sensor="heartbeat", session="test", sequence=0,
                                kernel_drops=0, snaplen=262144))


def stop(process: subprocess.Popen) -> tuple[int, str]:
    """Stop the pipeline as a user does (Ctrl-C): its exit code and output."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    out, _ = process.communicate(timeout=10)
    return process.returncode, out


@dataclass(frozen=True)
class StreamingRun:
    """What one streaming run wrote, and what the batch pipeline wrote for the same input."""

    rows: list[dict]
    errors: list[dict]
    expected_rows: list[dict]
    bad_message_ids: dict[str, str]
    exit_code: int
    bigquery_rows: list[dict]


def bigquery_rows(endpoint: EmulatorEndpoint, table: str) -> list[dict]:
    client = cloud_client(BigQueryConfig(parse_table_spec(table), STREAMING_INSERTS,
                                         endpoint.url))
    return [dict(row) for row in client.query(
        f"SELECT * FROM `{table.replace(':', '.')}` ORDER BY id").result()]


@pytest.fixture(scope="module")
def streaming_run(tmp_path_factory, bigquery_emulator) -> Iterator[StreamingRun]:
    """Replay real captures (agent) and bad messages, run the pipeline (to Parquet and to
    BigQuery by streaming inserts) until every expected row and dead letter is written, stop
    it."""
    tmp = tmp_path_factory.mktemp("streaming")
    table = f"{bigquery_emulator.project}:streaming.flow_logs"
    cloud_client(BigQueryConfig(parse_table_spec(table), STREAMING_INSERTS,
                                bigquery_emulator.url)).create_dataset("streaming")
    with running_emulator() as endpoint:
        create_topic(endpoint, "packet-batches", "packet-batches")
        topic = Topic(endpoint, topic_path("packet-batches"))
        subscription = subscription_path("packet-batches")
        expected: list[dict] = []
        bad_ids = {}
        bad = bad_messages()
        for index, (name, sensor, per_batch) in enumerate(REPLAYS):
            expected += batch_pipeline_rows(PCAPS / name, sensor, tmp / f"batch-{index}",
                                            "--idle_timeout", IDLE_S)
            replay(topic, PCAPS / name, sensor, per_batch)
            for bad_name in list(BAD_MESSAGES)[index::len(REPLAYS)]:  # between good batches
                bad_ids[bad_name] = topic.publish(*bad[bad_name])
        output = tmp / "out"
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.pubsub_flows", "--subscription", subscription,
             "--output", str(output), "--output_every", OUTPUT_EVERY_S, "--idle_timeout", IDLE_S,
             "--output_table", table, "--bq_endpoint", bigquery_emulator.url],
            cwd=ROOT, env=topic.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        try:
            deadline = started + 100
            while (len(read_rows(output)) < len(expected)
                   or len(read_errors(output)) < len(bad_ids)
                   or len(bigquery_rows(bigquery_emulator, table)) < len(expected)):
                assert process.poll() is None, stop(process)[1]
                assert time.monotonic() < deadline, stop(process)[1]
                heartbeat(topic)
                time.sleep(1)
            seconds_to_rows = time.monotonic() - started
            time.sleep(2 * float(OUTPUT_EVERY_S) + 1)  # a row too many would show up by now
        finally:
            exit_code, log = stop(process)
        print(f"rows after {seconds_to_rows:.1f} s\n{log}")
        yield StreamingRun(read_rows(output), read_errors(output), expected, bad_ids,
                           exit_code, bigquery_rows(bigquery_emulator, table))


@pytest.mark.emulator
def test_replayed_captures_stream_to_the_batch_pipelines_rows(streaming_run):
    got = sorted(comparable(row) for row in streaming_run.rows)
    assert got == sorted(comparable(row, stream_ended=False)
                         for row in streaming_run.expected_rows)
    assert {row["source"] for row in streaming_run.rows} == {"pubsub"}
    assert len({row["id"] for row in streaming_run.rows}) == len(streaming_run.rows)
    assert streaming_run.exit_code == 0


@pytest.mark.emulator
def test_streamed_rows_reach_bigquery_once_each_as_in_parquet(streaming_run):
    """Streaming inserts with the row id as insert id: the same rows, each once."""
    assert streaming_run.bigquery_rows == sorted(streaming_run.rows, key=lambda row: row["id"])


@pytest.mark.emulator
def test_bad_messages_in_the_stream_become_dead_letters(streaming_run):
    got = sorted((e["stage"], e["source"], e["reason"]) for e in streaming_run.errors)
    assert got == sorted(("decode_batch", message_id, BAD_MESSAGES[name].reason)
                         for name, message_id in streaming_run.bad_message_ids.items())


SUBSCRIPTION = ["--subscription", "projects/flowbeam-test/subscriptions/batches"]


@pytest.mark.parametrize(("argv", "message"), [
    ([], "--subscription is required"),
    (["--subscription", "my-sub"], "--subscription must be projects/PROJECT/subscriptions/NAME"),
    ([*SUBSCRIPTION, "--sensor", "east"], "--sensor is not an option of the streaming pipeline"),
    ([*SUBSCRIPTION, "--output_every", "0"], "--output_every must be positive"),
    ([*SUBSCRIPTION, "--idle-timeout", "3"],
     "unknown option(s): --idle-timeout (did you mean --idle_timeout?)"),
    ([*SUBSCRIPTION, "--output_table", "p:d.t", "--bq_insert_mode", "merge"],
     "--bq_insert_mode merge is for batch pipelines"),
])
def test_usage_errors_exit_2_before_anything_runs(argv, message, tmp_path, capsys):
    assert run_pubsub_pipeline([*argv, "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"flowbeam: error: {message}")


def test_help_lists_the_options_it_takes_and_not_the_one_it_refuses(capsys):
    assert run_pubsub_pipeline(["--help"]) == 0
    shown = capsys.readouterr().out
    for option in ("--subscription", "--output_every", "--idle_timeout", "--output_table"):
        assert option in shown
    assert "--sensor" not in shown  # each batch names its sensor
