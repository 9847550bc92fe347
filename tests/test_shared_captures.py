"""Every real capture in ../shared/data/pcaps goes through the pipeline; the odd ones are
checked for exactly what makes them odd. (Flow-by-flow comparisons with nfstream are in
test_peer_nfstream.py.)"""

from __future__ import annotations

import struct

import pytest

from pipelines.pcap_flows import run
from tests.test_pcap_pipeline import read_errors, read_flows
from tests.test_peer_nfstream import DATA

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
CAPTURES = sorted(p.name for p in DATA.glob("*.pcap*")) if DATA.is_dir() else []


def run_capture(name, tmp_path, capsys):
    code = run(["--input", str(DATA / name), "--output", str(tmp_path), "--runner=FnApiRunner"])
    return code, read_flows(tmp_path), read_errors(tmp_path), capsys.readouterr().out


def summary_value(out: str, label: str) -> int:
    [line] = [line for line in out.splitlines() if line.strip().startswith(label)]
    return int(line.split()[-1])


@pytest.mark.parametrize("name", CAPTURES)
def test_every_shared_capture_becomes_flows(name, tmp_path, capsys):
    code, flows, errors, out = run_capture(name, tmp_path, capsys)
    assert code == 0
    packets = summary_value(out, "packets  ")
    assert sum(r["src_packets"] + r["dst_packets"] for r in flows) == packets
    assert summary_value(out, "flows") == len(flows)
    if name == "sv_http-mime_truncated_file.pcap":
        assert errors == [{
            "stage": "read_capture", "source": str(DATA / name), "offset": 2715459,
            "reason": "file ends inside a record header (1 of 16 bytes)", "payload": None}]
        assert packets == 2696  # every complete record before the stray byte (dpkt agrees)
    elif name == "nfs_dhcp_big_endian.pcapng":
        # Its timestamps decode (by the pcapng spec, and in dpkt) to ~150,000 years from now.
        assert flows == [] and errors == []
        assert "skipped packets 4 timestamp_out_of_range" in out
    else:
        assert errors == []
        assert flows, f"{name} gave no flows"


def ip_total_lengths(path) -> list[int]:
    """IPv4 total length of every record of a little-endian Ethernet pcap, read by hand."""
    data = path.read_bytes()
    lengths, offset = [], 24
    while offset < len(data):
        caplen = struct.unpack_from("<I", data, offset + 8)[0]
        lengths.append(struct.unpack_from("!H", data, offset + 16 + 14 + 2)[0])
        offset += 16 + caplen
    return lengths


def test_snaplen_cut_packets_count_their_full_ip_length(tmp_path, capsys):
    """Every packet is cut inside its TCP options (caplen 54 < wire length): the bytes are
    still the IP total lengths of the headers."""
    name = "zeek_tcp_truncated-header_snapcut.pcap"
    _, flows, _, _ = run_capture(name, tmp_path, capsys)
    lengths = ip_total_lengths(DATA / name)
    [flow] = flows
    assert flow["protocol"] == "tcp"
    assert flow["src_packets"] + flow["dst_packets"] == len(lengths) == 24
    assert flow["src_bytes"] + flow["dst_bytes"] == sum(lengths) == 1589
