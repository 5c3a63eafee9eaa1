"""`broker --redis`: three nodes sharing one real `redis-server`, real clients.

Each test starts its own redis-server (no persistence: `--save '' --appendonly no`) on a free
port and stops it by PID. Nodes are real broker processes. The checks are the issue's: delivery
across nodes exactly once with the same seq, wildcards across nodes (topics with Redis glob
characters included), recovery on another node, Redis restarted under load, a node started while
Redis is unreachable, a node that lost its connection recovering what it missed, and a Redis
named by a host name (looked up off the loop: tests/net/test_redis_lookup.py stalls that lookup).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ARTIFACTS, BrokerProcess, RedisServer, free_port
from tests.tlsutil import Pki

NODES = 3


@pytest.fixture
def nodes(redis: RedisServer, broker_factory: Callable[..., BrokerProcess]) -> list[BrokerProcess]:
    return [broker_factory("--redis", redis.url) for _ in range(NODES)]


class Client:
    """A JSON WebSocket client that keeps messages arriving before the reply it waits for."""

    def __init__(self, node: BrokerProcess) -> None:
        self.stack = contextlib.ExitStack()
        self.ws: ClientConnection = self.stack.enter_context(
            connect(node.url, open_timeout=5, close_timeout=1)
        )
        self.n = 0
        self.early: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.close()

    def send(self, **req: Any) -> int:
        self.n += 1
        req["id"] = self.n
        self.ws.send(json.dumps(req))
        return self.n

    def request(self, **req: Any) -> dict[str, Any]:
        n = self.send(**req)
        while True:
            reply = self.recv()
            if reply.get("id") == n and reply.get("op") != "message":
                return reply
            self.early.append(reply)

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.ws.recv(timeout))
        return value

    def messages(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        found = [m for m in self.early if m.get("op") == "message"]
        self.early = [m for m in self.early if m.get("op") != "message"]
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                m = self.recv(max(0.01, deadline - time.monotonic()))
                if m.get("op") == "message":
                    found.append(m)
                else:
                    self.early.append(m)
        return found

    def quiet(self, seconds: float = 0.3) -> list[dict[str, Any]]:
        """Whatever else arrives within `seconds` (to prove nothing more does)."""
        extra = [m for m in self.early if m.get("op") == "message"]
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while time.monotonic() < deadline:
                extra.append(self.recv(max(0.01, deadline - time.monotonic())))
        return extra


@pytest.fixture
def clients() -> Iterator[Callable[[BrokerProcess], Client]]:
    made: list[Client] = []

    def make(node: BrokerProcess) -> Client:
        c = Client(node)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def healthz(node: BrokerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(node.http + "/healthz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def wait_health(node: BrokerProcess, status: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while healthz(node)[0] != status:
        assert time.monotonic() < deadline, f"/healthz never answered {status}: {node.log()}"
        time.sleep(0.05)


def sync_patterns(client: Client, topic: str = "sync.probe") -> None:
    """A concrete subscribe's answer comes back over the node's Redis connection after its
    earlier PSUBSCRIBEs: once acked, the node's pattern subscriptions are in place in Redis."""
    reply = client.request(op="subscribe", topic=topic)
    assert reply["op"] == "ack", reply
    assert client.request(op="unsubscribe", topic=topic)["op"] == "ack"


