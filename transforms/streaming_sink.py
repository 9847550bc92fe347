"""The local sink of a streaming pipeline: every ``window_s`` seconds (processing time), one new
``DIR/flows-*.parquet`` file with the rows that arrived since the last one, and likewise
``DIR/errors-*.jsonl`` for dead letters, so a user sees rows appear while the job runs.

Why not Beam's file sinks on windows: they write a window's files once the *watermark* has
passed it, and in this pipeline the watermark follows the packets' own time (held per sensor,
``transforms.pubsub_batches``): while an archived capture is replayed it stays in the past, so
no window would be written before the replay ended. Firing on the watermark early, or
repeatedly, would write several files under one name (Beam names them by window and shard,
not pane); a window closed by a one-shot processing-time trigger drops what reaches it late.
So a stateful DoFn buffers what arrives and writes it on a processing-time timer, independent
of the watermark.

Each file is written under a hidden temporary name and renamed, so a reader of ``flows-*``
never sees half a file. A retried timer on a distributed runner could write a batch twice
(the names are unique, the rows carry their deterministic ``id``): the local sink is for local
runs; BigQuery is the sink of a production job.
"""

from __future__ import annotations

import io
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.coders import coders
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)

from flowbeam.flows.schema import arrow_schema, records_to_arrow
from transforms.dead_letters import to_json_line
from transforms.local_sink import ERRORS_PREFIX, FLOWS_PREFIX

DEFAULT_WINDOW_S = 60


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Flow rows as one Parquet file with the flow schema."""
    buffer = io.BytesIO()
    pq.write_table(records_to_arrow(rows, arrow_schema()), buffer)
    return buffer.getvalue()


def json_lines_bytes(dead_letters: list[dict[str, Any]]) -> bytes:
    return "".join(to_json_line(record) + "\n" for record in dead_letters).encode()


def write_file(directory: str, prefix: str, suffix: str, data: bytes) -> str:
    """Write ``DIR/PREFIX-<UTC time>-<unique>SUFFIX`` through a hidden temporary name."""
    name = f"{prefix}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    final = posixpath.join(directory, name + suffix)
    temporary = posixpath.join(directory, f".{name}{suffix}.tmp")
    with FileSystems.create(temporary) as stream:
        stream.write(data)
    FileSystems.rename([temporary], [final])
    return final


class _WriteEveryFn(beam.DoFn):
    """Buffer elements; every ``every_s`` seconds after the first one, write them as a file."""

    BUFFER = BagStateSpec("buffer", coders.PickleCoder())
    ARMED = ReadModifyWriteStateSpec("armed", coders.BooleanCoder())
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)

    def __init__(self, directory: str, prefix: str, suffix: str,
                 encode: Callable[[list[Any]], bytes], every_s: float) -> None:
        self._directory = directory
        self._prefix = prefix
        self._suffix = suffix
        self._encode = encode
        self._every_s = every_s

    def setup(self) -> None:
        if not FileSystems.exists(self._directory):
            FileSystems.mkdirs(self._directory)

    def process(self, element: tuple[int, Any], buffer=beam.DoFn.StateParam(BUFFER),
                armed=beam.DoFn.StateParam(ARMED),
                flush=beam.DoFn.TimerParam(FLUSH)) -> None:
        buffer.add(element[1])
        if not armed.read():
            armed.write(True)
            flush.set(time.time() + self._every_s)

    @on_timer(FLUSH)
    def write(self, buffer=beam.DoFn.StateParam(BUFFER),
              armed=beam.DoFn.StateParam(ARMED)) -> Iterator[str]:
        elements = list(buffer.read())
        buffer.clear()
        armed.clear()
        if elements:
            yield write_file(self._directory, self._prefix, self._suffix,
                             self._encode(elements))


class _WriteEvery(beam.PTransform):
    """Elements to one file per ``every_s`` seconds; the written file names out."""

    def __init__(self, directory: str, prefix: str, suffix: str,
                 encode: Callable[[list[Any]], bytes], every_s: float) -> None:
        super().__init__()
        self._write = _WriteEveryFn(directory, prefix, suffix, encode, every_s)

    def expand(self, elements: beam.PCollection) -> beam.PCollection:
        return (
            elements
            # One writer: a local sink is read by a person, not scaled out.
            | "OneKey" >> beam.Map(lambda element: (0, element))
            | "WriteEvery" >> beam.ParDo(self._write)
        )


class WriteFlowsEveryWindow(_WriteEvery):
    """Flow rows to a new ``DIR/flows-<time>-<id>.parquet`` every ``window_s`` seconds."""

    def __init__(self, directory: str, window_s: float = DEFAULT_WINDOW_S) -> None:
        super().__init__(directory, FLOWS_PREFIX, ".parquet", parquet_bytes, window_s)


class WriteDeadLettersEveryWindow(_WriteEvery):
    """Dead letters to a new ``DIR/errors-<time>-<id>.jsonl`` every ``window_s`` seconds."""

    def __init__(self, directory: str, window_s: float = DEFAULT_WINDOW_S) -> None:
        super().__init__(directory, ERRORS_PREFIX, ".jsonl", json_lines_bytes, window_s)

