"""Names of flowbeam's Beam counters: one definition shared by the code that emits them and the
run summary that reads them (and by dashboards that alert on them)."""

from __future__ import annotations

from apache_beam.metrics import Metrics

NAMESPACE = "flowbeam"

FILES_READ = "files_read"
FILES_FAILED = "files_failed"
FILES_DAMAGED = "files_damaged"
PACKETS = "packets"
BYTES = "bytes"
FRAGMENTS = "fragments"
FLOW_ROWS = "flow_rows"
DEAD_LETTERS = "dead_letters"
BIGQUERY_REJECTED_ROWS = "bigquery_rejected_rows"
BIGQUERY_ERRORS_TABLE_REJECTED_ROWS = "bigquery_errors_table_rejected_rows"
# One counter per reason a packet was skipped: MALFORMED_PREFIX + the decoder's reason.
MALFORMED_PREFIX = "malformed_"


def counter(name: str) -> Metrics.DelegatingCounter:
    """The flowbeam counter ``name`` (one of this module's constants)."""
    return Metrics.counter(NAMESPACE, name)


def malformed_counter(reason: str) -> Metrics.DelegatingCounter:
    """The counter of packets skipped for ``reason``."""
    return Metrics.counter(NAMESPACE, MALFORMED_PREFIX + reason)
