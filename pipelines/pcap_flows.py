"""The pcap batch pipeline: capture files to flow records.

    python -m pipelines.pcap_flows --input 'captures/*.pcap.gz' --output out/

Reads local paths, globs, gs:// and s3:// (Beam filesystems), gzip'd or not, classic pcap
and pcapng; writes ``out/flows-*.parquet`` and ``out/errors-*.jsonl`` (dead letters) and prints
a summary. Every option can also come from ``FLOWBEAM_<NAME>``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.options import env_default
from pipelines.summary import RunSummary, summarize
from transforms.bigquery_sink import (
    BigQueryConfig,
    BigQueryConfigError,
    BigQueryOptions,
    WriteDeadLettersToBigQuery,
    WriteFlowsToBigQuery,
    prepare_table,
    resolve_config,
)
from transforms.build_flows import DEFAULT_SHARDS, BuildFlows
from transforms.capture_files import DecodeCaptures
from transforms.dead_letters import CountDeadLettersFn, dead_letter
from transforms.local_sink import WriteDeadLetters, WriteFlowsToParquet

LOG = logging.getLogger(__name__)
USAGE_ERROR = 2


class PcapFlowsOptions(PipelineOptions):
    """Options of the pcap pipeline (each also read from ``FLOWBEAM_<NAME>``)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--input", action="append", default=None,
            help="Capture file, glob, gs:// or s3:// path (.gz is decompressed); repeatable. "
                 "FLOWBEAM_INPUT may hold several, separated by commas.")
        parser.add_argument(
            "--output", default=env_default("output"),
            help="Directory for flows-*.parquet and errors-*.jsonl (the local sink). Required "
                 "unless flows go to BigQuery (--output_table or --bq_dataset).")
        parser.add_argument(
            "--idle_timeout", type=float, default=env_default("idle_timeout", 120.0),
            help="Seconds without a packet that close a flow (default 120).")
        parser.add_argument(
            "--active_timeout", type=float, default=env_default("active_timeout", 1800.0),
            help="A longer flow is emitted in rows of at most this many seconds (default 1800).")
        parser.add_argument(
            "--byte_accounting", choices=("ip", "frame"),
            default=env_default("byte_accounting", "ip"),
            help="ip: IP total length (default; agrees with VPC Flow Logs); "
                 "frame: original frame length on the wire.")
        parser.add_argument(
            "--flow_shards", type=int, default=env_default("flow_shards", DEFAULT_SHARDS),
            help=f"State shards of the flow engine (default {DEFAULT_SHARDS}).")


class OptionsError(ValueError):
    """A bad command line: reported as a usage error (exit 2)."""


@dataclass(frozen=True)
class PcapFlowsConfig:
    """The validated options the pipeline is built from."""

    inputs: tuple[str, ...]
    output: str | None
    idle_timeout_s: float
    active_timeout_s: float
    byte_accounting: str
    flow_shards: int


def parse_config(options: PipelineOptions, to_bigquery: bool = False) -> PcapFlowsConfig:
    """Validate the options; raise ``OptionsError`` with a message a user can act on.

    ``to_bigquery``: flows go to BigQuery, so the local sink (``--output``) is optional.
    """
    opts = options.view_as(PcapFlowsOptions)
    from_env = str(env_default("input", "")).split(",")
    inputs = opts.input or [pattern.strip() for pattern in from_env if pattern.strip()]
    if not inputs:
        raise OptionsError("--input is required (a capture file, glob, gs:// or s3:// path)")
    if not opts.output and not to_bigquery:
        raise OptionsError("--output DIR (or a BigQuery table: --output_table) is required")
    if opts.idle_timeout <= 0:
        raise OptionsError(f"--idle_timeout must be positive, got {opts.idle_timeout}")
    if opts.active_timeout <= 0:
        raise OptionsError(f"--active_timeout must be positive, got {opts.active_timeout}")
    if opts.flow_shards < 1:
        raise OptionsError(f"--flow_shards must be at least 1, got {opts.flow_shards}")
    return PcapFlowsConfig(tuple(inputs), opts.output, opts.idle_timeout, opts.active_timeout,
                           opts.byte_accounting, opts.flow_shards)


def unknown_flags(options: PipelineOptions, argv: Sequence[str]) -> list[str]:
    """Flags no registered option class knows, with a suggestion when one is close.

    Beam would log and discard them; a mistyped ``--idle-timeout`` must not silently run
    with the default instead.
    """
    parsers: list[argparse.ArgumentParser] = []
    options.get_all_options(add_extra_args_fn=parsers.append)
    parser = parsers[0]
    _, unknown = parser.parse_known_args(list(argv))
    known = [flag for action in parser._actions for flag in action.option_strings]
    problems = []
    for arg in unknown:
        if not arg.startswith("-"):
            continue
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
        problems.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return problems


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
    decoded = (
        pipeline
        | "Patterns" >> beam.Create(list(config.inputs))
        | "DecodeCaptures" >> DecodeCaptures(
            config.idle_timeout_s, config.active_timeout_s, config.byte_accounting)
    )
    flows = decoded.fragments | "BuildFlows" >> BuildFlows(
        config.idle_timeout_s, config.active_timeout_s, source="pcap", shards=config.flow_shards)
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
    if config.output:
        _ = flows | "WriteFlows" >> WriteFlowsToParquet(config.output)
        _ = dead_letters | "WriteDeadLetters" >> WriteDeadLetters(config.output)
    elif bigquery is not None:
        _ = input_dead_letters | "WriteDeadLettersToBigQuery" >> WriteDeadLettersToBigQuery(
            bigquery)
    return {"flows": flows, "dead_letters": dead_letters}


def print_help() -> None:
    """flowbeam's own options (Beam's PipelineOptions --help lists none of them)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.pcap_flows", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Beam's own options (--runner, --project, --temp_location, ...) apply as usual.")
    PcapFlowsOptions._add_argparse_args(parser.add_argument_group("pcap pipeline"))
    BigQueryOptions._add_argparse_args(parser.add_argument_group("BigQuery sink"))
    parser.print_help()


def run(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline; returns the process exit code (0 ok, 1 nothing read, 2 usage)."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv_list or "--help" in argv_list:
        print_help()
        return 0
    options = PipelineOptions(argv_list)
    try:
        extra = unknown_flags(options, argv_list)
        if extra:
            raise OptionsError(f"unknown option(s): {', '.join(extra)}")
        bigquery = resolve_config(options)
        config = parse_config(options, to_bigquery=bigquery is not None)
    except (OptionsError, BigQueryConfigError) as error:
        print(f"flowbeam: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        # The DirectRunner's in-process engine, without its Prism probe (a download).
        standard.runner = "FnApiRunner"
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
