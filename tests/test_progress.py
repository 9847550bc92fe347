"""The progress of a long run: files done of those matched, packets, rate, elapsed time; a bar
redrawn in place on a terminal, log lines otherwise."""

from __future__ import annotations

import io
import logging
import re

from pipelines.pcap_flows import run
from tests.test_pcap_pipeline import RUNNER
from transforms import progress
from transforms.progress import RunProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_says_files_packets_rate_and_elapsed_time():
    clock = Clock()
    shown = RunProgress(clock, io.StringIO())
    shown.start(4)
    clock.now += 2
    shown.add(packets=1000, files=2)
    assert shown.line() == "2/4 files, 1,000 packets, 500 packets/s, 2 s"
    shown.start(None)
    assert shown.line() == "0/? files, 0 packets, 0 packets/s, 0 s"


def test_lines_are_logged_every_few_seconds_when_stderr_is_no_terminal(caplog):
    clock = Clock()
    shown = RunProgress(clock, io.StringIO())
    shown.start(3)
    with caplog.at_level(logging.WARNING, logger="transforms.progress"):
        clock.now += progress.EVERY_S - 1
        shown.add(packets=10)  # not due yet
        clock.now += 1
        shown.add(files=1)
        clock.now += 1
        shown.add(packets=5)  # 1 s after the last line
    assert caplog.messages == [f"flowbeam: progress: 1/3 files, 10 packets, 2 packets/s, "
                               f"{progress.EVERY_S:.0f} s"]


def test_a_bar_is_redrawn_in_place_on_a_terminal():
    clock = Clock()
    terminal = Terminal()
    shown = RunProgress(clock, terminal)
    shown.start(3)
    clock.now += progress.EVERY_S
    shown.add(packets=50, files=1)
    clock.now += progress.EVERY_S
    shown.add(files=1)
    shown.finish()
    bars = terminal.getvalue()
    assert bars == ("\r[" + "#" * 10 + "." * 20 + "] 1/3 files, 50 packets, 10 packets/s, 5 s"
                    "\r[" + "#" * 20 + "." * 10 + "] 2/3 files, 50 packets, 5 packets/s, 10 s\n")


def test_a_run_reports_its_files_and_packets(tmp_path, monkeypatch, caplog):
    """The local runner decodes in this process: the launcher's total and the DoFn's counts
    meet in one line (shown after every file when the interval is 0)."""
    from flowbeam.synthetic import write_capture

    plans = [write_capture(str(tmp_path / f"{n}.pcap"), flows=10, packets=200, seed=n)
             for n in (1, 2)]
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="transforms.progress"):
        assert run(["--input", str(tmp_path / "*.pcap"), "--output", str(tmp_path / "out"),
                    RUNNER]) == 0
    packets = sum(int(plan.packets.sum()) for plan in plans)
    last = caplog.messages[-1]
    assert re.fullmatch(rf"flowbeam: progress: 2/2 files, {packets:,} packets, "
                        r"[\d,]+ packets/s, \d+ s", last), last
