"""The one publishing connection, driven by the coordinator (closed-loop window or fixed rate).

Publishes carry no id, so the broker answers nothing and the publisher's receive side only
sees pings (answered) and error replies (counted: a broker that rejects publishes would
otherwise look like loss). Every payload is stamped with CLOCK_MONOTONIC at the moment its
frame is built, right before the send; subscribers in other processes read the same clock.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time

from broker.bench import tls, wire
from broker.bench.target import BenchError, Endpoint


class Publisher:
    def __init__(self, ep: Endpoint, topic: str, size: int, timeout: float = 10.0) -> None:
        self.topic = topic.encode()
        self.size = size
        self.seq = 0
        self.errors = 0
        self.sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ep.tls:
            self.sock = tls.client_context().wrap_socket(self.sock, server_hostname=ep.host)
        req, accept = wire.handshake_request(ep.host, ep.port, ep.path)
        self.sock.sendall(req)
        head = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in head:
            if time.monotonic() > deadline or len(head) > 16384:
                raise BenchError("publisher: no handshake response")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise BenchError("publisher: connection closed during the handshake")
            head += chunk
        end = head.index(b"\r\n\r\n")
        why = wire.check_handshake_response(head[:end], accept)
        if why:
            raise BenchError(f"publisher: {why}")
        self.rx = bytearray(head[end + 4 :])
        # the socket keeps its timeout for sendall; reads only happen when poll says so
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)

    def publish(self, k: int) -> None:
        """Send k publishes in one write; each stamped as it is built."""
        frames = []
        for _ in range(k):
            payload = wire.make_payload(time.monotonic_ns(), self.seq, self.size)
            frames.append(wire.client_frame(wire.publish_body(self.topic, payload)))
            self.seq += 1
        try:
            self.sock.sendall(b"".join(frames))
        except OSError as e:
            raise BenchError(f"publisher: send failed: {e}") from e

    def service(self) -> None:
        """Drain what the broker sent us: answer pings, count error replies, notice a close."""
        pending = getattr(self.sock, "pending", None)  # TLS: plaintext poll cannot see
        while self.poller.poll(0) or (pending is not None and pending()):
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise BenchError(f"publisher: connection lost: {e}") from e
            if not chunk:
                raise BenchError("publisher: connection closed by the server")
            self.rx += chunk
            self.errors += wire.count_errors(self.rx)
            _count, _stamps, keep, pings = wire.scan(self.rx, len(self.rx), False)
            for ping in pings:
                self.sock.sendall(wire.client_frame(ping, wire.OP_PONG))
            del self.rx[:keep]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(wire.client_frame(b"\x03\xe8", wire.OP_CLOSE))
        self.sock.close()
