"""Synthetic traffic with a known answer: the sample capture and the benchmark captures.

Each generated flow is a complete conversation (a TCP connection with handshake and FIN
close, a UDP request/response exchange, or an ICMP echo exchange, over IPv4 or IPv6) whose
packets are interleaved with every other flow's in time order, as on a real link. Because the
generator knows every flow, it returns the exact expected flow table, so a run over the
capture can be checked row for row, and the capture can be as large as a benchmark needs
while memory stays flat (packets are produced in time order from NumPy arrays, not lists).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flowbeam.capture.writer import CapturedPacket, write_pcap

TCP_KIND, UDP_KIND, ICMP_KIND = 0, 1, 2
REFUSED_KIND = 3  # a TCP connection attempt the server refuses: SYN, then RST+ACK
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_ETH_IPV4 = bytes.fromhex("02000000000202000000000108" + "00")
_ETH_IPV6 = bytes.fromhex("02000000000202000000000186" + "dd")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHHH")


@dataclass(frozen=True)
class ExpectedFlow:
    """What a flow meter must report for one generated flow (IP bytes)."""

    protocol: int
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    first_ns: int
    last_ns: int
    src_packets: int
    dst_packets: int
    src_bytes: int
    dst_bytes: int


@dataclass(frozen=True)
class TrafficPlan:
    """Per-flow parameters (NumPy arrays, one element per flow) and the packet schedule."""

    kind: np.ndarray  # TCP_KIND / UDP_KIND / ICMP_KIND / REFUSED_KIND
    ipv6: np.ndarray  # bool
    packets: np.ndarray  # packets in the flow
    start_ns: np.ndarray
    gap_ns: np.ndarray  # time between consecutive packets of the flow
    payload: np.ndarray  # payload bytes of each data packet
    client: np.ndarray  # client host number (unique per flow, so 5-tuples never collide)
    server: np.ndarray  # server host number
    sport: np.ndarray

    def __len__(self) -> int:
        return len(self.kind)


def plan_traffic(flows: int, packets: int, seed: int = 1, start_s: int = 1_700_000_000,
                 duration_s: float = 600.0, refused: float = 0.0) -> TrafficPlan:
    """Choose ``flows`` flows totalling about ``packets`` packets over ``duration_s``.

    Flow sizes vary (a few packets to a few hundred), client addresses are unique per flow so no two
    flows share a 5-tuple, and gaps stay far below a 120 s idle timeout. A ``refused`` fraction
    of the TCP flows are refused connection attempts (2 packets: SYN, RST+ACK), as real traffic
    has; they are drawn from a separate random stream, so with ``refused=0`` every other flow is
    exactly what it was before they existed (the benchmarks' captures do not change).
    """
    rng = np.random.default_rng(seed)
    mean = max(packets / flows, 6.0)
    sizes = np.maximum(6, rng.geometric(1.0 / (mean - 5.0), flows) + 5).astype(np.int64)
    kind = rng.choice([TCP_KIND, UDP_KIND, ICMP_KIND], flows, p=[0.7, 0.25, 0.05])
    # ICMP echo and UDP exchanges alternate request/response: keep them even.
    sizes = np.where(kind == TCP_KIND, sizes, sizes + sizes % 2)
    span_ns = int(duration_s * 1e9)
    start = start_s * 1_000_000_000 + rng.integers(0, span_ns // 2, flows)
    gap = rng.integers(200_000, 2_000_000_000, flows) // np.maximum(sizes, 1)
    if refused:
        chosen = (kind == TCP_KIND) & (np.random.default_rng([seed, 1]).random(flows) < refused)
        kind = np.where(chosen, REFUSED_KIND, kind)
        sizes = np.where(chosen, 2, sizes)
    return TrafficPlan(
        kind=kind, ipv6=rng.random(flows) < 0.2, packets=sizes, start_ns=np.sort(start),
        gap_ns=np.maximum(gap, 1000), payload=rng.integers(0, 1200, flows),
        client=np.arange(flows), server=rng.integers(1, 200, flows),
        sport=1024 + np.arange(flows) % 60000,
    )


def _address(host: int, ipv6: bool, server: bool) -> bytes:
    """Servers are 10.1.0.N / fd00:1::N; client N is unique per flow (10.2.0.0/15 and up)."""
    if ipv6:
        return struct.pack("!HHIQ", 0xFD00, 0x1 if server else 0x2, 0, host)
    if server:
        return bytes((10, 1, 0, host))
    return bytes((10, 2 + (host >> 16), (host >> 8) & 0xFF, host & 0xFF))


def _frame(plan: TrafficPlan, flow: int, index: int) -> tuple[bytes, bool]:
    """Frame ``index`` of ``flow`` and whether the client sent it."""
    kind = int(plan.kind[flow])
    size = int(plan.packets[flow])
    ipv6 = bool(plan.ipv6[flow])
    from_client = index % 2 == 0
    payload_len = int(plan.payload[flow])
    client_port, server_port = int(plan.sport[flow]), 53 if kind == UDP_KIND else 443
    if kind == REFUSED_KIND:
        flags, payload_len = (SYN, 0) if from_client else (RST | ACK, 0)
        sport, dport = (client_port, server_port) if from_client else (server_port, client_port)
        transport = _TCP.pack(sport, dport, index, index, 0x50, flags, 65535, 0, 0)
        protocol = 6
    elif kind == TCP_KIND:
        if index == 0:
            flags, payload_len = SYN, 0
        elif index == 1:
            flags, payload_len = SYN | ACK, 0
        elif index == size - 3:
            flags, payload_len, from_client = FIN | ACK, 0, True
        elif index == size - 2:
            flags, payload_len, from_client = FIN | ACK, 0, False
        elif index == size - 1:
            flags, payload_len, from_client = ACK, 0, True
        else:
            flags = ACK | PSH if payload_len else ACK
        sport, dport = (client_port, server_port) if from_client else (server_port, client_port)
        transport = _TCP.pack(sport, dport, index, index, 0x50, flags, 65535, 0, 0)
        protocol = 6
    elif kind == UDP_KIND:
        sport, dport = (client_port, server_port) if from_client else (server_port, client_port)
        transport = _UDP.pack(sport, dport, 8 + payload_len, 0)
        protocol = 17
    else:
        icmp_type = (128 if from_client else 129) if ipv6 else (8 if from_client else 0)
        transport = _ICMP.pack(icmp_type, 0, 0, client_port, index // 2)
        protocol = 58 if ipv6 else 1
    body = transport + bytes(payload_len)
    src = _address(int(plan.client[flow] if from_client else plan.server[flow]), ipv6,
                   server=not from_client)
    dst = _address(int(plan.server[flow] if from_client else plan.client[flow]), ipv6,
                   server=from_client)
    if ipv6:
        return _ETH_IPV6 + _IPV6.pack(0x60000000, len(body), protocol, 64, src, dst) + body, (
            from_client)
    header = _IPV4.pack(0x45, 0, 20 + len(body), index & 0xFFFF, 0x4000, 64, protocol, 0, src, dst)
    return _ETH_IPV4 + header + body, from_client


def packet_schedule(plan: TrafficPlan, chunk: int = 1 << 20) -> Iterator[tuple[int, int, int]]:
    """(ts_ns, flow, index) of every packet, in time order, a bounded chunk at a time."""
    flows = np.repeat(np.arange(len(plan)), plan.packets)
    starts = np.cumsum(plan.packets) - plan.packets
    index = np.arange(len(flows)) - np.repeat(starts, plan.packets)
    times = plan.start_ns[flows] + index * plan.gap_ns[flows]
    order = np.argsort(times, kind="stable")
    for begin in range(0, len(order), chunk):
        part = order[begin:begin + chunk]
        yield from zip(times[part].tolist(), flows[part].tolist(), index[part].tolist(),
                       strict=True)


def generate_packets(plan: TrafficPlan) -> Iterator[CapturedPacket]:
    for ts_ns, flow, index in packet_schedule(plan):
        yield CapturedPacket(ts_ns, _frame(plan, flow, index)[0])


def expected_flows(plan: TrafficPlan) -> list[ExpectedFlow]:
    """The flow table a correct flow meter reports for ``plan`` (IP bytes, us timestamps)."""
    expected = []
    for flow in range(len(plan)):
        counts = {True: [0, 0], False: [0, 0]}
        frames = [_frame(plan, flow, i) for i in range(int(plan.packets[flow]))]
        for frame, from_client in frames:
            counts[from_client][0] += 1
            counts[from_client][1] += len(frame) - 14
        first_frame = frames[0][0]
        ipv6 = bool(plan.ipv6[flow])
        protocol = first_frame[20] if ipv6 else first_frame[23]
        src, dst = _endpoints(first_frame, ipv6)
        sport, dport = _ports(plan, flow)
        first = int(plan.start_ns[flow])
        expected.append(ExpectedFlow(
            protocol=protocol, src_addr=src, src_port=sport, dst_addr=dst, dst_port=dport,
            first_ns=first, last_ns=first + (int(plan.packets[flow]) - 1) * int(plan.gap_ns[flow]),
            src_packets=counts[True][0], dst_packets=counts[False][0],
            src_bytes=counts[True][1], dst_bytes=counts[False][1]))
    return expected


def _endpoints(frame: bytes, ipv6: bool) -> tuple[str, str]:
    if ipv6:
        return (str(ipaddress.IPv6Address(frame[22:38])), str(ipaddress.IPv6Address(frame[38:54])))
    return str(ipaddress.IPv4Address(frame[26:30])), str(ipaddress.IPv4Address(frame[30:34]))


def _ports(plan: TrafficPlan, flow: int) -> tuple[int, int]:
    kind = int(plan.kind[flow])
    if kind in (TCP_KIND, REFUSED_KIND):
        return int(plan.sport[flow]), 443
    if kind == UDP_KIND:
        return int(plan.sport[flow]), 53
    return (128, 129) if plan.ipv6[flow] else (8, 0)


def write_capture(path: str, flows: int, packets: int, seed: int = 1,
                  refused: float = 0.0) -> TrafficPlan:
    """Write a classic pcap of the planned traffic to ``path``; returns the plan."""
    plan = plan_traffic(flows, packets, seed, refused=refused)
    with open(path, "wb") as stream:
        write_pcap(stream, generate_packets(plan))
    return plan
