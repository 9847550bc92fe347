"""Restarts of ReadFromKinesis, against real servers on 127.0.0.1: a runner checkpoint (the SDF
residual, what Dataflow persists) resumed by a new worker, within a shard and across a split;
and a new run resumed from the positions an earlier run's sink committed, in batch and for a
streaming job killed part-way through a stream."""

from __future__ import annotations

import contextlib
import json
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that

from tests.kinesis_servers import (
    REGION,
    KinesisEndpoint,
    new_stream,
    put,
    wait_active,
)
from tests.test_kinesis_read import (
    assert_exactly,
    expect,
    read_restrictions,
    reader,
    run_pipeline,
    seeds,
    served,
)
from transforms.kinesis_read import KinesisRecord, ReadFromKinesis

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("aws_credentials")]


def test_a_runner_checkpoint_resumes_after_the_last_record_handed_on(moto):
    stream = new_stream(moto, 2)
    data = put(moto, stream, 0, 600)
    # The runner checkpoints mid-batch, once per shard; the residuals survive as bytes (what
    # Dataflow persists) and a new worker (a new DoFn, a new client) reads them.
    first, residuals = read_restrictions(reader(moto, stream), seeds(moto, stream),
                                         checkpoint=lambda n: n in (100, 150))
    assert len(first) == 150 and len(residuals) == 2
    restarted = [pickle.loads(pickle.dumps(r)) for r in residuals]
    rest, _ = read_restrictions(reader(moto, stream), restarted)
    assert_exactly(first + rest, data)


def test_a_checkpoint_across_a_split_loses_nothing_and_doubles_nothing(lite):
    stream = new_stream(lite, 1)
    client = lite.client()
    data = put(lite, stream, 0, 100)
    client.split_shard(StreamName=stream, ShardToSplit="shardId-000000000000",
                       NewStartingHashKey=str(2 ** 127))
    wait_active(lite, stream)
    data += put(lite, stream, 100, 100)
    for at in (1, 100, 101, 150):
        first, [residual] = read_restrictions(reader(lite, stream), seeds(lite, stream),
                                              checkpoint=lambda n, at=at: n == at)
        rest, _ = read_restrictions(reader(lite, stream), [pickle.loads(pickle.dumps(residual))])
        assert len(first) == at
        assert_exactly(first + rest, data)


def test_a_new_run_resumes_after_the_positions_an_earlier_run_committed(moto, tmp_path):
    stream = new_stream(moto, 2)
    put(moto, stream, 0, 250)
    committed = tmp_path / "positions.json"

    def commit_positions(stamped) -> None:
        # What a sink commits with its rows: the last sequence number of each shard.
        def write(got):
            last: dict[str, str] = {}
            for shard_id, sequence_number in got:
                if int(sequence_number) > int(last.get(shard_id, "0")):
                    last[shard_id] = sequence_number
            committed.write_text(json.dumps(last))
        assert_that(stamped | beam.MapTuple(lambda r, _: (r.shard_id, r.sequence_number)),
                    write)

    run_pipeline(moto, stream, commit_positions)
    second_data = put(moto, stream, 250, 250)
    run_pipeline(moto, stream, expect(served(moto, stream, second_data)),
                 resume_after=json.loads(committed.read_text()))


class _AppendLines(beam.DoFn):
    """The streaming job's sink: one JSON line per record, written as it comes."""

    def __init__(self, path: str) -> None:
        self._path = path

    def process(self, record: KinesisRecord) -> None:
        with open(self._path, "a") as lines:
            lines.write(json.dumps([record.shard_id, record.sequence_number,
                                    record.data.decode()]) + "\n")


def run_streaming_job() -> None:
    """The streaming pipeline the restart test starts and kills (argv: endpoint, stream,
    output file, resume_after as JSON)."""
    url, stream, output, resume_after = sys.argv[1:5]
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming"]))
    _ = (pipeline
         | ReadFromKinesis(stream, REGION, url, "trim_horizon",
                           resume_after=json.loads(resume_after), poll_interval_s=0.2)
         | beam.ParDo(_AppendLines(output)))
    pipeline.run().wait_until_finish()


@contextlib.contextmanager
def streaming_job(endpoint: KinesisEndpoint, stream: str, output: Path,
                  resume_after: dict[str, str]) -> Iterator[None]:
    job = subprocess.Popen(
        [sys.executable, "-c", "from tests.test_kinesis_restart import run_streaming_job; "
         "run_streaming_job()", endpoint.url, stream, str(output), json.dumps(resume_after)],
        cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        job.kill()  # no drain, no goodbye: what a crash or a cancelled job does
        job.wait(timeout=30)


def sink_lines(output: Path, at_least: int, timeout_s: float = 60.0) -> list[list[str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = ([json.loads(line) for line in output.read_text().splitlines()]
                 if output.exists() else [])
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_a_streaming_run_killed_part_way_resumes_from_its_sink_positions(moto, tmp_path):
    stream = new_stream(moto, 2)
    output = tmp_path / "records.jsonl"
    data = put(moto, stream, 0, 100)
    with streaming_job(moto, stream, output, {}):
        assert len(sink_lines(output, 100)) == 100
        for first in range(100, 250, 50):  # records keep coming; the job dies among them
            time.sleep(0.2)
            data += put(moto, stream, first, 50)
    read_before_kill = len(sink_lines(output, 0))
    committed: dict[str, str] = {}  # what the sink committed: the last record of each shard
    for shard_id, sequence_number, _ in sink_lines(output, 0):
        if int(sequence_number) > int(committed.get(shard_id, "0")):
            committed[shard_id] = sequence_number
    data += put(moto, stream, 250, 150)  # and these arrive while it is down
    with streaming_job(moto, stream, output, committed):
        sink_lines(output, 400)
        time.sleep(1.0)  # a record read twice would arrive by now
    lines = sink_lines(output, 0)
    assert 100 <= read_before_kill <= 250
    assert len({(shard_id, seq) for shard_id, seq, _ in lines}) == len(lines) == 400
    assert sorted(text.encode() for _, _, text in lines) == sorted(data)
