"""The capture agent on a real interface: two network namespaces joined by a veth.

Namespace A runs the agent (capturing on its veth), an echo server and a second, independent
capture (a plain AF_PACKET socket); namespace B runs the Pub/Sub emulator on its veth address
and sends the traffic. The agent's uploads to B therefore cross the very link it captures: the
second capture sees them, the agent's batches must not. Everything else on the link must be
in the batches, byte for byte, and the traffic the test sent must be there exactly.

Two more tests run the emulator inside A (on its 127.0.0.1): the interface vanishing under
the agent, and kernel drops forced by stopping the agent (SIGSTOP) during a flood.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import dpkt

from flowbeam.agent import batch_format as bf
from tests.capture_agent_helpers import (
    agent_command,
    agent_env,
    batch_packets,
    ordered,
    summary_value,
)
from tests.netns import PING_COUNT, PING_ID, TCP_PAYLOAD, UDP_COUNT, namespace_pair
from tests.pubsub_emulator import (
    REPO,
    create_topic_in_netns,
    in_netns,
    pull_in_netns,
    running_emulator,
    topic_path,
)

SERVICE_PORT = 7000
SENSOR = "veth-sensor"


@contextlib.contextmanager
def started(command: Sequence[str], netns: str, env: dict[str, str] | None = None,
            ready: str = "ready") -> Iterator[subprocess.Popen]:
    """Run ``command`` in ``netns`` until its first output line starts with ``ready``; stop it
    (SIGTERM, then kill) when the block ends, before the namespace is deleted."""
    process = subprocess.Popen(in_netns(netns, command), cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stream = process.stderr if ready.startswith("flowbeam") else process.stdout
        line = stream.readline()
        assert line.startswith(ready), line + process.stderr.read()
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def frames_of(path: Path) -> list[bytes]:
    with open(path, "rb") as stream:
        return [frame for _, frame in dpkt.pcap.Reader(stream)]


def is_pubsub(frame: bytes, address: str, port: int) -> bool:
    """Whether an Ethernet frame is TCP to or from the emulator."""
    ip = dpkt.ethernet.Ethernet(frame).data
    if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.tcp.TCP):
        return False
    ends = {(dpkt.utils.inet_to_str(ip.src), ip.data.sport),
            (dpkt.utils.inet_to_str(ip.dst), ip.data.dport)}
    return (address, port) in ends


def traffic_summary(frames: list[bytes], client: str, server: str) -> dict[str, object]:
    """What the test's own traffic looks like in ``frames``, per protocol and direction."""
    counts: collections.Counter = collections.Counter()
    for frame in frames:
        ip = dpkt.ethernet.Ethernet(frame).data
        if not isinstance(ip, dpkt.ip.IP):
            counts["not ip"] += 1
            continue
        way = (dpkt.utils.inet_to_str(ip.src), dpkt.utils.inet_to_str(ip.dst))
        if way not in ((client, server), (server, client)):
            continue
        to_server = way == (client, server)
        if isinstance(ip.data, dpkt.tcp.TCP) and SERVICE_PORT in (ip.data.sport, ip.data.dport):
            counts["tcp payload to server" if to_server else "tcp payload to client"] += len(
                ip.data.data)
            if ip.data.flags & dpkt.tcp.TH_SYN:
                counts["tcp syn"] += 1
        elif isinstance(ip.data, dpkt.udp.UDP):
            counts["udp to server" if to_server else "udp to client"] += 1
        elif (isinstance(ip.data, dpkt.icmp.ICMP)
              and isinstance(ip.data.data, dpkt.icmp.ICMP.Echo) and ip.data.data.id == PING_ID):
            counts["echo request" if ip.data.type == 8 else "echo reply"] += 1
    return dict(counts)


def test_live_capture_publishes_the_link_traffic_but_not_its_own(tmp_path: Path) -> None:
    second_capture = tmp_path / "af_packet.pcap"
    helper = [sys.executable, "-m", "tests.netns"]
    with namespace_pair() as pair, running_emulator(pair.address_b, pair.b) as endpoint:
        emulator_host, emulator_port = endpoint.split(":")
        create_topic_in_netns(pair.b, endpoint, "live", "live-sub")
        agent_args = agent_command("--interface", pair.veth_a, "--topic", topic_path("live"),
                                   "--sensor", SENSOR, "--batch_seconds", "1")
        with started([*helper, "sniff", pair.veth_a, str(second_capture)], pair.a) as sniffer, \
                started([*helper, "serve", pair.address_a, str(SERVICE_PORT)], pair.a):
            with started(agent_args, pair.a, agent_env(endpoint),
                         ready="flowbeam capture: capturing") as agent:
                subprocess.run(in_netns(pair.b, [*helper, "traffic", pair.address_a,
                                                 str(SERVICE_PORT)]),
                               cwd=REPO, check=True, timeout=60, capture_output=True)
                agent.send_signal(signal.SIGTERM)  # flushes the open batch
                stdout, stderr = agent.communicate(timeout=60)
            assert agent.returncode == 0, stderr
            sniffer.send_signal(signal.SIGTERM)
            sniffer.wait(timeout=30)
        published = int(summary_value(stdout, "packets published").split()[0])
        messages = pull_in_netns(pair.b, endpoint, "live-sub", published)

    assert summary_value(stdout, "kernel drops") == "0"
    assert int(summary_value(stdout, "packets captured")) == published
    infos = [bf.batch_info(message.attributes) for message in ordered(messages)]
    assert [info.sequence for info in infos] == list(range(len(infos)))
    assert {(info.sensor, info.linktype, info.kernel_drops) for info in infos} == {
        (SENSOR, 1, 0)}
    captured = [frame for _, frame, _, _ in batch_packets(messages)]
    assert len(captured) == published

    # The second capture saw the agent's uploads; the agent's batches hold none of them, and
    # everything else on the link, frame for frame.
    seen = frames_of(second_capture)
    uploads = [frame for frame in seen if is_pubsub(frame, emulator_host, int(emulator_port))]
    assert uploads
    assert not [frame for frame in captured
                if is_pubsub(frame, emulator_host, int(emulator_port))]
    others = [frame for frame in seen if not is_pubsub(frame, emulator_host, int(emulator_port))]
    assert collections.Counter(captured) == collections.Counter(others)

    # And the test's own traffic is there exactly (ARP aside: the only non-IP frames).
    summary = traffic_summary(captured, pair.address_b, pair.address_a)
    assert summary.pop("not ip") >= 2  # who-has and is-at, at least
    assert summary == {
        "tcp payload to server": len(TCP_PAYLOAD), "tcp payload to client": len(TCP_PAYLOAD),
        "tcp syn": 2, "udp to server": UDP_COUNT, "udp to client": UDP_COUNT,
        "echo request": PING_COUNT, "echo reply": PING_COUNT,
    }


