"""The VPC Flow Logs pipeline: AWS VPC Flow Logs to flow records, per-subnet traffic and a
denial log.

    # batch, from files
    python -m pipelines.vpc_flows --input 's3://logs/AWSLogs/*/vpcflowlogs/**.log.gz' \\
        --subnets_file subnets.csv --output out/
    # streaming, from a Kinesis stream fed by a CloudWatch Logs subscription
    python -m pipelines.vpc_flows --kinesis_stream vpc-flow-logs --subnets_from_ec2 \\
        --output_table my-project:network.flow_logs

Files: flow logs as AWS delivers them to S3 (gzip'd text, a header line naming the fields) and
files of CloudWatch Logs subscription envelopes (as Firehose writes them), from local paths,
globs, gs:// and s3://. Kinesis: each record a gzip'd subscription envelope. Writes
DIR/flows-*.parquet (one bidirectional row per flow and network interface),
DIR/subnet_traffic-*.parquet, DIR/denied_flows-*.parquet and DIR/errors-*.jsonl (dead
letters), and/or the BigQuery tables flow_logs, subnet_traffic and denied_flows. Every option
can also come from FLOWBEAM_<NAME>; AWS credentials and region come the usual boto3 way and
are never logged.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from flowbeam.kinesis_shards import parse_start_position
from flowbeam.vpc.fields import DEFAULT_FORMAT, FormatError, parse_format
from flowbeam.vpc.fragments import to_fragment
from flowbeam.vpc.schemas import DENIED_FLOWS, EXTRA_TABLES, SUBNET_TRAFFIC
from flowbeam.vpc.subnets import Subnet, SubnetsError
from pipelines.options import (
    USAGE_ERROR,
    BigQueryOptions,
    FlowConfig,
    FlowOptions,
    InputOptions,
    LocalSinkOptions,
    OptionsError,
    StreamingSinkOptions,
    bigquery_insert_mode,
    check_inputs,
    default_runner,
    env_default,
    env_flag,
    flow_config,
    input_patterns,
    invoked_as,
    local_streaming,
    output_every_s,
    print_help,
    resolve_bigquery_config,
    unknown_environment,
    unknown_flags,
)
from pipelines.summary import LABEL_WIDTH, counter_values
from transforms import counters
from transforms.bigquery_config import BigQueryConfig, BigQueryConfigError, TableRef
from transforms.bigquery_merge import MERGE, prepare_staging_table
from transforms.bigquery_tables import prepare_table
from transforms.bigquery_write import WriteDeadLettersToBigQuery, WriteFlowsToBigQuery
from transforms.build_flows import BuildFlows
from transforms.dead_letters import CountDeadLettersFn
from transforms.kinesis_read import ReadFromKinesis
from transforms.local_sink import WriteDeadLetters, WriteFlowsToParquet, remove_earlier_outputs
from transforms.streaming_sink import (
    WriteDeadLettersEveryWindow,
    WriteFlowsEveryWindow,
)
from transforms.vpc_outputs import (
    AddSubnets,
    DeniedFlows,
    SubnetTraffic,
    WriteExtraTable,
    prepare_extra_tables,
)
from transforms.vpc_read import DecodeSubscriptionRecords, ParseLogEvents, ReadVpcFiles
from transforms.vpc_subnets import Ec2Subnets, startup_subnets, subnets_side_input

LOG = logging.getLogger(__name__)
SOURCE = "vpc_flow_logs"
# --help's text (the module docstring's examples name one way of starting the pipeline).
DESCRIPTION = """\
AWS VPC Flow Logs to flow records, per-subnet traffic and a denial log. Reads flow log files
(as delivered to S3, or CloudWatch Logs subscription envelopes as Firehose writes them) with
--input, or a Kinesis stream fed by a CloudWatch Logs subscription with --kinesis_stream.
Writes DIR/flows-*.parquet, DIR/subnet_traffic-*.parquet, DIR/denied_flows-*.parquet and
DIR/errors-*.jsonl, and/or the BigQuery tables flow_logs, subnet_traffic and denied_flows.
Every option can also come from FLOWBEAM_<NAME>; the command line wins. AWS credentials and
region come the usual boto3 way. Exit status: 0 when a file was read (or the stream until
stopped), 1 when no file could be, 2 for a usage error."""
DEFAULT_SUBNET_REFRESH_S = 1800.0


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
        parser.add_argument(
            "--kinesis_stop_at_latest", action="store_true",
            default=env_flag("kinesis_stop_at_latest"),
            help="Read the stream up to its latest record, then finish (a batch back-fill).")
        parser.add_argument(
            "--log_format", default=env_default("log_format"),
            help="The flow log's format, as given to AWS ('${version} ${account-id} ...') or "
                 "as in a file's header. Default: the version 2 default format. A file's "
                 "header line overrides it for that file.")
        parser.add_argument(
            "--subnets_from_ec2", action="store_true", default=env_flag("subnets_from_ec2"),
            help="Subnets from EC2 DescribeSubnets (needs ec2:DescribeSubnets).")
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
        parser.add_argument(
            "--log_denied", action="store_true", default=env_flag("log_denied"),
            help="Also log one structured line (JSON) per REJECT record.")


@dataclass(frozen=True)
class KinesisSource:
    """The stream to read, where it is, and where to start."""

    stream: str
    region: str | None
    endpoint: str | None
    start_position: str
    stop_at_latest: bool  # a bounded read: the pipeline runs in batch


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


def parse_config(options: PipelineOptions, to_bigquery: bool = False) -> VpcFlowsConfig:
    """Validate the options; raise ``OptionsError`` with a message a user can act on."""
    own = options.view_as(VpcFlowsOptions)
    inputs = input_patterns(options)
    kinesis = None
    if own.kinesis_stream:
        if inputs:
            raise OptionsError("give --input (files) or --kinesis_stream, not both")
        try:
            parse_start_position(own.start_position, 0.0)
        except ValueError as error:
            raise OptionsError(f"--start_position: {error}") from None
        kinesis = KinesisSource(own.kinesis_stream, own.aws_region, own.kinesis_endpoint,
                                own.start_position, own.kinesis_stop_at_latest)
    elif not inputs:
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
    if flows.sensor:
        raise OptionsError("--sensor is not an option of the VPC pipeline: each flow is "
                           "scoped by the network interface that logged it")
    ec2 = (Ec2Subnets(own.aws_region, own.ec2_endpoint, own.subnet_refresh_s)
           if own.subnets_from_ec2 else None)
    return VpcFlowsConfig(inputs, kinesis, log_format, own.subnets_file, ec2, own.log_denied,
                          flows, output_every_s(options))


def read_records(pipeline: beam.Pipeline, config: VpcFlowsConfig,
                 startup_dead_letters: Sequence[dict]
                 ) -> tuple[beam.PCollection, list[beam.PCollection]]:
    """The flow records of the files or the stream, and the dead letters of reading them."""
    names = config.log_format
    if config.kinesis is not None:
        source = config.kinesis
        decoded = (
            pipeline
            | "ReadFromKinesis" >> ReadFromKinesis(
                source.stream, source.region, source.endpoint, source.start_position,
                stop_at_latest=source.stop_at_latest)
            | "DecodeSubscriptionRecords" >> DecodeSubscriptionRecords(source.stream)
        )
        parsed = decoded.events | "ParseLogEvents" >> ParseLogEvents(names)
        return parsed.records, [decoded.dead_letters, parsed.dead_letters]
    read = (
        pipeline
        | "Patterns" >> beam.Create(list(config.inputs))
        | "ReadVpcFiles" >> ReadVpcFiles(names)
    )
    parsed = read.events | "ParseLogEvents" >> ParseLogEvents(names)
    records = (read.records, parsed.records) | "AllRecords" >> beam.Flatten()
    startup = pipeline | "StartupDeadLetters" >> beam.Create(list(startup_dead_letters))
    return records, [read.dead_letters, parsed.dead_letters, startup]


def build(pipeline: beam.Pipeline, config: VpcFlowsConfig, subnets: Sequence[Subnet] = (),
          startup_dead_letters: Sequence[dict] = (), bigquery: BigQueryConfig | None = None,
          staging: TableRef | None = None) -> dict[str, beam.PCollection]:
    """Wire the pipeline: files or stream -> records -> fragments -> flows (with subnets),
    per-subnet traffic and denials -> local sink and/or BigQuery.

    ``staging``: the job's staging table when flow rows are merged into BigQuery (the batch
    default); the two extra tables are appended. Dead letters go to the local errors file
    when there is a local sink, else to the BigQuery errors table. Streaming writes local
    files per minute of arrival (``transforms.streaming_sink``).
    """
    settings = config.flows
    streaming = config.streaming
    records, read_dead_letters = read_records(pipeline, config, startup_dead_letters)
    side = subnets_side_input(pipeline, list(subnets), config.ec2, streaming)
    flows = (
        records
        | "ToFragments" >> beam.Map(lambda record: [to_fragment(record)])
        | "BuildFlows" >> BuildFlows(settings.idle_timeout_s, settings.active_timeout_s,
                                     source=SOURCE, shards=settings.flow_shards)
        | "AddSubnets" >> AddSubnets(side)
    )
    traffic = records | "SubnetTraffic" >> SubnetTraffic(side)
    denied = records | "DeniedFlows" >> DeniedFlows(side, config.log_denied)
    input_dead_letters = read_dead_letters | "InputDeadLetters" >> beam.Flatten()
    window_s = config.output_every_s if streaming else None
    rejected = [
        traffic | "WriteSubnetTraffic" >> WriteExtraTable(SUBNET_TRAFFIC, settings.output,
                                                         bigquery, window_s),
        denied | "WriteDeniedFlows" >> WriteExtraTable(DENIED_FLOWS, settings.output, bigquery,
                                                       window_s),
    ]
    if bigquery is not None:
        rejected.append(flows | "WriteFlowsToBigQuery" >> WriteFlowsToBigQuery(
            bigquery, staging=staging))
    dead_letters = (
        (input_dead_letters, *rejected)
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDeadLetters" >> beam.ParDo(CountDeadLettersFn())
    )
    if settings.output and streaming:
        _ = flows | "WriteFlows" >> WriteFlowsEveryWindow(settings.output, window_s)
        _ = dead_letters | "WriteDeadLetters" >> WriteDeadLettersEveryWindow(settings.output,
                                                                              window_s)
    elif settings.output:
        _ = flows | "WriteFlows" >> WriteFlowsToParquet(settings.output)
        _ = dead_letters | "WriteDeadLetters" >> WriteDeadLetters(settings.output)
    elif bigquery is not None:
        _ = input_dead_letters | "WriteDeadLettersToBigQuery" >> WriteDeadLettersToBigQuery(
            bigquery)
    return {"flows": flows, "subnet_traffic": traffic, "denied_flows": denied,
            "dead_letters": dead_letters}


SUMMARY_LINES = (
    ("files read", counters.VPC_FILES_READ),
    ("files unreadable", counters.FILES_UNREADABLE),
    ("envelopes", counters.VPC_ENVELOPES),
    ("control messages skipped", counters.VPC_CONTROL_MESSAGES),
    ("bad envelopes", counters.VPC_BAD_ENVELOPES),
    ("flow records", counters.VPC_RECORDS),
    ("NODATA records", counters.VPC_NODATA),
    ("SKIPDATA records", counters.VPC_SKIPDATA),
    ("malformed records", counters.VPC_MALFORMED),
    ("denied records", counters.VPC_DENIED),
    ("flows", counters.FLOW_ROWS),
    ("dead letters", counters.DEAD_LETTERS),
)


def render_summary(values: dict[str, int], elapsed_s: float) -> str:
    """The run summary: one labelled counter a line."""
    lines = [f"  {label:<{LABEL_WIDTH}}{values.get(name, 0)}" for label, name in SUMMARY_LINES]
    return "\n".join(["flowbeam summary", *lines,
                      f"  {'elapsed':<{LABEL_WIDTH}}{elapsed_s:.2f} s"])


def run(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline; returns the exit code: 0 when at least one file was read (others
    may have failed: see the summary and the dead letters) or the stream was read until
    stopped (Ctrl-C), 1 when no file could be, 2 for a usage error."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv_list or "--help" in argv_list:
        print_help(invoked_as("pipelines.vpc_flows", "vpc"), DESCRIPTION, [
            ("VPC pipeline: flow log files and envelope files", InputOptions),
            ("VPC pipeline", VpcFlowsOptions), ("flows", FlowOptions),
            ("local sink", LocalSinkOptions),
            ("streaming local sink", StreamingSinkOptions), ("BigQuery sink", BigQueryOptions)])
        return 0
    options = PipelineOptions(argv_list)
    own = options.view_as(VpcFlowsOptions)
    if own.kinesis_stream and not own.kinesis_stop_at_latest:
        options.view_as(StandardOptions).streaming = True
    try:
        extra = unknown_flags(options, argv_list)
        if extra:
            raise OptionsError(f"unknown option(s): {', '.join(extra)}")
        bigquery = resolve_bigquery_config(options)
        insert_mode = bigquery_insert_mode(options, bigquery) if bigquery else None
        config = parse_config(options, to_bigquery=bigquery is not None)
        default_runner(options)
        FileSystems.set_options(options)  # s3:// and gs:// credentials, endpoints, regions
        try:  # a bad file or missing permissions stop the job before it reads anything
            subnets = startup_subnets(config.subnets_file, config.ec2)
        except SubnetsError as error:
            flag = "--subnets_file" if config.subnets_file else "--subnets_from_ec2"
            raise OptionsError(f"{flag}: {error}") from None
        if config.streaming and config.ec2 and local_streaming(options):
            print("flowbeam: warning: the local runner cannot refresh subnets (a side input "
                  "that changes): using EC2's subnets at start-up; Dataflow refreshes them "
                  "every --subnet_refresh_s", file=sys.stderr)
            config = dataclasses.replace(config, ec2=None)
        staging = None
        if bigquery is not None:
            prepare_table(bigquery)  # an incompatible table fails here, before any work
            prepare_extra_tables(bigquery)
            if insert_mode == MERGE:
                staging = prepare_staging_table(bigquery)
    except (OptionsError, BigQueryConfigError) as error:
        print(f"flowbeam: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    for warning in unknown_environment():
        print(f"flowbeam: warning: {warning}", file=sys.stderr)
    startup_dead_letters = check_inputs(config.inputs)
    if config.flows.output and not config.streaming:
        replaced = remove_earlier_outputs(config.flows.output, [t.name for t in EXTRA_TABLES])
        if replaced:
            print(f"flowbeam: replacing {len(replaced)} files of an earlier run in "
                  f"{config.flows.output}", file=sys.stderr)
    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config, subnets, startup_dead_letters, bigquery, staging)
    result = pipeline.run()
    if not getattr(result, "has_job", True):  # a flex template launch: Dataflow runs the job
        print("flowbeam: job graph written to --template_location; Dataflow runs the job")
        return 0
    if config.streaming:
        try:
            result.wait_until_finish()
        except KeyboardInterrupt:
            print("flowbeam: stopping", file=sys.stderr)
            result.cancel()
        return 0
    result.wait_until_finish()
    values = counter_values(result)
    print(render_summary(values, time.monotonic() - started))
    if config.kinesis is None and values.get(counters.VPC_FILES_READ, 0) == 0:
        print("flowbeam: error: no flow log file could be read", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(run())


if __name__ == "__main__":
    main()
