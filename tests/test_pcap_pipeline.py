"""The pcap pipeline end to end on the local runner: synthetic captures with a known answer."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import shutil
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flowbeam.capture.writer import CapturedPacket, write_pcap
from flowbeam.flows.schema import FLOW_COLUMN_NAMES, arrow_schema
from flowbeam.synthetic import expected_flows, generate_packets, plan_traffic
from pipelines.pcap_flows import run
from pipelines.summary import LABEL_WIDTH

RUNNER = "--runner=FnApiRunner"


def read_flows(directory: Path) -> list[dict]:
    files = sorted(glob.glob(str(directory / "flows-*.parquet")))
    assert files, f"no flows-*.parquet in {directory}"
    rows = []
    for name in files:
        table = pq.read_table(name)
        assert table.schema.names == list(FLOW_COLUMN_NAMES)
        rows.extend(table.to_pylist())
    return rows


def read_errors(directory: Path) -> list[dict]:
    lines = []
    for name in sorted(glob.glob(str(directory / "errors-*.jsonl"))):
        lines.extend(json.loads(line) for line in Path(name).read_text().splitlines())
    return lines


def summary_of(out: str) -> dict[str, str]:
    """The run summary's lines as {label: value} (labels as printed, without indentation)."""
    lines = out[out.index("flowbeam summary\n"):].splitlines()[1:]
    return {line[:2 + LABEL_WIDTH].strip(): line[2 + LABEL_WIDTH:]
            for line in lines if line.startswith("  ")}


def as_expected(row: dict) -> tuple:
    return (row["ip_protocol"], row["src_addr"], row["src_port"], row["dst_addr"],
            row["dst_port"], int(row["first_seen_at"].timestamp() * 1_000_000),
            int(row["last_seen_at"].timestamp() * 1_000_000), row["src_packets"],
            row["dst_packets"], row["src_bytes"], row["dst_bytes"])


def last_record_offset(pcap: bytes) -> int:
    """Byte offset of the last record header of a little-endian classic pcap."""
    offset, last = 24, 24
    while offset < len(pcap):
        last = offset
        (caplen,) = struct.unpack_from("<I", pcap, offset + 8)
        offset += 16 + caplen
    return last


def truth(plan) -> list[tuple]:
    return sorted((f.protocol, f.src_addr, f.src_port, f.dst_addr, f.dst_port,
                   f.first_ns // 1000, f.last_ns // 1000, f.src_packets, f.dst_packets,
                   f.src_bytes, f.dst_bytes) for f in expected_flows(plan))


