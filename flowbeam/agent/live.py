"""Packets from a network interface, through libpcap (pcapy-ng).

On Linux, libpcap's read timeout does not fire while the interface is quiet: a blocking
``dispatch`` could wait forever, and with it the seconds threshold and a shutdown request. So
the handle is non-blocking and the loop waits in ``select`` on its descriptor with a short
timeout, then drains whatever arrived. The read timeout still matters: it is how long the
kernel holds a partly filled buffer block before handing it over (TPACKET_V3), so it bounds
the delay between a packet on the wire and the agent seeing it.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pcapy

from flowbeam.agent.capture_filter import compose_filter
from flowbeam.capture.writer import CapturedPacket

READ_TIMEOUT_MS = 100
TICK_S = 0.2  # how often a quiet loop wakes to check the clock and the stop flag

# libpcap's pcap_activate() error codes (pcap/pcap.h) and what to tell the user.
_PCAP_ERROR_NO_SUCH_DEVICE = -5
_PCAP_ERROR_PERM_DENIED = -8
_PCAP_ERROR_IFACE_NOT_UP = -9
_PCAP_ERROR_PROMISC_PERM_DENIED = -11
_PERMISSION_HINT = ("capturing needs CAP_NET_RAW and CAP_NET_ADMIN: run as root, or "
                    "setcap cap_net_raw,cap_net_admin=eip on the Python binary")


class CaptureSetupError(Exception):
    """The capture cannot start (interface, permission, filter): a one-line usage error."""


class CaptureLostError(Exception):
    """The capture stopped under the agent (e.g. the interface went down)."""


def _activation_error(interface: str, code: int) -> str:
    if code == _PCAP_ERROR_NO_SUCH_DEVICE:
        return f"no such interface: {interface!r}"
    if code in (_PCAP_ERROR_PERM_DENIED, _PCAP_ERROR_PROMISC_PERM_DENIED):
        return f"no permission to capture on {interface!r}: {_PERMISSION_HINT}"
    if code == _PCAP_ERROR_IFACE_NOT_UP:
        return f"interface {interface!r} is not up"
    return f"cannot capture on {interface!r} (libpcap error {code})"


class LiveSource:
    """An activated, filtered, non-blocking libpcap handle on one interface."""

    def __init__(self, interface: str, *, snaplen: int, buffer_bytes: int, bpf: str,
                 exclude: str) -> None:
        """Open ``interface`` with the user's filter ``bpf`` minus ``exclude`` (either may be
        empty) and a kernel buffer of ``buffer_bytes``; raises ``CaptureSetupError``."""
        try:
            handle = pcapy.create(interface)
            handle.set_snaplen(snaplen)
            handle.set_buffer_size(buffer_bytes)
            handle.set_promisc(1)
            handle.set_timeout(READ_TIMEOUT_MS)
            code = handle.activate()
        except pcapy.PcapError as error:
            raise CaptureSetupError(f"cannot capture on {interface!r}: {error}") from None
        if code < 0:
            raise CaptureSetupError(_activation_error(interface, code))
        self.filter = compose_filter(bpf, exclude)
        try:
            handle.setfilter(self.filter)
        except pcapy.PcapError as error:
            raise CaptureSetupError(f"bad BPF filter {bpf or self.filter!r}: {error}") from None
        handle.setnonblock(1)
        self._handle = handle
        self.interface = interface
        self.snaplen = snaplen
        self.linktype = handle.datalink()
        self._fd = handle.getfd()

    def chunks(self, stop: threading.Event) -> Iterator[tuple[int, list[CapturedPacket]]]:
        """Yield (link type, packets) as they arrive; an empty list when a tick passed quietly.

        Once ``stop`` is set, one last read collects what the kernel captured before it.
        """
        arrived: list[CapturedPacket] = []

        def keep(header: Any, data: bytes) -> None:  # header: pcapy's Pkthdr
            seconds, micros = header.getts()
            arrived.append(CapturedPacket((seconds * 1_000_000 + micros) * 1000, data,
                                          header.getlen()))

        while True:
            stopping = stop.is_set()
            if stopping:  # the kernel holds a partly filled block until the read timeout
                time.sleep(READ_TIMEOUT_MS / 1000 + TICK_S)
            else:
                select.select([self._fd], [], [], TICK_S)
            try:
                self._handle.dispatch(-1, keep)
            except pcapy.PcapError as error:
                raise CaptureLostError(f"capture on {self.interface!r} stopped: {error}") from None
            packets = list(arrived)
            arrived.clear()
            yield self.linktype, packets
            if stopping:
                return

    def kernel_drops(self) -> int:
        """Packets the kernel dropped since the capture started (libpcap ``ps_drop``)."""
        return self._handle.stats()[1]

    def now_us(self) -> int:
        """The capture clock: libpcap stamps packets with the kernel's wall clock."""
        return time.time_ns() // 1000

    def close(self) -> None:
        self._handle.close()
