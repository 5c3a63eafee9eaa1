"""GET /connections and GET /topics on a real broker: what they report, how they sort, their
parameters, and the admin token they need when auth is on."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from websockets.sync.client import connect

from tests.auth.keys import SECRET, claims, sign
from tests.conftest import BrokerProcess
from tests.wsraw import RawWs

Factory = Callable[..., BrokerProcess]
Ws = Callable[..., RawWs]


def get(broker: BrokerProcess, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(broker.http + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read() or b"null")


def subscriber(raw_ws: Ws, broker: BrokerProcess, *patterns: str, **kw: Any) -> RawWs:
    c = raw_ws(broker, **kw)
    for i, pattern in enumerate(patterns):
        c.send_json({"op": "subscribe", "topic": pattern, "id": i})
        assert c.recv_json()["op"] == "ack"
    return c


def test_connections_report_and_sort(broker_factory: Factory, raw_ws: Ws) -> None:
    broker = broker_factory("--outbound-high-water", "65536", "--slow-consumer-policy", "drop")
    old = subscriber(raw_ws, broker, "a", "b.*", "c.>")
    time.sleep(0.05)
    slow = subscriber(raw_ws, broker, "bulk", rcvbuf=4096)
    pub = raw_ws(broker)
    # 8 MB, past the kernel's socket buffers (MiBs on loopback) and the mark, in batches under
    # the mark (a batch read in one iteration over it would be dropped then and there).
    for i in range(200):
        for _ in range(4):
            pub.send_json({"op": "publish", "topic": "bulk", "data": "x" * 10_000})
        pub.send_json({"op": "ping", "id": i})
        assert pub.recv_json()["op"] == "pong"

    status, body = get(broker, "/connections")  # sort=lag by default, 20 at most
    assert status == 200
    assert body["sort"] == "lag" and body["total"] == 3
    first = body["connections"][0]
    assert first["queued_bytes"] > 65536 and first["queued_frames"] >= 1
    assert first["queue_age_s"] > 0 and first["slow"] is True and first["dropped"] > 0
    assert first["subscriptions"] == 1 and first["remote"] == "127.0.0.1"
    assert first["user"] is None and first["encoding"] == "json" and first["state"] == "open"
    assert abs(first["connected_at"] - (time.time() - first["connected_s"])) < 1
    assert [c["queue_age_s"] for c in body["connections"][1:]] == [0.0, 0.0]

    status, body = get(broker, "/connections?sort=age&limit=1")
    (oldest,) = body["connections"]
    assert oldest["subscriptions"] == 3 and oldest["dropped"] == 0
    assert oldest["connected_s"] >= first["connected_s"]
    assert (
        get(broker, "/connections?sort=dropped&limit=1")[1]["connections"][0]["id"] == first["id"]
    )

    for bad in ("sort=size", "limit=0", "limit=x", "limit=100001"):
        status, body = get(broker, f"/connections?{bad}")
        assert status == 400 and "error" in body, bad
    assert slow and old


def test_topics_by_rate_and_by_subscribers(broker: BrokerProcess, raw_ws: Ws) -> None:
    subscriber(raw_ws, broker, "hot", "warm")
    subscriber(raw_ws, broker, "hot", "room.*")
    subscriber(raw_ws, broker, "room.*")
    pub = raw_ws(broker)
    deadline = time.monotonic() + 10
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:  # the rates are per stats tick (1 s)
        for _ in range(30):
            pub.send_json({"op": "publish", "topic": "hot", "data": 1})
        for _ in range(5):
            pub.send_json({"op": "publish", "topic": "room.1", "data": 1})
        pub.send_json({"op": "publish", "topic": "warm", "data": 1})
        time.sleep(0.05)
        body = get(broker, "/topics?sort=rate&limit=2")[1]
        if [t["topic"] for t in body["topics"]] == ["hot", "room.1"]:
            break
    hot, room = body["topics"]
    assert [hot["topic"], room["topic"]] == ["hot", "room.1"], body
    assert hot["rate"] > room["rate"] > 0 and body["interval_s"] > 0
    assert hot["subscribers"] == 2 and room["subscribers"] == 2  # reached through room.*

    status, body = get(broker, "/topics?sort=subscribers&limit=3")
    assert status == 200
    assert [(t["topic"], t["subscribers"]) for t in body["topics"]][:2] == [
        ("hot", 2),
        ("room.*", 2),
    ] or [(t["topic"], t["subscribers"]) for t in body["topics"]][:2] == [
        ("room.*", 2),
        ("hot", 2),
    ]
    assert body["topics"][2] == {
        "topic": "warm",
        "subscribers": 1,
        "rate": body["topics"][2]["rate"],
    }
    assert get(broker, "/topics?sort=lag")[0] == 400


def test_admin_token_required_with_auth_on_and_user_reported(broker_factory: Factory) -> None:
    broker = broker_factory("--auth-secret", SECRET)
    token = sign(claims(subscribe=["x.>"], sub="alice"))
    with connect(broker.url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        ws.send(json.dumps({"op": "subscribe", "topic": "x.y", "id": 1}))
        assert json.loads(ws.recv(5))["op"] == "ack"
        for path in ("/connections", "/topics"):
            assert get(broker, path)[0] == 401
            assert get(broker, path, sign(claims()))[0] == 403
            assert get(broker, path, sign(claims(admin=True)))[0] == 200
        body = get(broker, "/connections", sign(claims(admin=True)))[1]
        (conn,) = body["connections"]
        assert conn["user"] == "alice" and conn["subscriptions"] == 1
