"""flowbeam's flows equal nfstream's on every shared capture that has NAME.nfstream.csv.

nfstream 6.6 (idle timeout 120 s, IP-bytes columns) is the peer. Same keys, direction, packets
and bytes per direction, first/last seen within 1 ms. Where the two must differ, the
difference is listed here and what flowbeam produces instead is asserted:

- ICMP/ICMPv6: nfstream keys all ICMP between two addresses as one flow with ports 0;
  flowbeam puts type/code in the ports (Community ID's port equivalents), so one nfstream flow
  may be several of ours. Asserted: the packets and bytes each address sent to each other
  address are equal (per direction, not per pair), and every ICMP row's
  ports are a (type, code or paired type) of a message its initiator really sent (read with dpkt).
- IPv4 fragments: nfstream counts first fragments only; flowbeam counts non-first fragments
  toward their first fragment's flow. Asserted: our flow is tshark's per-packet flow for the
  first fragments plus tshark's port-0 flow of the later fragments.
"""

from __future__ import annotations

import csv
import functools
import glob
import ipaddress
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import dpkt
import pytest

from flowbeam.flows.protocols import ICMP_COUNTERPARTS, PROTO_ICMP, PROTO_ICMPV6
from pipelines.pcap_flows import run
from tests.test_pcap_pipeline import read_flows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcaps"
NAMES = sorted(Path(p).name.removesuffix(".nfstream.csv")
               for p in glob.glob(str(DATA / "*.nfstream.csv")))
ICMP_PROTOCOLS = {1, 58}
FRAGMENT_CAPTURES = {"ppp_ip4_fragments"}

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")


def capture_path(name: str) -> Path:
    [path] = [p for p in DATA.glob(f"{name}.pcap*")]
    return path


def nfstream_flows(name: str) -> list[dict]:
    with open(DATA / f"{name}.nfstream.csv") as stream:
        return [{
            "ip_protocol": int(r["protocol"]), "src_addr": r["src_ip"],
            "src_port": int(r["src_port"]), "dst_addr": r["dst_ip"], "dst_port": int(r["dst_port"]),
            "first_ms": int(r["bidirectional_first_seen_ms"]),
            "last_ms": int(r["bidirectional_last_seen_ms"]),
            "counts": (int(r["src2dst_packets"]), int(r["dst2src_packets"]),
                       int(r["src2dst_bytes_ip"]), int(r["dst2src_bytes_ip"])),
        } for r in csv.DictReader(stream)]


def tshark_flows(name: str) -> list[dict]:
    with open(DATA / f"{name}.tshark_fields.csv") as stream:
        return list(csv.DictReader(stream))


def ms(timestamp) -> float:
    return timestamp.timestamp() * 1000


def counts(row: dict) -> tuple[int, int, int, int]:
    return row["src_packets"], row["dst_packets"], row["src_bytes"], row["dst_bytes"]


def find(ours: list[dict], theirs: dict) -> dict | None:
    for row in ours:
        if ((row["ip_protocol"], row["src_addr"], row["src_port"], row["dst_addr"],
             row["dst_port"]) == (theirs["ip_protocol"], theirs["src_addr"], theirs["src_port"],
                                  theirs["dst_addr"], theirs["dst_port"])
                and abs(ms(row["first_seen_at"]) - theirs["first_ms"]) <= 1):
            return row
    return None


def icmp_messages(path: Path) -> set[tuple[str, str, int, int]]:
    """(src, dst, type, code) of every ICMP/ICMPv6 message in an Ethernet capture, by dpkt."""
    reader_class = dpkt.pcapng.Reader if path.suffix == ".pcapng" else dpkt.pcap.Reader
    messages = set()
    with open(path, "rb") as stream:
        for _, frame in reader_class(stream):
            ip = dpkt.ethernet.Ethernet(frame).data
            if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
                continue
            icmp = ip.data
            if isinstance(icmp, dpkt.icmp.ICMP | dpkt.icmp6.ICMP6):
                messages.add((str(ipaddress.ip_address(ip.src)),
                              str(ipaddress.ip_address(ip.dst)), icmp.type, icmp.code))
    return messages


@functools.cache
def flowbeam_flows(name: str) -> list[dict]:
    """Our flows for a capture, computed once per test session."""
    output = Path(tempfile.mkdtemp(prefix=f"flowbeam-{name}-"))
    assert run(["--input", str(capture_path(name)), "--output", str(output),
                "--runner=FnApiRunner"]) == 0
    flows = read_flows(output)
    shutil.rmtree(output)
    return flows


def has_icmp(name: str) -> bool:
    return any(f["ip_protocol"] in ICMP_PROTOCOLS for f in nfstream_flows(name))


