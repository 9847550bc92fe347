"""The capture agent when Pub/Sub is away or refuses a batch: batches are retried, kept in
memory and in the spool, or counted as dropped, never lost silently.

Each test replays a real capture into a real Pub/Sub emulator (started on the agent's port
mid-run or for a second run, when the test is about an outage) and checks, by pulling every
batch, that exactly the file's packets arrived.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from flowbeam.agent import batch_format as bf
from flowbeam.agent.spool import Message, Spool
from tests.capture_agent_helpers import (
    agent_command,
    agent_env,
    batch_packets,
    file_packets,
    run_agent,
    shared_capture,
    summary_value,
)
from tests.local_servers import HOST, free_port
from tests.pubsub_emulator import REPO, create_topic, pull, running_emulator, topic_path


def test_batches_wait_in_memory_and_spool_for_pubsub_to_come_back(tmp_path: Path) -> None:
    path = shared_capture("ppp_example.pcap")  # 3.8 MB: 15 uncompressed batches of <= 262184
    port = free_port()
    endpoint, spool, most = f"{HOST}:{port}", tmp_path / "spool", str(24 + 16 + 262144)
    agent = subprocess.Popen(  # memory holds one batch: the other 14 go to the spool
        agent_command("--replay", str(path), "--topic", topic_path("late"), "--compression",
                      "none", "--batch_bytes", most, "--max_pending_bytes", most, "--spool",
                      str(spool), "--drain_seconds", "120"),
        env=agent_env(endpoint), cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        time.sleep(4)  # the agent has read the file; every publish fails
        assert agent.poll() is None and len(list(spool.glob("*.batch"))) == 14
        with running_emulator(port=port) as started:
            create_topic(started, "late", "late-sub")
            stdout, stderr = agent.communicate(timeout=150)
            messages = pull(started, "late-sub", 4631)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr
    assert batch_packets(messages) == file_packets(path)
    assert int(summary_value(stdout, "publish failures").split()[0]) >= 1
    assert summary_value(stdout, "batches") == "15 (15 published, 14 spooled, 0 dropped)"
    assert list(spool.glob("*.batch")) == []


def test_spool_keeps_batches_for_the_next_run_without_it_they_are_dropped(
        tmp_path: Path) -> None:
    path = shared_capture("tcpreplay_test.pcap")  # 179 packets: 4 batches of 50, 50, 50, 29
    port = free_port()
    endpoint, spool = f"{HOST}:{port}", tmp_path / "spool"
    args = ("--replay", str(path), "--topic", topic_path("spooled"), "--batch_packets", "50")
    dropped = run_agent(endpoint, *args, "--drain_seconds", "0")  # no spool: counted, exit 1
    assert dropped.returncode == 1
    assert summary_value(dropped.stdout, "batches") == (
        "4 (0 published, 0 spooled, 4 dropped)")
    assert summary_value(dropped.stdout, "packets published") == "0 (179 dropped)"
    first = run_agent(endpoint, *args, "--drain_seconds", "0", "--spool", str(spool))
    assert first.returncode == 0, first.stderr
    assert summary_value(first.stdout, "batches") == (
        "4 (0 published, 4 spooled, 0 dropped)")
    assert len(list(spool.glob("*.batch"))) == 4
    with running_emulator(port=port) as started:
        create_topic(started, "spooled", "spooled-sub")
        second = run_agent(started, *args, "--spool", str(spool))  # sends the spool too
        assert second.returncode == 0, second.stderr
        messages = pull(started, "spooled-sub", 2 * 179)
    assert list(spool.glob("*.batch")) == []
    assert len({m.attributes["session"] for m in messages}) == 2
    assert sorted(batch_packets(messages)) == sorted(file_packets(path) * 2)


def test_a_damaged_or_refused_spool_file_is_set_aside_not_retried_forever(
        tmp_path: Path) -> None:
    path = shared_capture("tcpreplay_test.pcap")
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "00000000000000000001-1-0.batch").write_bytes(b"\0\0\0\x08not json")
    oversized = Message(bytes(11_000_000), {bf.ATTR_PACKETS: "7", bf.ATTR_SEQUENCE: "3"}, 7)
    assert Spool(spool, 1 << 30).put(oversized)  # Pub/Sub takes at most 10 MB
    with running_emulator() as endpoint:
        create_topic(endpoint, "refused", "refused-sub")
        done = run_agent(endpoint, "--replay", str(path), "--topic", topic_path("refused"),
                         "--spool", str(spool))
        messages = pull(endpoint, "refused-sub", 179)
    assert done.returncode == 1  # a batch was dropped
    assert summary_value(done.stdout, "batches") == "1 (1 published, 0 spooled, 1 dropped)"
    assert summary_value(done.stdout, "packets published") == "179 (7 dropped)"
    assert batch_packets(messages) == file_packets(path)
    assert sorted(p.suffix for p in spool.iterdir()) == [".damaged", ".rejected"]
