"""The options every flowbeam pipeline shares, in one place.

Each pipeline module adds only its own source's options (``--input``, ``--subscription``, ...);
the flow engine's (timeouts, byte accounting, shards, sensor), the local sink's (``--output``)
and the BigQuery sink's are defined here once, so they mean the same in every pipeline.

Every option ``--name`` can also come from ``FLOWBEAM_<NAME>`` so a container (a flex
template, a Kubernetes job) can be configured without rewriting its command line. The command
line wins over the environment; argparse converts the string with the option's ``type``.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from flowbeam.env_options import (
    ENV_PREFIX,
    env_default,
)
from transforms.bigquery_config import (
    DEFAULT_TABLE,
    ERRORS_TABLE_SUFFIX,
    FILE_LOADS,
    WRITE_METHODS,
    BigQueryConfig,
    check_file_loads_location,
    load_key_file,
    normalize_endpoint,
    resolve_table,
    resolve_write_method,
)
from transforms.bigquery_merge import INSERT_MODES, resolve_insert_mode
from transforms.build_flows import DEFAULT_SHARDS
from transforms.dead_letters import dead_letter
from transforms.streaming_sink import DEFAULT_WINDOW_S as DEFAULT_OUTPUT_EVERY_S

USAGE_ERROR = 2


class OptionsError(ValueError):
    """A bad command line: reported as a usage error (exit 2)."""


class FlowOptions(PipelineOptions):
    """How fragments become flows: the same meaning in every pipeline."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
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
        parser.add_argument(
            "--sensor", default=env_default("sensor", ""),
            help="Name of the observation point, written to the sensor column and part of "
                 "the flow key (two sensors never merge each other's flows). Default: none.")


class InputOptions(PipelineOptions):
    """``--input``, shared by the batch pipelines (pcap, VPC Flow Logs): Beam registers every
    options class of the process in one parser, so a flag may be defined only once."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--input", action="append", default=None,
            help="Input file, glob, gs:// or s3:// path (.gz is decompressed); repeatable. "
                 "FLOWBEAM_INPUT may hold several, separated by commas.")


def input_patterns(options: PipelineOptions) -> tuple[str, ...]:
    """The ``--input`` patterns (else ``$FLOWBEAM_INPUT``'s, comma-separated), local ones
    made absolute (``absolute_pattern``); empty when none was given."""
    from_env = str(env_default("input", "")).split(",")
    inputs = options.view_as(InputOptions).input or [
        pattern.strip() for pattern in from_env if pattern.strip()]
    return tuple(absolute_pattern(pattern) for pattern in inputs)


class LocalSinkOptions(PipelineOptions):
    """The local sink: Parquet flow files and JSON-lines dead letters in a directory."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--output", default=env_default("output"),
            help="Directory for flows-*.parquet and errors-*.jsonl (the local sink). Required "
                 "unless flows go to BigQuery (--output_table or --bq_dataset).")


class StreamingSinkOptions(PipelineOptions):
    """How often a streaming job's local sink starts new files."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--output_every", type=float,
            default=env_default("output_every", DEFAULT_OUTPUT_EVERY_S),
            help="Streaming: the local sink writes the rows of every this many seconds to new "
                 f"files (default {DEFAULT_OUTPUT_EVERY_S:g}).")


def output_every_s(options: PipelineOptions) -> float:
    """``--output_every``, validated."""
    every = options.view_as(StreamingSinkOptions).output_every
    if every <= 0:
        raise OptionsError(f"--output_every must be positive, got {every:g}")
    return every


class BigQueryOptions(PipelineOptions):
    """Where and how flow rows go to BigQuery (each flag also from ``FLOWBEAM_<NAME>``)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--output_table", default=env_default("output_table"),
            help="Destination table, PROJECT:DATASET.TABLE or PROJECT.DATASET.TABLE "
                 "(DATASET.TABLE takes the project from --bq_project or --project). "
                 "Alternative to --bq_project/--bq_dataset/--bq_table.")
        parser.add_argument(
            "--bq_project", default=env_default("bq_project"),
            help="Project of the destination table (default: --project).")
        parser.add_argument(
            "--bq_dataset", default=env_default("bq_dataset"),
            help="Dataset of the destination table; it must exist (its location is yours "
                 "to choose). Giving it, or --output_table, turns the BigQuery sink on.")
        parser.add_argument(
            "--bq_table", default=env_default("bq_table", DEFAULT_TABLE),
            help=f"Destination table name (default {DEFAULT_TABLE}); dead letters go to "
                 f"<table>{ERRORS_TABLE_SUFFIX}.")
        parser.add_argument(
            "--bq_write_method", default=env_default("bq_write_method"),
            choices=tuple(WRITE_METHODS),
            help="file_loads (default in batch), streaming_inserts (default in streaming "
                 "and with --bq_endpoint) or storage_write_api (needs Java).")
        parser.add_argument(
            "--bq_endpoint",
            default=env_default("bq_endpoint", os.environ.get("BIGQUERY_EMULATOR_HOST")),
            help="BigQuery REST endpoint URL, e.g. an emulator's http://127.0.0.1:9050 "
                 "(default: $BIGQUERY_EMULATOR_HOST); uses anonymous credentials.")
        parser.add_argument(
            "--bq_insert_mode", default=env_default("bq_insert_mode"), choices=INSERT_MODES,
            help="merge (default in batch): stage the rows and MERGE them into the table on "
                 "their id, so a re-run adds no duplicate; append (default in streaming): "
                 "write straight into the table.")
        parser.add_argument(
            "--service_account_key_file", default=env_default("service_account_key_file"),
            help="Service account JSON key (default: Application Default Credentials). "
                 "Read where the pipeline runs locally; Dataflow workers use their own "
                 "service account (--service_account_email).")


