"""The pcap pipeline's inputs end to end: bad ones become dead letters and the right exit
status, a file matched twice is read once. Each number of the summary is checked."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata

from flowbeam.synthetic import write_capture
from pipelines.pcap_flows import run
from tests.test_pcap_pipeline import (
    RUNNER,
    as_expected,
    last_record_offset,
    read_errors,
    read_flows,
    summary_of,
    truth,
)
from transforms.capture_files import DecodeCaptures
from transforms.dead_letters import DEAD_LETTER_TAG


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
    summary = summary_of(capsys.readouterr().out)
    assert [summary[label] for label in (
        "captures read", "of which damaged", "files not captures", "files unreadable",
        "inputs matching nothing", "dead letters")] == ["1", "1", "1", "0", "1", "3"]


def test_a_file_matched_by_several_patterns_is_read_once(synthetic, tmp_path, monkeypatch,
                                                         capsys):
    """The same file as a relative path, an absolute one, a bare glob and a directory glob."""
    path, plan = synthetic
    monkeypatch.chdir(path.parent)
    assert run(["--input", path.name, "--input", str(path), "--input", "*.pcap",
                "--input", str(path.parent / "traffic.*"), "--input", f"./{path.name}",
                "--output", str(tmp_path), RUNNER]) == 0
    assert sorted(as_expected(r) for r in read_flows(tmp_path)) == truth(plan)
    summary = summary_of(capsys.readouterr().out)
    assert (summary["captures read"], summary["packets"]) == ("1", str(int(plan.packets.sum())))


def run_one_bad_input(pattern: str, output: Path, capsys) -> tuple[int, list[dict], dict, str]:
    """Run on one input that cannot be read: exit code, dead letters, summary, stderr."""
    code = run(["--input", pattern, "--output", str(output), RUNNER])
    captured = capsys.readouterr()
    return code, read_errors(output), summary_of(captured.out), captured.err


def test_a_pattern_matching_nothing_exits_1_with_a_dead_letter(tmp_path, capsys):
    pattern = str(tmp_path / "none*.pcap")
    code, errors, summary, err = run_one_bad_input(pattern, tmp_path / "out", capsys)
    assert code == 1
    assert errors == [{"stage": "match_files", "reason": f"no file matches {pattern!r}",
                       "source": pattern, "offset": None, "payload": None}]
    assert (summary["inputs matching nothing"], summary["captures read"]) == ("1", "0")
    assert err.splitlines() == [f"flowbeam: no file matches {pattern!r}",
                                "flowbeam: error: no capture could be read"]


def test_a_directory_input_is_unreadable_and_exits_1(tmp_path, capsys):
    directory = tmp_path / "captures"
    directory.mkdir()
    code, [error], summary, _ = run_one_bad_input(str(directory), tmp_path / "out", capsys)
    assert code == 1
    assert error["reason"] == ("is a directory, not a capture file (to read the captures in "
                               f"it: {directory}/*)")
    assert (summary["files unreadable"], summary["of which damaged"]) == ("1", "0")


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 4,  # no gzip magic
    gzip.compress(b"\xd4\xc3\xb2\xa1" + bytes(1000))[:-8] + bytes(8),  # bad CRC, first read
], ids=["random-bytes", "corrupt-gzip"])
def test_a_gz_file_that_does_not_decompress_is_no_capture_and_exits_1(content, tmp_path,
                                                                      capsys):
    path = tmp_path / "bad.pcap.gz"
    path.write_bytes(content)
    code, [error], summary, _ = run_one_bad_input(str(path), tmp_path / "out", capsys)
    assert code == 1
    assert error["reason"].startswith("no capture could be read from it: Error -3 while "
                                      "decompressing data: ")
    assert error["offset"] == 0
    assert (summary["files not captures"], summary["of which damaged"],
            summary["captures read"]) == ("1", "0", "0")


def test_files_that_match_but_are_no_captures_exit_1(tmp_path, capsys):
    for name in ("a.pcap", "b.pcapng"):
        (tmp_path / name).write_text("not packets\n")
    code, errors, summary, _ = run_one_bad_input(str(tmp_path / "*.pcap*"), tmp_path / "out",
                                                 capsys)
    assert code == 1
    assert sorted(e["source"] for e in errors) == [str(tmp_path / "a.pcap"),
                                                   str(tmp_path / "b.pcapng")]
    assert summary["files not captures"] == "2"


def test_a_gzip_corrupt_after_the_capture_header_is_damaged_not_refused(tmp_path, capsys):
    """A stored (uncompressed) gzip over 16 MB, Beam's first read, with a wrong CRC: the
    capture header came out before the check failed at the end, so the file is damaged, not
    refused. The bytes of the failing read are lost, so some packets are missing."""
    path = tmp_path / "big.pcap"
    plan = write_capture(str(path), flows=400, packets=36000, seed=4)
    packed = gzip.compress(path.read_bytes(), compresslevel=0)
    assert len(packed) > 16 << 20
    corrupt = tmp_path / "big.pcap.gz"
    corrupt.write_bytes(packed[:-8] + bytes(4) + packed[-4:])  # CRC32 zeroed
    code, [error], summary, _ = run_one_bad_input(str(corrupt), tmp_path / "out", capsys)
    assert code == 0
    assert error["reason"] == ("cannot read file: Error -3 while decompressing data: "
                               "incorrect data check")
    assert (summary["captures read"], summary["of which damaged"]) == ("1", "1")
    packets = sum(r["src_packets"] + r["dst_packets"] for r in read_flows(tmp_path / "out"))
    assert 0 < packets == int(summary["packets"]) < int(plan.packets.sum())


def test_a_file_gone_before_it_is_read_is_unreadable(tmp_path):
    """Matched, then deleted before its worker opened it: a dead letter, no capture counted."""
    path = str(tmp_path / "gone.pcap")
    decode = DecodeCaptures(120, 1800)._decode
    [output] = list(decode.process(fileio.ReadableFile(FileMetadata(path, 0))))
    assert output.tag == DEAD_LETTER_TAG
    assert output.value["reason"].startswith("cannot open file: [Errno 2] No such file")
    assert (output.value["source"], output.value["offset"]) == (path, None)
