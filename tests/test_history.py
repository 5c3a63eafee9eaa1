"""History and recovery against a real broker: positions in acks, exact recovery across
reconnects with publishes racing them, a slow consumer closed with 1008 that comes back, a
restart, a replay far over the high-water mark, and the history op and HTTP route."""

from __future__ import annotations

import base64
import json
import random
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from tests.conftest import BrokerProcess
from tests.test_protocol import http_publish
from tests.wsraw import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, RawWs

Ws = Callable[..., RawWs]


def subscribe(c: RawWs, topic: str, since: tuple[str, int] | None = None, id: int = 1) -> Any:
    request: dict[str, Any] = {"op": "subscribe", "topic": topic, "id": id}
    if since is not None:
        request["since"] = {"epoch": since[0], "seq": since[1]}
    c.send_json(request)
    ack = c.recv_json()
    assert ack["op"] == "ack" and ack["id"] == id, ack
    return ack


def get(broker: BrokerProcess, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(broker.http + path, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read() or b"null")


def test_recovery_across_reconnects_with_publishes_racing(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    """A publisher runs flat out while a subscriber is cut (clean close or RST) again and again,
    each time coming back with `since`: the stream it reads holds every seq once, in order."""
    total = 3000
    broker = broker_factory("--history-size", str(total))
    pub = raw_ws(broker)
    epoch = subscribe(pub, "race")["epoch"]  # the publisher's own subscription is never read
    pub.send_json({"op": "unsubscribe", "topic": "race", "id": 2})
    assert pub.recv_json()["op"] == "ack"

    def publish() -> None:
        for n in range(1, total + 1):
            pub.send_json({"op": "publish", "topic": "race", "data": n})
            if n % 200 == 0:
                time.sleep(0.01)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    rng = random.Random(8)
    seen: list[int] = []
    reconnects = 0
    deadline = time.monotonic() + 60
    while (not seen or seen[-1] < total) and time.monotonic() < deadline:
        c = raw_ws(broker)
        ack = subscribe(c, "race", (epoch, seen[-1] if seen else 0))
        assert ack["recovered"] is True and ack["epoch"] == epoch, ack
        for _ in range(rng.randint(1, 400)):
            m = c.recv_json()
            assert m["data"] == m["seq"]
            seen.append(m["seq"])
            if m["seq"] == total:
                break
        if rng.random() < 0.5:  # RST: unread data plus SO_LINGER 0
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        reconnects += 1
    thread.join(10)
    assert seen == list(range(1, total + 1))
    assert reconnects > 5


def test_slow_consumer_closed_with_1008_comes_back_and_recovers(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    total = 3000  # 3 MB: far past the mark and the socket buffers, for a reader that stops
    broker = broker_factory("--outbound-high-water", "65536", "--history-size", str(total))
    slow = raw_ws(broker, rcvbuf=4096)
    epoch = subscribe(slow, "feed")["epoch"]
    pub = raw_ws(broker)
    payload = "x" * 1000
    for n in range(1, total + 1):
        pub.send_json({"op": "publish", "topic": "feed", "data": payload, "id": n})
        assert pub.recv_json()["op"] == "ack"
    seqs = []
    slow.sock.settimeout(10)
    while True:  # what it was given, then the close
        op, body = slow.recv_frame()
        if op == OP_CLOSE:
            assert struct.unpack("!H", body[:2])[0] == 1008
            break
        if op not in (OP_PING, OP_PONG):
            seqs.append(json.loads(body)["seq"])
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < total
    again = raw_ws(broker)
    ack = subscribe(again, "feed", (epoch, seqs[-1]))
    assert ack == {"op": "ack", "id": 1, "epoch": epoch, "seq": total, "recovered": True}
    rest = [again.recv_json()["seq"] for _ in range(total - len(seqs))]
    assert seqs + rest == list(range(1, total + 1))
    assert broker.metric("broker_messages_replayed_total") == len(rest)


def test_restart_gives_a_new_epoch(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    first = broker_factory()
    c = raw_ws(first)
    subscribe(c, "r")
    c.send_json({"op": "publish", "topic": "r", "data": 1})
    assert c.recv_json()["seq"] == 1
    status, before = get(first, "/history/r")
    assert status == 200 and before["seq"] == 1
    c.close()
    first.stop()
    second = broker_factory(port=first.port)
    c = raw_ws(second)
    ack = subscribe(c, "r", (before["epoch"], 1))
    assert ack["recovered"] is False and ack["seq"] == 0 and ack["epoch"] != before["epoch"]
    c.send_json({"op": "publish", "topic": "r", "data": 2})
    assert c.recv_json() == {"op": "message", "topic": "r", "data": 2, "seq": 1}


def test_replay_far_over_the_high_water_mark_reaches_a_full_speed_reader(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    """2 MB of history replayed under a 64 KiB mark, with live publishes arriving meanwhile:
    paced as the socket drains, not counted as lag; live messages follow in order (they do
    count: a live rate that outruns the replay makes a slow consumer, as it would without)."""
    broker = broker_factory(
        "--outbound-high-water", "65536", "--history-size", "3000", "--slow-consumer-policy", "drop"
    )
    pub = raw_ws(broker)
    epoch = subscribe(pub, "big")["epoch"]
    pub.send_json({"op": "unsubscribe", "topic": "big", "id": 2})
    assert pub.recv_json()["op"] == "ack"
    payload = "y" * 1000
    for n in range(1, 2001):
        pub.send_json({"op": "publish", "topic": "big", "data": payload, "id": n})
        assert pub.recv_json()["op"] == "ack"
    c = raw_ws(broker, subprotocol="pubsub.v1.msgpack")
    c.send_frame(
        OP_BINARY,
        msgpack.packb(
            {"op": "subscribe", "topic": "big", "id": 1, "since": {"epoch": epoch, "seq": 0}}
        ),
    )
    # Live ones (2001..2050), queued behind the replay: they count against the mark (50 KB).
    for _ in range(50):
        pub.send_json({"op": "publish", "topic": "big", "data": payload})

    def recv() -> Any:
        op, body = c.recv_frame()
        while op in (OP_PING, OP_PONG):
            op, body = c.recv_frame()
        assert op == OP_BINARY
        return msgpack.unpackb(body)

    ack = recv()
    assert ack["recovered"] is True and ack["seq"] >= 2000
    got = [recv()["seq"] for _ in range(2050)]
    assert got == list(range(1, 2051))
    assert broker.metric("broker_slow_consumers_total") == 0
    assert broker.metric("broker_messages_dropped_total", 'reason="slow_consumer"') == 0


def test_a_paced_replay_counts_as_queued_bytes_not_as_lag(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    """A replay waiting behind a client's full socket is in broker_outbound_queued_bytes and in
    GET /connections as replay_bytes (not queued_bytes: it is not lag); both go to 0 once read."""
    # More than the kernel can take while the client does not read: the broker's send buffer
    # grows up to net.ipv4.tcp_wmem's maximum whatever the client's window; 2 MB more stay.
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        kernel_max = int(f.read().split()[2])
    payload = "z" * 4000
    count = (kernel_max + 2_000_000) // len(payload) + 1
    memory = str(4 * count * len(payload))
    broker = broker_factory(
        "--outbound-high-water", "65536", "--history-size", str(count), "--history-memory", memory
    )
    pub = raw_ws(broker)
    epoch = subscribe(pub, "big")["epoch"]
    for n in range(1, count + 1):
        pub.send_json({"op": "publish", "topic": "big", "data": payload, "id": n})
        while pub.recv_json()["op"] != "ack":
            pass
    c = raw_ws(broker, rcvbuf=4096)  # a small window: the replay stalls behind it unread
    c.send_json({"op": "subscribe", "topic": "big2", "id": 1})  # any reply, then stop reading
    assert c.recv_json()["op"] == "ack"
    c.send_json({"op": "subscribe", "topic": "big", "id": 2, "since": {"epoch": epoch, "seq": 0}})
    queued = broker.wait_metric("broker_outbound_queued_bytes", at_least=1_000_000)
    assert queued >= 1_000_000
    with urllib.request.urlopen(broker.http + "/connections?sort=lag", timeout=5) as r:
        rows = json.load(r)["connections"]
    stalled = max(rows, key=lambda row: row["replay_bytes"])
    assert stalled["replay_bytes"] >= 1_000_000
    assert stalled["queued_bytes"] < 100_000
    assert c.recv_json()["recovered"] is True
    got = [c.recv_json()["seq"] for _ in range(count)]
    assert got == list(range(1, count + 1))
    assert broker.wait_metric("broker_outbound_queued_bytes", equals=0) == 0


def test_history_op_and_http_route(broker: BrokerProcess, raw_ws: Ws) -> None:
    c = raw_ws(broker)
    epoch = subscribe(c, "h.t")["epoch"]
    for n in range(1, 4):
        c.send_json({"op": "publish", "topic": "h.t", "data": {"n": n}})
    assert http_publish(broker, "h.t", b"\x00\xffbin", "application/octet-stream")[0] == 202
    assert [c.recv_json()["seq"] for _ in range(4)] == [1, 2, 3, 4]
    c.send_json(
        {"op": "history", "topic": "h.t", "id": 5, "since": {"epoch": epoch, "seq": 1}, "limit": 2}
    )
    assert c.recv_json() == {
        "op": "ack",
        "id": 5,
        "epoch": epoch,
        "seq": 4,
        "recovered": True,
        "messages": [{"seq": 2, "data": {"n": 2}}, {"seq": 3, "data": {"n": 3}}],
    }
    status, body = get(broker, "/history/h.t")
    assert status == 200
    assert body["messages"][-1] == {
        "seq": 4,
        "data": base64.b64encode(b"\x00\xffbin").decode(),
        "encoding": "base64",
    }
    assert (body["epoch"], body["seq"], body["recovered"]) == (epoch, 4, True)
    status, body = get(broker, f"/history/h.t?epoch={epoch}&since=3&limit=5")
    assert (status, [m["seq"] for m in body["messages"]]) == (200, [4])
    status, body = get(broker, "/history/h%2Et?epoch=other&since=3")
    assert (status, body["recovered"], len(body["messages"])) == (200, False, 4)
    m = raw_ws(broker, subprotocol="pubsub.v1.msgpack")
    m.send_frame(OP_BINARY, msgpack.packb({"op": "history", "topic": "h.t", "id": 1, "limit": 1}))
    _, raw = m.recv_frame()
    assert msgpack.unpackb(raw)["messages"] == [{"seq": 1, "data": {"n": 1}}]
    c.send_json({"op": "history", "topic": "h.*", "id": 6})
    assert c.recv_json()["code"] == "bad_request"
    assert broker.metric("broker_history_topics") == 1
    assert broker.metric("broker_history_messages") == 4
    assert broker.metric("broker_history_bytes") > 0
    assert broker.metric("broker_history_evictions_total", 'reason="size"') == 0


@pytest.mark.parametrize(
    "query",
    [
        "/history/h.*",
        "/history/h..t",
        "/history/h.t?since=3",
        "/history/h.t?epoch=e",
        "/history/h.t?epoch=e&since=-1",
        "/history/h.t?epoch=e&since=%2B1",
        "/history/h.t?epoch=e&since=1.5",
        "/history/h.t?epoch=e&since=99999999999999999999",
        "/history/h.t?epoch=&since=1",
        "/history/h.t?limit=ten",
        "/history/h.t?limit=1&limit=2",
        "/history/h.t?%ff=1",
        "/history/%ff",
    ],
)
def test_http_history_refuses_bad_input(broker: BrokerProcess, query: str) -> None:
    status, body = get(broker, query)
    assert status == 400 and "error" in body, (status, body)
