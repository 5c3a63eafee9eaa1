"""GET /connections and GET /topics on a real broker: what they report, how they sort, their
parameters, and the admin token they need when auth is on."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
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


def top_lag(broker: BrokerProcess) -> dict[str, dict[str, list[float]]]:
    """/metrics' broker_top_lag_{seconds,bytes} as {"seconds"|"bytes": {worker: [rank 1..5]}}
    (worker "" for one process)."""
    with urllib.request.urlopen(broker.http + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[str, list[float]]] = {"seconds": {}, "bytes": {}}
    for family in text_string_to_metric_families(text):
        kind = family.name.removeprefix("broker_top_lag_")
        if kind not in out:
            continue
        assert family.type == "gauge", family
        for sample in family.samples:
            ranks = out[kind].setdefault(sample.labels.get("worker", ""), [0.0] * 5)
            assert set(sample.labels) - {"worker"} == {"rank"}, sample  # no identities
            ranks[int(sample.labels["rank"]) - 1] = sample.value
    return out


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers-2"])
def test_top_lag_metrics_rank_slow_readers_and_fall_back(
    broker_factory: Factory, raw_ws: Ws, workers: int
) -> None:
    """Two raw slow readers (tiny SO_RCVBUF, not reading) behind a publisher: exactly two ranks
    show an age, each process's ranks are in order, and they read 0 again once one reader left
    and the other drained."""
    broker = broker_factory(
        "--outbound-high-water", "65536", "--slow-consumer-policy", "drop",
        "--workers", str(workers),
    )  # fmt: skip
    first = subscriber(raw_ws, broker, "bulk.a", rcvbuf=4096)
    second = subscriber(raw_ws, broker, "bulk.b", rcvbuf=4096)
    pub = raw_ws(broker)
    time.sleep(0.2 if workers > 1 else 0)  # the subscriptions reach the other worker
    idle = top_lag(broker)
    assert len(idle["seconds"]) == workers and len(idle["bytes"]) == workers, idle
    if workers > 1:
        assert set(idle["seconds"]) == {"0", "1"}, idle  # labelled by the hub's gathering
    # 4 MB to each, past the kernel's buffers and the mark; the first backlog starts earlier.
    for topic in ("bulk.a", "bulk.b"):
        for i in range(100):
            for _ in range(4):
                pub.send_json({"op": "publish", "topic": topic, "data": "x" * 10_000})
            pub.send_json({"op": "ping", "id": i})
            assert pub.recv_json()["op"] == "pong"

    deadline = time.monotonic() + 10
    while True:
        lag = top_lag(broker)
        ages = [a for ranks in lag["seconds"].values() for a in ranks]
        if sum(a > 0 for a in ages) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(a > 0 for a in ages) == 2, lag  # the two slow readers, and nobody else
    for worker, ranks in lag["seconds"].items():
        assert ranks == sorted(ranks, reverse=True), lag
        sizes = lag["bytes"][worker]
        assert all((s > 0) >= (a > 0) for a, s in zip(ranks, sizes, strict=True)), lag
    assert max(max(b) for b in lag["bytes"].values()) > 65536 // 2, lag
    if workers == 1:
        (ranks,) = lag["seconds"].values()
        # The same ranking as GET /connections?sort=lag, read a moment later.
        status, body = get(broker, "/connections?sort=lag&limit=5")
        listed = [c["queue_age_s"] for c in body["connections"]]
        assert status == 200 and len(listed) == 3 and listed[2] == 0.0, body  # + the publisher
        assert listed[0] >= ranks[0] and listed[1] >= ranks[1], (listed, ranks)
        assert ranks[0] >= ranks[1] > 0, lag  # bulk.a's backlog is the older one

    first.close()  # leaves with its backlog
    second.sock.settimeout(1.0)  # drains: reads until the broker has nothing more for it
    deadline = time.monotonic() + 15
    while True:
        try:
            while second.sock.recv(1 << 16):
                pass
        except TimeoutError:
            pass
        lag = top_lag(broker)
        ages = [a for ranks in lag["seconds"].values() for a in ranks]
        sizes = [s for ranks in lag["bytes"].values() for s in ranks]
        if (not any(ages) and not any(sizes)) or time.monotonic() > deadline:
            break
    assert not any(ages) and not any(sizes), lag
