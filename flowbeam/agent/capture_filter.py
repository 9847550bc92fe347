"""The capture filter: the user's BPF expression minus the agent's own uploads.

An agent capturing on the interface it publishes through would capture its own Pub/Sub
requests, publish them in the next batch, capture that upload, and so on: a feedback loop that
grows with the traffic it is meant to observe. So by default the filter excludes the Pub/Sub
endpoint's resolved addresses on its port. The addresses are resolved once, at start: Google's
front ends answer from many addresses (see README, "Live capture", for the limits).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

DEFAULT_PUBSUB_ENDPOINT = "pubsub.googleapis.com:443"
EMULATOR_VARIABLE = "PUBSUB_EMULATOR_HOST"


def pubsub_endpoint(environ: Mapping[str, str]) -> str:
    """Where google-cloud-pubsub will connect: ``$PUBSUB_EMULATOR_HOST`` or Google's endpoint."""
    return environ.get(EMULATOR_VARIABLE) or DEFAULT_PUBSUB_ENDPOINT


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port); raises ValueError when malformed."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), sorted; raises OSError."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    addresses = {info[4][0].split("%")[0] for info in infos}  # drop IPv6 scope ids
    return sorted(addresses, key=lambda text: ipaddress.ip_address(text).packed)


def own_traffic_filter(addresses: list[str], port: int) -> str:
    """A BPF expression matching everything except traffic to or from the endpoint."""
    if not addresses:
        raise ValueError("no endpoint address to exclude")
    hosts = " or ".join(f"host {address}" for address in addresses)
    if len(addresses) > 1:
        hosts = f"({hosts})"
    return f"not ({hosts} and port {port})"


def compose_filter(user_bpf: str, own_traffic: str) -> str:
    """The filter to install: both expressions when both are given (either may be empty)."""
    parts = [part for part in (user_bpf.strip(), own_traffic) if part]
    if len(parts) == 2:
        return f"({parts[0]}) and {parts[1]}"
    return parts[0] if parts else ""
