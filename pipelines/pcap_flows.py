"""The pcap batch pipeline: capture files to flow records.

    python -m pipelines.pcap_flows --input 'captures/*.pcap.gz' --output out/

Reads local paths, globs, gs:// and s3:// (Beam filesystems), gzip'd or not, classic pcap
and pcapng; writes ``out/flows-*.parquet`` and ``out/errors-*.jsonl`` (dead letters) and prints
a summary. Every option can also come from ``FLOWBEAM_<NAME>``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from flowbeam.env_options import env_default, unknown_environment
from flowbeam.packets.range_pool import POOL_RANGE_BYTES
from pipelines.local_cores import exit_after_run, freeze_imported_objects, local_workers
from pipelines.options import (
    BATCH_RUNNER,
    USAGE_ERROR,
    BigQueryOptions,
    FlowConfig,
    FlowOptions,
    InputOptions,
    LocalSinkOptions,
    OptionsError,
    bigquery_insert_mode,
    check_inputs,
    default_runner,
    flow_config,
    input_patterns,
    invoked_as,
    launched_elsewhere,
    print_help,
    resolve_bigquery_config,
    unknown_flags,
)
from pipelines.summary import RunSummary, summarize
from transforms.bigquery_config import BigQueryConfig, BigQueryConfigError, TableRef
from transforms.bigquery_merge import MERGE, prepare_staging_table
from transforms.bigquery_tables import prepare_table
from transforms.bigquery_write import WriteDeadLettersToBigQuery, WriteFlowsToBigQuery
from transforms.build_flows import BuildFlows
from transforms.capture_files import DecodeCaptures
from transforms.dead_letters import CountDeadLettersFn
from transforms.local_sink import WriteDeadLetters, WriteFlowsToParquet, remove_earlier_outputs
from transforms.progress import PROGRESS

LOG = logging.getLogger(__name__)
# --help's text (plain: the module docstring's markup would show as is).
DESCRIPTION = """\
Capture files to flow records. Reads local paths, globs, gs:// and s3:// paths, gzip'd or
not, classic pcap and pcapng; writes DIR/flows-*.parquet and DIR/errors-*.jsonl (dead
letters) and/or a BigQuery table, and prints a summary. Every option can also come from
FLOWBEAM_<NAME> (FLOWBEAM_INPUT: several patterns separated by commas); the command line wins.
Exit status: 0 when a capture was read, 1 when none could be, 2 for a usage error."""


class CaptureSplitOptions(PipelineOptions):
    """How big captures are spread over workers (``transforms.capture_ranges``) or over local
    processes (``flowbeam.packets.range_pool``)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--split_mb", type=float, default=env_default("split_mb"),
            help="Decode an uncompressed capture bigger than this many MB as byte ranges of "
                 "about this size, on several workers at once; the rows are a whole read's "
                 f"(default: {AUTO_SPLIT_MB:g} on Dataflow or with local worker processes, "
                 "--direct_num_workers=N --direct_running_mode=multi_processing; else 0: "
                 "every file whole).")
        parser.add_argument(
            "--decode_processes", type=int, default=env_default("decode_processes"),
            help="Decode a local, uncompressed capture bigger than "
                 f"{POOL_RANGE_BYTES >> 20} MB as byte ranges in this many local processes "
                 "at once; the rows are a whole read's (default: one per core when the "
                 "pipeline runs in this process without --split_mb; else 1).")


# Ranges of this size keep two local workers evenly busy on a capture of a few GB, and give a
# Dataflow job many ranges to spread; each costs a few MB of re-read at its edges.
AUTO_SPLIT_MB = 256.0
# Runners whose workers are spread over machines: a big capture is always worth splitting.
DISTRIBUTED_RUNNERS = ("DataflowRunner",)


def split_mb_of(options: PipelineOptions, workers: int = 1) -> float:
    """``--split_mb``, validated; when not given, ``AUTO_SPLIT_MB`` on a distributed runner or
    with several local ``workers``, else 0."""
    split_mb = options.view_as(CaptureSplitOptions).split_mb
    if split_mb is None:
        distributed = options.view_as(StandardOptions).runner in DISTRIBUTED_RUNNERS
        return AUTO_SPLIT_MB if distributed or workers > 1 else 0.0
    if split_mb < 0:
        raise OptionsError(f"--split_mb must be 0 (no splits) or positive, got {split_mb:g}")
    return split_mb


def decode_processes_of(options: PipelineOptions, workers: int = 1,
                        split_mb: float = 0.0) -> int:
    """``--decode_processes``, validated; when not given, one per core when the in-process
    runner (one local worker) reads files whole, else 1: Beam's own workers use the cores."""
    processes = options.view_as(CaptureSplitOptions).decode_processes
    if processes is None:
        in_process = options.view_as(StandardOptions).runner == BATCH_RUNNER
        return (os.cpu_count() or 1) if in_process and workers == 1 and not split_mb else 1
    if processes < 1:
        raise OptionsError(f"--decode_processes must be 1 or more, got {processes}")
    return processes


@dataclass(frozen=True)
class PcapFlowsConfig:
    """The validated options the pipeline is built from."""

    inputs: tuple[str, ...]
    flows: FlowConfig
    split_mb: float = 0.0  # whole files
    decode_processes: int = 1


