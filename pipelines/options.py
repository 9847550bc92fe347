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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
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
from transforms.build_flows import DEFAULT_SHARDS

USAGE_ERROR = 2


def env_default(name: str, default: object = None) -> object:
    """The default for option ``name``: ``$FLOWBEAM_<NAME>`` when set, else ``default``."""
    return os.environ.get(f"FLOWBEAM_{name.upper()}", default)


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


class LocalSinkOptions(PipelineOptions):
    """The local sink: Parquet flow files and JSON-lines dead letters in a directory."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--output", default=env_default("output"),
            help="Directory for flows-*.parquet and errors-*.jsonl (the local sink). Required "
                 "unless flows go to BigQuery (--output_table or --bq_dataset).")


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
                      flows.flow_shards)


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


def print_help(prog: str, description: str | None,
               groups: Sequence[tuple[str, type[PipelineOptions]]]) -> None:
    """flowbeam's own options (Beam's PipelineOptions --help lists none of them)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Beam's own options (--runner, --project, --temp_location, ...) apply as usual.")
    for title, options_class in groups:
        options_class._add_argparse_args(parser.add_argument_group(title))
    parser.print_help()


def default_runner(options: PipelineOptions) -> None:
    """The DirectRunner's in-process engine, without its Prism probe (a download), unless
    ``--runner`` was given."""
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = "FnApiRunner"