@dataclass(frozen=True)
class FlowConfig:
    """The validated flow-engine and local-sink options."""

    output: str | None
    idle_timeout_s: float
    active_timeout_s: float
    byte_accounting: str
    flow_shards: int
    sensor: str = ""


def flow_config(options: PipelineOptions, to_bigquery: bool = False) -> FlowConfig:
    """Validate the shared options; raise ``OptionsError`` with a message a user can act on.

    ``to_bigquery``: flows go to BigQuery, so the local sink (``--output``) is optional.
    """
    flows = options.view_as(FlowOptions)
    output = options.view_as(LocalSinkOptions).output
    if not output and not to_bigquery:
        raise OptionsError("--output DIR (or a BigQuery table: --output_table) is required")
    if flows.idle_timeout <= 0:
        raise OptionsError(f"--idle_timeout must be positive, got {flows.idle_timeout}")
    if flows.active_timeout <= 0:
        raise OptionsError(f"--active_timeout must be positive, got {flows.active_timeout}")
    if flows.flow_shards < 1:
        raise OptionsError(f"--flow_shards must be at least 1, got {flows.flow_shards}")
    return FlowConfig(output, flows.idle_timeout, flows.active_timeout, flows.byte_accounting,
                      flows.flow_shards, flows.sensor or "")


def resolve_bigquery_config(options: PipelineOptions) -> BigQueryConfig | None:
    """The validated BigQuery settings, or None when no BigQuery output was asked for
    (neither ``--output_table`` nor ``--bq_dataset``). Raises ``BigQueryConfigError``."""
    opts = options.view_as(BigQueryOptions)
    if not opts.output_table and not opts.bq_dataset:
        return None
    cloud = options.view_as(GoogleCloudOptions)
    table = resolve_table(opts.output_table, opts.bq_project, opts.bq_dataset, opts.bq_table,
                          cloud.project)
    endpoint = normalize_endpoint(opts.bq_endpoint) if opts.bq_endpoint else None
    method = resolve_write_method(
        opts.bq_write_method, streaming=bool(options.view_as(StandardOptions).streaming),
        emulated=endpoint is not None)
    if method == FILE_LOADS:
        check_file_loads_location(cloud.temp_location)
    if opts.service_account_key_file:
        load_key_file(opts.service_account_key_file)
    return BigQueryConfig(table, method, endpoint, opts.service_account_key_file)


def bigquery_insert_mode(options: PipelineOptions, config: BigQueryConfig) -> str:
    """``--bq_insert_mode``, defaulted by pipeline mode and checked against the write method
    (``transforms.bigquery_merge``). Raises ``BigQueryConfigError``."""
    return resolve_insert_mode(
        options.view_as(BigQueryOptions).bq_insert_mode,
        streaming=bool(options.view_as(StandardOptions).streaming),
        write_method=config.write_method)


def unknown_flags(options: PipelineOptions, argv: Sequence[str]) -> list[str]:
    """Flags no registered option class knows, with a suggestion when one is close.

    Beam would log and discard them; a mistyped ``--idle-timeout`` must not silently run
    with the default instead. A bad value (``--idle_timeout abc``, or ``FLOWBEAM_IDLE_TIMEOUT=abc``)
    raises ``OptionsError`` with argparse's one-line reason instead of Beam's usage dump of
    every Beam option.
    """
    parsers: list[argparse.ArgumentParser] = []

    def one_line_errors(parser: argparse.ArgumentParser) -> None:
        parser.error = functools.partial(_bad_value, list(argv))  # type: ignore[method-assign]
        parsers.append(parser)

    beam_options_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_options_log.level
    beam_options_log.setLevel(logging.ERROR)  # "Discarding unparseable args": reported below
    try:
        options.get_all_options(add_extra_args_fn=one_line_errors)
    finally:
        beam_options_log.setLevel(level)
    parser = parsers[0]
    _, unknown = parser.parse_known_args(list(argv))
    known = [flag for action in parser._actions for flag in action.option_strings]
    problems = []
    for arg in unknown:
        if not arg.startswith("-"):
            continue
        name = arg.split("=", 1)[0]
        # Only the name's inner dashes: "--idle-timeout" -> "--idle_timeout".
        spelled = "--" + name.lstrip("-").replace("-", "_")
        close = difflib.get_close_matches(spelled, known, n=1)
        problems.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return problems