def test_delivery_across_nodes_exactly_once_with_the_same_seq(
    nodes: list[BrokerProcess], clients: Callable[[BrokerProcess], Client]
) -> None:
    subs = [clients(node) for node in nodes for _ in range(2)]
    for i, sub in enumerate(subs):
        # Half subscribe to the topic, half through wildcards (some through both: still once).
        if i % 2 == 0:
            assert sub.request(op="subscribe", topic="orders.eu")["seq"] == 0
        else:
            sub.request(op="subscribe", topic="orders.*")
            sub.request(op="subscribe", topic="orders.>")
            if i == 1:
                sub.request(op="subscribe", topic="orders.eu")
            sync_patterns(sub)
    publishers = [clients(node) for node in nodes]
    per_node = 20
    for k in range(per_node):
        for j, pub in enumerate(publishers):
            pub.send(op="publish", topic="orders.eu", data={"from": j, "k": k})
    for pub in publishers:
        acks = [pub.recv() for _ in range(per_node)]
        assert all(a["op"] == "ack" for a in acks), acks
    total = per_node * NODES
    seen: list[dict[Any, int]] = []
    for sub in subs:
        got = sub.messages(total)
        assert len(got) == total
        assert sub.quiet(0.3) == [], "a message arrived twice"
        seqs = [m["seq"] for m in got]
        assert seqs == list(range(1, total + 1)), "in order, numbered once for the cluster"
        seen.append({(m["data"]["from"], m["data"]["k"]): m["seq"] for m in got})
    assert all(s == seen[0] for s in seen), "every node delivers a message with the same seq"
    for j in range(NODES):  # each publisher's own messages in its order
        own = [seen[0][(j, k)] for k in range(per_node)]
        assert own == sorted(own)


GLOB_TOPICS = ["a?b.c", "x[1].y", "back\\slash.z", "a^b.c", "[ab].c"]


def test_wildcards_across_nodes_with_glob_characters(
    nodes: list[BrokerProcess], clients: Callable[[BrokerProcess], Client]
) -> None:
    a, b, c = (clients(node) for node in nodes)
    patterns = {"a?b.*": a, "x[1].>": b, "back\\slash.*": c, "[ab].*": a}
    for pattern, sub in patterns.items():
        assert sub.request(op="subscribe", topic=pattern)["op"] == "ack"
    exact = clients(nodes[1])
    assert exact.request(op="subscribe", topic="a?b.c")["seq"] == 0
    # No sync_patterns here: a wildcard's ack comes once its PSUBSCRIBE is in place in Redis.
    pub = clients(nodes[2])
    # Topics a Redis glob (unescaped) would also match, and ones only over-matching `*` would.
    decoys = ["axb.c", "ab.c", "x1.y", "x[1]", "backXslash.z", "a.c", "b.c", "a?b.c.d", "a^b.c"]
    for topic in decoys + GLOB_TOPICS:
        assert pub.request(op="publish", topic=topic, data=topic)["op"] == "ack"
    got_a = a.messages(2)
    assert sorted(m["topic"] for m in got_a) == ["[ab].c", "a?b.c"]
    assert [m["topic"] for m in b.messages(1)] == ["x[1].y"]
    assert [m["topic"] for m in c.messages(1)] == ["back\\slash.z"]
    assert [m["topic"] for m in exact.messages(1)] == ["a?b.c"]
    for sub in (a, b, c, exact):
        assert sub.quiet(0.3) == [], "a decoy matched"


def test_recovery_on_another_node_after_a_node_is_killed(
    nodes: list[BrokerProcess], clients: Callable[[BrokerProcess], Client]
) -> None:
    sub = clients(nodes[0])
    ack = sub.request(op="subscribe", topic="feed")
    epoch = ack["epoch"]
    pub = clients(nodes[1])
    for i in range(5):
        pub.request(op="publish", topic="feed", data=i)
    got = sub.messages(5)
    last = got[-1]["seq"]
    assert last == 5
    os.kill(nodes[0].pid, signal.SIGKILL)
    nodes[0].proc.wait(5)  # type: ignore[union-attr]
    for i in range(5, 12):
        pub.request(op="publish", topic="feed", data=i)
    again = clients(nodes[2])
    ack = again.request(op="subscribe", topic="feed", since={"epoch": epoch, "seq": last})
    assert ack["recovered"] is True and ack["epoch"] == epoch and ack["seq"] == 12
    replay = again.messages(7)
    assert [(m["seq"], m["data"]) for m in replay] == [(s, s - 1) for s in range(6, 13)]
    pub.request(op="publish", topic="feed", data="live")
    assert [(m["seq"], m["data"]) for m in again.messages(1)] == [(13, "live")]
    # HTTP publishes go through Redis as well (202 once Redis has numbered it).
    req = urllib.request.Request(nodes[1].http + "/publish/feed", data=b'"http"', method="POST")
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 202 and json.loads(r.read())["delivered"] >= 1
    assert [(m["seq"], m["data"]) for m in again.messages(1)] == [(14, "http")]
    assert again.quiet(0.3) == []
    # The history op and GET /history read the same stream from any node.
    hist = clients(nodes[1]).request(op="history", topic="feed", since={"epoch": epoch, "seq": 10})
    assert [m["seq"] for m in hist["messages"]] == [11, 12, 13, 14]
    with urllib.request.urlopen(nodes[2].http + "/history/feed?limit=2", timeout=5) as r:
        body = json.loads(r.read())
    assert body["epoch"] == epoch and [m["seq"] for m in body["messages"]] == [1, 2]


