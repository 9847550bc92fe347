"""The catalogue of VPC Flow Logs fields (versions 2 to 8), as AWS documents them.

A flow log's format is a list of these names in any order (``--log_format``, or the header
line AWS writes at the top of every file it delivers to S3). The parser looks each value's
name up here to know how to read it: a record's meaning never depends on how many values it
has, only on the format it was written with.

Kinds: ``int`` (a decimal number), ``addr`` (an IPv4 or IPv6 address), ``str`` (text).
Every field may be ``-`` (no value: NULL), e.g. the addresses of a NODATA record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INT = "int"
ADDR = "addr"
STR = "str"


@dataclass(frozen=True)
class Field:
    """One flow log field: its AWS name, how its value is read, the version that added it."""

    name: str
    kind: str
    version: int

    @property
    def attribute(self) -> str:
        """The name of the ``VpcRecord`` attribute that holds it (``-`` becomes ``_``)."""
        return self.name.replace("-", "_")


FIELDS: tuple[Field, ...] = (
    # Version 2: the default format.
    Field("version", INT, 2),
    Field("account-id", STR, 2),
    Field("interface-id", STR, 2),
    Field("srcaddr", ADDR, 2),
    Field("dstaddr", ADDR, 2),
    Field("srcport", INT, 2),
    Field("dstport", INT, 2),
    Field("protocol", INT, 2),
    Field("packets", INT, 2),
    Field("bytes", INT, 2),
    Field("start", INT, 2),
    Field("end", INT, 2),
    Field("action", STR, 2),
    Field("log-status", STR, 2),
    # Version 3.
    Field("vpc-id", STR, 3),
    Field("subnet-id", STR, 3),
    Field("instance-id", STR, 3),
    Field("tcp-flags", INT, 3),
    Field("type", STR, 3),
    Field("pkt-srcaddr", ADDR, 3),
    Field("pkt-dstaddr", ADDR, 3),
    # Version 4.
    Field("region", STR, 4),
    Field("az-id", STR, 4),
    Field("sublocation-type", STR, 4),
    Field("sublocation-id", STR, 4),
    # Version 5.
    Field("pkt-src-aws-service", STR, 5),
    Field("pkt-dst-aws-service", STR, 5),
    Field("flow-direction", STR, 5),
    Field("traffic-path", INT, 5),
    # Version 7: Amazon ECS.
    Field("ecs-cluster-arn", STR, 7),
    Field("ecs-cluster-name", STR, 7),
    Field("ecs-container-instance-arn", STR, 7),
    Field("ecs-container-instance-id", STR, 7),
    Field("ecs-container-id", STR, 7),
    Field("ecs-second-container-id", STR, 7),
    Field("ecs-service-name", STR, 7),
    Field("ecs-task-definition-arn", STR, 7),
    Field("ecs-task-arn", STR, 7),
    Field("ecs-task-id", STR, 7),
    # Version 8.
    Field("reject-reason", STR, 8),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
# What AWS writes when a flow log is created without a format.
DEFAULT_FORMAT: tuple[str, ...] = tuple(f.name for f in FIELDS if f.version == 2)
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


class FormatError(ValueError):
    """A log format that names an unknown field, or a field twice."""


def parse_format(text: str) -> tuple[str, ...]:
    """The field names of a format, written as AWS takes it (``${version} ${account-id}``)
    or as AWS writes it in a file's header line (``version account-id``)."""
    names = tuple(_PLACEHOLDER.sub(r"\1", token) for token in text.split())
    if not names:
        raise FormatError("the log format names no field")
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise FormatError(f"unknown field(s) in the log format: {', '.join(unknown)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise FormatError(f"field(s) named twice in the log format: {', '.join(repeated)}")
    return names


def is_header(tokens: list[str]) -> bool:
    """Whether a line is a format header: every token a field name. No record can be one: a
    record's values are numbers, addresses, ids (``eni-...``) and ``-``."""
    return bool(tokens) and all(token in BY_NAME for token in tokens)
