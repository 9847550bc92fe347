"""The ``flowbeam`` command as a user runs it: a subprocess, its exit status, its output.

Packet counts are checked against dpkt (an independent reader), not against flowbeam's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from tests.test_pcap_pipeline import read_flows, summary_of

FLOWBEAM = Path(sys.executable).with_name("flowbeam")


def flowbeam(*args: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``flowbeam`` command; FLOWBEAM_* variables of this process are
    dropped so only ``env`` sets them."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBEAM_")}
    return subprocess.run([str(FLOWBEAM), *args], env={**clean, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def dpkt_records(path: Path) -> int:
    with open(path, "rb") as stream:
        return sum(1 for _ in dpkt.pcap.Reader(stream))


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, int]:
    """``flowbeam generate --flows 10``: the capture and its packet count by dpkt."""
    path = tmp_path_factory.mktemp("cli") / "ten.pcap"
    done = flowbeam("generate", "--output", str(path), "--flows", "10", "--seed", "3")
    assert done.returncode == 0, done.stderr
    packets = dpkt_records(path)
    assert done.stdout == f"wrote {path}: {packets} packets in 10 flows\n"
    return path, packets


def test_generate_scales_packets_with_flows(sample):
    """20 packets per flow on average (the 2,000-flow sample's 40,000), not 40,000 for any
    --flows; each flow has at least 6."""
    _, packets = sample
    assert 60 <= packets <= 400


def test_pcap_reads_the_generated_capture(sample, tmp_path):
    path, packets = sample
    done = flowbeam("pcap", "--input", str(path), "--output", str(tmp_path))
    assert (done.returncode, done.stderr) == (0, "")
    summary = summary_of(done.stdout)
    assert (summary["captures read"], summary["packets"], summary["flows"]) == (
        "1", str(packets), "10")
    rows = read_flows(tmp_path)
    assert len(rows) == 10
    assert sum(r["src_packets"] + r["dst_packets"] for r in rows) == packets


def test_the_module_entry_point_ends_with_its_whole_summary(sample, tmp_path):
    """``python -m pipelines.pcap_flows`` (the README's main job) ends the process without
    the interpreter's teardown: its piped output must still be complete."""
    path, packets = sample
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-m", "pipelines.pcap_flows", "--input", str(path),
                           "--output", str(tmp_path)], capture_output=True, text=True,
                          env=buffered, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    summary = summary_of(done.stdout)
    assert (summary["packets"], summary["flows"]) == (str(packets), "10")
    assert done.stdout.splitlines()[-1].split()[0] == "packets/s"
    assert len(read_flows(tmp_path)) == 10


def test_a_rerun_replaces_the_earlier_files_in_one_line(sample, tmp_path):
    path, _ = sample
    (tmp_path / "flows-00001-of-00002.parquet").write_bytes(b"an earlier run's shard")
    assert flowbeam("pcap", "--input", str(path), "--output", str(tmp_path)).returncode == 0
    done = flowbeam("pcap", "--input", str(path), "--output", str(tmp_path))
    assert done.returncode == 0
    # The earlier run's two files (flows and errors); the stray shard went the first time.
    assert done.stderr == f"flowbeam: replacing 2 files of an earlier run in {tmp_path}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "errors-00000-of-00001.jsonl", "flows-00000-of-00001.parquet"]


def test_pcap_help_names_the_command_and_has_no_markup():
    done = flowbeam("pcap", "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: flowbeam pcap [-h] [--input INPUT]")
    assert "``" not in done.stdout
    assert "python -m" not in done.stdout


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--idle_timeout", "abc"], {},
     "flowbeam: error: argument --idle_timeout: invalid float value: 'abc'\n"),
    ([], {"FLOWBEAM_IDLE_TIMEOUT": "abc"},
     "flowbeam: error: FLOWBEAM_IDLE_TIMEOUT: invalid float value: 'abc'\n"),
    (["--inptu", "x.pcap"], {},
     "flowbeam: error: unknown option(s): --inptu (did you mean --input?)\n"),
    (["--byte_accounting", "bits"], {},
     "flowbeam: error: argument --byte_accounting: invalid choice: 'bits' "
     "(choose from 'ip', 'frame')\n"),
], ids=["bad-value", "bad-value-from-environment", "mistyped-flag", "bad-choice"])
def test_usage_errors_are_one_line_and_exit_2(args, env, message, tmp_path):
    done = flowbeam("pcap", "--input", "x.pcap", "--output", str(tmp_path), *args, env=env)
    assert (done.returncode, done.stderr, done.stdout) == (2, message, "")


def test_a_misspelled_environment_variable_is_named_with_a_suggestion(sample, tmp_path):
    path, _ = sample
    done = flowbeam("pcap", "--input", str(path), "--output", str(tmp_path),
                    env={"FLOWBEAM_IDLE_TIMOUT": "5"})
    assert done.returncode == 0
    assert done.stderr == ("flowbeam: warning: FLOWBEAM_IDLE_TIMOUT is no option of this command "
                           "(did you mean FLOWBEAM_IDLE_TIMEOUT?); it is ignored\n")


def test_no_capture_read_exits_1(tmp_path):
    (tmp_path / "notes.pcap").write_text("not packets\n")
    done = flowbeam("pcap", "--input", "*.pcap", "--output", "out", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "flowbeam: error: no capture could be read"
    assert summary_of(done.stdout)["files not captures"] == "1"


def test_no_command_is_a_usage_error_and_an_unknown_one_names_the_choices():
    assert flowbeam().returncode == 2
    done = flowbeam("pcapp")
    prefix = "flowbeam: error: unknown command 'pcapp' (choose from "
    assert done.returncode == 2 and done.stderr.startswith(prefix)
    assert {"pcap", "generate"} <= set(done.stderr[len(prefix):].rstrip(")\n").split(", "))
