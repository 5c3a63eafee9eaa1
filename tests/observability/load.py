"""A mixed load on a running broker, so that every dashboard panel has something to show.

Worker threads, each owning its own sockets, run until `stop()` (and each loop is bounded in time
anyway):
- subscribers (JSON and msgpack, exact and wildcard patterns) that read everything;
- WebSocket publishers (JSON and msgpack) at a steady rate, and HTTP POST /publish publishers;
- churn: clients that connect, subscribe and close cleanly, or vanish without a close frame;
- garbage: raw TCP connections that send bytes that are not HTTP, so a close reason appears;
- a slow consumer: a raw WebSocket with a tiny receive buffer that subscribes and never reads,
  plus bulk HTTP publishes to its topic until the broker counts it as a slow consumer.
Errors in workers are collected (never raised in the thread) and reported by the test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import msgpack
from websockets.sync.client import ClientConnection, connect

# Never send loopback requests through a proxy from the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

LOAD_TOPICS = ("obs.load.a", "obs.load.b")
BULK_TOPIC = "obs.bulk.slow"
BULK_PAYLOAD = 64 * 1024


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with HTTP.open(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def http_publish(base: str, topic: str, body: bytes, content_type: str) -> None:
    request = urllib.request.Request(
        f"{base}/publish/{topic}", data=body, method="POST", headers={"Content-Type": content_type}
    )
    with HTTP.open(request, timeout=5) as response:
        assert response.status == 202, response.status
        response.read()


def ws_connect(url: str, encoding: str = "json") -> ClientConnection:
    return connect(
        url,
        subprotocols=[f"pubsub.v1.{encoding}"],  # type: ignore[list-item]
        compression=None,
        proxy=None,
        open_timeout=5,
        close_timeout=2,
    )


def ws_send(ws: ClientConnection, request: dict[str, object], encoding: str) -> None:
    if encoding == "json":
        ws.send(json.dumps(request))
    else:
        ws.send(msgpack.packb(request))


def raw_handshake(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket opened by hand, for clients that misbehave in ways a library will not."""
    sock = socket.socket()
    if rcvbuf is not None:
        # Set before connect so the advertised window is small from the first segment.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: pubsub.v1.json\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = sock.recv(1)  # byte by byte: leave any frame after the headers unread
            if not chunk:
                raise ConnectionError("closed during handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head[:200]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def masked_text_frame(payload: bytes) -> bytes:
    """One FIN text frame, masked as RFC 6455 section 5.3 requires of clients."""
    mask = os.urandom(4)
    if len(payload) < 126:
        header = struct.pack("!BB", 0x81, 0x80 | len(payload))
    else:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload))
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


class Load:
    """Start with `start()`, end with `stop()`; counters say what was done."""

    def __init__(self, port: int, max_seconds: float = 60.0) -> None:
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.http = f"http://127.0.0.1:{port}"
        self.deadline = time.monotonic() + max_seconds
        self.stopping = threading.Event()
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.slow_sockets: list[socket.socket] = []

    # -- bookkeeping -------------------------------------------------------------------------

    def running(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def spawn(self, name: str, work: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                work()
            except Exception as exc:  # reported by the test, never lost in a thread
                with self.lock:
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=guarded, name=f"load-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def start(self) -> Load:
        for topic, encoding in (
            ("obs.load.a", "json"),
            ("obs.load.*", "json"),
            ("obs.load.>", "msgpack"),
        ):
            self.spawn(
                f"subscriber {topic} {encoding}", lambda t=topic, e=encoding: self.subscriber(t, e)
            )
        self.spawn("publisher json", lambda: self.publisher("json", 0.005))
        self.spawn("publisher msgpack", lambda: self.publisher("msgpack", 0.01))
        self.spawn("http publisher", self.http_publisher)
        self.spawn("churn", self.churn)
        self.spawn("garbage", self.garbage)
        self.spawn("slow consumer", self.slow_consumer)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        for sock in self.slow_sockets:
            sock.close()
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"load threads still running: {alive}"

    # -- workers -----------------------------------------------------------------------------

    def subscriber(self, topic: str, encoding: str) -> None:
        with ws_connect(self.url, encoding) as ws:
            ws_send(ws, {"op": "subscribe", "topic": topic, "id": 1}, encoding)
            while self.running():
                with contextlib.suppress(TimeoutError):
                    ws.recv(timeout=0.2)
                    self.count("received")

    def publisher(self, encoding: str, pause: float) -> None:
        with ws_connect(self.url, encoding) as ws:
            n = 0
            while self.running():
                topic = LOAD_TOPICS[n % len(LOAD_TOPICS)]
                data = {"n": n, "pad": "x" * 200}
                ws_send(ws, {"op": "publish", "topic": topic, "data": data}, encoding)
                self.count("ws published")
                n += 1
                time.sleep(pause)

    def http_publisher(self) -> None:
        n = 0
        while self.running():
            body = json.dumps({"n": n, "via": "http"}).encode()
            http_publish(self.http, LOAD_TOPICS[n % 2], body, "application/json")
            self.count("http published")
            n += 1
            time.sleep(0.05)

    def churn(self) -> None:
        n = 0
        while self.running():
            if n % 2 == 0:
                with ws_connect(self.url) as ws:
                    ws_send(ws, {"op": "subscribe", "topic": f"obs.churn.{n}", "id": n}, "json")
                    ws.recv(timeout=5)  # the ack: the subscription was made before we leave
                self.count("clean closes")
            else:
                sock = raw_handshake(self.port)
                # RST instead of FIN and no close frame: the peer simply vanished.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                self.count("abrupt closes")
            n += 1
            time.sleep(0.1)

    def garbage(self) -> None:
        while self.running():
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1 not http at all\r\n\r\n")
                with contextlib.suppress(OSError):
                    while sock.recv(4096):  # read until the broker closes
                        pass
            self.count("garbage connections")
            time.sleep(0.3)

    def slow_consumer(self) -> None:
        sock = raw_handshake(self.port, rcvbuf=4096)
        self.slow_sockets.append(sock)
        request = {"op": "subscribe", "topic": BULK_TOPIC}
        sock.sendall(masked_text_frame(json.dumps(request).encode()))
        time.sleep(0.2)  # let the subscription land before the bulk arrives
        payload = os.urandom(BULK_PAYLOAD)
        # Enough bytes to fill any kernel buffer (tcp_wmem max is 4 MiB) plus the broker's queue;
        # stop as soon as the broker has counted the slow consumer.
        for _ in range(256):
            if not self.running():
                return
            http_publish(self.http, BULK_TOPIC, payload, "application/octet-stream")
            self.count("bulk published")
            if self.slow_consumers() >= 1:
                self.count("slow consumer seen")
                return

    def slow_consumers(self) -> float:
        """broker_slow_consumers_total summed over its policy label."""
        total = 0.0
        for line in http_get(self.http + "/metrics").decode().splitlines():
            if line.startswith("broker_slow_consumers_total{"):
                total += float(line.split()[-1])
        return total