ICMP_NAMES = [name for name in NAMES if has_icmp(name)]


@pytest.fixture(params=NAMES)
def compared(request):
    return request.param, flowbeam_flows(request.param), nfstream_flows(request.param)


@pytest.fixture(params=ICMP_NAMES)
def compared_icmp(request):
    return request.param, flowbeam_flows(request.param), nfstream_flows(request.param)


def test_tcp_and_udp_flows_equal_nfstream(compared):
    name, ours, theirs = compared
    for flow in theirs:
        if flow["ip_protocol"] in ICMP_PROTOCOLS:
            continue
        row = find(ours, flow)
        assert row is not None, f"{name}: no flow like nfstream's {flow}"
        assert abs(ms(row["last_seen_at"]) - flow["last_ms"]) <= 1
        if name in FRAGMENT_CAPTURES:
            continue  # see test_fragments_count_toward_their_first_fragment
        assert counts(row) == flow["counts"], f"{name}: {flow}"
    ported = [r for r in ours if r["ip_protocol"] not in ICMP_PROTOCOLS]
    assert len(ported) == len([f for f in theirs if f["ip_protocol"] not in ICMP_PROTOCOLS])


def icmp_sent(rows: list[dict], counts_of) -> dict[tuple, tuple[int, int]]:
    """ICMP packets and bytes per (protocol, sender, receiver), summed over rows: a flow's
    source sent its src counts, its destination its dst counts."""
    sums: dict[tuple, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for row in rows:
        if row["ip_protocol"] not in ICMP_PROTOCOLS:
            continue
        src_packets, dst_packets, src_bytes, dst_bytes = counts_of(row)
        for sender, receiver, packets, size in (
                (row["src_addr"], row["dst_addr"], src_packets, src_bytes),
                (row["dst_addr"], row["src_addr"], dst_packets, dst_bytes)):
            if packets:
                total = sums[(row["ip_protocol"], sender, receiver)]
                sums[(row["ip_protocol"], sender, receiver)] = (total[0] + packets,
                                                                total[1] + size)
    return dict(sums)


def test_icmp_sent_per_sender_equals_nfstream(compared_icmp):
    """Per direction, so a row that swapped sender and receiver (0 sent, 3 received where
    nfstream says 3, 0) fails."""
    _, ours, theirs = compared_icmp
    assert icmp_sent(ours, counts) == icmp_sent(theirs, lambda f: f["counts"])


def test_icmp_sent_per_sender_sees_a_swapped_direction():
    """The comparison itself: the traceroute row nfstream reads as 3 sent, 0 received."""
    row = {"ip_protocol": 1, "src_addr": "192.168.100.1", "dst_addr": "192.168.100.138"}
    assert icmp_sent([row], lambda _: (3, 0, 168, 0)) == {
        (1, "192.168.100.1", "192.168.100.138"): (3, 168)}
    assert icmp_sent([row], lambda _: (0, 3, 0, 168)) == {
        (1, "192.168.100.138", "192.168.100.1"): (3, 168)}


def test_icmp_ports_are_type_and_code_of_a_real_message(compared_icmp):
    name, ours, _ = compared_icmp
    rows = [r for r in ours if r["ip_protocol"] in ICMP_PROTOCOLS]
    assert rows
    messages = icmp_messages(capture_path(name))
    for row in rows:
        pairs = ICMP_COUNTERPARTS[PROTO_ICMP if row["ip_protocol"] == 1 else PROTO_ICMPV6]
        sent = {(t, c) for s, d, t, c in messages
                if (s, d) == (row["src_addr"], row["dst_addr"])}
        if row["src_port"] in pairs:
            assert row["dst_port"] == pairs[row["src_port"]]
            assert any(t == row["src_port"] for t, _ in sent), row
        else:
            assert (row["src_port"], row["dst_port"]) in sent, row


@pytest.mark.parametrize("name", sorted(FRAGMENT_CAPTURES))
def test_fragments_count_toward_their_first_fragment(name):
    ours = flowbeam_flows(name)
    first_fragments, later_fragments = tshark_flows(name)
    assert later_fragments["src_port"] == "0"  # tshark (no reassembly): ports only in the first
    [row] = ours
    assert (row["src_addr"], row["src_port"], row["dst_addr"], row["dst_port"]) == (
        first_fragments["src_ip"], int(first_fragments["src_port"]),
        first_fragments["dst_ip"], int(first_fragments["dst_port"]))
    assert counts(row) == (
        int(first_fragments["src_packets"]) + int(later_fragments["src_packets"]),
        int(first_fragments["dst_packets"]),
        int(first_fragments["src_bytes_ip"]) + int(later_fragments["src_bytes_ip"]),
        int(first_fragments["dst_bytes_ip"]))