def test_interface_going_away_ends_the_capture_after_publishing_it(tmp_path: Path) -> None:
    helper = [sys.executable, "-m", "tests.netns"]
    with namespace_pair() as pair, running_emulator(netns=pair.a) as endpoint:
        create_topic_in_netns(pair.a, endpoint, "gone", "gone-sub")
        agent_args = agent_command("--interface", pair.veth_a, "--topic", topic_path("gone"),
                                   "--batch_seconds", "600")
        with started([*helper, "serve", pair.address_a, str(SERVICE_PORT)], pair.a), \
                started(agent_args, pair.a, agent_env(endpoint),
                        ready="flowbeam capture: capturing") as agent:
            subprocess.run(in_netns(pair.b, [*helper, "traffic", pair.address_a,
                                             str(SERVICE_PORT)]),
                           cwd=REPO, check=True, timeout=60, capture_output=True)
            time.sleep(1)  # the agent reads within ~0.3 s; then the interface goes
            subprocess.run(["ip", "-n", pair.a, "link", "del", pair.veth_a], check=True)
            stdout, stderr = agent.communicate(timeout=60)
        assert agent.returncode == 1
        assert stderr.splitlines()[-1] == (
            f"flowbeam capture: error: capture on {pair.veth_a!r} stopped: "
            "The interface went down")
        captured = int(summary_value(stdout, "packets captured"))
        assert summary_value(stdout, "packets published") == f"{captured} (0 dropped)"
        messages = pull_in_netns(pair.a, endpoint, "gone-sub", captured)
    summary = traffic_summary([frame for _, frame, _, _ in batch_packets(messages)],
                              pair.address_b, pair.address_a)
    assert summary["echo request"] == summary["echo reply"] == PING_COUNT


def test_kernel_drops_are_counted_exactly_per_batch_and_in_the_summary() -> None:
    sent, port = 20000, 9999  # 20 MB against a 1 MiB ring while the agent is stopped
    with namespace_pair() as pair, running_emulator(netns=pair.a) as endpoint:
        create_topic_in_netns(pair.a, endpoint, "drops", "drops-sub")
        agent_args = agent_command("--interface", pair.veth_a, "--topic", topic_path("drops"),
                                   "--bpf", f"udp and dst port {port}",
                                   "--buffer_bytes", str(1 << 20), "--batch_packets", "500")
        with started(agent_args, pair.a, agent_env(endpoint),
                     ready="flowbeam capture: capturing") as agent:
            agent.send_signal(signal.SIGSTOP)  # the kernel can only queue, then drop
            subprocess.run(in_netns(pair.b, [sys.executable, "-m", "tests.netns", "flood",
                                             pair.address_a, str(port), str(sent)]),
                           cwd=REPO, check=True, timeout=120, capture_output=True)
            agent.send_signal(signal.SIGCONT)
            time.sleep(1)
            agent.send_signal(signal.SIGTERM)
            stdout, stderr = agent.communicate(timeout=60)
        assert agent.returncode == 0, stderr
        captured = int(summary_value(stdout, "packets captured"))
        drops = int(summary_value(stdout, "kernel drops"))
        messages = pull_in_netns(pair.a, endpoint, "drops-sub", captured)
    assert drops > 0 and captured + drops == sent
    infos = [bf.batch_info(message.attributes) for message in ordered(messages)]
    assert sum(info.kernel_drops for info in infos) == drops
    numbers = [int.from_bytes(dpkt.ethernet.Ethernet(frame).data.data.data[:8], "big")
               for _, frame, _, _ in batch_packets(messages)]
    assert numbers == sorted(numbers) and len(set(numbers)) == captured  # in order, no repeats
    assert numbers[0] == 0  # the ring kept the first ones, dropped later ones
