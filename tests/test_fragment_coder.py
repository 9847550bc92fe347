"""The fragment batch coder round-trips fragments exactly (values and types) and is what Beam
picks for the fragment lists the pcap pipeline shuffles."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam import coders

from flowbeam.flows.fragment import NO_TIME, SIDE_B, Fragment
from flowbeam.flows.protocols import TCP_FIN, TCP_SYN
from pipelines.options import FlowConfig
from pipelines.pcap_flows import PcapFlowsConfig, build
from tests.fragment_builders import S, packet
from transforms.fragment_coder import FragmentBatch, FragmentBatchCoder

TOP = 2**64 - 1  # the highest address half (an IPv6 ff.. address)


def round_trip(fragments: list[Fragment]) -> list[Fragment]:
    coder = FragmentBatchCoder()
    return coder.decode(coder.encode(fragments))


def field_types(fragments: list[Fragment]) -> list[tuple]:
    return [(type(f), tuple(map(type, f.key)), tuple(map(type, f))) for f in fragments]


BATCH = [
    packet(1_700_000_000 * S, "10.0.0.1", 1234, "10.0.0.2", 80, flags=TCP_SYN),
    packet(1_700_000_001 * S + 7, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 0,
           "fe80::1", 65535, protocol=58, vlan_id=4094, scope="sensor-é"),
    Fragment((4, 17, -1, 0, 1, 53, 0, 2, 5353, "eni-1"), -5, 2**62, 0, 0, 3, 2**40,
             0, TCP_FIN << 8, SIDE_B, NO_TIME, 0, True,
             (("account_id", "123456789012"), ("action", "REJECT"), ("log_status", None))),
    Fragment((6, 6, 0, TOP, TOP, 1, TOP, TOP - 1, 2, ""), 0, 0, 1, 40, 0, 0, 0x1FF, 0,
             0, 0, SIDE_B, False),
]


@pytest.mark.parametrize("fragments", [BATCH, BATCH[:1], BATCH[2:3], []],
                         ids=["mixed", "one", "with-attributes", "empty"])
def test_fragments_round_trip_exactly(fragments):
    decoded = round_trip(fragments)
    assert decoded == fragments
    assert field_types(decoded) == field_types(fragments)


def test_attributes_survive_beside_fragments_without_them():
    decoded = round_trip(BATCH)
    assert [f.attributes for f in decoded] == [(), (), BATCH[2].attributes, ()]
    assert decoded[2].open_at_end is True and decoded[3].open_at_end is False


def test_size_estimates_grow_with_the_batch_without_encoding_it():
    coder = FragmentBatchCoder()
    assert coder.estimate_size([]) == 0
    assert coder.estimate_size(BATCH * 10) == 10 * coder.estimate_size(BATCH) > 0


def test_the_pcap_pipeline_shuffles_fragments_with_it(tmp_path):
    assert isinstance(coders.registry.get_coder(FragmentBatch), FragmentBatchCoder)
    pipeline = beam.Pipeline()
    build(pipeline, PcapFlowsConfig(("x.pcap",), FlowConfig(str(tmp_path), 120, 1800, "ip", 256)))
    shuffled = {label: pcoll for label, pcoll in _outputs(pipeline)
                if label in ("DecodeCaptures/AllFragments", "BuildFlows/ShardFragments",
                             "DecodeCaptures/KeepSettledRanges")}
    shuffled.update((label, pcoll) for label, pcoll in _outputs(pipeline)
                    if label == "DecodeCaptures/DecodeRanges/ParDo(DecodeRangeFn)"
                    and pcoll.tag is None)  # the range's fragments, not its summary
    assert len(shuffled) == 4
    for pcoll in shuffled.values():
        coder = coders.registry.get_coder(pcoll.element_type)
        assert "FragmentBatchCoder" in repr(coder), (pcoll, coder)


def _outputs(pipeline: beam.Pipeline) -> list[tuple[str, beam.PCollection]]:
    found: list[tuple[str, beam.PCollection]] = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            found.extend((node.full_label, pcoll) for pcoll in node.outputs.values())

    pipeline.visit(Visitor())
    return found