def test_synthetic_capture_gives_exactly_the_generated_flows(synthetic, tmp_path, capsys):
    path, plan = synthetic
    assert run(["--input", str(path), "--output", str(tmp_path), RUNNER]) == 0
    rows = read_flows(tmp_path)
    assert sorted(as_expected(r) for r in rows) == truth(plan)
    tcp = [r for r in rows if r["protocol"] == "tcp"]
    assert tcp and all(r["status"] == "end_of_flow" for r in tcp)
    assert all(r["status"] == "forced_end" or r["protocol"] == "tcp" or
               r["status"] == "idle_timeout" for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert read_errors(tmp_path) == []
    summary = summary_of(capsys.readouterr().out)
    assert summary["packets"] == str(int(plan.packets.sum()))
    assert summary["flows"] == str(len(plan))
    assert summary["dead letters"] == "0"
    assert summary["captures read"] == "1"
    assert summary["rows written"] == f"{len(plan)} to {tmp_path} (flows-*.parquet)"
    statuses = collections.Counter(r["status"] for r in rows)
    assert {label: summary[label] for label in statuses} == {
        status: str(count) for status, count in statuses.items()}


def test_refused_connections_are_two_packet_flows_ended_by_the_reset(tmp_path):
    """``refused``: some TCP flows are a SYN answered by RST+ACK; every other flow of the plan
    is the same as without them."""
    plan = plan_traffic(flows=200, packets=4000, seed=8, refused=0.1)
    unrefused = plan_traffic(flows=200, packets=4000, seed=8)
    refused = plan.kind != unrefused.kind
    assert 5 <= refused.sum() <= 30 and (plan.packets[refused] == 2).all()
    assert (plan.packets[~refused] == unrefused.packets[~refused]).all()
    with open(tmp_path / "refused.pcap", "wb") as stream:
        write_pcap(stream, generate_packets(plan))
    assert run(["--input", str(tmp_path / "refused.pcap"), "--output", str(tmp_path / "out"),
                RUNNER]) == 0
    rows = read_flows(tmp_path / "out")
    assert sorted(as_expected(r) for r in rows) == truth(plan)
    resets = [r for r in rows if r["dst_tcp_flags"] == 0x14]  # RST+ACK from the server
    assert len(resets) == refused.sum()
    assert all((r["src_packets"], r["dst_packets"], r["src_tcp_flags"], r["status"]) ==
               (1, 1, 0x02, "end_of_flow") for r in resets)


def test_parquet_schema_is_the_flow_schema(synthetic, tmp_path):
    path, _ = synthetic
    assert run(["--input", str(path), "--output", str(tmp_path), RUNNER]) == 0
    [name] = glob.glob(str(tmp_path / "flows-*.parquet"))
    schema = pq.read_schema(name)
    expected = arrow_schema()
    assert [(f.name, f.type, f.nullable) for f in schema] == [
        (f.name, f.type, f.nullable) for f in expected]


def test_gzip_and_glob_inputs_give_the_same_flows(synthetic, tmp_path):
    path, plan = synthetic
    inputs = tmp_path / "in"
    inputs.mkdir()
    with open(path, "rb") as raw, gzip.open(inputs / "a.pcap.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    assert run(["--input", str(inputs / "*.gz"), "--output", str(tmp_path / "out"), RUNNER]) == 0
    assert sorted(as_expected(r) for r in read_flows(tmp_path / "out")) == truth(plan)


def write_halves(directory: Path, plan) -> list[Path]:
    """The plan's capture rotated into two files, part1.pcap and part2.pcap."""
    packets = list(generate_packets(plan))
    half = len(packets) // 2
    paths = [directory / "part1.pcap", directory / "part2.pcap"]
    for path, part in zip(paths, (packets[:half], packets[half:]), strict=True):
        with open(path, "wb") as stream:
            write_pcap(stream, part)
    return paths


def test_flows_split_across_files_are_merged(tmp_path):
    """A capture rotated into two files: flows crossing the cut come out whole."""
    plan = plan_traffic(flows=80, packets=1600, seed=5)
    write_halves(tmp_path, plan)
    assert run(["--input", str(tmp_path / "part*.pcap"), "--output", str(tmp_path / "out"),
                RUNNER]) == 0
    assert sorted(as_expected(r) for r in read_flows(tmp_path / "out")) == truth(plan)


def test_flowbeam_input_takes_patterns_separated_by_commas(tmp_path, monkeypatch):
    plan = plan_traffic(flows=80, packets=1600, seed=5)
    first, second = write_halves(tmp_path, plan)
    monkeypatch.setenv("FLOWBEAM_INPUT", f"{first}, {second},")
    assert run(["--output", str(tmp_path / "out"), RUNNER]) == 0
    assert sorted(as_expected(r) for r in read_flows(tmp_path / "out")) == truth(plan)


@pytest.mark.parametrize(("argv", "message"), [
    (["--output", "o"], "--input is required"),
    (["--input", "x.pcap"], "--output DIR (or a BigQuery table: --output_table) is required"),
    (["--input", "x.pcap", "--output", "o", "--idle_timeout", "0"],
     "--idle_timeout must be positive"),
    (["--input", "x.pcap", "--output", "o", "--idle-timeout", "5"],
     "unknown option(s): --idle-timeout (did you mean --idle_timeout?)"),
    (["--inptu", "x.pcap", "--output", "o"],
     "unknown option(s): --inptu (did you mean --input?)"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_option_value_is_one_usage_error_line(capsys, monkeypatch):
    """argparse's reason, not Beam's usage dump of every Beam option."""
    assert run(["--input", "x", "--output", "o", "--idle_timeout", "abc"]) == 2
    assert capsys.readouterr().err == (
        "flowbeam: error: argument --idle_timeout: invalid float value: 'abc'\n")
    monkeypatch.setenv("FLOWBEAM_FLOW_SHARDS", "many")
    assert run(["--input", "x", "--output", "o"]) == 2
    assert capsys.readouterr().err == (
        "flowbeam: error: FLOWBEAM_FLOW_SHARDS: invalid int value: 'many'\n")


def test_options_come_from_the_environment(synthetic, tmp_path, monkeypatch):
    path, plan = synthetic
    monkeypatch.setenv("FLOWBEAM_INPUT", str(path))
    monkeypatch.setenv("FLOWBEAM_OUTPUT", str(tmp_path))
    monkeypatch.setenv("FLOWBEAM_BYTE_ACCOUNTING", "frame")
    assert run([RUNNER]) == 0
    rows = read_flows(tmp_path)
    # Frame accounting adds the 14-byte Ethernet header to every packet.
    expected = sum(f.src_bytes + f.dst_bytes + 14 * (f.src_packets + f.dst_packets)
                   for f in expected_flows(plan))
    assert sum(r["src_bytes"] + r["dst_bytes"] for r in rows) == expected


def udp_frame() -> bytes:
    """One Ethernet frame: a 28-byte UDP datagram 10.0.0.1:12345 -> 10.0.0.2:53."""
    udp = struct.pack("!HHHH", 12345, 53, 8, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0x4000, 64, 17, 0,
                     bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
    return bytes(6) + bytes(6) + b"\x08\x00" + ip + udp


def test_a_short_idle_timeout_splits_flows(tmp_path):
    """Two packets 3 s apart: one flow at the default timeout, two at --idle_timeout 2."""
    frame = udp_frame()
    path = tmp_path / "two.pcap"
    with open(path, "wb") as stream:
        write_pcap(stream, [CapturedPacket(10**18, frame),
                            CapturedPacket(10**18 + 3 * 10**9, frame)])
    assert run(["--input", str(path), "--output", str(tmp_path / "a"), RUNNER]) == 0
    assert [r["src_packets"] for r in read_flows(tmp_path / "a")] == [2]
    assert run(["--input", str(path), "--output", str(tmp_path / "b"), RUNNER,
                "--idle_timeout", "2"]) == 0
    assert sorted(r["src_packets"] for r in read_flows(tmp_path / "b")) == [1, 1]


def test_active_timeout_emits_a_long_flow_in_rows(tmp_path):
    """A packet every 10 s for 100 s with --active_timeout 30: a row ends when a packet comes
    30 s or more after the row's first packet, so rows start at 0, 30, 60 and 90 s."""
    start = 10**18
    path = tmp_path / "long.pcap"
    with open(path, "wb") as stream:
        write_pcap(stream, [CapturedPacket(start + i * 10 * 10**9, udp_frame())
                            for i in range(11)])
    assert run(["--input", str(path), "--output", str(tmp_path / "out"), RUNNER,
                "--active_timeout", "30"]) == 0
    rows = sorted(read_flows(tmp_path / "out"), key=lambda r: r["first_seen_at"])
    assert [(int(r["first_seen_at"].timestamp()) - start // 10**9,
             int(r["last_seen_at"].timestamp()) - start // 10**9,
             r["src_packets"], r["src_bytes"], r["status"]) for r in rows] == [
        (0, 20, 3, 84, "active_timeout"), (30, 50, 3, 84, "active_timeout"),
        (60, 80, 3, 84, "active_timeout"), (90, 100, 2, 56, "forced_end")]
    assert len({r["id"] for r in rows}) == 4


def test_help_lists_flowbeam_options(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--input", "--output", "--idle_timeout", "--active_timeout",
                 "--byte_accounting", "--output_table", "--bq_endpoint"):
        assert flag in out


def test_unknown_link_type_is_counted_and_reported_once_per_file(tmp_path, capsys, caplog):
    path = tmp_path / "user0.pcap"
    with open(path, "wb") as stream:
        write_pcap(stream, [CapturedPacket(10**18 + i, b"\x00" * 40) for i in range(3)],
                   linktype=147)
    assert run(["--input", str(path), "--output", str(tmp_path / "out"), RUNNER]) == 0
    assert summary_of(capsys.readouterr().out)["skipped packets"] == (
        "3 a link type flowbeam does not decode (unknown_linktype)")
    reports = [r.getMessage() for r in caplog.records if "link type 147" in r.getMessage()]
    assert reports == [f"flowbeam: {path}: link type 147 is not supported; its packets were "
                       "skipped"]
    assert f"flowbeam: {path}: skipped 3 packets: 3 a link type flowbeam does not decode" in [
        r.getMessage() for r in caplog.records]


def test_skipped_packets_and_cut_ports_are_said_in_words_with_their_file(tmp_path, capsys,
                                                                         caplog):
    """Two ARP frames are skipped; a UDP packet cut inside its header (caplen 14 + 20 + 3)
    still counts, with ports 0."""
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    frame = udp_frame()
    path = tmp_path / "mixed.pcap"
    with open(path, "wb") as stream:
        write_pcap(stream, [CapturedPacket(10**18, arp), CapturedPacket(10**18 + 1, arp),
                            CapturedPacket(10**18 + 2, frame[:37], wirelen=len(frame))])
    assert run(["--input", str(path), "--output", str(tmp_path / "out"), RUNNER]) == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["packets"] == "1"
    assert summary["skipped packets"] == (
        "2 not IP: ARP, LLDP, STP or another link protocol (not_ip)")
    assert summary["with ports unknown"] == (
        "1 transport header cut by the snaplen (truncated_transport)")
    [row] = read_flows(tmp_path / "out")
    assert (row["src_port"], row["dst_port"], row["src_bytes"]) == (0, 0, 28)
    assert [r.getMessage() for r in caplog.records if str(path) in r.getMessage()] == [
        f"flowbeam: {path}: skipped 2 packets: 2 not IP: ARP, LLDP, STP or another link "
        "protocol",
        f"flowbeam: {path}: 1 packet counted with ports 0: 1 transport header cut by the "
        "snaplen"]
