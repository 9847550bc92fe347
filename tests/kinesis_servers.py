"""Kinesis servers for the tests, all on 127.0.0.1: moto (the Kinesis API), kinesalite (splits
and merges that end their parents, which moto's do not), and a fault proxy in front of either
that answers chosen calls with a Kinesis error, the way a throttled or expired call comes back
over the wire."""

from __future__ import annotations

import collections
import contextlib
import http.client
import itertools
import json
import shutil
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import EndpointConnectionError

from tests.local_servers import HOST, free_port, running_moto, running_server, server_unavailable

NODE_DIR = Path(__file__).with_name("node")
REGION = "us-east-1"
# Fake credentials, in the environment like real ones: the reader finds them the boto3 way.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass(frozen=True)
class KinesisEndpoint:
    url: str

    def client(self) -> Any:
        return boto3.client("kinesis", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")


_names = itertools.count()


def new_stream(endpoint: KinesisEndpoint, shards: int) -> str:
    name = f"flows-{next(_names)}"
    client = endpoint.client()
    client.create_stream(StreamName=name, ShardCount=shards)
    client.get_waiter("stream_exists").wait(StreamName=name,
                                            WaiterConfig={"Delay": 0.1, "MaxAttempts": 50})
    return name


def put(endpoint: KinesisEndpoint, stream: str, first: int, count: int) -> list[bytes]:
    """Records ``record-<n>`` for n in [first, first + count), partition keys over all shards."""
    data = [b"record-%05d" % n for n in range(first, first + count)]
    client = endpoint.client()
    for chunk in range(0, count, 500):
        answer = client.put_records(StreamName=stream, Records=[
            {"Data": d, "PartitionKey": f"key-{first + chunk + i}"}
            for i, d in enumerate(data[chunk:chunk + 500])])
        assert answer["FailedRecordCount"] == 0
    return data


def wait_active(endpoint: KinesisEndpoint, stream: str) -> None:
    endpoint.client().get_waiter("stream_exists").wait(
        StreamName=stream, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50})


def _answers(endpoint: KinesisEndpoint) -> bool:
    try:
        endpoint.client().list_streams()
    except EndpointConnectionError:
        return False
    return True


@contextlib.contextmanager
def moto_kinesis() -> Iterator[KinesisEndpoint]:
    with running_moto() as url:
        yield KinesisEndpoint(url)


@contextlib.contextmanager
def kinesalite() -> Iterator[KinesisEndpoint]:
    """kinesalite from tests/node (``make install`` runs npm ci there), bound to 127.0.0.1 by
    tests/node/serve.js (its own CLI listens on every interface)."""
    node = shutil.which("node")
    if node is None:
        server_unavailable("kinesalite", "node is not on PATH")
    if not (NODE_DIR / "node_modules" / "kinesalite").is_dir():
        server_unavailable("kinesalite", f"not installed: run npm ci --prefix {NODE_DIR}")
    port = free_port()
    endpoint = KinesisEndpoint(f"http://{HOST}:{port}")
    with running_server([node, str(NODE_DIR / "serve.js"), str(port)],
                        lambda: _answers(endpoint), "kinesalite"):
        yield endpoint


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a Kinesis server.

    ``fail(operation, code, calls, status)``: the listed calls (1-based) of ``operation`` are
    answered with the Kinesis error ``code`` (HTTP ``status``) instead of being forwarded.
    ``records_per_call`` caps each GetRecords' Limit, as Kinesis itself returns fewer records
    than asked when it likes.
    ``calls`` counts the calls of each operation.
    """

    def __init__(self, upstream: KinesisEndpoint, records_per_call: int | None = None) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self._faults: dict[tuple[str, int], tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._upstream = upstream.url.removeprefix("http://")
        self._records_per_call = records_per_call
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self.endpoint = KinesisEndpoint(f"http://{HOST}:{self._server.server_address[1]}")

    def fail(self, operation: str, code: str, calls: Iterable[int], status: int = 400) -> None:
        for call in calls:
            self._faults[(operation, call)] = (code, status)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                with proxy._lock:
                    proxy.calls[operation] += 1
                    fault = proxy._faults.get((operation, proxy.calls[operation]))
                if fault is not None:
                    code, status = fault
                    self._reply(status, json.dumps({"__type": code, "message": "injected"})
                                .encode(), "application/x-amz-json-1.1")
                    return
                if operation == "GetRecords" and proxy._records_per_call:
                    request = json.loads(body)
                    request["Limit"] = min(request.get("Limit", 10_000), proxy._records_per_call)
                    body = json.dumps(request).encode()
                headers = {key: value for key, value in self.headers.items()
                           if key.lower() not in ("host", "content-length")}
                upstream = http.client.HTTPConnection(proxy._upstream, timeout=30)
                try:
                    upstream.request("POST", self.path, body, headers)
                    answer = upstream.getresponse()
                    self._reply(answer.status, answer.read(),
                                answer.getheader("Content-Type", "application/json"))
                finally:
                    upstream.close()

            def _reply(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