def test_history_limits_in_redis(
    redis: RedisServer, broker_factory: Callable[..., BrokerProcess], clients: Any
) -> None:
    a = broker_factory("--redis", redis.url, "--history-size", "5")
    b = broker_factory("--redis", redis.url, "--history-size", "5")
    pub = clients(a)
    epoch = clients(b).request(op="subscribe", topic="t")["epoch"]
    for i in range(300):
        pub.send(op="publish", topic="t", data=i)
    pub.request(op="publish", topic="t", data=300)
    length = redis.call("XLEN", "broker:{t}:h")
    assert 5 <= length < 300, "the stream is capped (MAXLEN ~ history size)"
    late = clients(b)
    ack = late.request(op="subscribe", topic="t", since={"epoch": epoch, "seq": 1})
    assert ack["recovered"] is False, "seq 2 is long trimmed"
    again = clients(b)
    ack = again.request(op="subscribe", topic="t", since={"epoch": epoch, "seq": 298})
    assert ack["recovered"] is True
    assert [m["seq"] for m in again.messages(3)] == [299, 300, 301]
    assert redis.call("PTTL", "broker:{t}:h") > 0, "the stream expires with --history-ttl"


def start_degraded(*args: str) -> BrokerProcess:
    """A node whose /healthz is not 200 yet (it cannot reach Redis): started, not awaited."""
    node = BrokerProcess(*args)
    env = {**os.environ, "PYTHONPATH": str(ARTIFACTS.parent.parent)}
    cmd = [*node_cmd(node), *args]
    with node.open_log() as log:
        node.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            if healthz(node)[0]:
                return node
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.05)


def node_cmd(node: BrokerProcess) -> list[str]:
    import sys

    return [sys.executable, "-m", "broker", "--host", "127.0.0.1", "--port", str(node.port)]


def test_a_node_that_cannot_reach_redis_at_start_up(
    clients: Callable[[BrokerProcess], Client],
) -> None:
    port = free_port()
    node = start_degraded("--redis", f"redis://127.0.0.1:{port}/0")
    server: RedisServer | None = None
    try:
        assert healthz(node) == (503, "degraded\n")
        assert node.metric("broker_backplane_up") == 0
        sub = clients(node)
        assert sub.request(op="subscribe", topic="w.*")["op"] == "ack"
        t0 = time.monotonic()
        reply = sub.request(op="publish", topic="w.x", data=1)
        assert reply["op"] == "error" and reply["code"] == "unavailable"
        assert time.monotonic() - t0 < 2, "refused promptly, not held"
        reply = sub.request(op="subscribe", topic="w.x")
        assert reply["op"] == "error" and reply["code"] == "unavailable"
        req = urllib.request.Request(node.http + "/publish/w.x", data=b"1", method="POST")
        req.add_header("content-type", "application/json")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        assert refused.value.code == 503
        refused.value.close()
        server = RedisServer(port).start()
        wait_health(node, 200)
        assert node.metric("broker_backplane_up") == 1
        sync_patterns(sub)  # the wildcard was subscribed in Redis when the node came up
        assert sub.request(op="publish", topic="w.x", data=2)["op"] == "ack"
        assert [m["data"] for m in sub.messages(1)] == [2]
    finally:
        node.stop()
        if server is not None:
            server.stop()