def _bad_value(argv: Sequence[str], message: str) -> NoReturn:
    """argparse's error hook: its message as an ``OptionsError``, naming ``FLOWBEAM_<NAME>``
    when the bad value came from the environment rather than the command line."""
    match = re.fullmatch(r"argument (--\w+)(?:/\S+)?: (.*)", message, re.DOTALL)
    if match:
        flag, problem = match.groups()
        variable = f"{ENV_PREFIX}{flag[2:].upper()}"
        given = any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)
        if not given and variable in os.environ:
            message = f"{variable}: {problem}"
    raise OptionsError(message)


def invoked_as(module: str, command: str) -> str:
    """How the user started a pipeline, for its usage line: ``flowbeam pcap`` from the
    ``flowbeam`` command, else ``python -m pipelines.pcap_flows``."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return f"flowbeam {command}" if script == "flowbeam" else f"python -m {module}"


def print_help(prog: str, description: str | None,
               groups: Sequence[tuple[str, type[PipelineOptions]]],
               omit: Sequence[str] = ()) -> None:
    """flowbeam's own options (Beam's PipelineOptions --help lists none of them); ``omit``:
    shared options this pipeline refuses."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Beam's own options (--runner, --project, --temp_location, ...) apply as usual.")
    for title, options_class in groups:
        options_class._add_argparse_args(parser.add_argument_group(title))
    for action in parser._actions:
        if set(action.option_strings) & set(omit):
            action.help = argparse.SUPPRESS
    parser.print_help()


# The local runners: Beam's in-process engine for batch, and for streaming a
# BundleBasedDirectRunner that can read Kinesis.
BATCH_RUNNER = "FnApiRunner"
STREAMING_RUNNER = "transforms.direct_streaming.StreamingDirectRunner"


def default_runner(options: PipelineOptions) -> None:
    """The DirectRunner's in-process engine, without its Prism probe (a download), unless
    ``--runner`` was given. Streaming takes the DirectRunner's streaming engine, in the
    variant that can also read Kinesis (``transforms.direct_streaming``): the FnApiRunner
    cannot read Pub/Sub, nor hand on a stream's records while it is still reading it."""
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = STREAMING_RUNNER if standard.streaming else BATCH_RUNNER


def launched_elsewhere(result: Any, options: PipelineOptions, streaming: bool) -> bool:
    """Whether the job runs elsewhere, with nothing to wait for here (and says so): a job
    graph written to ``--template_location`` (a template launch; Dataflow starts the job), or
    a streaming job submitted to Dataflow, which runs until drained or cancelled."""
    if not getattr(result, "has_job", True):
        print("flowbeam: job graph written to --template_location; Dataflow runs the job")
        return True
    if streaming and options.view_as(StandardOptions).runner == "DataflowRunner":
        print(f"flowbeam: streaming job {result.job_id()} submitted", file=sys.stderr)
        return True
    return False


def local_streaming(options: PipelineOptions) -> bool:
    """Whether the job runs on the local streaming runner (after ``default_runner``)."""
    return options.view_as(StandardOptions).runner == STREAMING_RUNNER


def absolute_pattern(pattern: str) -> str:
    """A local pattern as an absolute one; others (gs://, s3://) as they are.

    Beam's local filesystem matches a bare ``*.pcap`` to nothing, and names the same file
    ``a.pcap`` or ``/here/a.pcap`` depending on the pattern that matched it, so a file given
    twice (``a.pcap`` and ``*.pcap``) would not be recognised as one.
    """
    if FileSystems.get_scheme(pattern) is not None:
        return pattern
    return os.path.abspath(os.path.expanduser(pattern))


def check_inputs(patterns: Sequence[str], paths: set[str] | None = None) -> list[dict]:
    """Match every pattern once at start-up, so an empty glob or a bad path gets a clear
    message before any work starts; returns one dead letter per pattern that matched nothing.
    ``paths``, when given, collects the files matched (once each: the progress total)."""
    problems = []
    for pattern in patterns:
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except (OSError, ValueError, beam.io.filesystem.BeamIOError) as error:
            reason = f"cannot list {pattern!r}: {error}"
        else:
            if paths is not None:
                paths.update(metadata.path for metadata in matched)
            if matched:
                continue
            reason = f"no file matches {pattern!r}"
        print(f"flowbeam: {reason}", file=sys.stderr)
        problems.append(dead_letter("match_files", reason, pattern))
    return problems
