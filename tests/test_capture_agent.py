"""Tests of the capture agent (``flowbeam capture``): batching, the batch format, the filter,
and the agent itself replaying real captures into a real Pub/Sub emulator.

Expected packets come from the project's reader over the same file (or from the packets a
test wrote); batches are checked with dpkt as an independent pcap reader. Pub/Sub outages are
in ``test_capture_agent_delivery``, the live capture through network namespaces in
``test_capture_agent_live``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import dpkt
import pcapy
import pytest

from flowbeam.agent import batch_format as bf
from flowbeam.agent.batcher import Batcher
from flowbeam.agent.capture_filter import (
    compose_filter,
    own_traffic_filter,
    pubsub_endpoint,
    split_endpoint,
)
from flowbeam.capture.reader import read_capture
from flowbeam.capture.writer import CapturedPacket
from tests.capture_agent_helpers import (
    agent_command,
    agent_env,
    batch_packets,
    file_packets,
    ordered,
    run_agent,
    shared_capture,
    summary_value,
)
from tests.local_servers import HOST, free_port
from tests.pubsub_emulator import REPO, create_topic, pull, running_emulator, topic_path

T0_US = 1_700_000_000_000_000


def _packet(offset_us: int, size: int = 100) -> CapturedPacket:
    return CapturedPacket((T0_US + offset_us) * 1000, bytes([size % 251]) * size, size + 4)


# --------------------------------------------------------------------------------------------
# The batcher: exact thresholds


def test_batch_closes_at_exactly_max_packets() -> None:
    batcher = Batcher(max_packets=3, max_bytes=1 << 20, max_seconds=60)
    closed = [batcher.add(_packet(i), 1) for i in range(7)]
    assert [len(batches) for batches in closed] == [0, 0, 1, 0, 0, 1, 0]
    assert [len(closed[2][0].packets), len(closed[5][0].packets)] == [3, 3]
    last = batcher.flush()
    assert len(last.packets) == 1 and last.packets[0] == _packet(6) and batcher.flush() is None


def test_batch_never_exceeds_max_bytes() -> None:
    # two 100-byte records fill 24 + 2 * 116 = 256 bytes exactly: the batch closes at once
    batcher = Batcher(max_packets=100, max_bytes=256, max_seconds=60)
    assert batcher.add(_packet(0), 1) == []
    (full,) = batcher.add(_packet(1), 1)
    assert (len(full.packets), full.pcap_bytes) == (2, 256)
    # one byte less: the second packet would overflow, so it starts the next batch
    batcher = Batcher(max_packets=100, max_bytes=255, max_seconds=60)
    assert batcher.add(_packet(0), 1) == []
    (first,) = batcher.add(_packet(1), 1)
    assert (len(first.packets), first.pcap_bytes) == (1, 140)
    assert batcher.flush().packets == [_packet(1)]


def test_batch_spans_less_than_max_seconds_of_capture_time() -> None:
    batcher = Batcher(max_packets=100, max_bytes=1 << 20, max_seconds=1.0)
    assert batcher.add(_packet(0), 1) == [] and batcher.add(_packet(999_999), 1) == []
    (first,) = batcher.add(_packet(1_000_000), 1)  # at the deadline: the next batch
    assert first.packets == [_packet(0), _packet(999_999)]
    assert batcher.poll(T0_US + 1_999_999) is None  # a quiet interface, just before
    assert batcher.poll(T0_US + 2_000_000).packets == [_packet(1_000_000)]
    assert batcher.poll(T0_US + 9_000_000) is None


def test_batch_closes_when_the_link_type_changes() -> None:
    batcher = Batcher(max_packets=100, max_bytes=1 << 20, max_seconds=60)
    batcher.add(_packet(0), 1)
    (ethernet,) = batcher.add(_packet(1), 113)
    assert (ethernet.linktype, len(ethernet.packets)) == (1, 1)
    assert batcher.flush().linktype == 113


# --------------------------------------------------------------------------------------------
# The batch format


def _encode(packets: Sequence[CapturedPacket], compression: str = bf.COMPRESSION_GZIP):
    return bf.encode_batch(packets, linktype=1, sensor="s1", session="abc", sequence=7,
                           kernel_drops=3, snaplen=65535, compression=compression)


@pytest.mark.parametrize("compression", bf.COMPRESSIONS)
def test_batch_round_trip_is_a_plain_pcap_file(compression: str) -> None:
    packets = [_packet(5_000_123 - 1000 * i, 60 + 37 * i) for i in range(20)]  # out of order
    data, attributes = _encode(packets, compression)
    assert attributes == {
        "flowbeam_batch": "1", "sensor": "s1", "session": "abc", "sequence": "7",
        "linktype": "1", "packets": "20", "first_packet_us": str(T0_US + 4_981_123),
        "last_packet_us": str(T0_US + 5_000_123), "ts": str((T0_US + 4_981_123) // 1000),
        "kernel_drops": "3", "compression": compression,
    }
    assert (data[:2] == b"\x1f\x8b") == (compression == bf.COMPRESSION_GZIP)
    pcap = bf.decode_batch(data, attributes)
    want = [(p.ts_ns // 1000, p.data, p.wirelen) for p in packets]
    (records,) = read_capture(io.BytesIO(pcap))
    assert [(ts, bytes(records.data[o:o + c]), w) for ts, o, c, w in zip(
        records.ts_us.tolist(), records.offsets.tolist(), records.caplen.tolist(),
        records.wirelen.tolist(), strict=True)] == want
    reader = dpkt.pcap.Reader(io.BytesIO(pcap))  # a peer reader agrees
    assert reader.datalink() == 1 and reader.snaplen == 65535
    assert [(round(ts * 1e6), frame) for ts, frame in reader] == [w[:2] for w in want]


def test_decode_batch_refuses_what_it_cannot_read() -> None:
    data, attributes = _encode([_packet(0)])
    cases = [
        (data, {k: v for k, v in attributes.items() if k != "session"},
         "not a flowbeam packet batch: missing attributes ['session']"),
        (data, {**attributes, "flowbeam_batch": "2"},
         "unknown batch format version '2' (this reader knows '1'): upgrade the pipeline"),
        (data, {**attributes, "compression": "zstd"}, "unknown compression 'zstd'"),
        (data, {**attributes, "packets": "x"}, "attribute packets is not an integer: 'x'"),
        (data[:30], attributes, "batch data is truncated gzip"),
        (b"junk", attributes, "batch data is not valid gzip: Error -3 while decompressing data: "
                              "incorrect header check"),
        (data, {**attributes, "linktype": "113"},
         "pcap header says link type 1, the linktype attribute 113"),
        (b"\0" * 24, {**attributes, "compression": "none"},
         "batch data is not a little-endian µs pcap (magic 0x00000000)"),
        (gzip.compress(bytes(bf.MAX_BATCH_BYTES + 1)), attributes,
         f"batch inflates to more than {bf.MAX_BATCH_BYTES} bytes"),
    ]
    for payload, attrs, message in cases:
        with pytest.raises(bf.BatchFormatError) as caught:
            bf.decode_batch(payload, attrs)
        assert str(caught.value) == message


# --------------------------------------------------------------------------------------------
# The capture filter


def _frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport)
    ip = dpkt.ip.IP(src=bytes(map(int, src.split("."))), dst=bytes(map(int, dst.split("."))),
                    p=dpkt.ip.IP_PROTO_TCP, data=tcp)
    return bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def test_filter_excludes_exactly_the_endpoint_traffic() -> None:
    own = own_traffic_filter(["10.0.0.2", "10.0.0.3"], 8085)
    assert own == "not ((host 10.0.0.2 or host 10.0.0.3) and port 8085)"
    assert own_traffic_filter(["::1"], 443) == "not (host ::1 and port 443)"
    both = compose_filter(" udp or tcp ", own)
    assert both == f"(udp or tcp) and {own}"
    assert compose_filter("", own) == own and compose_filter("tcp", "") == "tcp"
    program = pcapy.compile(1, 65535, both, 1, 0)  # real libpcap decides
    matches = {case: program.filter(_frame(*case)) > 0 for case in [
        ("10.0.0.1", "10.0.0.2", 40000, 8085), ("10.0.0.3", "10.0.0.1", 8085, 40000),
        ("10.0.0.1", "10.0.0.2", 40000, 8086), ("10.0.0.1", "10.0.0.4", 40000, 8085)]}
    assert list(matches.values()) == [False, False, True, True]


def test_endpoint_comes_from_the_emulator_variable() -> None:
    assert pubsub_endpoint({}) == "pubsub.googleapis.com:443"
    assert pubsub_endpoint({"PUBSUB_EMULATOR_HOST": "[::1]:8085"}) == "[::1]:8085"
    assert split_endpoint("[::1]:8085") == ("::1", 8085)
    assert split_endpoint("localhost:80") == ("localhost", 80)
    for bad in ("localhost", "host:0", ":80", "host:http"):
        with pytest.raises(ValueError):
            split_endpoint(bad)


# --------------------------------------------------------------------------------------------
# The agent, replaying real captures into the Pub/Sub emulator


@pytest.fixture
def emulator() -> Iterator[str]:
    """A fresh Pub/Sub emulator on 127.0.0.1 for one test: its host:port."""
    with running_emulator() as endpoint:
        yield endpoint


def test_replay_publishes_every_packet_exactly(emulator: str) -> None:
    path = shared_capture("ppp_example.pcap")
    create_topic(emulator, "replay", "replay-sub")
    done = run_agent(emulator, "--replay", str(path), "--topic", topic_path("replay"),
                     "--sensor", "archive-1", "--batch_bytes", "500000", "--batch_seconds", "2")
    assert done.returncode == 0, done.stderr
    want = file_packets(path)
    messages = pull(emulator, "replay-sub", len(want))
    assert batch_packets(messages) == want
    infos = [bf.batch_info(m.attributes) for m in ordered(messages)]
    assert [info.sequence for info in infos] == list(range(len(messages)))
    assert {(info.sensor, info.linktype, info.kernel_drops, info.compression)
            for info in infos} == {("archive-1", 1, 0, "gzip")}
    assert len({info.session for info in infos}) == 1
    for info, message in zip(infos, ordered(messages), strict=True):
        assert info.last_packet_us - info.first_packet_us < 2_000_000
        assert len(bf.decode_batch(message.data, message.attributes)) <= 500_000
    assert summary_value(done.stdout, "packets captured") == str(len(want))
    assert summary_value(done.stdout, "batches") == (
        f"{len(messages)} ({len(messages)} published, 0 spooled, 0 dropped)")


def test_replay_of_a_gzipped_pcapng_with_two_link_types(emulator: str, tmp_path: Path) -> None:
    source = shared_capture("ppp_ldap_mixed_linktypes.pcapng")
    path = tmp_path / "mixed.pcapng.gz"
    path.write_bytes(gzip.compress(source.read_bytes()))
    create_topic(emulator, "mixed", "mixed-sub")
    done = run_agent(emulator, env={  # every option may come from the environment
        "FLOWBEAM_REPLAY": str(path), "FLOWBEAM_TOPIC": topic_path("mixed"),
        "FLOWBEAM_COMPRESSION": "none", "FLOWBEAM_SENSOR": "from-env",
        "FLOWBEAM_BATCH_SECONDS": "1e9"})  # its timestamps span 19 years
    assert done.returncode == 0, done.stderr
    want = file_packets(path)
    messages = pull(emulator, "mixed-sub", len(want))
    assert batch_packets(messages) == want
    runs = [lt for i, (*_, lt) in enumerate(want) if i == 0 or want[i - 1][3] != lt]
    infos = [bf.batch_info(m.attributes) for m in ordered(messages)]
    assert [info.linktype for info in infos] == runs  # one batch per run of a link type
    assert {(info.compression, info.sensor) for info in infos} == {("none", "from-env")}


def test_damaged_replay_publishes_every_record_before_the_damage_and_exits_1(
        emulator: str) -> None:
    path = shared_capture("sv_http-mime_truncated_file.pcap")  # cut inside its last record header
    create_topic(emulator, "damaged", "damaged-sub")
    done = run_agent(emulator, "--replay", str(path), "--topic", topic_path("damaged"))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "flowbeam capture: error: file ends inside a record header (1 of 16 bytes) "
        "(at byte 2715459)")
    want = []  # dpkt, an independent reader, stops at the same record
    with path.open("rb") as stream, contextlib.suppress(dpkt.NeedData):
        for ts, frame in dpkt.pcap.Reader(stream):
            want.append((round(ts * 1e6), frame))
    assert len(want) == 2696
    messages = pull(emulator, "damaged-sub", len(want))
    assert [(ts, frame) for ts, frame, _, _ in batch_packets(messages)] == want


def test_sigterm_flushes_the_open_batch_and_prints_the_summary(emulator: str) -> None:
    path = shared_capture("ppp_sll.pcap")  # 518 packets over 51 s; 9 in its first 12.9 s,
    # the 10th at 16.8 s: at twice real time, due 6.4 s and 8.4 s after the start
    create_topic(emulator, "paced", "paced-sub")
    agent = subprocess.Popen(
        agent_command("--replay", str(path), "--topic", topic_path("paced"), "--speed", "2",
                      "--batch_seconds", "600", "--progress_seconds", "1"),
        env=agent_env(emulator), cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert agent.stderr.readline().startswith("flowbeam capture: replaying")
        time.sleep(7)
        agent.send_signal(signal.SIGTERM)
        stdout, stderr = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr
    progress = re.findall(r"^flowbeam capture: \d+ packets, 0 kernel drops, 0 batches, "
                          r"0 published \(0.0 MB\), 0 pending, 0 spooled, 0 failures$",
                          stderr, re.MULTILINE)
    assert len(progress) >= 2, stderr  # one a second while the batch stays open
    assert summary_value(stdout, "packets captured") == "9"
    assert summary_value(stdout, "packets published") == "9 (0 dropped)"
    messages = pull(emulator, "paced-sub", 9)
    assert len(messages) == 1  # the open batch, flushed: no threshold was reached
    assert batch_packets(messages) == file_packets(path)[:9]


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr.strip()


def test_bad_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    endpoint = f"{HOST}:{free_port()}"  # never reached: each case fails before publishing
    topic = topic_path("unused")
    cases = {
        ("--interface", "lo", "--topic", "topics/x"):
            "flowbeam capture: error: bad topic 'topics/x': expected "
            "projects/PROJECT/topics/TOPIC",
        ("--replay", str(tmp_path / "none.pcap"), "--topic", topic):
            f"flowbeam capture: error: cannot read {tmp_path / 'none.pcap'}: "
            "No such file or directory",
        ("--topic", topic): "flowbeam capture: error: give exactly one of --interface and "
                            "--replay",
    }
    if os.geteuid() == 0:  # without the capabilities, opening the capture fails first
        cases["--interface", "nosuch0", "--topic", topic] = (
            "flowbeam capture: error: no such interface: 'nosuch0'")
        cases["--interface", "lo", "--topic", topic, "--bpf", "tcp and and"] = (
            "flowbeam capture: error: bad BPF filter 'tcp and and': can't parse filter "
            "expression: syntax error")
    for args, message in cases.items():
        assert _one_line_error(run_agent(endpoint, *args)) == message


def test_missing_topic_is_a_usage_error(emulator: str) -> None:
    done = run_agent(emulator, "--replay", str(shared_capture("tcpreplay_test.pcap")), "--topic",
                     topic_path("missing"))
    assert _one_line_error(done) == (
        f"flowbeam capture: error: topic {topic_path('missing')} does not exist")


def test_no_permission_names_the_capabilities() -> None:
    # root drops both capabilities for the agent; anyone else has none to drop
    drop = (["setpriv", "--inh-caps=-net_raw,-net_admin", "--bounding-set=-net_raw,-net_admin"]
            if os.geteuid() == 0 else [])
    command = [*drop, *agent_command("--interface", "lo", "--topic", topic_path("unused"))]
    done = subprocess.run(command, env=agent_env(f"{HOST}:1"), cwd=REPO, text=True,
                          capture_output=True, timeout=60, check=False)
    assert _one_line_error(done) == (
        "flowbeam capture: error: no permission to capture on 'lo': capturing needs "
        "CAP_NET_RAW and CAP_NET_ADMIN: run as root, or setcap cap_net_raw,cap_net_admin=eip "
        "on the Python binary")
