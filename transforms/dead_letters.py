"""Dead letters: records a pipeline could not turn into flows, kept with the reason.

Nothing is dropped silently: a damaged capture, an unreadable path, a row BigQuery rejected all
become one dead letter each, written beside the flows (``errors-*.jsonl`` locally, or an
``<table>_errors`` table) and counted in the run summary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from transforms import counters

DEAD_LETTER_TAG = "dead_letters"


def dead_letter(
    stage: str,
    reason: str,
    source: str,
    offset: int | None = None,
    payload: Any = None,
) -> dict[str, Any]:
    """One dead-letter record.

    ``stage`` names the step that failed (``read_capture``, ``match_files``, ``bigquery_insert``),
    ``source`` what it was reading (a file, a table), ``offset`` the byte offset when there is
    one, ``payload`` the offending record when it is small enough to keep (JSON-serialisable).
    """
    return {"stage": stage, "reason": reason, "source": source, "offset": offset,
            "payload": payload}


def to_json_line(record: dict[str, Any]) -> str:
    """Serialise a dead letter for the local errors file; unknown types become strings."""
    return json.dumps(record, sort_keys=True, default=str)


class CountDeadLettersFn(beam.DoFn):
    """Passes dead letters through, counting them for the run summary."""

    def __init__(self) -> None:
        self._dead_letters = counters.counter(counters.DEAD_LETTERS)

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._dead_letters.inc()
        yield record
