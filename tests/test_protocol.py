"""Protocol v1 end to end with the `websockets` client against a broker process."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import BrokerProcess

JSON, MSGPACK = "pubsub.v1.json", "pubsub.v1.msgpack"
_OPEN = contextlib.ExitStack()  # connections opened by the current test


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    with _OPEN:
        yield


class Client:
    """A thin protocol-speaking wrapper over a websockets sync connection."""

    def __init__(self, broker: BrokerProcess, subprotocol: str | None = JSON) -> None:
        protocols: Any = [subprotocol] if subprotocol else None
        self.ws: ClientConnection = _OPEN.enter_context(
            connect(broker.url, subprotocols=protocols, open_timeout=5)
        )
        self.binary = subprotocol == MSGPACK

    def send(self, msg: dict[str, Any]) -> None:
        self.ws.send(msgpack.packb(msg) if self.binary else json.dumps(msg))

    def recv(self, timeout: float = 5) -> dict[str, Any]:
        raw = self.ws.recv(timeout)
        assert isinstance(raw, bytes) == self.binary, "replies use the connection's encoding"
        return msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send(msg)
        return self.recv()

    def subscribe(self, topic: str) -> None:
        ack = self.request({"op": "subscribe", "topic": topic, "id": 1})
        if "*" in topic or ">" in topic:
            assert ack == {"op": "ack", "id": 1}
        else:  # a concrete topic's ack tells where it stands
            assert ack == {"op": "ack", "id": 1, "epoch": ack["epoch"], "seq": ack["seq"]}

    def close(self) -> None:
        self.ws.close()


def http_publish(broker: BrokerProcess, topic: str, body: bytes, ctype: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{broker.http}/publish/{topic}", data=body, headers={"Content-Type": ctype}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read() or b"null")


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK, None])
def test_every_operation(broker: BrokerProcess, subprotocol: str | None) -> None:
    c = Client(broker, subprotocol)
    assert c.ws.subprotocol == subprotocol
    assert c.request({"op": "ping", "id": "p"}) == {"op": "pong", "id": "p"}
    c.subscribe("room.1")
    c.send({"op": "publish", "topic": "room.1", "data": {"text": "hi", "n": [1, 2.5]}, "id": 7})
    got = [c.recv(), c.recv()]  # ack and own delivery, in either order
    assert {"op": "ack", "id": 7, "delivered": 1} in got
    assert {
        "op": "message",
        "topic": "room.1",
        "data": {"text": "hi", "n": [1, 2.5]},
        "seq": 1,
    } in got
    assert c.request({"op": "unsubscribe", "topic": "room.1", "id": 8}) == {"op": "ack", "id": 8}
    c.send({"op": "publish", "topic": "room.1", "data": 2, "id": 9})
    assert c.recv() == {"op": "ack", "id": 9, "delivered": 0}
    c.close()


def test_wildcards_and_seq(polled_broker: BrokerProcess) -> None:
    broker = polled_broker
    star, tail, exact, pub = (Client(broker) for _ in range(4))
    star.subscribe("s.*.x")
    tail.subscribe("s.>")
    exact.subscribe("s.a.x")
    for topic in ("s.a.x", "s.b.x", "s.a.x.y", "s", "t.a.x"):
        pub.send({"op": "publish", "topic": topic, "data": topic})
    pub.send({"op": "ping", "id": "done"})
    assert pub.recv() == {"op": "pong", "id": "done"}
    assert [(m["topic"], m["seq"]) for m in (star.recv(), star.recv())] == [
        ("s.a.x", 1),
        ("s.b.x", 1),
    ]
    assert [m["topic"] for m in (tail.recv(), tail.recv(), tail.recv())] == [
        "s.a.x",
        "s.b.x",
        "s.a.x.y",
    ]
    assert exact.recv()["topic"] == "s.a.x"
    exact.send({"op": "ping"})
    assert exact.recv() == {"op": "pong"}, "nothing else was delivered to the exact subscriber"


def test_cross_encoding_delivery(broker: BrokerProcess) -> None:
    j, m = Client(broker, JSON), Client(broker, MSGPACK)
    j.subscribe("x")
    m.subscribe("x")
    m.send({"op": "publish", "topic": "x", "data": b"\x00\x01bin"})
    assert j.recv() == {
        "op": "message",
        "topic": "x",
        "data": "AAFiaW4=",
        "seq": 1,
        "encoding": "base64",
    }
    assert m.recv() == {"op": "message", "topic": "x", "data": b"\x00\x01bin", "seq": 1}
    # A text frame on a msgpack connection is decoded as JSON; the reply is still msgpack.
    m.ws.send(json.dumps({"op": "publish", "topic": "x", "data": {"a": 1}, "id": 3}))
    replies = [m.recv(), m.recv()]
    assert {"op": "ack", "id": 3, "delivered": 2} in replies
    assert j.recv() == {"op": "message", "topic": "x", "data": {"a": 1}, "seq": 2}


def test_bad_requests_get_errors_and_the_connection_stays(broker: BrokerProcess) -> None:
    c = Client(broker)
    c.ws.send("{not json")
    assert c.recv()["code"] == "bad_request"
    c.ws.send(msgpack.packb([1, 2]))
    assert c.recv()["code"] == "bad_request"
    for bad in (
        {"op": "nope", "id": 1},
        {"op": "publish", "topic": "a.*", "data": 1, "id": 2},
        {"op": "subscribe", "topic": "a..b", "id": 3},
        {"op": "subscribe", "topic": "x" * 256, "id": 4},
        {"id": 5},
    ):
        reply = c.request(bad)
        assert reply["op"] == "error" and reply["code"] == "bad_request", reply
        assert reply["id"] == bad["id"]
        assert isinstance(reply["message"], str) and reply["message"]
    assert c.request({"op": "ping", "id": 6}) == {"op": "pong", "id": 6}


def test_http_publish(broker: BrokerProcess) -> None:
    j, m = Client(broker, JSON), Client(broker, MSGPACK)
    j.subscribe("h.>")
    m.subscribe("h.>")
    assert http_publish(broker, "h.json", b'{"v": [1]}', "application/json") == (
        202,
        {"delivered": 2},
    )
    assert j.recv() == {"op": "message", "topic": "h.json", "data": {"v": [1]}, "seq": 1}
    assert m.recv()["data"] == {"v": [1]}
    status, _ = http_publish(broker, "h.mp", msgpack.packb({"k": b"\x01"}), "application/msgpack")
    assert status == 202
    assert m.recv()["data"] == {"k": b"\x01"}
    assert j.recv()["data"] == {"k": "AQ=="}
    http_publish(broker, "h.raw", b"\xff\x00", "application/octet-stream")
    assert m.recv()["data"] == b"\xff\x00"
    assert j.recv() == {
        "op": "message",
        "topic": "h.raw",
        "data": "/wA=",
        "seq": 1,
        "encoding": "base64",
    }
    # seq is shared between WebSocket and HTTP publishes.
    j.send({"op": "publish", "topic": "h.json", "data": 2})
    assert j.recv()["seq"] == 2
    assert http_publish(broker, "h.*", b"1", "application/json")[0] == 400
    assert http_publish(broker, "h..x", b"1", "application/json")[0] == 400
    assert http_publish(broker, "h.x", b"{bad", "application/json")[0] == 400
    assert http_publish(broker, "h.x", b"1", "text/plain")[0] == 415


def test_http_routes(broker: BrokerProcess) -> None:
    with urllib.request.urlopen(broker.http + "/healthz", timeout=5) as r:
        assert (r.status, r.read()) == (200, b"ok")
    for path, status in (("/nope", 404), ("/ws", 400)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(broker.http + path, timeout=5)
        err.value.close()
        assert err.value.code == status
    with urllib.request.urlopen(broker.http + "/stats", timeout=5) as r:
        stats = json.loads(r.read())
    assert stats["connections"] >= 1 and "busiest_topics" in stats


def test_metrics_count_what_happened(polled_broker: BrokerProcess) -> None:
    broker = polled_broker
    subs = [Client(broker) for _ in range(3)]
    for s in subs:
        s.subscribe("m")
    pub = Client(broker, MSGPACK)
    for i in range(10):
        pub.send({"op": "publish", "topic": "m", "data": i})
    for s in subs:
        assert [s.recv()["data"] for _ in range(10)] == list(range(10))
    assert broker.metric("broker_messages_published_total") == 10
    assert broker.metric("broker_messages_delivered_total") == 30
    assert broker.metric("broker_subscriptions") == 3
    assert broker.metric("broker_topics") == 1
    assert broker.metric("broker_connections") == 5  # 4 WebSockets + this scrape
    assert broker.metric("broker_epoll_wait_total") > 0
    assert broker.metric("broker_epoll_events_total", 'kind="in"') > 0
    assert broker.metric("broker_bytes_received_total") > 0
    assert broker.metric("broker_bytes_sent_total") > 0
    assert broker.metric("broker_epoll_events_per_wait_count") > 0
    assert broker.metric("process_resident_memory_bytes") > 0
    for c in [*subs, pub]:
        c.close()
    assert broker.metric("broker_subscriptions") == 0
    assert broker.metric("broker_connections_closed_total", 'reason="client_close"') == 4
