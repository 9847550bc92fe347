"""Local runs with worker processes: when the pcap pipeline has them, what it splits for them,
and what the launcher shows of their log lines."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_fn_api_pb2

from pipelines.local_cores import WorkerLogFilter, local_workers, worker_message
from pipelines.options import OptionsError
from pipelines.pcap_flows import AUTO_SPLIT_MB, run, split_mb_of
from tests.test_pcap_pipeline import read_flows, summary_of

SHARED_PCAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcaps"


def relayed(message: str) -> logging.LogRecord:
    """A worker's log line as Beam's logging service hands it to the launcher's logging."""
    entry = beam_fn_api_pb2.LogEntry(
        severity=beam_fn_api_pb2.LogEntry.Severity.WARN, message=message,
        log_location="/work/main/transforms/capture_reports.py:62", thread="Thread-13")
    return logging.LogRecord("apache_beam.runners.portability.local_job_service",
                             logging.WARNING, __file__, 1, "Worker: %s",
                             (str(entry).replace("\n", " "),), None)


@pytest.mark.parametrize("message", [
    "flowbeam: a.pcap: skipped 440 packets: 440 not IP",
    'flowbeam: "quoted" path\\with\\backslashes and a tab\tand a newline\nend',
    "flowbeam: café → ünïcode ✓",
])
def test_a_worker_log_line_shows_its_message_alone(message):
    record = relayed(message)
    assert WorkerLogFilter().filter(record)
    assert record.getMessage() == message


def test_the_workers_start_up_notice_is_dropped():
    record = relayed("No semi_persistent_directory found: User registered objects ...")
    assert not WorkerLogFilter().filter(record)


def test_other_log_lines_are_left_alone():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain %s", ("text",), None)
    assert WorkerLogFilter().filter(record)
    assert record.getMessage() == "plain text"
    assert worker_message(r"caf\303\251") == "café"


@pytest.mark.parametrize(("argv", "workers"), [
    (["--runner=FnApiRunner"], 1),  # one process unless asked
    (["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
     2),
    (["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"],
     1),  # threads share one core's worth of Python
    (["--runner=DataflowRunner", "--direct_num_workers=2",
      "--direct_running_mode=multi_processing"], 1),  # not a local run
])
def test_local_workers_are_the_users_choice(argv, workers):
    logger = logging.getLogger("apache_beam.runners.portability.local_job_service")
    logger.filters = [f for f in logger.filters if not isinstance(f, WorkerLogFilter)]
    assert local_workers(PipelineOptions(argv)) == workers
    assert any(isinstance(f, WorkerLogFilter) for f in logger.filters) == (workers > 1)


def test_worker_processes_give_the_rows_of_one_process(tmp_path, capsys, caplog):
    """A shared capture split into ranges and decoded by two worker processes: the rows, the
    summary and the skipped-packets warning (a worker's log line) are a one-process run's."""
    capture = tmp_path / "ppp_sll.pcap"
    shutil.copy(SHARED_PCAPS / "ppp_sll.pcap", capture)
    assert run(["--input", str(capture), "--output", str(tmp_path / "one"),
                "--runner=FnApiRunner"]) == 0
    one = summary_of(capsys.readouterr().out)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run(["--input", str(capture), "--output", str(tmp_path / "two"),
                    "--runner=FnApiRunner", "--split_mb=0.1", "--direct_num_workers=2",
                    "--direct_running_mode=multi_processing"]) == 0
    two = summary_of(capsys.readouterr().out)
    key = lambda row: row["id"]  # noqa: E731
    assert sorted(read_flows(tmp_path / "two"), key=key) == sorted(
        read_flows(tmp_path / "one"), key=key)
    for label in ("captures read", "packets", "skipped packets", "flows", "bytes"):
        assert two[label] == one[label]
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "LogEntry" in m or "severity:" in m], messages


@pytest.mark.parametrize(("argv", "workers", "expected"), [
    ([], 1, 0.0),  # one process: splitting a file only costs
    ([], 2, AUTO_SPLIT_MB),
    (["--runner=DataflowRunner"], 1, AUTO_SPLIT_MB),
    (["--split_mb=0"], 2, 0.0),  # the user's choice wins
    (["--split_mb=64"], 1, 64.0),
])
def test_big_captures_are_split_when_there_are_workers_to_share_them(argv, workers, expected):
    assert split_mb_of(PipelineOptions(argv), workers) == expected


def test_a_negative_split_size_is_refused():
    with pytest.raises(OptionsError, match=r"--split_mb must be 0 \(no splits\) or positive"):
        split_mb_of(PipelineOptions(["--split_mb=-1"]), 2)


# --- Ctrl-C ends a local streaming run ------------------------------------------------------

STUCK_MAIN_THREAD = """
import os, sys
from pipelines.local_cores import exit_on_interrupt
exit_on_interrupt("flowbeam: stopped (test)")
print("ready", flush=True)
read_end, _ = os.pipe()
os.read(read_end, 1)  # blocks for ever: only the watcher can end the process
"""


def test_ctrl_c_ends_the_process_even_when_the_main_thread_is_stuck():
    process = subprocess.Popen([sys.executable, "-c", STUCK_MAIN_THREAD],
                               cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr.read() == "flowbeam: stopped (test)\n"
