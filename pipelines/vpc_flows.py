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

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from flowbeam.env_options import unknown_environment
from flowbeam.vpc.fragments import to_fragment
from flowbeam.vpc.schemas import DENIED_FLOWS, EXTRA_TABLES, SUBNET_TRAFFIC
from flowbeam.vpc.subnets import Subnet, SubnetsError
from pipelines.local_cores import exit_on_interrupt
from pipelines.options import (
    USAGE_ERROR,
    BigQueryOptions,
    FlowOptions,
    InputOptions,
    LocalSinkOptions,
    OptionsError,
    StreamingSinkOptions,
    bigquery_insert_mode,
    check_inputs,
    default_runner,
    invoked_as,
    launched_elsewhere,
    local_streaming,
    print_help,
    resolve_bigquery_config,
    unknown_flags,
)
from pipelines.summary import LABEL_WIDTH, counter_values
from pipelines.vpc_options import VpcFlowsConfig, VpcFlowsOptions, parse_config
from transforms import counters
from transforms.bigquery_config import BigQueryConfig, BigQueryConfigError
from transforms.bigquery_merge import MERGE, job_suffix, prepare_staging_table, staging_table
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
    WriteKinesisPositions,
    prepare_extra_staging_tables,
    prepare_extra_tables,
)
from transforms.vpc_read import DecodeSubscriptionRecords, ParseLogEvents, ReadVpcFiles
from transforms.vpc_subnets import startup_subnets, subnets_side_input

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


def read_records(pipeline: beam.Pipeline, config: VpcFlowsConfig,
                 startup_dead_letters: Sequence[dict]
                 ) -> tuple[beam.PCollection, list[beam.PCollection]]:
    """The flow records of the files or the stream, and the dead letters of reading them.

    A back-fill from the stream into a local sink also writes where it stopped reading
    (``WriteKinesisPositions``), for the next one's ``--kinesis_resume_after``."""
    names = config.log_format
    if config.kinesis is not None:
        source = config.kinesis
        read = pipeline | "ReadFromKinesis" >> ReadFromKinesis(
            source.stream, source.region, source.endpoint, source.start_position,
            resume_after=source.resume_after, stop_at_latest=source.stop_at_latest)
        if source.stop_at_latest and config.flows.output:
            _ = read | "WriteKinesisPositions" >> WriteKinesisPositions(
                config.flows.output, source.resume_after)
        decoded = read | "DecodeSubscriptionRecords" >> DecodeSubscriptionRecords(source.stream)
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
          staging_suffix: str | None = None) -> dict[str, beam.PCollection]:
    """Wire the pipeline: files or stream -> records -> fragments -> flows (with subnets),
    per-subnet traffic and denials -> local sink and/or BigQuery.

    ``staging_suffix``: the suffix of the job's staging tables when rows are merged into
    BigQuery (the batch default; ``transforms.bigquery_merge``): all three tables are staged,
    then merged on their ids; without it they are appended. Dead letters go to the local
    errors file when there is a local sink, else to the BigQuery errors table. Streaming
    writes local files per minute of arrival (``transforms.streaming_sink``).
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
        traffic | "WriteSubnetTraffic" >> WriteExtraTable(
            SUBNET_TRAFFIC, settings.output, bigquery, window_s, staging_suffix),
        denied | "WriteDeniedFlows" >> WriteExtraTable(
            DENIED_FLOWS, settings.output, bigquery, window_s, staging_suffix),
    ]
    if bigquery is not None:
        staging = staging_table(bigquery.table, staging_suffix) if staging_suffix else None
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
            ("streaming local sink", StreamingSinkOptions), ("BigQuery sink", BigQueryOptions)],
            omit=["--sensor", "--byte_accounting"])  # flows are scoped by ENI; IP bytes only
        return 0
    options = PipelineOptions(argv_list)
    try:
        extra = unknown_flags(options, argv_list)  # first: it reports bad values in one line
        if extra:
            raise OptionsError(f"unknown option(s): {', '.join(extra)}")
        own = options.view_as(VpcFlowsOptions)
        if own.kinesis_stream and not own.kinesis_stop_at_latest:
            options.view_as(StandardOptions).streaming = True
        bigquery = resolve_bigquery_config(options)
        insert_mode = bigquery_insert_mode(options, bigquery) if bigquery else None
        FileSystems.set_options(options)  # s3:// and gs:// credentials, endpoints, regions
        config = parse_config(options, to_bigquery=bigquery is not None)
        default_runner(options)
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
        staging_suffix = None
        if bigquery is not None:
            prepare_table(bigquery)  # an incompatible table fails here, before any work
            prepare_extra_tables(bigquery)
            if insert_mode == MERGE:
                staging_suffix = job_suffix()
                prepare_staging_table(bigquery, suffix=staging_suffix)
                prepare_extra_staging_tables(bigquery, staging_suffix)
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
    build(pipeline, config, subnets, startup_dead_letters, bigquery, staging_suffix)
    result = pipeline.run()
    if launched_elsewhere(result, options, config.streaming):
        return 0
    if config.streaming:
        exit_on_interrupt()
        result.wait_until_finish()
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
