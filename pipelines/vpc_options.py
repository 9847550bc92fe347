"""The VPC Flow Logs pipeline's own options and the config they are validated into.

Apart from ``pipelines.vpc_flows`` (which wires and runs the pipeline) so that each module
stays readable; the options every pipeline shares are ``pipelines.options``'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from flowbeam.env_options import add_switch, env_default
from flowbeam.kinesis_shards import parse_start_position
from flowbeam.vpc.fields import DEFAULT_FORMAT, FormatError, parse_format
from pipelines.options import (
    FlowConfig,
    OptionsError,
    flow_config,
    input_patterns,
    output_every_s,
)
from transforms.vpc_subnets import Ec2Subnets

DEFAULT_SUBNET_REFRESH_S = 1800.0
RESUME_AFTER_EXAMPLE = ('{"shardId-000000000000": '
                        '"49590338271490256608559692538361571095921575989136588898"}')


class VpcFlowsOptions(PipelineOptions):
    """The VPC pipeline's own options; the rest are the shared ones of ``pipelines.options``."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--kinesis_stream", default=env_default("kinesis_stream"),
            help="Read this Kinesis stream (fed by a CloudWatch Logs subscription) instead of "
                 "--input files: a streaming pipeline, stopped with Ctrl-C.")
        parser.add_argument(
            "--kinesis_endpoint", default=env_default("kinesis_endpoint"),
            help="Kinesis endpoint URL (default: AWS's), e.g. a local test server.")
        parser.add_argument(
            "--start_position", default=env_default("start_position", "latest"),
            help="Where to start reading the stream: latest (default), trim_horizon, or "
                 "at_timestamp:ISO8601.")
        add_switch(
            parser, "kinesis_stop_at_latest",
            "Read the stream up to its latest record, then finish (a batch back-fill); with "
            "--output DIR, the last sequence number read per shard goes to "
            "DIR/kinesis_positions.json.")
        parser.add_argument(
            "--kinesis_resume_after", default=env_default("kinesis_resume_after"),
            help="Resume each shard after this sequence number: a JSON object of shard id -> "
                 "sequence number, or @FILE holding one (any path Beam reads, e.g. an earlier "
                 "back-fill's @DIR/kinesis_positions.json). Other shards start at "
                 "--start_position.")
        parser.add_argument(
            "--log_format", default=env_default("log_format"),
            help="The flow log's format, as given to AWS ('${version} ${account-id} ...') or "
                 "as in a file's header. Default: the version 2 default format. A file's "
                 "header line overrides it for that file.")
        add_switch(parser, "subnets_from_ec2",
                   "Subnets from EC2 DescribeSubnets (needs ec2:DescribeSubnets).")
        parser.add_argument(
            "--subnets_file", default=env_default("subnets_file"),
            help="Subnets from a CSV (cidr,subnet_id,name,vpc_id) or JSON file (a list of "
                 "such objects, or `aws ec2 describe-subnets` output).")
        parser.add_argument(
            "--aws_region", default=env_default("aws_region"),
            help="AWS region of Kinesis and EC2 (default: boto3's, e.g. AWS_REGION).")
        parser.add_argument(
            "--ec2_endpoint", default=env_default("ec2_endpoint"),
            help="EC2 endpoint URL (default: AWS's), e.g. a local test server.")
        parser.add_argument(
            "--subnet_refresh_s", type=float,
            default=env_default("subnet_refresh_s", DEFAULT_SUBNET_REFRESH_S),
            help="Streaming: seconds between two DescribeSubnets calls (default 1800).")
        add_switch(parser, "log_denied",
                   "Also log one structured line (JSON) per REJECT record.")


@dataclass(frozen=True)
class KinesisSource:
    """The stream to read, where it is, and where to start."""

    stream: str
    region: str | None
    endpoint: str | None
    start_position: str
    stop_at_latest: bool  # a bounded read: the pipeline runs in batch
    resume_after: Mapping[str, str]  # shard id -> last sequence number an earlier run read


