"""What the VPC pipeline does differently in streaming: log events de-duplicated over time
(state per event, not a whole-input grouping), per-subnet rows per minute of arrival, and the
subnet refresh step against a real EC2 server (moto, 127.0.0.1).

The stream is a TestStream here (the whole streaming pipeline on a real stream is
test_vpc_streaming_kinesis), and the refresh DoFn runs on its own: the local runner cannot
run PeriodicImpulse nor make a changing global-window side input ready."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing import test_pipeline, test_stream
from apache_beam.testing.util import assert_that, equal_to

from flowbeam.vpc.envelopes import LogEvent
from flowbeam.vpc.fields import DEFAULT_FORMAT
from flowbeam.vpc.subnets import Subnet, SubnetMatcher
from pipelines.vpc_flows import build, parse_config
from tests.kinesis_servers import CREDENTIALS
from tests.test_vpc_subnets import make_subnets
from transforms.vpc_outputs import SubnetTraffic
from transforms.vpc_read import ParseLogEvents
from transforms.vpc_subnets import DescribeSubnetsFn, Ec2Subnets

LINE = "2 1 eni-1 10.0.0.1 192.0.2.9 40000 80 6 {packets} {bytes} 1000 1060 ACCEPT OK"


def event(event_id: str, packets: int, octets: int) -> tuple[str, LogEvent]:
    logged = LogEvent(event_id, 1_000_000, LINE.format(packets=packets, bytes=octets), "g/s")
    return logged.key, logged


def two_different_ids(ids: list[str]) -> None:
    assert len(ids) == len(set(ids)) == 2, ids


def streaming_pipeline() -> test_pipeline.TestPipeline:
    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    return test_pipeline.TestPipeline(options=options)


def test_redelivered_events_count_once_and_traffic_rows_follow_arrival():
    stream = (test_stream.TestStream()
              .add_elements([event("1", 3, 400), event("2", 5, 500)], event_timestamp=10)
              .advance_watermark_to(70)
              # Event 1 again (a Kinesis retry), and event 3, arriving in the next minute.
              .add_elements([event("1", 3, 400), event("3", 1, 300)], event_timestamp=80)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as pipeline:
        parsed = pipeline | stream | ParseLogEvents(DEFAULT_FORMAT)
        subnets = beam.pvalue.AsSingleton(pipeline | beam.Create([SubnetMatcher(
            [Subnet("subnet-a", "a", None, ("10.0.0.0/24",))])]))
        rows = parsed.records | SubnetTraffic(subnets)
        assert_that(parsed.records | beam.Map(lambda r: r.bytes), equal_to([400, 500, 300]),
                    label="records")
        # 10.0.0.1 sends (outbound of subnet-a); all three records started in minute 960 s.
        assert_that(rows | beam.Map(lambda r: (int(r["minute"].timestamp()), r["subnet"],
                                               r["direction"], r["flows"], r["packets"],
                                               r["bytes"])),
                    equal_to([(960, "subnet-a", "outbound", 2, 8, 900),
                              (960, "subnet-a", "outbound", 1, 1, 300)]), label="rows")
        # Two rows of one key (two arrival minutes) have two ids: an insert id each.
        assert_that(rows | beam.Map(lambda r: r["id"]), two_different_ids, label="ids")


def test_a_refresh_gives_the_current_subnets_and_a_failure_gives_nothing(ec2_endpoint,
                                                                          monkeypatch):
    url, client = ec2_endpoint
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    ids, _ = make_subnets(client)
    refreshed = list(DescribeSubnetsFn(Ec2Subnets("us-east-1", url, 60)).process(None))
    [matcher] = refreshed
    assert matcher.match("10.20.3.7").label == ids["batch"]
    # Nothing listens on port 9 (discard): the refresh fails, emits nothing, readers keep
    # the previous set.
    failed = DescribeSubnetsFn(Ec2Subnets("us-east-1", "http://127.0.0.1:9", 60))
    assert list(failed.process(None)) == []


def test_the_streaming_graph_builds_with_refreshed_subnets_and_windowed_files(tmp_path):
    """The graph a Dataflow job would get (it cannot run here): the Kinesis reader, the
    refresh every --subnet_refresh_s, per-window local files."""
    options = PipelineOptions(["--kinesis_stream", "vpc", "--subnets_from_ec2",
                               "--subnet_refresh_s", "600", "--output", str(tmp_path)])
    options.view_as(StandardOptions).streaming = True
    config = parse_config(options)
    assert config.streaming
    pipeline = beam.Pipeline(options=options)
    outputs = build(pipeline, config, [Subnet("subnet-a", None, None, ("10.0.0.0/24",))])
    assert not outputs["flows"].is_bounded and not outputs["subnet_traffic"].is_bounded
    labels = set()

    class Labels(PipelineVisitor):
        def enter_composite_transform(self, node):
            labels.add(node.full_label)

        def visit_transform(self, node):
            labels.add(node.full_label)

    pipeline.visit(Labels())
    assert {"ReadFromKinesis", "DecodeSubscriptionRecords", "ParseLogEvents/OncePerId",
            "EveryRefresh", "DescribeSubnets", "LatestSubnets", "WriteFlows",
            "WriteSubnetTraffic/Windows", "WriteDeniedFlows/Windows"} <= labels
