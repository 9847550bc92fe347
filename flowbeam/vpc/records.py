"""VPC Flow Logs records: one line of text, read with a format, as a ``VpcRecord``.

The format (which field each value is) comes from ``--log_format`` or from a file's header
line, never from the number of values: a version 5 line and a custom line of the same length
mean different things. ``-`` is NULL. A line that cannot be read raises ``RecordError`` with
a reason a user can act on; the caller makes it a dead letter and goes on with the next line.

``LineReader`` reads the lines of one file or stream: a header line (AWS writes one at the top
of every file it delivers to S3; concatenated files have several) switches the format for the
lines after it; blank lines are skipped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields

from flowbeam.vpc.fields import ADDR, BY_NAME, DEFAULT_FORMAT, INT, is_header

OK = "OK"
NODATA = "NODATA"
SKIPDATA = "SKIPDATA"
LOG_STATUSES = frozenset({OK, NODATA, SKIPDATA})
ACCEPT = "ACCEPT"
REJECT = "REJECT"
ACTIONS = frozenset({ACCEPT, REJECT})
# What a record needs to be a flow fragment (the key, the interval and the counts).
FLOW_FIELDS = ("srcaddr", "dstaddr", "protocol", "start", "end", "packets", "bytes")
_LIMITS = {"srcport": 65535, "dstport": 65535, "protocol": 255, "tcp-flags": 255}


class RecordError(ValueError):
    """A line that is not a record of its format; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VpcRecord:
    """One flow log record. Every field of versions 2 to 8; None where the format has no such
    field or the record says ``-``. Addresses are in canonical text form."""

    version: int | None = None
    account_id: str | None = None
    interface_id: str | None = None
    srcaddr: str | None = None
    dstaddr: str | None = None
    srcport: int | None = None
    dstport: int | None = None
    protocol: int | None = None
    packets: int | None = None
    bytes: int | None = None
    start: int | None = None
    end: int | None = None
    action: str | None = None
    log_status: str | None = None
    vpc_id: str | None = None
    subnet_id: str | None = None
    instance_id: str | None = None
    tcp_flags: int | None = None
    type: str | None = None
    pkt_srcaddr: str | None = None
    pkt_dstaddr: str | None = None
    region: str | None = None
    az_id: str | None = None
    sublocation_type: str | None = None
    sublocation_id: str | None = None
    pkt_src_aws_service: str | None = None
    pkt_dst_aws_service: str | None = None
    flow_direction: str | None = None
    traffic_path: int | None = None
    ecs_cluster_arn: str | None = None
    ecs_cluster_name: str | None = None
    ecs_container_instance_arn: str | None = None
    ecs_container_instance_id: str | None = None
    ecs_container_id: str | None = None
    ecs_second_container_id: str | None = None
    ecs_service_name: str | None = None
    ecs_task_definition_arn: str | None = None
    ecs_task_arn: str | None = None
    ecs_task_id: str | None = None
    reject_reason: str | None = None

    @property
    def is_flow(self) -> bool:
        """Whether the record describes traffic: NODATA (no traffic in the interval) and
        SKIPDATA (records AWS could not capture) are counted, never flows."""
        return self.log_status not in (NODATA, SKIPDATA)

    @property
    def is_denied(self) -> bool:
        return self.is_flow and self.action == REJECT


# Every catalogue field has its attribute (checked once, at import).
assert {f.attribute for f in BY_NAME.values()} == {f.name for f in fields(VpcRecord)}


def _value(name: str, token: str) -> object:
    if token == "-":
        return None
    kind = BY_NAME[name].kind
    if kind == INT:
        if not token.isdigit():
            raise RecordError(f"{name} is not a number: {token!r}")
        number = int(token)
        if number > _LIMITS.get(name, number):
            raise RecordError(f"{name} {number} is out of range (at most {_LIMITS[name]})")
        return number
    if kind == ADDR:
        try:
            return str(ipaddress.ip_address(token))
        except ValueError:
            raise RecordError(f"{name} is not an IP address: {token!r}") from None
    return token


def parse_record(line: str, names: tuple[str, ...] = DEFAULT_FORMAT) -> VpcRecord:
    """The record of ``line`` in the format ``names``; raises ``RecordError``."""
    tokens = line.split()
    if len(tokens) != len(names):
        raise RecordError(f"{len(tokens)} values for a format of {len(names)} fields")
    values = {BY_NAME[name].attribute: _value(name, token) for name, token in zip(
        names, tokens, strict=True)}
    record = VpcRecord(**values)
    _check(record)
    return record


def _check(record: VpcRecord) -> None:
    """What the values must satisfy together for the record to be used."""
    if record.log_status is not None and record.log_status not in LOG_STATUSES:
        raise RecordError(f"unknown log-status {record.log_status!r}")
    if not record.is_flow:
        return
    if record.action is not None and record.action not in ACTIONS:
        raise RecordError(f"unknown action {record.action!r}")
    missing = [name for name in FLOW_FIELDS if getattr(record, name) is None]
    if missing:
        raise RecordError(f"no {', '.join(missing)}: a record without them cannot be a flow")
    if (":" in record.srcaddr) != (":" in record.dstaddr):
        raise RecordError(f"srcaddr {record.srcaddr} and dstaddr {record.dstaddr} are of "
                          "different IP versions")
    if record.start > record.end:
        raise RecordError(f"start {record.start} is after end {record.end}")


class LineReader:
    """Reads the lines of one file or stream, following its header lines.

    ``names``: the format of the lines before any header (``--log_format``, else the
    default version 2 format).
    """

    def __init__(self, names: tuple[str, ...] = DEFAULT_FORMAT) -> None:
        self.names = names

    def read(self, line: str) -> VpcRecord | None:
        """The record of ``line``; None for a blank or header line. Raises ``RecordError``."""
        tokens = line.split()
        if not tokens:
            return None
        if is_header(tokens):
            self.names = tuple(tokens)
            return None
        return parse_record(line, self.names)
