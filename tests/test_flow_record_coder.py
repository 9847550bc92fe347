"""The flow row coder round-trips rows exactly and is what Beam picks for BuildFlows' output."""

from __future__ import annotations

from apache_beam import coders

from flowbeam.flows.engine import advance
from flowbeam.flows.records import to_flow_record
from tests.fragment_builders import S, packet
from transforms.flow_record_coder import FlowRecord, FlowRecordCoder


def test_rows_round_trip_exactly():
    fragments = [packet(1_700_000_000 * S + 123_457, "10.0.0.1", 1, "10.0.0.2", 2, protocol=17),
                 packet(1_700_000_003 * S + 999_999, "10.0.0.2", 2, "10.0.0.1", 1, protocol=17)]
    [row] = [to_flow_record(r, "pcap") for r in advance(fragments, 120 * S, 1800 * S, None)[0]]
    coder = FlowRecordCoder()
    decoded = coder.decode(coder.encode(row))
    assert decoded == row
    assert decoded["last_seen_at"].microsecond == 999_999
    assert decoded["vlan_id"] is None and decoded["src_tcp_flags"] is None


def test_the_registry_gives_it_for_flow_records():
    assert isinstance(coders.registry.get_coder(FlowRecord), FlowRecordCoder)
