"""The pcap pipeline end to end on the local runner: synthetic captures with a known answer."""

from __future__ import annotations

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
from flowbeam.synthetic import expected_flows, generate_packets, plan_traffic, write_capture
from pipelines.pcap_flows import run

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


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    path = directory / "traffic.pcap"
    plan = write_capture(str(path), flows=300, packets=6000, seed=11)
    return path, plan


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
    out = capsys.readouterr().out
    assert f"packets         {int(plan.packets.sum())}" in out
    assert f"flows           {len(plan)}" in out
    assert "dead letters    0" in out


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


def test_flows_split_across_files_are_merged(tmp_path):
    """A capture rotated into two files: flows crossing the cut come out whole."""
    plan = plan_traffic(flows=80, packets=1600, seed=5)
    packets = list(generate_packets(plan))
    half = len(packets) // 2
    for name, part in (("part1.pcap", packets[:half]), ("part2.pcap", packets[half:])):
        with open(tmp_path / name, "wb") as stream:
            write_pcap(stream, part)
    assert run(["--input", str(tmp_path / "part*.pcap"), "--output", str(tmp_path / "out"),
                RUNNER]) == 0
    assert sorted(as_expected(r) for r in read_flows(tmp_path / "out")) == truth(plan)


def test_bad_inputs_become_dead_letters_and_good_records_still_flow(synthetic, tmp_path, capsys):
    path, plan = synthetic
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pcap"
    cut = len(data) - 10  # inside the last record's data
    truncated.write_bytes(data[:cut])
    not_a_capture = tmp_path / "notes.pcap"
    not_a_capture.write_text("these are not packets\n")
    empty_glob = str(tmp_path / "nothing-here-*.pcap")
    code = run(["--input", str(truncated), "--input", str(not_a_capture), "--input", empty_glob,
                "--output", str(tmp_path / "out"), RUNNER])
    assert code == 0
    rows = read_flows(tmp_path / "out")
    # Every packet but the cut one is counted: one packet fewer than the whole capture.
    assert sum(r["src_packets"] + r["dst_packets"] for r in rows) == int(plan.packets.sum()) - 1
    errors = {e["source"]: e for e in read_errors(tmp_path / "out")}
    assert set(errors) == {str(truncated), str(not_a_capture), empty_glob}
    assert errors[empty_glob]["reason"] == f"no file matches {empty_glob!r}"
    assert errors[str(not_a_capture)]["stage"] == "read_capture"
    assert errors[str(not_a_capture)]["reason"].startswith("not a pcap or pcapng file")
    assert errors[str(truncated)]["offset"] == last_record_offset(data)
    assert "dead letters    3" in capsys.readouterr().out


def test_nothing_readable_exits_1(tmp_path, capsys):
    assert run(["--input", str(tmp_path / "none*.pcap"), "--output", str(tmp_path), RUNNER]) == 1
    assert "no file matches" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--output", "o"], "--input is required"),
    (["--input", "x.pcap"], "--output DIR (or a BigQuery table: --output_table) is required"),
    (["--input", "x.pcap", "--output", "o", "--idle_timeout", "0"],
     "--idle_timeout must be positive"),
    (["--input", "x.pcap", "--output", "o", "--idle-timeout", "5"],
     "unknown option(s): --idle-timeout (did you mean --idle_timeout?)"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_option_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--input", "x", "--output", "o", "--byte_accounting", "bits"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bits'" in capsys.readouterr().err


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


def test_a_short_idle_timeout_splits_flows(tmp_path):
    """Two packets 3 s apart: one flow at the default timeout, two at --idle_timeout 2."""
    udp = struct.pack("!HHHH", 12345, 53, 8, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0x4000, 64, 17, 0,
                     bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
    frame = bytes(6) + bytes(6) + b"\x08\x00" + ip + udp
    path = tmp_path / "two.pcap"
    with open(path, "wb") as stream:
        write_pcap(stream, [CapturedPacket(10**18, frame),
                            CapturedPacket(10**18 + 3 * 10**9, frame)])
    assert run(["--input", str(path), "--output", str(tmp_path / "a"), RUNNER]) == 0
    assert [r["src_packets"] for r in read_flows(tmp_path / "a")] == [2]
    assert run(["--input", str(path), "--output", str(tmp_path / "b"), RUNNER,
                "--idle_timeout", "2"]) == 0
    assert sorted(r["src_packets"] for r in read_flows(tmp_path / "b")) == [1, 1]


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
    assert "skipped packets 3 unknown_linktype" in capsys.readouterr().out
    reports = [r.getMessage() for r in caplog.records if "link type 147" in r.getMessage()]
    assert reports == [f"flowbeam: {path}: link type 147 is not supported; its packets were "
                       "skipped"]
