"""Routing without sockets: seq, encode-once fan-out, slow consumers, limits, rate limits."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgpack
import pytest

from broker.config import Config
from broker.metrics import Stats
from broker.pubsub import router as router_module
from broker.pubsub.router import Router
from broker.pubsub.session import Session
from broker.wire.codec import Encoding


def make(**overrides: Any) -> Router:
    return Router(dataclasses.replace(Config(), **overrides), Stats())


def frames(session: Session) -> list[Any]:
    """Decode and consume every frame in a session's buffer."""
    out, data = [], b"".join(session.out)
    session.out.clear()
    session.queued = 0
    while data:
        n = data[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(n, 0)
        if n == 126:
            n = int.from_bytes(data[2:4])
        elif n == 127:
            n = int.from_bytes(data[2:10])
        body, data = data[start : start + n], data[start + n :]
        out.append(json.loads(body) if session.encoding is Encoding.JSON else msgpack.unpackb(body))
    return out


def test_subscribe_publish_ack_and_seq() -> None:
    r = make()
    sub, pub = Session(), Session(Encoding.MSGPACK)
    r.handle(sub, '{"op":"subscribe","topic":"t.*","id":1}', binary=False)
    r.handle(pub, msgpack.packb({"op": "publish", "topic": "t.x", "data": [1], "id": 2}), True)
    r.handle(pub, msgpack.packb({"op": "publish", "topic": "t.x", "data": [2]}), True)
    r.handle(pub, msgpack.packb({"op": "publish", "topic": "t.y", "data": [3]}), True)
    assert frames(sub) == [
        {"op": "ack", "id": 1},
        {"op": "message", "topic": "t.x", "data": [1], "seq": 1},
        {"op": "message", "topic": "t.x", "data": [2], "seq": 2},
        {"op": "message", "topic": "t.y", "data": [3], "seq": 1},
    ]
    assert frames(pub) == [{"op": "ack", "id": 2, "delivered": 1}]
    assert r.dirty == [sub, pub]  # each listed once, when its buffer became non-empty


def test_each_message_is_encoded_once_per_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    r = make()
    calls: list[Encoding] = []
    real = router_module.messages.message

    def counting(topic: str, data: Any, seq: int, encoding: Encoding, plain: bool = False) -> bytes:
        calls.append(encoding)
        return real(topic, data, seq, encoding, plain)

    monkeypatch.setattr(router_module.messages, "message", counting)
    subs = [Session(Encoding(i % 2)) for i in range(100)]
    for s in subs:
        r.subscribe(s, "t")
    assert r.publish("t", "hello") == 100
    assert sorted(calls) == [Encoding.JSON, Encoding.MSGPACK]
    first_json = subs[0].out[0]
    assert all(s.out[0] is first_json for s in subs[::2]), "the same bytes object, not copies"


def test_overlapping_patterns_deliver_once() -> None:
    r = make()
    s = Session()
    for pattern in ("a.b", "a.*", "a.>", ">"):
        r.subscribe(s, pattern)
    assert r.publish("a.b", 1) == 1


def test_slow_consumer_is_listed_once_and_gets_nothing_more() -> None:
    r = make(outbound_high_water=1000)
    slow, ok = Session(), Session()
    r.subscribe(slow, "t")
    r.subscribe(ok, "t")
    delivered = []
    for _ in range(20):
        delivered.append(r.publish("t", "x" * 100))
        ok.out.clear()  # this one keeps up
        ok.queued = 0
    assert delivered[0] == 2 and delivered[-1] == 1
    assert r.over == [slow]
    assert 1000 < slow.queued <= 1000 + 200
    assert slow.queued == sum(map(len, slow.out))
    assert r.stats.dropped["slow_consumer"] == sum(2 - d for d in delivered)


def test_unsubscribe_and_limits() -> None:
    r = make(max_subscriptions=2)
    s = Session()
    r.handle(s, '{"op":"unsubscribe","topic":"a","id":1}', binary=False)
    r.handle(s, '{"op":"subscribe","topic":"a","id":2}', binary=False)
    r.handle(s, '{"op":"subscribe","topic":"a","id":3}', binary=False)  # idempotent
    r.handle(s, '{"op":"subscribe","topic":"b","id":4}', binary=False)
    r.handle(s, '{"op":"subscribe","topic":"c","id":5}', binary=False)
    r.handle(s, '{"op":"unsubscribe","topic":"a","id":6}', binary=False)
    replies = frames(s)
    assert [m["id"] for m in replies] == [1, 2, 3, 4, 5, 6]
    assert [(m["op"], m.get("code")) for m in replies] == [
        ("error", "not_found"),
        ("ack", None),
        ("ack", None),
        ("ack", None),
        ("error", "too_large"),
        ("ack", None),
    ]
    assert r.sublist.subscriptions == 1
    r.drop(s)
    assert r.sublist.empty


def test_rate_limit() -> None:
    r = make(publish_rate=10.0, publish_burst=3)
    s = Session()
    r.now = 100.0
    s.rate_at, s.rate_tokens = 100.0, 3.0
    for i in range(5):
        r.handle(s, json.dumps({"op": "publish", "topic": "t", "data": i, "id": i}), False)
    codes = [m.get("code") for m in frames(s)]
    assert codes == [None, None, None, "rate_limited", "rate_limited"]
    r.now = 100.2  # two tokens refilled
    r.handle(s, '{"op":"publish","topic":"t","data":0,"id":9}', False)
    assert frames(s) == [{"op": "ack", "id": 9, "delivered": 0}]


def test_unencodable_data_is_counted_not_raised() -> None:
    r = make()
    j, m = Session(Encoding.JSON), Session(Encoding.MSGPACK)
    r.subscribe(j, "t")
    r.subscribe(m, "t")
    assert r.publish("t", 2**70) == 1  # JSON carries it, msgpack cannot
    assert r.stats.dropped["unencodable"] == 1
    assert frames(j)[0]["data"] == 2**70