def test_a_lost_connection_is_recovered_from_the_stream(
    nodes: list[BrokerProcess], redis: RedisServer, clients: Callable[[BrokerProcess], Client]
) -> None:
    """Redis keeps running; one node's connection is killed while others publish: the node
    reconnects, resubscribes and delivers the messages it missed, once and in order."""
    sub = clients(nodes[0])
    sub.request(op="subscribe", topic="gap")
    pub = clients(nodes[1])
    total = 300
    name = f"broker-{nodes[0].port}"
    for i in range(total):
        if i == 50:
            listing = redis.call("CLIENT", "LIST").decode()
            ids = [
                line.split()[0].split("=")[1]
                for line in listing.splitlines()
                if f"name={name} " in line
            ]
            assert len(ids) == 1, listing
            assert redis.call("CLIENT", "KILL", "ID", ids[0]) == 1
        pub.send(op="publish", topic="gap", data=i)
        time.sleep(0.002)
    acks = [pub.recv() for _ in range(total)]
    assert all(a["op"] == "ack" for a in acks)
    got = sub.messages(total, timeout=15)
    assert [m["data"] for m in got] == list(range(total))
    assert [m["seq"] for m in got] == list(range(1, total + 1))
    assert sub.quiet(0.3) == []
    assert nodes[0].metric("broker_backplane_reconnects_total") >= 1


