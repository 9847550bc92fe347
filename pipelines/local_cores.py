"""Local batch runs on several cores, when asked for, and the end of a local run (batch:
once its summary is out; streaming: at Ctrl-C).

Beam's in-process engine (``FnApiRunner``) runs every stage on one core. With
``--direct_num_workers=N --direct_running_mode=multi_processing`` it starts N SDK worker
processes and hands each stage's input out among them; a big capture split into byte ranges
(``transforms.capture_ranges``, exact) is then decoded on every core at once. Starting the
workers costs a Beam import each (~2 s), stopping them ~1.5 s, and fragments move between
processes, so it is the user's choice, not a default (see ``local_workers``): by default the
in-process runner decodes a big local capture on every core with plain worker processes
instead (``--decode_processes``, ``flowbeam.packets.range_pool``).

The workers' log lines reach the launcher through Beam's logging service, which prints each
as a raw ``LogEntry`` protobuf; ``WorkerLogFilter`` turns them back into the message alone and
drops the workers' start-up notice about a missing semi-persistent directory (a Dataflow
concept that means nothing here).
"""

from __future__ import annotations

import codecs
import gc
import logging
import os
import re
import signal
import sys
import threading
from typing import NoReturn

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipelines.options import BATCH_RUNNER

_WORKER_LOGGER = "apache_beam.runners.portability.local_job_service"
_MESSAGE = re.compile(r'\bmessage: "((?:[^"\\]|\\.)*)"')
_NOISE = ("No semi_persistent_directory found",)
STOPPED = ("flowbeam: stopped (flows still open, and rows not yet in a file, are not "
           "written)")


def local_workers(options: PipelineOptions) -> int:
    """How many processes decode at once on the local runner: the workers the user asked for
    (``--direct_num_workers=N --direct_running_mode=multi_processing``), else 1; their log
    lines get ``WorkerLogFilter``.

    Not a default: on this project's 2-core machine two workers took as long as one process
    on the 20M-packet capture (22.5-25.6 s against 22.4-23.9 s, alternating runs): the second
    core halves the decoding, but starting and stopping the workers and moving fragments
    between processes cost as much.
    """
    direct = options.view_as(DirectOptions)
    if (options.view_as(StandardOptions).runner != BATCH_RUNNER
            or direct.direct_running_mode != "multi_processing"):
        return 1
    install_worker_log_filter()
    return direct.direct_num_workers or os.cpu_count() or 1


class WorkerLogFilter(logging.Filter):
    """A worker's relayed ``LogEntry`` as its message alone; start-up noise dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.args or not isinstance(record.args, tuple):
            return True
        found = _MESSAGE.search(str(record.args[0]))
        if found is None:
            return True
        message = worker_message(found.group(1))
        if message.startswith(_NOISE):
            return False
        record.msg, record.args = "%s", (message,)
        return True


def worker_message(escaped: str) -> str:
    """A protobuf text-format string (C escapes; UTF-8 as is or as octal bytes) as the text
    it holds."""
    return codecs.escape_decode(escaped.encode("utf-8"))[0].decode("utf-8", "replace")


def install_worker_log_filter() -> None:
    """Once per process: the logger Beam relays worker log lines through gets the filter."""
    logger = logging.getLogger(_WORKER_LOGGER)
    if not any(isinstance(existing, WorkerLogFilter) for existing in logger.filters):
        logger.addFilter(WorkerLogFilter())


def freeze_imported_objects() -> None:
    """Leave what the imports made (Beam's modules: ~1.5M objects) out of the cyclic garbage
    collector's full collections: it lives as long as the process anyway. On the 20M-packet
    capture the collections during the run took 1.10 s before, 0.54 s after (gc.callbacks
    timings, one run each). Called by a batch run's entry point, never by ``run()``: a test
    process calls that many times, and would keep its garbage."""
    gc.freeze()


def exit_after_run(code: int) -> NoReturn:
    """End the process once a batch run is over and its summary printed, without the
    interpreter's teardown of what Beam's runner leaves behind (its gRPC servers and worker
    channels): that took ~0.75 s after a 20M-packet run, with every file already closed.
    Output is flushed first; nothing else is pending."""
    logging.shutdown()
    _exit_now(code)


def exit_on_interrupt(message: str = STOPPED) -> None:
    """From now on Ctrl-C (SIGINT) prints ``message`` and ends the process at once: a local
    streaming run has no other end. Call it from the main thread.

    Not by catching ``KeyboardInterrupt`` around ``wait_until_finish``: only the main thread
    raises it, and twice in one test run a streaming pipeline's main thread had not within
    30 s (its exit code then -9); ``result.cancel()`` in turn waits for the DirectRunner's
    readers, which may sit in a 30 s pull. Python writes every signal it catches to the
    wakeup fd from its C handler, whatever the main thread is doing, so a thread watching
    that fd acts on it. Every file written so far is complete (written under a temporary
    name, then renamed); what was not yet written is lost, as ``message`` says.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the watcher acts on it
    threading.Thread(target=_exit_at_sigint, args=(read_fd, message), daemon=True,
                     name="flowbeam-interrupt").start()


def _exit_at_sigint(read_fd: int, message: str) -> None:
    while signal.SIGINT not in os.read(read_fd, 64):
        pass
    print(message, file=sys.stderr)
    _exit_now(0)  # without logging.shutdown(): a stuck thread may hold a handler's lock


def _exit_now(code: int) -> NoReturn:
    """Flush the output, then end the process without the interpreter's teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