def parse_config(options: PipelineOptions, to_bigquery: bool = False,
                 workers: int = 1) -> PcapFlowsConfig:
    """Validate the options; raise ``OptionsError`` with a message a user can act on.

    ``to_bigquery``: flows go to BigQuery, so the local sink (``--output``) is optional;
    ``workers``: the local worker processes (``local_workers``), for the default split size
    and decoding processes.
    """
    inputs = input_patterns(options)
    if not inputs:
        raise OptionsError("--input is required (a capture file, glob, gs:// or s3:// path)")
    split_mb = split_mb_of(options, workers)
    return PcapFlowsConfig(inputs, flow_config(options, to_bigquery), split_mb,
                           decode_processes_of(options, workers, split_mb))


def build(pipeline: beam.Pipeline, config: PcapFlowsConfig,
          startup_dead_letters: Sequence[dict] = (),
          bigquery: BigQueryConfig | None = None,
          staging: TableRef | None = None) -> dict[str, beam.PCollection]:
    """Wire the pipeline: patterns -> fragments -> flows -> local sink and/or BigQuery.

    ``staging``: the job's staging table when rows are merged into BigQuery (the batch
    default, ``--bq_insert_mode merge``) rather than appended.

    Dead letters (unreadable inputs, rows BigQuery rejected) go to the local errors file when
    there is a local sink, else to the BigQuery errors table (rejected rows are written there
    by the BigQuery sink itself).
    """
    settings = config.flows
    decoded = (
        pipeline
        | "Patterns" >> beam.Create(list(config.inputs))
        | "DecodeCaptures" >> DecodeCaptures(
            settings.idle_timeout_s, settings.active_timeout_s, settings.byte_accounting,
            settings.sensor, config.split_mb, config.decode_processes)
    )
    flows = decoded["fragments"] | "BuildFlows" >> BuildFlows(
        settings.idle_timeout_s, settings.active_timeout_s, source="pcap",
        shards=settings.flow_shards)
    input_dead_letters = (
        (decoded["dead_letters"],
         pipeline | "StartupDeadLetters" >> beam.Create(list(startup_dead_letters)))
        | "InputDeadLetters" >> beam.Flatten()
    )
    rejected = []
    if bigquery is not None:
        rejected.append(flows | "WriteFlowsToBigQuery" >> WriteFlowsToBigQuery(
            bigquery, staging=staging))
    dead_letters = (
        (input_dead_letters, *rejected)
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDeadLetters" >> beam.ParDo(CountDeadLettersFn())
    )
    if settings.output:
        _ = flows | "WriteFlows" >> WriteFlowsToParquet(settings.output)
        _ = dead_letters | "WriteDeadLetters" >> WriteDeadLetters(settings.output)
    elif bigquery is not None:
        _ = input_dead_letters | "WriteDeadLettersToBigQuery" >> WriteDeadLettersToBigQuery(
            bigquery)
    return {"flows": flows, "dead_letters": dead_letters}


def run(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline; returns the process exit code: 0 when at least one capture was read
    (other inputs may have failed: see the summary and the dead letters), 1 when none could
    be, 2 for a usage error."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv_list or "--help" in argv_list:
        print_help(invoked_as("pipelines.pcap_flows", "pcap"), DESCRIPTION, [
            ("pcap pipeline: capture files", InputOptions),
            ("big captures", CaptureSplitOptions), ("flows", FlowOptions),
            ("local sink", LocalSinkOptions), ("BigQuery sink", BigQueryOptions)])
        return 0
    options = PipelineOptions(argv_list)
    default_runner(options)
    try:
        extra = unknown_flags(options, argv_list)
        if extra:
            raise OptionsError(f"unknown option(s): {', '.join(extra)}")
        bigquery = resolve_bigquery_config(options)
        insert_mode = bigquery_insert_mode(options, bigquery) if bigquery else None
        config = parse_config(options, to_bigquery=bigquery is not None,
                              workers=local_workers(options))
    except (OptionsError, BigQueryConfigError) as error:
        print(f"flowbeam: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    for warning in unknown_environment():
        print(f"flowbeam: warning: {warning}", file=sys.stderr)
    FileSystems.set_options(options)  # s3:// and gs:// credentials, endpoints, regions
    matched: set[str] = set()
    startup_dead_letters = check_inputs(config.inputs, matched)
    staging = None
    if bigquery is not None:
        try:
            prepare_table(bigquery)  # an incompatible table fails here, before any work
            if insert_mode == MERGE:
                staging = prepare_staging_table(bigquery)
        except BigQueryConfigError as error:
            print(f"flowbeam: error: {error}", file=sys.stderr)
            return USAGE_ERROR
    if config.flows.output:
        replaced = remove_earlier_outputs(config.flows.output)
        if replaced:
            print(f"flowbeam: replacing {len(replaced)} files of an earlier run in "
                  f"{config.flows.output}", file=sys.stderr)
    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config, startup_dead_letters, bigquery, staging)
    PROGRESS.start(len(matched))
    result = pipeline.run()
    if launched_elsewhere(result, options, streaming=False):
        return 0
    result.wait_until_finish()
    PROGRESS.finish()
    summary: RunSummary = summarize(
        result, time.monotonic() - started, unmatched_inputs=len(startup_dead_letters),
        output=config.flows.output, table=bigquery.table.spec if bigquery else None)
    print(summary.render())
    if summary.captures_read == 0:
        print("flowbeam: error: no capture could be read", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    freeze_imported_objects()
    exit_after_run(run())


if __name__ == "__main__":
    main()
