"""Local batch runs on every core: the DirectRunner's engine with one worker process per core.

Beam's in-process engine (``FnApiRunner``) runs every stage on one core. With
``--direct_running_mode=multi_processing`` it starts ``--direct_num_workers`` SDK worker
processes and hands each stage's input out among them; a big capture split into byte ranges
(``transforms.capture_ranges``) is then decoded on every core at once. Starting the workers
costs a Beam import each (~2 s) and stopping them ~1.5 s, so only runs with enough input take
them: a capture of a few hundred MB still runs in one process.

The workers' log lines reach the launcher through Beam's logging service, which prints each
as a raw ``LogEntry`` protobuf; ``WorkerLogFilter`` turns them back into the message alone and
drops the workers' start-up notice about a missing semi-persistent directory (a Dataflow
concept that means nothing here).
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

IN_PROCESS_RUNNER = "FnApiRunner"
# Below this much input, the workers' fixed cost (~3 s to start them and stop them) is more than
# the second core saves: the 3M-packet capture (460 MB) took 6.2-7.3 s in one process and
# 8.8-9.5 s with two workers, the 20M one (3.3 GB) 26 s and 22.5 s; they break even near 1.5 GB.
MIN_BYTES_FOR_WORKERS = 1536 << 20
_WORKER_LOGGER = "apache_beam.runners.portability.local_job_service"
_MESSAGE = re.compile(r'\bmessage: "((?:[^"\\]|\\.)*)"')
_NOISE = ("No semi_persistent_directory found",)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def spread_over_cores(options: PipelineOptions, argv: Sequence[str], input_bytes: int,
                      parts: int, cores: int | None = None,
                      min_bytes: int = MIN_BYTES_FOR_WORKERS) -> int:
    """Give a local batch run one worker process per core when it has ``min_bytes`` of input
    or more in at least two ``parts`` that can be decoded at once (files, or a file's byte
    ranges), unless the user chose ``--direct_num_workers``/``--direct_running_mode``. One
    part (a single compressed capture) would keep one worker busy and the others idle, and
    pay for moving its fragments between processes (~30% slower on the 20M capture).

    Returns how many processes decode at once: 1 in process, else the workers.
    """
    direct = options.view_as(DirectOptions)
    in_process = options.view_as(StandardOptions).runner == IN_PROCESS_RUNNER
    chosen = any(arg.startswith(("--direct_num_workers", "--direct_running_mode"))
                 for arg in argv)
    cores = usable_cores() if cores is None else cores
    if in_process and not chosen and cores >= 2 and parts >= 2 and input_bytes >= min_bytes:
        direct.direct_num_workers = cores
        direct.direct_running_mode = "multi_processing"
    if not in_process or direct.direct_running_mode == "in_memory":
        return 1
    install_worker_log_filter()
    return direct.direct_num_workers or cores


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


def exit_after_run(code: int) -> NoReturn:
    """End the process once a batch run is over and its summary printed, without the
    interpreter's teardown of what Beam's runner leaves behind (its gRPC servers and worker
    channels): that took ~0.75 s after a 20M-packet run, with every file already closed.
    Output is flushed first; nothing else is pending."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