def test_redis_restarted_under_load(
    nodes: list[BrokerProcess], redis: RedisServer, clients: Callable[[BrokerProcess], Client]
) -> None:
    """Redis killed and restarted (no persistence: new epochs) while clients publish: no node
    crashes, every publish is acked or refused, exact subscribers are told (1012) and
    resubscribe; afterwards the cluster works."""
    subs = [clients(node) for node in nodes]
    epochs = [s.request(op="subscribe", topic="load.x")["epoch"] for s in subs]
    assert len(set(epochs)) == 1
    wild = clients(nodes[2])
    wild.request(op="subscribe", topic="load.*")
    sync_patterns(wild)
    pubs = [clients(node) for node in nodes]
    sent = 0
    outcomes: dict[str, int] = {}
    down_seen = False
    t_end = time.monotonic() + 30
    phase = "before"
    restarted_at = 0.0
    while time.monotonic() < t_end:
        for pub in pubs:
            pub.send(op="publish", topic="load.x", data=sent)
            sent += 1
        for pub in pubs:
            reply = pub.recv()
            while reply.get("op") == "message":
                reply = pub.recv()
            key = reply["op"] if reply["op"] == "ack" else reply.get("code", "?")
            outcomes[key] = outcomes.get(key, 0) + 1
        if phase == "before" and sent >= 150:
            redis.kill()
            phase = "down"
        elif phase == "down":
            status, _ = healthz(nodes[0])
            if status == 503:
                down_seen = True
                assert nodes[1].metric("broker_backplane_up") == 0
                redis.start()
                restarted_at = time.monotonic()
                phase = "restarted"
        elif phase == "restarted" and all(healthz(n)[0] == 200 for n in nodes):
            phase = "up"
            up_at = sent
        elif phase == "up" and sent >= up_at + 60:
            break
        time.sleep(0.005)
    assert down_seen and phase == "up", (phase, outcomes)
    assert restarted_at
    assert set(outcomes) <= {"ack", "unavailable"}, outcomes
    assert outcomes["ack"] + outcomes.get("unavailable", 0) == sent, "no publish unanswered"
    assert outcomes.get("unavailable", 0) > 0
    for node in nodes:
        assert node.proc is not None and node.proc.poll() is None, "no node crashed"
        assert node.metric("broker_backplane_reconnects_total") >= 1
    # Redis lost everything (new epoch): the exact subscribers were closed with 1012.
    for sub in subs:
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10_000):
                sub.recv(5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    fresh = clients(nodes[0])
    ack = fresh.request(op="subscribe", topic="load.x", since={"epoch": epochs[0], "seq": 10})
    assert ack["recovered"] is False and ack["epoch"] != epochs[0]
    clients(nodes[1]).request(op="publish", topic="load.x", data="after")
    assert [m["data"] for m in fresh.messages(1)] == ["after"]
    assert any(m["data"] == "after" for m in wild.messages(10_000, timeout=3))


def test_rediss_with_a_password_and_a_database(
    tmp_path: Path, broker_factory: Callable[..., BrokerProcess], clients: Any
) -> None:
    """rediss:// (TLS, verified against --redis-ca), AUTH from the URL's password, SELECT db."""
    pki = Pki(tmp_path)
    cert, key, _ = pki.issue(2001)
    tls_args = ("--tls-cert-file", str(cert), "--tls-key-file", str(key))
    tls_args += ("--tls-ca-cert-file", str(pki.ca_path), "--tls-auth-clients", "no")
    server = RedisServer(args=tls_args, password="s3cret", tls=pki.client_context()).start()
    try:
        url = server.url.replace("/0", "/3")
        a = broker_factory("--redis", url, "--redis-ca", str(pki.ca_path))
        b = broker_factory("--redis", url, "--redis-ca", str(pki.ca_path))
        sub = clients(a)
        assert sub.request(op="subscribe", topic="secure")["seq"] == 0
        assert clients(b).request(op="publish", topic="secure", data="hi")["op"] == "ack"
        assert [(m["seq"], m["data"]) for m in sub.messages(1)] == [(1, "hi")]
        in_db3 = "redis.call('SELECT', '3'); return redis.call('EXISTS', KEYS[1])"
        assert server.call("EVAL", in_db3, 1, "broker:{secure}:s") == 1
        assert server.call("EXISTS", "broker:{secure}:s") == 0, "nothing in db 0"
        # A wrong password or an untrusted CA: the node stays degraded, it does not crash.
        wrong = url.replace("s3cret", "wrong")
        bad = start_degraded("--redis", wrong, "--redis-ca", str(pki.ca_path))
        untrusted = start_degraded("--redis", url)
        try:
            for node in (bad, untrusted):
                time.sleep(0.5)
                assert healthz(node) == (503, "degraded\n")
                assert node.proc is not None and node.proc.poll() is None
        finally:
            bad.stop()
            untrusted.stop()
        assert "WRONGPASS" in bad.log() or "invalid username-password" in bad.log()
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.log()
    finally:
        server.stop()


def test_workers_each_talk_to_redis(
    redis: RedisServer, broker_factory: Callable[..., BrokerProcess], clients: Any
) -> None:
    """--workers 2 --redis: each worker is a node of the cluster (its own Redis connection)."""
    host = broker_factory("--workers", "2", "--redis", redis.url)
    single = broker_factory("--redis", redis.url)
    by_worker: dict[str, Client] = {}
    for _ in range(100):  # SO_REUSEPORT spreads by a hash: open until both workers hold one
        c = clients(host)
        by_worker.setdefault(c.ws.response.headers["x-broker-worker"], c)
        if len(by_worker) == 2:
            break
    assert sorted(by_worker) == ["0", "1"]
    subs = [*by_worker.values(), clients(single)]
    for sub in subs:
        assert sub.request(op="subscribe", topic="wk")["seq"] == 0
    pub = clients(single)
    for i in range(10):
        pub.send(op="publish", topic="wk", data=i)
    assert pub.request(op="publish", topic="wk", data=10)["delivered"] == 3
    for sub in subs:
        got = sub.messages(11)
        assert [(m["seq"], m["data"]) for m in got] == [(i + 1, i) for i in range(11)]
        assert sub.quiet(0.2) == []


def test_a_wildcard_is_in_place_in_redis_when_acked(
    nodes: list[BrokerProcess], clients: Callable[[BrokerProcess], Client]
) -> None:
    """A publish on another node right after a wildcard subscribe's ack reaches it, every time."""
    sub, pub = clients(nodes[0]), clients(nodes[1])
    for i in range(30):
        assert sub.request(op="subscribe", topic=f"race{i}.*")["op"] == "ack"
        assert pub.request(op="publish", topic=f"race{i}.x", data=i)["op"] == "ack"
        assert [m["data"] for m in sub.messages(1, timeout=5)] == [i]


def test_a_redis_named_by_a_host_name(
    redis: RedisServer,
    broker_factory: Callable[..., BrokerProcess],
    clients: Callable[[BrokerProcess], Client],
) -> None:
    """--redis redis://localhost:PORT: the name is looked up (off the loop, /etc/hosts here) and
    the node is one of the cluster like a node given the address."""
    first = socket.getaddrinfo("localhost", redis.port, type=socket.SOCK_STREAM)[0][4][0]
    if first != "127.0.0.1":  # redis-server listens on 127.0.0.1 only
        pytest.skip(f"localhost names {first} first here")
    named = broker_factory("--redis", f"redis://localhost:{redis.port}/0")  # healthy: Redis up
    by_address = broker_factory("--redis", redis.url)
    assert "connected to Redis at localhost:" in named.log()
    subs = [clients(named), clients(by_address)]
    for sub in subs:
        assert sub.request(op="subscribe", topic="named")["seq"] == 0
    for i, pub in enumerate(clients(node) for node in (named, by_address)):
        assert pub.request(op="publish", topic="named", data=i)["delivered"] == 2
    for sub in subs:
        assert [(m["seq"], m["data"]) for m in sub.messages(2)] == [(1, 0), (2, 1)]
        assert sub.quiet(0.2) == []


def test_a_bad_redis_configuration_exits_with_a_reason() -> None:
    import sys

    for args, expected in (
        (["--redis", "redis://"], b"names no host"),
        (["--redis", "redis://127.0.0.1:99999/0"], b"port"),
        (["--redis", "redis://127.0.0.1:6379/zero"], b"database number"),
        (["--redis", "http://127.0.0.1"], b"redis:// or rediss://"),
        (["--redis", "rediss://127.0.0.1:1/0", "--redis-ca", "/nonexistent/ca.pem"], b"redis-ca"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "broker", "--port", str(free_port()), *args],
            env={**os.environ, "PYTHONPATH": str(ARTIFACTS.parent.parent)},
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 2, proc
        assert expected in proc.stderr, proc.stderr


def test_the_python_client_through_a_redis_restart(
    nodes: list[BrokerProcess], redis: RedisServer, clients: Callable[[BrokerProcess], Client]
) -> None:
    """The library client on node 0 while Redis restarts without persistence: closed with 1012,
    it reconnects and resubscribes by itself, is told it did not recover (new epoch), then gets
    the new epoch's messages, numbered from 1."""
    from broker_client import Client as BrokerClient
    from broker_client import Message

    got: list[Message] = []
    lost: list[Any] = []
    pub = clients(nodes[1])
    with BrokerClient(nodes[0].url, on_unrecovered=lost.append) as client:
        client.subscribe("rc.t", got.append)
        assert pub.request(op="publish", topic="rc.t", data="before")["op"] == "ack"
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        redis.kill()
        redis.start()
        for node in nodes[:2]:
            wait_health(node, 200)
        deadline = time.monotonic() + 15
        while not lost:
            assert time.monotonic() < deadline, "never told it did not recover"
            time.sleep(0.05)
        reply = pub.request(op="publish", topic="rc.t", data="after")
        assert reply["op"] == "ack", reply
        while len(got) < 2:
            assert time.monotonic() < deadline, got
            time.sleep(0.02)
    assert [(m.seq, m.data) for m in got] == [(1, "before"), (1, "after")]