@dataclass(frozen=True)
class VpcFlowsConfig:
    """The validated options the pipeline is built from."""

    inputs: tuple[str, ...]
    kinesis: KinesisSource | None
    log_format: tuple[str, ...]
    subnets_file: str | None
    ec2: Ec2Subnets | None
    log_denied: bool
    flows: FlowConfig
    output_every_s: float  # streaming: the local sink's file period

    @property
    def streaming(self) -> bool:
        """Reading a stream until stopped (not files, nor a stream up to its latest record)."""
        return self.kinesis is not None and not self.kinesis.stop_at_latest


def parse_resume_after(value: str | None) -> dict[str, str]:
    """``--kinesis_resume_after``: inline JSON, or ``@PATH`` read through Beam's filesystems
    (so an earlier back-fill's positions file on gs:// or s3:// works as a local one).

    Sequence numbers must be strings of digits, as Kinesis writes them: a JSON number would
    lose digits in most tools that wrote the file (they exceed a double's precision).
    """
    if not value:
        return {}
    text, source = value, "the value"
    if value.startswith("@"):
        path = value[1:]
        try:
            with FileSystems.open(path) as stream:
                text = stream.read().decode("utf-8")
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise OptionsError(f"--kinesis_resume_after: cannot read {path!r}: "
                               f"{str(error).splitlines()[0]}") from None
        source = repr(path)
    try:
        positions = json.loads(text)
    except ValueError as error:
        raise OptionsError(f"--kinesis_resume_after: {source} is not JSON ({error})") from None
    if not isinstance(positions, dict) or not all(
            isinstance(seq, str) and seq.isdigit() for seq in positions.values()):
        raise OptionsError(
            f"--kinesis_resume_after: {source} must be a JSON object of shard id -> sequence "
            f"number (a string of digits), e.g. {RESUME_AFTER_EXAMPLE}")
    return positions


def parse_kinesis(own: VpcFlowsOptions, inputs: tuple[str, ...]) -> KinesisSource | None:
    """The stream to read, or None when reading files; checks the Kinesis options."""
    if not own.kinesis_stream:
        if own.kinesis_resume_after:
            raise OptionsError("--kinesis_resume_after needs --kinesis_stream")
        return None
    if inputs:
        raise OptionsError("give --input (files) or --kinesis_stream, not both")
    try:
        parse_start_position(own.start_position, 0.0)
    except ValueError as error:
        raise OptionsError(f"--start_position: {error}") from None
    return KinesisSource(own.kinesis_stream, own.aws_region, own.kinesis_endpoint,
                         own.start_position, own.kinesis_stop_at_latest,
                         parse_resume_after(own.kinesis_resume_after))


def parse_config(options: PipelineOptions, to_bigquery: bool = False) -> VpcFlowsConfig:
    """Validate the options; raise ``OptionsError`` with a message a user can act on."""
    own = options.view_as(VpcFlowsOptions)
    inputs = input_patterns(options)
    kinesis = parse_kinesis(own, inputs)
    if kinesis is None and not inputs:
        raise OptionsError("--input (a flow log file, glob, gs:// or s3:// path) or "
                           "--kinesis_stream is required")
    try:
        log_format = parse_format(own.log_format) if own.log_format else DEFAULT_FORMAT
    except FormatError as error:
        raise OptionsError(f"--log_format: {error}") from None
    if own.subnets_from_ec2 and own.subnets_file:
        raise OptionsError("give --subnets_from_ec2 or --subnets_file, not both")
    if own.subnet_refresh_s <= 0:
        raise OptionsError(f"--subnet_refresh_s must be positive, got {own.subnet_refresh_s}")
    flows = flow_config(options, to_bigquery)
    if flows.byte_accounting != "ip":
        raise OptionsError("--byte_accounting frame is not an option of the VPC pipeline: flow "
                           "logs count IP bytes only")
    if flows.sensor:
        raise OptionsError("--sensor is not an option of the VPC pipeline: each flow is "
                           "scoped by the network interface that logged it")
    ec2 = (Ec2Subnets(own.aws_region, own.ec2_endpoint, own.subnet_refresh_s)
           if own.subnets_from_ec2 else None)
    return VpcFlowsConfig(inputs, kinesis, log_format, own.subnets_file, ec2, own.log_denied,
                          flows, output_every_s(options))
