"""Network namespaces for live-capture tests, and the programs the tests run inside them.

``namespace_pair()`` makes two fresh namespaces joined by a veth pair (unique names per run,
deleted at the end even when the test fails), IPv6 off so the link carries only what a test
sends plus ARP. Run as a script, this module is what runs inside them:

- ``serve ADDRESS PORT``: a TCP echo server (one connection at a time) and a UDP echo server;
- ``traffic ADDRESS PORT``: one TCP exchange, ``UDP_COUNT`` UDP datagrams, ``PING_COUNT``
  ICMP echo requests (a raw socket: no ``ping`` binary needed);
- ``flood ADDRESS PORT COUNT``: COUNT numbered 1000-byte UDP datagrams, as fast as it can;
- ``sniff INTERFACE OUT.pcap``: an independent second capture through a plain AF_PACKET
  socket (not libpcap), written when it receives SIGTERM.

Each prints ``ready`` once it is listening.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flowbeam.capture.writer import CapturedPacket, write_pcap
from tests.local_servers import server_unavailable

TCP_PAYLOAD = bytes(range(256)) * 12  # 3072 bytes: several segments on a 1500-byte link
UDP_COUNT = 5
PING_COUNT = 3
PING_ID = 0x4242
FLOOD_BYTES = 1000
ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class NamespacePair:
    """Namespaces ``a`` and ``b``; ``veth_a`` (in a, ``address_a``) is joined to ``veth_b``."""

    a: str
    b: str
    veth_a: str
    veth_b: str
    address_a: str
    address_b: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def namespace_pair() -> Iterator[NamespacePair]:
    """Create the pair (skips the test when namespaces cannot be made here)."""
    if os.geteuid() != 0:
        server_unavailable("network namespaces", "they need root")
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    pair = NamespacePair(f"fbA{tag}", f"fbB{tag}", f"fa{tag}", f"fb{tag}",
                         "10.213.7.1", "10.213.7.2")
    created: list[str] = []
    try:
        for namespace in (pair.a, pair.b):
            try:
                _ip("netns", "add", namespace)
            except subprocess.CalledProcessError as error:
                server_unavailable("network namespaces", error.stderr.decode().strip())
            created.append(namespace)
            subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-qw",
                            "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=True, timeout=30)
            _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("link", "add", pair.veth_a, "netns", pair.a, "type", "veth",
            "peer", "name", pair.veth_b, "netns", pair.b)
        for namespace, veth, address in ((pair.a, pair.veth_a, pair.address_a),
                                         (pair.b, pair.veth_b, pair.address_b)):
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", namespace, "link", "set", veth, "up")
        yield pair
    finally:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=30)


def _stop_on_sigterm() -> list[bool]:
    stopped = [False]
    signal.signal(signal.SIGTERM, lambda *_: stopped.__setitem__(0, True))
    return stopped


def serve(address: str, port: int) -> None:
    """Echo TCP connections and UDP datagrams on ``address:port`` until SIGTERM."""
    stopped = _stop_on_sigterm()
    listener = socket.create_server((address, port))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, port))
    print("ready", flush=True)
    while not stopped[0]:
        readable, _, _ = select.select([listener, udp], [], [], 0.1)
        if udp in readable:
            data, peer = udp.recvfrom(65535)
            udp.sendto(data, peer)
        if listener in readable:
            connection, _ = listener.accept()
            with connection:
                received = b""
                while chunk := connection.recv(65535):
                    received += chunk
                connection.sendall(received)


def _icmp_echo(sequence: int) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, PING_ID, sequence)
    payload = b"flowbeam-ping"
    total = 0
    for (word,) in struct.iter_unpack("!H", header + payload + b"\0" * (len(payload) % 2)):
        total += word
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    return struct.pack("!BBHHH", 8, 0, checksum, PING_ID, sequence) + payload


def traffic(address: str, port: int) -> None:
    """One TCP echo exchange, UDP_COUNT datagrams and PING_COUNT pings to ``address``."""
    with socket.create_connection((address, port), timeout=10) as connection:
        connection.sendall(TCP_PAYLOAD)
        connection.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := connection.recv(65535):
            echoed += chunk
    assert echoed == TCP_PAYLOAD, "the TCP echo came back different"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        for number in range(UDP_COUNT):
            udp.sendto(f"udp-{number}".encode(), (address, port))
            assert udp.recv(65535) == f"udp-{number}".encode()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as icmp:
        icmp.settimeout(10)
        for sequence in range(1, PING_COUNT + 1):
            icmp.sendto(_icmp_echo(sequence), (address, 0))
            while True:  # the raw socket also sees our own request on some kernels
                reply = icmp.recv(65535)
                header = (reply[0] & 0xF) * 4
                if reply[header] == 0:
                    break
    print("done", flush=True)


def flood(address: str, port: int, count: int) -> None:
    """``count`` UDP datagrams of FLOOD_BYTES, each starting with its number (8 bytes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        padding = bytes(FLOOD_BYTES - 8)
        for number in range(count):
            udp.sendto(number.to_bytes(8, "big") + padding, (address, port))
    print("done", flush=True)


def sniff(interface: str, output: str) -> None:
    """Capture every frame on ``interface`` with an AF_PACKET socket until SIGTERM."""
    stopped = _stop_on_sigterm()
    # Protocol 0 receives nothing until bind() names the interface: no other frames sneak in.
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    raw.bind((interface, ETH_P_ALL))
    print("ready", flush=True)
    frames = []
    while not stopped[0]:
        readable, _, _ = select.select([raw], [], [], 0.1)
        if readable:
            frames.append(CapturedPacket(time.time_ns(), raw.recv(262144)))
    while True:  # what arrived before the signal
        try:
            frames.append(CapturedPacket(time.time_ns(), raw.recv(262144, socket.MSG_DONTWAIT)))
        except BlockingIOError:
            break
    with open(output, "wb") as stream:
        write_pcap(stream, frames)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "serve":
        serve(arguments[0], int(arguments[1]))
    elif command == "traffic":
        traffic(arguments[0], int(arguments[1]))
    elif command == "flood":
        flood(arguments[0], int(arguments[1]), int(arguments[2]))
    elif command == "sniff":
        sniff(arguments[0], arguments[1])
    else:
        sys.exit(f"unknown command {command!r}")
