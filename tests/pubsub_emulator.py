"""Google's Pub/Sub emulator for tests, on 127.0.0.1 or inside a network namespace.

The emulator is a separate Java process reached over gRPC exactly like Pub/Sub, so the agent
under test makes its real calls (GetTopic, Publish). Clients here talk to it through an
insecure channel to an explicit address instead of ``PUBSUB_EMULATOR_HOST``, so a test can
reach several emulators and never changes its own environment.

Run as a script (``python -m tests.pubsub_emulator create|pull ...``) it does the same from
inside a namespace the test process cannot reach (``ip netns exec B python -m ...``); ``pull``
prints one JSON object per message.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.api_core.exceptions import DeadlineExceeded
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from flowbeam.agent.batch_format import ATTR_PACKETS
from tests.local_servers import HOST, free_port, running_server, server_unavailable

EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
PROJECT = "flowbeam-test"  # Beam refuses short project ids such as "proj"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Received:
    """One pulled message."""

    data: bytes
    attributes: dict[str, str]


def in_netns(netns: str | None, command: Sequence[str]) -> list[str]:
    """``command``, run inside network namespace ``netns`` when one is given."""
    return ["ip", "netns", "exec", netns, *command] if netns else list(command)


def _port_open(host: str, port: int, netns: str | None) -> bool:
    probe = in_netns(netns, ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"])
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def running_emulator(host: str = HOST, netns: str | None = None,
                     port: int | None = None) -> Iterator[str]:
    """Run an emulator until the block ends; yields its ``host:port`` (skips if unavailable).

    In a fresh namespace every port is free; on 127.0.0.1 ``free_port`` picks one.
    """
    if not EMULATOR.exists():
        server_unavailable("Pub/Sub emulator", f"not installed ({EMULATOR})")
    if port is None:
        port = 8085 if netns else free_port()
    command = in_netns(netns, [str(EMULATOR), f"--host={host}", f"--port={port}"])
    with running_server(command, lambda: _port_open(host, port, netns), "Pub/Sub emulator",
                        timeout_s=60.0):
        yield f"{host}:{port}"


def _channel(endpoint: str) -> grpc.Channel:
    return grpc.insecure_channel(endpoint)


def create_topic(endpoint: str, topic: str, subscription: str) -> None:
    """Create ``projects/PROJECT/topics/topic`` and a subscription to it (before publishing:
    Pub/Sub keeps a message only for subscriptions that exist when it is published)."""
    publisher = pubsub_v1.PublisherClient(
        transport=PublisherGrpcTransport(channel=_channel(endpoint)))
    subscriber = pubsub_v1.SubscriberClient(
        transport=SubscriberGrpcTransport(channel=_channel(endpoint)))
    publisher.create_topic(name=topic_path(topic))
    subscriber.create_subscription(name=subscription_path(subscription),
                                   topic=topic_path(topic), ack_deadline_seconds=600)


def topic_path(topic: str) -> str:
    return f"projects/{PROJECT}/topics/{topic}"


def subscription_path(subscription: str) -> str:
    return f"projects/{PROJECT}/subscriptions/{subscription}"


def pull(endpoint: str, subscription: str, packets: int, timeout_s: float = 60.0,
         quiet_s: float = 1.0) -> list[Received]:
    """Pull and acknowledge batches until they hold ``packets`` packets, then ``quiet_s`` more
    seconds (so an extra message would be seen); raises AssertionError on timeout."""
    subscriber = pubsub_v1.SubscriberClient(
        transport=SubscriberGrpcTransport(channel=_channel(endpoint)))
    name = subscription_path(subscription)
    received: list[Received] = []
    deadline = time.monotonic() + timeout_s
    quiet_until = None
    while quiet_until is None or time.monotonic() < quiet_until:
        if time.monotonic() > deadline:
            got = sum(int(message.attributes[ATTR_PACKETS]) for message in received)
            raise AssertionError(f"pulled {got} of {packets} packets in {timeout_s} s")
        try:
            batch = subscriber.pull(subscription=name, max_messages=100, timeout=1,
                                    retry=None).received_messages
        except DeadlineExceeded:  # nothing arrived within the timeout
            batch = []
        if batch:
            subscriber.acknowledge(subscription=name, ack_ids=[m.ack_id for m in batch])
        received += [Received(m.message.data, dict(m.message.attributes)) for m in batch]
        have = sum(int(message.attributes[ATTR_PACKETS]) for message in received)
        if quiet_until is None and have >= packets:
            quiet_until = time.monotonic() + quiet_s
    return received


def pull_in_netns(netns: str, endpoint: str, subscription: str, packets: int) -> list[Received]:
    """``pull`` run inside ``netns`` (this module as a script), its messages parsed back."""
    command = in_netns(netns, [sys.executable, "-m", "tests.pubsub_emulator", "pull", endpoint,
                               subscription, str(packets)])
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=120)
    return [Received(base64.b64decode(row["data"]), row["attributes"])
            for row in map(json.loads, done.stdout.splitlines())]


def create_topic_in_netns(netns: str, endpoint: str, topic: str, subscription: str) -> None:
    """``create_topic`` run inside ``netns``."""
    command = in_netns(netns, [sys.executable, "-m", "tests.pubsub_emulator", "create",
                               endpoint, topic, subscription])
    subprocess.run(command, cwd=REPO, capture_output=True, check=True, timeout=60)


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.pubsub_emulator")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create")
    pulling = commands.add_parser("pull")
    for command in (create, pulling):
        command.add_argument("endpoint")
    create.add_argument("topic")
    create.add_argument("subscription")
    pulling.add_argument("subscription")
    pulling.add_argument("packets", type=int)
    args = parser.parse_args(argv)
    if args.command == "create":
        create_topic(args.endpoint, args.topic, args.subscription)
        return
    for message in pull(args.endpoint, args.subscription, args.packets):
        print(json.dumps({"data": base64.b64encode(message.data).decode(),
                          "attributes": message.attributes}))


if __name__ == "__main__":
    _main(sys.argv[1:])
