"""The summary printed at the end of a run, read from the pipeline's Beam metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult

from transforms import counters


@dataclass(frozen=True)
class RunSummary:
    files_read: int
    files_failed: int
    files_damaged: int
    packets: int
    flows: int
    bytes: int
    dead_letters: int
    elapsed_s: float
    malformed: dict[str, int] = field(default_factory=dict)

    @property
    def packets_per_s(self) -> float:
        return self.packets / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def render(self) -> str:
        lines = [
            "flowbeam summary",
            f"  files read      {self.files_read} ({self.files_damaged} damaged, "
            f"{self.files_failed} not captures)",
            f"  packets         {self.packets}",
            f"  flows           {self.flows}",
            f"  bytes           {self.bytes}",
            f"  dead letters    {self.dead_letters}",
            f"  elapsed         {self.elapsed_s:.2f} s",
            f"  packets/s       {self.packets_per_s:,.0f}",
        ]
        for reason, count in sorted(self.malformed.items()):
            lines.append(f"  skipped packets {count} {reason}")
        return "\n".join(lines)


def counter_values(result: PipelineResult) -> dict[str, int]:
    """Committed (or, where the runner has none, attempted) flowbeam counters by name."""
    query = result.metrics().query(MetricsFilter().with_namespace(counters.NAMESPACE))
    totals: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals


def summarize(result: PipelineResult, elapsed_s: float) -> RunSummary:
    values = counter_values(result)
    return RunSummary(
        files_read=values.get(counters.FILES_READ, 0),
        files_failed=values.get(counters.FILES_FAILED, 0),
        files_damaged=values.get(counters.FILES_DAMAGED, 0),
        packets=values.get(counters.PACKETS, 0),
        flows=values.get(counters.FLOW_ROWS, 0),
        bytes=values.get(counters.BYTES, 0),
        dead_letters=values.get(counters.DEAD_LETTERS, 0),
        elapsed_s=elapsed_s,
        malformed={name[len(counters.MALFORMED_PREFIX):]: value for name, value in values.items()
                   if name.startswith(counters.MALFORMED_PREFIX) and value},
    )
