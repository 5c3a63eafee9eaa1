"""One slow or hostile client never hurts the others: slow consumers, garbage, abrupt
disconnects, 5,000 connections, timeouts, limits, and the SIGTERM drain."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable

import pytest
from websockets.sync.client import connect

from tests.conftest import BrokerProcess
from tests.wsraw import OP_CLOSE, OP_PING, OP_TEXT, RawWs

Ws = Callable[..., RawWs]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def slow_subscriber(raw_ws: Ws, broker: BrokerProcess, topic: str) -> RawWs:
    """A subscriber with a tiny receive window that never reads after its ack."""
    c = raw_ws(broker, rcvbuf=4096)
    c.send_json({"op": "subscribe", "topic": topic, "id": 1})
    assert c.recv_json().items() >= {"op": "ack", "id": 1}.items()
    return c


def run_readers(broker: BrokerProcess, n: int, topic: str, expect: int) -> list[list[int]]:
    """`n` websockets subscribers in threads; each returns the seqs it received."""
    results: list[list[int]] = [[] for _ in range(n)]
    ready = threading.Barrier(n + 1, timeout=10)

    def read(i: int) -> None:
        with connect(broker.url, subprotocols=["pubsub.v1.json"]) as ws:  # type: ignore[list-item]
            ws.send(json.dumps({"op": "subscribe", "topic": topic, "id": 1}))
            assert json.loads(ws.recv(5))["op"] == "ack"
            ready.wait()
            deadline = time.monotonic() + 60
            while len(results[i]) < expect and time.monotonic() < deadline:
                results[i].append(json.loads(ws.recv(10))["seq"])

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    run_readers.threads = threads  # type: ignore[attr-defined]
    return results


def publish_paced(
    ws: Ws, broker: BrokerProcess, topic: str, count: int, size: int, readers: list[list[int]]
) -> None:
    """Publish in batches, letting the normal readers catch up after each: only the subscriber
    that never reads may fall behind. A batch stays under the high-water mark, so a normal
    reader is never a slow consumer however fast the publisher is."""
    pub = ws(broker)
    payload = "x" * size
    batch = 20
    for start in range(0, count, batch):
        for _ in range(batch):
            pub.send_json({"op": "publish", "topic": topic, "data": payload})
        deadline = time.monotonic() + 20
        while min(map(len, readers)) < start + batch and time.monotonic() < deadline:
            time.sleep(0.002)
    pub.send_json({"op": "ping", "id": "sync"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if pub.recv_json() == {"op": "pong", "id": "sync"}:
            return
    raise AssertionError("publisher never got its pong")


@pytest.mark.parametrize("policy", ["disconnect", "drop"])
def test_slow_consumer_beside_normal_subscribers(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws, policy: str
) -> None:
    broker = broker_factory("--outbound-high-water", "65536", "--slow-consumer-policy", policy)
    slow = slow_subscriber(raw_ws, broker, "feed")
    count, size = 3000, 1000  # 3 MB per subscriber, 45x the high-water mark
    results = run_readers(broker, 3, "feed", count)
    rss_before = rss_bytes(broker.pid)
    publish_paced(raw_ws, broker, "feed", count, size, results)
    for t in run_readers.threads:  # type: ignore[attr-defined]
        t.join(60)
    for seqs in results:
        assert seqs == list(range(1, count + 1)), "normal subscribers get everything, in order"
    assert broker.metric("broker_slow_consumers_total", f'policy="{policy}"') == 1
    assert broker.metric("broker_messages_dropped_total", 'reason="slow_consumer"') > 0
    assert broker.metric("broker_outbound_queued_bytes") <= 65536 + 2 * size
    assert rss_bytes(broker.pid) - rss_before < 20 * 1024 * 1024, "memory stays bounded"
    if policy == "disconnect":
        # Reading now (within the close timeout), it finds the frames it was owed, then a
        # close 1008 "slow consumer".
        slow.sock.settimeout(10)
        assert slow.expect_close() == (1008, "slow consumer")
        assert slow.at_eof()
        closed = broker.wait_metric(
            "broker_connections_closed_total", 'reason="slow_consumer"', equals=1
        )
        assert closed == 1
    else:
        # Still connected; reading what it was given shows the gap in seq.
        slow.sock.settimeout(10)
        seqs = [slow.recv_json()["seq"] for _ in range(20)]
        assert seqs == list(range(1, 21))
        assert broker.metric("broker_connections") >= 2


def test_garbage_and_abrupt_disconnects_leave_no_trace(broker: BrokerProcess, raw_ws: Ws) -> None:
    rng = random.Random(1234)
    baseline = broker.metric("broker_connections")
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        kind = i % 6
        if kind == 0:
            s.sendall(rng.randbytes(rng.randint(1, 3000)))
        elif kind == 1:
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock")  # cut mid-request
        elif kind == 2:
            s.sendall(b"POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        elif kind == 3:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # RST
        s.close()
        if kind == 4:
            c = raw_ws(broker)
            c.send_json({"op": "subscribe", "topic": f"g.{i}", "id": 1})
            c.sock.sendall(b"\x81\xfe\x10\x00mask" + rng.randbytes(100))  # cut mid-frame
            c.close()
        elif kind == 5:
            c = raw_ws(broker)
            c.sock.sendall(rng.randbytes(500))  # random frames
            c.close()
    for _ in range(100):
        if broker.metric("broker_connections") == baseline:
            break
        time.sleep(0.1)
    assert broker.metric("broker_connections") == baseline
    assert broker.metric("broker_subscriptions") == 0
    assert broker.metric("broker_topics") == 0
    assert broker.metric("broker_internal_errors_total") == 0
    with connect(broker.url) as ws:  # still serving
        ws.send('{"op":"ping","id":1}')
        assert json.loads(ws.recv(5)) == {"op": "pong", "id": 1}


def handshake_all(port: int, n: int) -> list[socket.socket]:
    """Open `n` WebSockets, pipelining the handshake and a subscribe on each."""
    socks = []
    request = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    for i in range(n):
        # Several source addresses, as a real load would come from, spare the ephemeral ports.
        s = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(f"127.0.0.{2 + i % 4}", 0)
        )
        s.sendall(request + _frame({"op": "subscribe", "topic": "all", "id": i}))
        socks.append(s)
    return socks


def _frame(msg: object) -> bytes:
    from tests.wsraw import encode_frame

    return encode_frame(OP_TEXT, json.dumps(msg).encode())


def test_five_thousand_concurrent_connections(broker: BrokerProcess) -> None:
    n = 5000
    socks = handshake_all(broker.port, n)
    try:
        for i, s in enumerate(socks):
            c = RawWs.adopt(s)
            c._read_until(b"\r\n\r\n")
            assert c.recv_json().items() >= {"op": "ack", "id": i}.items()
            socks[i] = c  # type: ignore[call-overload]
        assert broker.metric("broker_connections") == n + 1  # and the scrape
        assert broker.metric("broker_subscriptions") == n
        with connect(broker.url) as pub:
            pub.send('{"op":"publish","topic":"all","data":"hello","id":"p"}')
            assert json.loads(pub.recv(10)) == {"op": "ack", "id": "p", "delivered": n}
        for c in socks:
            assert c.recv_json()["data"] == "hello"  # type: ignore[attr-defined]
    finally:
        for c in socks:
            getattr(c, "sock", c).close()
    assert broker.wait_metric("broker_connections", equals=1, timeout=20) == 1
    assert broker.metric("broker_subscriptions") == 0


def test_handshake_timeout(broker_factory: Callable[..., BrokerProcess]) -> None:
    broker = broker_factory("--handshake-timeout", "0.5")
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    s.sendall(b"GET /ws HTTP/1.1\r\n")  # and then nothing
    start = time.monotonic()
    assert s.recv(100) == b""
    assert time.monotonic() - start < 3
    s.close()
    assert broker.metric("broker_connections_closed_total", 'reason="handshake_timeout"') == 1


def test_keepalive_pings_and_pong_timeout(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    broker = broker_factory("--ping-interval", "0.5", "--ping-timeout", "1")
    silent = raw_ws(broker)
    with connect(broker.url) as alive:  # websockets answers pings by itself
        op, _ = silent.recv_frame()
        assert op == OP_PING  # we are pinged once silent for the interval
        assert silent.expect_close()[0] == 1001  # and closed when we never answer
        time.sleep(2)
        alive.send('{"op":"ping","id":1}')
        assert json.loads(alive.recv(5)) == {"op": "pong", "id": 1}
    silent.close()
    closed = broker.wait_metric(
        "broker_connections_closed_total", 'reason="ping_timeout"', equals=1
    )
    assert closed == 1


def test_max_connections(broker_factory: Callable[..., BrokerProcess], raw_ws: Ws) -> None:
    broker = broker_factory("--max-connections", "3")
    a, b = raw_ws(broker), raw_ws(broker)
    third = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    with pytest.raises(ConnectionError):
        raw_ws(broker)  # accepted and closed at once: the broker is full
    third.close()
    b.close()
    deadline = time.monotonic() + 5
    while True:  # until the broker has seen the two closes and has a seat for the scrape
        try:
            seen = broker.metric("broker_connections")
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert seen == 2  # a + the scrape
    assert broker.metric("broker_connections_closed_total", 'reason="max_connections"') >= 1
    a.send_json({"op": "ping", "id": 1})
    assert a.recv_json() == {"op": "pong", "id": 1}


def test_sigterm_drains_then_exits_0(broker: BrokerProcess, raw_ws: Ws) -> None:
    subs = [raw_ws(broker) for _ in range(3)]
    for c in subs:
        c.send_json({"op": "subscribe", "topic": "d", "id": 1})
        assert c.recv_json()["op"] == "ack"
    pub = raw_ws(broker)
    for i in range(500):
        pub.send_json({"op": "publish", "topic": "d", "data": i})
    pub.send_json({"op": "ping", "id": "sync"})
    assert pub.recv_json() == {"op": "pong", "id": "sync"}
    assert broker.proc is not None
    broker.proc.send_signal(15)
    for c in subs:
        got = [c.recv_json()["data"] for _ in range(500)]
        assert got == list(range(500)), "queued messages are flushed before the close"
        assert c.expect_close() == (1001, "server shutting down")
        c.send_frame(OP_PING, b"late")  # a ping after the server's close gets no pong
        c.send_frame(OP_CLOSE, b"\x03\xe9")  # answer the close handshake
        assert c.at_eof()
    assert pub.expect_close()[0] == 1001
    pub.close()  # the publisher never answers: the deadline finishes it
    assert broker.proc.wait(15) == 0
    assert "error serving connection" not in broker.log()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker.port), timeout=1)


def test_fd_limit_is_reported(broker: BrokerProcess) -> None:
    log = broker.log()
    assert "open files limit" in log and "max connections" in log
    assert broker.metric("process_max_fds") >= 1024
    assert os.path.exists(f"/proc/{broker.pid}")
