"""Names of flowbeam's Beam counters: one definition shared by the code that emits them and the
run summary that reads them (and by dashboards that alert on them)."""

from __future__ import annotations

from apache_beam.metrics import Metrics

NAMESPACE = "flowbeam"

FILES_READ = "files_read"  # captures read (pcap or pcapng), damaged ones included
FILES_FAILED = "files_failed"  # files that are not captures (another format, bad .gz)
FILES_DAMAGED = "files_damaged"  # captures read up to damage (cut, corrupt)
FILES_UNREADABLE = "files_unreadable"  # directories, permission denied, vanished files
BATCHES_READ = "batches_read"  # Pub/Sub packet batches decoded, damaged ones included
BATCHES_DAMAGED = "batches_damaged"  # batches read only up to damage (cut, corrupt)
BATCHES_FAILED = "batches_failed"  # messages that are no batch (not a capture, bad attributes)
BATCHES_REDELIVERED = "batches_redelivered"  # copies of a batch already read, dropped
SENSOR_KERNEL_DROPS = "sensor_kernel_drops"  # packets the sensors' kernels dropped (batches say)
PACKETS = "packets"
BYTES = "bytes"
FRAGMENTS = "fragments"
FLOW_ROWS = "flow_rows"
# Streaming: fragments that started before their shard's last timer firing (behind the
# watermark, e.g. a sensor whose upload was delayed); they still end up in a row.
LATE_FRAGMENTS = "late_fragments"
DEAD_LETTERS = "dead_letters"
BIGQUERY_REJECTED_ROWS = "bigquery_rejected_rows"
BIGQUERY_ERRORS_TABLE_REJECTED_ROWS = "bigquery_errors_table_rejected_rows"
# One counter per reason a packet was skipped: MALFORMED_PREFIX + the decoder's reason.
MALFORMED_PREFIX = "malformed_"
# Flow rows written to the local sink, one counter per status: PARQUET_ROWS_PREFIX + status.
PARQUET_ROWS_PREFIX = "parquet_rows_"


def counter(name: str) -> Metrics.DelegatingCounter:
    """The flowbeam counter ``name`` (one of this module's constants)."""
    return Metrics.counter(NAMESPACE, name)


def malformed_counter(reason: str) -> Metrics.DelegatingCounter:
    """The counter of packets skipped for ``reason``."""
    return Metrics.counter(NAMESPACE, MALFORMED_PREFIX + reason)


# VPC Flow Logs (pipelines.vpc_flows).
VPC_FILES_READ = "vpc_files_read"  # flow log files and envelope files read
VPC_RECORDS = "vpc_records"  # flow records (log-status OK): each one a fragment
VPC_NODATA = "vpc_nodata_records"  # intervals without traffic
VPC_SKIPDATA = "vpc_skipdata_records"  # intervals AWS could not capture
VPC_MALFORMED = "vpc_malformed_records"  # lines that are no record (dead letters)
VPC_ENVELOPES = "vpc_envelopes"  # DATA_MESSAGE envelopes decoded
VPC_CONTROL_MESSAGES = "vpc_control_messages"  # CONTROL_MESSAGE envelopes skipped
VPC_BAD_ENVELOPES = "vpc_bad_envelopes"  # not gzip, not JSON, KPL-aggregated (dead letters)
VPC_DENIED = "vpc_denied_records"  # REJECT records (the denial log)
VPC_SUBNET_REFRESHES = "vpc_subnet_refreshes"  # DescribeSubnets calls that succeeded
VPC_SUBNET_REFRESH_FAILURES = "vpc_subnet_refresh_failures"  # ... that failed (old set kept)
# Per-subnet traffic: SUBNET_TRAFFIC_PREFIX + "SUBNET/DIRECTION/ACTION/MEASURE".
SUBNET_TRAFFIC_PREFIX = "subnet_traffic/"


def subnet_traffic_counter(subnet: str, direction: str, action: str | None,
                           measure: str) -> Metrics.DelegatingCounter:
    """The counter of one figure (flows, packets, bytes) of a subnet's traffic."""
    return Metrics.counter(
        NAMESPACE, f"{SUBNET_TRAFFIC_PREFIX}{subnet}/{direction}/{action or '-'}/{measure}")


# The Kinesis reader (transforms/kinesis_read.py): records handed on, shards read to their end,
# and the calls retried: throttled, expired iterators, any other AWS error.
KINESIS_RECORDS = "kinesis_records"
KINESIS_SHARDS_ENDED = "kinesis_shards_ended"
KINESIS_THROTTLED = "kinesis_throttled"
KINESIS_EXPIRED_ITERATORS = "kinesis_expired_iterators"
KINESIS_ERRORS = "kinesis_errors"
