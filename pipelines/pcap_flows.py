"""The pcap batch pipeline: capture files to flow records.

    python -m pipelines.pcap_flows --input 'captures/*.pcap.gz' --output out/

Reads local paths, globs, gs:// and s3:// (Beam filesystems), gzip'd or not, classic pcap
and pcapng; writes ``out/flows-*.parquet`` and ``out/errors-*.jsonl`` (dead letters) and prints
a summary. Every option can also come from ``FLOWBEAM_<NAME>``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import (
    USAGE_ERROR,
    BigQueryOptions,
    FlowConfig,
    FlowOptions,
    LocalSinkOptions,
    OptionsError,
    default_runner,
    env_default,
    flow_config,
    print_help,
    resolve_bigquery_config,
    unknown_flags,
)
from pipelines.summary import RunSummary, summarize
from transforms.bigquery_config import BigQueryConfig, BigQueryConfigError
from transforms.bigquery_tables import prepare_table
from transforms.bigquery_write import WriteDeadLettersToBigQuery, WriteFlowsToBigQuery
from transforms.build_flows import BuildFlows
from transforms.capture_files import DecodeCaptures
from transforms.dead_letters import CountDeadLettersFn, dead_letter
from transforms.local_sink import WriteDeadLetters, WriteFlowsToParquet

LOG = logging.getLogger(__name__)


class PcapFlowsOptions(PipelineOptions):
    """The pcap pipeline's own option; the rest are the shared ones of ``pipelines.options``."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--input", action="append", default=None,
            help="Capture file, glob, gs:// or s3:// path (.gz is decompressed); repeatable. "
                 "FLOWBEAM_INPUT may hold several, separated by commas.")


@dataclass(frozen=True)
class PcapFlowsConfig:
    """The validated options the pipeline is built from."""

    inputs: tuple[str, ...]
    flows: FlowConfig


def parse_config(options: PipelineOptions, to_bigquery: bool = False) -> PcapFlowsConfig:
    """Validate the options; raise ``OptionsError`` with a message a user can act on.

    ``to_bigquery``: flows go to BigQuery, so the local sink (``--output``) is optional.
    """
    from_env = str(env_default("input", "")).split(",")
    inputs = options.view_as(PcapFlowsOptions).input or [
        pattern.strip() for pattern in from_env if pattern.strip()]
    if not inputs:
        raise OptionsError("--input is required (a capture file, glob, gs:// or s3:// path)")
    return PcapFlowsConfig(tuple(inputs), flow_config(options, to_bigquery))


def check_inputs(patterns: Sequence[str]) -> list[dict]:
    """Match every pattern once at start-up, so an empty glob or a bad path gets a clear
    message before any work starts; returns one dead letter per pattern that matched nothing."""
    problems = []
    for pattern in patterns:
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except (OSError, ValueError, beam.io.filesystem.BeamIOError) as error:
            reason = f"cannot list {pattern!r}: {error}"
        else:
            if matched:
                continue
            reason = f"no file matches {pattern!r}"
        print(f"flowbeam: {reason}", file=sys.stderr)
        problems.append(dead_letter("match_files", reason, pattern))
    return problems


def build(pipeline: beam.Pipeline, config: PcapFlowsConfig,
          startup_dead_letters: Sequence[dict] = (),
          bigquery: BigQueryConfig | None = None) -> dict[str, beam.PCollection]:
    """Wire the pipeline: patterns -> fragments -> flows -> local sink and/or BigQuery.

    Dead letters (unreadable inputs, rows BigQuery rejected) go to the local errors file when
    there is a local sink, else to the BigQuery errors table (rejected rows are written there
    by the BigQuery sink itself).
    """
    settings = config.flows
    decoded = (
        pipeline
        | "Patterns" >> beam.Create(list(config.inputs))
        | "DecodeCaptures" >> DecodeCaptures(
            settings.idle_timeout_s, settings.active_timeout_s, settings.byte_accounting)
    )
    flows = decoded.fragments | "BuildFlows" >> BuildFlows(
        settings.idle_timeout_s, settings.active_timeout_s, source="pcap",
        shards=settings.flow_shards)
    input_dead_letters = (
        (decoded.dead_letters,
         pipeline | "StartupDeadLetters" >> beam.Create(list(startup_dead_letters)))
        | "InputDeadLetters" >> beam.Flatten()
    )
    rejected = []
    if bigquery is not None:
        rejected.append(flows | "WriteFlowsToBigQuery" >> WriteFlowsToBigQuery(bigquery))
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
    """Run the pipeline; returns the process exit code (0 ok, 1 nothing read, 2 usage)."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv_list or "--help" in argv_list:
        print_help("python -m pipelines.pcap_flows", __doc__, [
            ("pcap pipeline", PcapFlowsOptions), ("flows", FlowOptions),
            ("local sink", LocalSinkOptions), ("BigQuery sink", BigQueryOptions)])
        return 0
    options = PipelineOptions(argv_list)
    try:
        extra = unknown_flags(options, argv_list)
        if extra:
            raise OptionsError(f"unknown option(s): {', '.join(extra)}")
        bigquery = resolve_bigquery_config(options)
        config = parse_config(options, to_bigquery=bigquery is not None)
    except (OptionsError, BigQueryConfigError) as error:
        print(f"flowbeam: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    default_runner(options)
    FileSystems.set_options(options)  # s3:// and gs:// credentials, endpoints, regions
    startup_dead_letters = check_inputs(config.inputs)
    if len(startup_dead_letters) == len(config.inputs):
        print("flowbeam: nothing to read", file=sys.stderr)
        return 1
    if bigquery is not None:
        try:
            prepare_table(bigquery)  # an incompatible table fails here, before any work
        except BigQueryConfigError as error:
            print(f"flowbeam: error: {error}", file=sys.stderr)
            return USAGE_ERROR
    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config, startup_dead_letters, bigquery)
    result = pipeline.run()
    result.wait_until_finish()
    summary: RunSummary = summarize(result, time.monotonic() - started)
    print(summary.render())
    return 0 if summary.files_read > 0 else 1


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(run())


if __name__ == "__main__":
    main()
