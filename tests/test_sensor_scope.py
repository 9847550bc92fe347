"""The sensor scopes flows: the same 5-tuple seen by two sensors is two flows, never merged."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from flowbeam.synthetic import write_capture
from pipelines.pcap_flows import run
from tests.fragment_builders import S, packet
from tests.test_pcap_pipeline import RUNNER, as_expected, read_flows, truth
from transforms.build_flows import BuildFlows

T0 = 1_700_000_000 * S


def test_build_flows_keeps_two_sensors_apart():
    """One UDP exchange seen by two sensors, interleaved: two rows, one per sensor, each with
    that sensor's packets only (1 + 1 each), where an unscoped key would merge 2 + 2."""
    fragments = [
        packet(T0, "10.0.0.9", 5000, "10.0.0.1", 53, protocol=17, size=70, scope="tap-1"),
        packet(T0 + 10, "10.0.0.9", 5000, "10.0.0.1", 53, protocol=17, size=70, scope="tap-2"),
        packet(T0 + 20, "10.0.0.1", 53, "10.0.0.9", 5000, protocol=17, size=90, scope="tap-1"),
        packet(T0 + 30, "10.0.0.1", 53, "10.0.0.9", 5000, protocol=17, size=90, scope="tap-2"),
    ]
    with TestPipeline(runner="FnApiRunner") as p:
        rows = (p | beam.Create([fragments[:2], fragments[2:]])
                | BuildFlows(120, 1800, source="pubsub", shards=4)
                | beam.Map(lambda r: (r["sensor"], r["src_addr"], r["src_packets"],
                                      r["dst_packets"], r["src_bytes"], r["dst_bytes"])))
        assert_that(rows, equal_to([("tap-1", "10.0.0.9", 1, 1, 70, 90),
                                    ("tap-2", "10.0.0.9", 1, 1, 70, 90)]))


def test_pcap_pipeline_writes_the_sensor_column(tmp_path):
    capture = tmp_path / "traffic.pcap"
    plan = write_capture(str(capture), flows=40, packets=800, seed=5)
    out = tmp_path / "out"
    assert run(["--input", str(capture), "--output", str(out), "--sensor", "edge-7",
                RUNNER]) == 0
    rows = read_flows(out)
    assert sorted(as_expected(r) for r in rows) == truth(plan)
    assert {r["sensor"] for r in rows} == {"edge-7"}
    plain = tmp_path / "plain"
    assert run(["--input", str(capture), "--output", str(plain), RUNNER]) == 0
    unscoped = read_flows(plain)
    assert {r["sensor"] for r in unscoped} == {None}
    assert not {r["id"] for r in rows} & {r["id"] for r in unscoped}
