"""The streaming pipeline: packet batches from Pub/Sub (``flowbeam capture``) to flow records.

    python -m pipelines.pubsub_flows --subscription projects/P/subscriptions/S --output out/

Runs until stopped (Ctrl-C locally; drain or cancel on Dataflow). Rows appear in
``out/flows-*.parquet``, a new file every ``--output_every`` seconds (processing time),
and/or in BigQuery (``--output_table``, streaming inserts by default); undecodable messages
become dead letters (``out/errors-*.jsonl`` or ``<table>_errors``) naming the message id.

Event time is the packets' own time: a message's timestamp is its batch's first packet time
(the ``ts`` attribute), so on Dataflow the watermark never passes a packet of a batch still
in the backlog, and flows close when their idle timeout has passed *in packet time*. Every
option can also come from ``FLOWBEAM_<NAME>``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from flowbeam.agent.batch_format import TIMESTAMP_ATTRIBUTE
from flowbeam.env_options import env_default
from pipelines.local_cores import exit_on_interrupt
from pipelines.options import (
    USAGE_ERROR,
    BigQueryOptions,
    FlowConfig,
    FlowOptions,
    LocalSinkOptions,
    OptionsError,
    StreamingSinkOptions,
    bigquery_insert_mode,
    default_runner,
    flow_config,
    launched_elsewhere,
    output_every_s,
    print_help,
    resolve_bigquery_config,
    unknown_flags,
)
from transforms.bigquery_config import BigQueryConfig, BigQueryConfigError
from transforms.bigquery_tables import prepare_table
from transforms.bigquery_write import WriteDeadLettersToBigQuery, WriteFlowsToBigQuery
from transforms.build_flows import BuildFlows
from transforms.dead_letters import CountDeadLettersFn
from transforms.pubsub_batches import DecodePacketBatches
from transforms.streaming_sink import (
    WriteDeadLettersEveryWindow,
    WriteFlowsEveryWindow,
)

SOURCE = "pubsub"
_SUBSCRIPTION = re.compile(r"projects/[^/]+/subscriptions/[^/]+")


class PubsubFlowsOptions(PipelineOptions):
    """The streaming pipeline's own options; the rest are the shared ones of
    ``pipelines.options``."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--subscription", default=env_default("subscription"),
            help="Pub/Sub subscription to the capture agents' topic, "
                 "projects/PROJECT/subscriptions/NAME.")


@dataclass(frozen=True)
class PubsubFlowsConfig:
    """The validated options the pipeline is built from."""

    subscription: str
    output_every_s: float
    flows: FlowConfig


def parse_config(options: PipelineOptions, to_bigquery: bool = False) -> PubsubFlowsConfig:
    """Validate the options; raise ``OptionsError`` with a message a user can act on.

    ``to_bigquery``: flows go to BigQuery, so the local sink (``--output``) is optional.
    """
    own = options.view_as(PubsubFlowsOptions)
    if not own.subscription:
        raise OptionsError("--subscription is required (projects/PROJECT/subscriptions/NAME)")
    if not _SUBSCRIPTION.fullmatch(own.subscription):
        raise OptionsError(f"--subscription must be projects/PROJECT/subscriptions/NAME, "
                           f"got {own.subscription!r}")
    every = output_every_s(options)
    flows = flow_config(options, to_bigquery)
    if flows.sensor:
        raise OptionsError("--sensor is not an option of the streaming pipeline: every batch "
                           "names its sensor (flowbeam capture --sensor)")
    return PubsubFlowsConfig(own.subscription, every, flows)


def build(pipeline: beam.Pipeline, config: PubsubFlowsConfig,
          bigquery: BigQueryConfig | None = None) -> dict[str, beam.PCollection]:
    """Wire the pipeline: messages -> fragments -> flows -> local sink and/or BigQuery.

    Dead letters (undecodable messages, rows BigQuery rejected) go to the local errors files
    when there is a local sink, else to the BigQuery errors table (rejected rows are written
    there by the BigQuery sink itself).
    """
    settings = config.flows
    decoded = (
        pipeline
        | "ReadBatches" >> beam.io.ReadFromPubSub(
            subscription=config.subscription, with_attributes=True,
            timestamp_attribute=TIMESTAMP_ATTRIBUTE)
        | "DecodePacketBatches" >> DecodePacketBatches(
            settings.idle_timeout_s, settings.active_timeout_s, settings.byte_accounting)
    )
    flows = decoded["fragments"] | "BuildFlows" >> BuildFlows(
        settings.idle_timeout_s, settings.active_timeout_s, source=SOURCE,
        shards=settings.flow_shards)
    rejected = []
    if bigquery is not None:
        rejected.append(flows | "WriteFlowsToBigQuery" >> WriteFlowsToBigQuery(bigquery))
    dead_letters = (
        (decoded["dead_letters"], *rejected)
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDeadLetters" >> beam.ParDo(CountDeadLettersFn())
    )
    if settings.output:
        _ = flows | "WriteFlows" >> WriteFlowsEveryWindow(settings.output, config.output_every_s)
        _ = dead_letters | "WriteDeadLetters" >> WriteDeadLettersEveryWindow(
            settings.output, config.output_every_s)
    elif bigquery is not None:
        _ = decoded["dead_letters"] | "WriteDeadLettersToBigQuery" >> WriteDeadLettersToBigQuery(
            bigquery)
    return {"flows": flows, "dead_letters": dead_letters}


def run(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline until it is stopped (Ctrl-C) or, on Dataflow, submit it; returns the
    process exit code: 0, or 2 for a usage error."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv_list or "--help" in argv_list:
        print_help("python -m pipelines.pubsub_flows", __doc__, [
            ("streaming pipeline", PubsubFlowsOptions), ("flows", FlowOptions),
            ("local sink", LocalSinkOptions),
            ("streaming local sink", StreamingSinkOptions), ("BigQuery sink", BigQueryOptions)],
            omit=["--sensor"])  # every batch names its sensor
        return 0
    options = PipelineOptions(argv_list)
    options.view_as(StandardOptions).streaming = True
    try:
        extra = unknown_flags(options, argv_list)
        if extra:
            raise OptionsError(f"unknown option(s): {', '.join(extra)}")
        bigquery = resolve_bigquery_config(options)
        if bigquery is not None:
            bigquery_insert_mode(options, bigquery)  # streaming appends; refuses "merge"
        config = parse_config(options, to_bigquery=bigquery is not None)
    except (OptionsError, BigQueryConfigError) as error:
        print(f"flowbeam: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    default_runner(options)
    if bigquery is not None:
        try:
            prepare_table(bigquery)  # an incompatible table fails here, before any work
        except BigQueryConfigError as error:
            print(f"flowbeam: error: {error}", file=sys.stderr)
            return USAGE_ERROR
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config, bigquery)
    result = pipeline.run()
    if launched_elsewhere(result, options, streaming=True):  # drained: open flows emitted
        return 0
    exit_on_interrupt()
    result.wait_until_finish()
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(run())


if __name__ == "__main__":
    main()
