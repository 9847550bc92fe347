"""The summary printed at the end of a run, read from the pipeline's Beam metrics.

Each line is one labelled number whose label says what it counts, so that a run over many
inputs answers "what was read, what was not, and where did the rows go" without the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult

from transforms import counters
from transforms.capture_reports import DECODED_REASONS, REASON_WORDS

LABEL_WIDTH = 25


@dataclass(frozen=True)
class RunSummary:
    captures_read: int  # pcap/pcapng files read, damaged ones included
    captures_damaged: int  # of those, read only up to a cut or corruption
    not_captures: int  # files in another format (or a .gz that does not decompress)
    unreadable: int  # directories, permission denied
    unmatched_inputs: int  # --input patterns that matched no file
    packets: int
    flows: int
    bytes: int
    dead_letters: int
    elapsed_s: float
    malformed: dict[str, int] = field(default_factory=dict)
    output: str | None = None  # the local sink's directory
    rows_written: dict[str, int] = field(default_factory=dict)  # local sink, per status
    table: str | None = None  # the BigQuery table
    bigquery_rejected: int = 0

    @property
    def packets_per_s(self) -> float:
        return self.packets / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def render(self) -> str:
        """One labelled number a line, each label saying what it counts."""
        lines: list[tuple[str, object]] = [
            ("captures read", self.captures_read),
            ("  of which damaged", self.captures_damaged),
            ("files not captures", self.not_captures),
            ("files unreadable", self.unreadable),
            ("inputs matching nothing", self.unmatched_inputs),
            ("packets", self.packets),
        ]
        for reason, count in sorted(self.malformed.items()):
            # Packets counted with ports 0 are among the packets above; skipped ones are not.
            label = "  with ports unknown" if reason in DECODED_REASONS else "skipped packets"
            lines.append((label, f"{count} {REASON_WORDS.get(reason, reason)} ({reason})"))
        lines += [("flows", self.flows), ("bytes", self.bytes)]
        if self.output is not None:
            lines.append(("rows written", f"{sum(self.rows_written.values())} to "
                                          f"{self.output} (flows-*.parquet)"))
            lines += [(f"  {status}", count) for status, count in sorted(self.rows_written.items())]
        if self.table is not None:
            lines.append(("rows to BigQuery", f"{self.flows - self.bigquery_rejected} to "
                                              f"{self.table} ({self.bigquery_rejected} rejected)"))
        lines += [
            ("dead letters", self.dead_letters),
            ("elapsed", f"{self.elapsed_s:.2f} s"),
            ("packets/s", f"{self.packets_per_s:,.0f}"),
        ]
        return "\n".join(["flowbeam summary", *(f"  {label:<{LABEL_WIDTH}}{value}"
                                                 for label, value in lines)])


def counter_values(result: PipelineResult) -> dict[str, int]:
    """Committed (or, where the runner has none, attempted) flowbeam counters by name."""
    query = result.metrics().query(MetricsFilter().with_namespace(counters.NAMESPACE))
    totals: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals


def _by_suffix(values: dict[str, int], prefix: str) -> dict[str, int]:
    return {name[len(prefix):]: value for name, value in values.items()
            if name.startswith(prefix) and value}


def summarize(result: PipelineResult, elapsed_s: float, unmatched_inputs: int = 0,
              output: str | None = None, table: str | None = None) -> RunSummary:
    """The summary of a finished run; ``unmatched_inputs`` comes from the start-up match,
    ``output`` and ``table`` say where rows went (the local sink, BigQuery)."""
    values = counter_values(result)
    return RunSummary(
        captures_read=values.get(counters.FILES_READ, 0),
        captures_damaged=values.get(counters.FILES_DAMAGED, 0),
        not_captures=values.get(counters.FILES_FAILED, 0),
        unreadable=values.get(counters.FILES_UNREADABLE, 0),
        unmatched_inputs=unmatched_inputs,
        packets=values.get(counters.PACKETS, 0),
        flows=values.get(counters.FLOW_ROWS, 0),
        bytes=values.get(counters.BYTES, 0),
        dead_letters=values.get(counters.DEAD_LETTERS, 0),
        elapsed_s=elapsed_s,
        malformed=_by_suffix(values, counters.MALFORMED_PREFIX),
        output=output,
        rows_written=_by_suffix(values, counters.PARQUET_ROWS_PREFIX),
        table=table,
        bigquery_rejected=values.get(counters.BIGQUERY_REJECTED_ROWS, 0),
    )
