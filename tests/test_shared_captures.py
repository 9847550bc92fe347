"""Every real capture in ../shared/data/pcaps goes through the pipeline; its flows hold exactly
the IP packets dpkt finds in it (an independent reader and decoder, so a packet our decoder
dropped would show), and the odd captures are checked for exactly what makes them odd.
(Flow-by-flow comparisons with nfstream are in test_peer_nfstream.py.)"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import dpkt
import pytest

from pipelines.pcap_flows import run
from tests.test_pcap_pipeline import read_errors, read_flows, summary_of
from tests.test_peer_nfstream import DATA

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
CAPTURES = sorted(p.name for p in DATA.glob("*.pcap*")) if DATA.is_dir() else []


def run_capture(name, tmp_path, capsys):
    code = run(["--input", str(DATA / name), "--output", str(tmp_path), "--runner=FnApiRunner"])
    return code, read_flows(tmp_path), read_errors(tmp_path), capsys.readouterr().out


def link_frames(path: Path) -> list[tuple[int, bytes]]:
    """(link type, frame) of every complete record, read by dpkt. dpkt's pcapng Reader knows
    only the first interface's link type, so pcapng blocks are walked here with dpkt's block
    classes, keeping each interface's link type."""
    frames: list[tuple[int, bytes]] = []
    with open(path, "rb") as stream:
        if path.suffix != ".pcapng":
            reader = dpkt.pcap.Reader(stream)
            # A record cut by the end of the file ends it; extend keeps what came before.
            with contextlib.suppress(dpkt.NeedData):
                frames.extend((reader.datalink(), frame) for _, frame in reader)
            return frames
        data = stream.read()
    little = data[8:12] == b"\x4d\x3c\x2b\x1a"
    suffix = "LE" if little else ""
    interface_block = getattr(dpkt.pcapng, "InterfaceDescriptionBlock" + suffix)
    packet_block = getattr(dpkt.pcapng, "EnhancedPacketBlock" + suffix)
    linktypes: list[int] = []
    offset = 0
    while offset + 8 <= len(data):
        kind, length = struct.unpack_from("<II" if little else ">II", data, offset)
        block = data[offset:offset + length]
        if kind == dpkt.pcapng.PCAPNG_BT_IDB:
            linktypes.append(interface_block(block).linktype)
        elif kind == dpkt.pcapng.PCAPNG_BT_EPB:
            packet = packet_block(block)
            frames.append((linktypes[packet.iface_id], packet.pkt_data))
        offset += length
    return frames


def ip_packet(linktype: int, frame: bytes) -> object:
    """The outermost network-layer payload dpkt decodes from a frame of ``linktype``."""
    if linktype == dpkt.pcap.DLT_EN10MB:
        return dpkt.ethernet.Ethernet(frame).data
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return dpkt.sll.SLL(frame).data
    if linktype in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
        return dpkt.loopback.Loopback(frame).data
    version = frame[0] >> 4 if frame else 0
    if linktype in (12, 14, 101, 228, 229) and version in (4, 6):  # raw IP
        return dpkt.ip.IP(frame) if version == 4 else dpkt.ip6.IP6(frame)
    raise AssertionError(f"link type {linktype} needs a case here")


def dpkt_ip_packets(path: Path) -> int:
    """IPv4 and IPv6 packets of a capture, by dpkt."""
    return sum(isinstance(ip_packet(linktype, frame), dpkt.ip.IP | dpkt.ip6.IP6)
               for linktype, frame in link_frames(path))


def summary_value(out: str, label: str) -> int:
    return int(summary_of(out)[label])


@pytest.mark.parametrize("name", CAPTURES)
def test_every_shared_capture_becomes_flows(name, tmp_path, capsys):
    code, flows, errors, out = run_capture(name, tmp_path, capsys)
    assert code == 0
    packets = summary_value(out, "packets")
    in_flows = sum(r["src_packets"] + r["dst_packets"] for r in flows)
    assert in_flows == packets
    assert summary_value(out, "flows") == len(flows)
    if name == "sv_http-mime_truncated_file.pcap":
        assert errors == [{
            "stage": "read_capture", "source": str(DATA / name), "offset": 2715459,
            "reason": "file ends inside a record header (1 of 16 bytes)", "payload": None}]
        assert packets == 2696  # every complete record before the stray byte (dpkt agrees)
    elif name == "nfs_dhcp_big_endian.pcapng":
        # Its timestamps decode (by the pcapng spec, and in dpkt) to ~150,000 years from now.
        assert flows == [] and errors == []
        assert summary_of(out)["skipped packets"] == (
            "4 timestamp after the year 9999 (timestamp_out_of_range)")
        assert dpkt_ip_packets(DATA / name) == 4
        return
    else:
        assert errors == []
        assert flows, f"{name} gave no flows"
    assert in_flows == dpkt_ip_packets(DATA / name)


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
