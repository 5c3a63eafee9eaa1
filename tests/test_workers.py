"""`broker --workers 3`: clients spread over processes, one hub numbering every message.

Each connection learns its worker from the 101's `x-broker-worker` header; SO_REUSEPORT spreads
connections by a hash of the 4-tuple, so a test opens connections until every worker holds some
(bounded). Everything here runs real processes: the supervisor, its workers, real clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from broker_client import Backoff, ConnectionState, Message
from broker_client import Client as BrokerClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from broker.config import Config, validate
from tests.clients.chaos import cut
from tests.conftest import REPO, BrokerProcess, RedisServer, free_port

WORKERS = 3
MAX_TRIES = 200  # connections opened at most to find one on a given worker


class Client:
    def __init__(self, broker: BrokerProcess) -> None:
        self.stack = contextlib.ExitStack()
        self.ws: ClientConnection = self.stack.enter_context(
            connect(broker.url, open_timeout=5, close_timeout=1)
        )
        header = self.ws.response.headers.get("x-broker-worker")
        self.worker = -1 if header is None else int(header)  # -1: not a worker
        self.n = 0

    def request(self, **req: Any) -> dict[str, Any]:
        """Send a request with a fresh id and return its answer (messages before it are kept)."""
        self.n += 1
        req["id"] = self.n
        self.ws.send(json.dumps(req))
        while True:
            reply = self.recv()
            if reply.get("id") == self.n:
                return reply
            self.early.append(reply)

    early: list[dict[str, Any]]

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.ws.recv(timeout))
        return value

    def messages(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """`count` deliveries (those that came before a reply first), bounded in time."""
        found = [m for m in self.early if m.get("op") == "message"]
        self.early = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"got {len(found)} of {count} messages"
            found.append(self.recv(left))
        return found

    def quiet(self, wait: float = 0.3) -> bool:
        """Nothing more arrives within `wait` seconds."""
        try:
            extra = self.ws.recv(wait)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected extra frame: {extra!r}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.close()


@pytest.fixture
def clients() -> Iterator[Callable[[BrokerProcess], Client]]:
    opened: list[Client] = []

    def open_client(broker: BrokerProcess) -> Client:
        c = Client(broker)
        c.early = []
        opened.append(c)
        return c

    yield open_client
    for c in opened:
        c.close()


def on_worker(
    open_client: Callable[[BrokerProcess], Client], broker: BrokerProcess, worker: int
) -> Client:
    """A connection held by `worker` (others opened on the way are closed)."""
    for _ in range(MAX_TRIES):
        c = open_client(broker)
        if c.worker == worker:
            return c
        c.close()
    raise AssertionError(f"no connection landed on worker {worker} in {MAX_TRIES} tries")


def spread(
    open_client: Callable[[BrokerProcess], Client], broker: BrokerProcess, per_worker: int
) -> list[Client]:
    """`per_worker` connections on each worker."""
    by_worker: dict[int, list[Client]] = {w: [] for w in range(WORKERS)}
    for _ in range(MAX_TRIES):
        c = open_client(broker)
        if len(by_worker[c.worker]) < per_worker:
            by_worker[c.worker].append(c)
        else:
            c.close()
        if all(len(v) == per_worker for v in by_worker.values()):
            return [c for v in by_worker.values() for c in v]
    raise AssertionError(f"connections per worker: { {w: len(v) for w, v in by_worker.items()} }")


def http(broker: BrokerProcess, path: str, body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        broker.http + path,
        data=body,
        method="GET" if body is None else "POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def worker_pids(broker: BrokerProcess) -> set[int]:
    with open(f"/proc/{broker.pid}/task/{broker.pid}/children") as f:
        return {int(p) for p in f.read().split()}


def worker_pid(broker: BrokerProcess, index: int) -> int:
    for pid in worker_pids(broker):
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        if env.get(b"BROKER_WORKER_INDEX") == str(index).encode():
            return pid
    raise AssertionError(f"no process for worker {index}")


@pytest.fixture
def workers(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory("--workers", str(WORKERS), "--shutdown-timeout", "3")


def test_every_subscriber_on_every_worker_gets_each_message_once_with_one_seq(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    subs = spread(clients, workers, per_worker=2)
    exact = subs[::2]  # one per worker on the topic, one per worker on a wildcard
    wild = subs[1::2]
    positions = {
        json.dumps([r["epoch"], r["seq"]])
        for r in (c.request(op="subscribe", topic="w.t") for c in exact)
    }
    assert len(positions) == 1, "every worker acks the same position"
    for c in wild:
        assert c.request(op="subscribe", topic="w.*") == {"op": "ack", "id": c.n}
    # A subscriber holding both the topic and a wildcard still gets each message once.
    assert exact[0].request(op="subscribe", topic="w.>") == {"op": "ack", "id": exact[0].n}
    pubs = spread(clients, workers, per_worker=1)
    total = 30
    for i in range(total):
        p = pubs[i % WORKERS]
        reply = p.request(op="publish", topic="w.t", data={"i": i})
        assert reply == {"op": "ack", "id": p.n, "delivered": len(subs)}
    seqs: dict[int, int] = {}
    for c in subs:
        got = c.messages(total)
        assert [m["data"]["i"] for m in got] == list(range(total)), "in order, no gap"
        for m in got:
            assert seqs.setdefault(m["data"]["i"], m["seq"]) == m["seq"], "one seq per message"
        assert c.quiet()
    assert sorted(seqs.values()) == list(range(1, total + 1))


def test_a_wildcard_on_one_worker_sees_topics_published_on_the_others(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    watcher = on_worker(clients, workers, 0)
    watcher.request(op="subscribe", topic="room.>")
    p1 = on_worker(clients, workers, 1)
    p2 = on_worker(clients, workers, 2)
    p1.request(op="publish", topic="room.a.b", data=1)
    p2.request(op="publish", topic="room.c", data=2)
    p1.request(op="publish", topic="other.c", data=3)
    got = watcher.messages(2)
    assert [(m["topic"], m["data"], m["seq"]) for m in got] == [
        ("room.a.b", 1, 1),
        ("room.c", 2, 1),
    ]
    assert watcher.quiet()


def test_a_publish_after_a_wildcard_ack_reaches_it_from_any_worker(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    """The ack of a wildcard subscribe waits for the hub's barrier answer, so the hub holds the
    interest before the client can act on the ack: no publish made after it can miss it."""
    watcher = on_worker(clients, workers, 0)
    publisher = on_worker(clients, workers, 1)
    rounds = 30
    for i in range(rounds):
        watcher.request(op="subscribe", topic=f"race{i}.*")
        publisher.ws.send(json.dumps({"op": "publish", "topic": f"race{i}.x", "data": i}))
    got = watcher.messages(rounds)
    assert sorted(m["data"] for m in got) == list(range(rounds))
    assert watcher.quiet()


def test_a_client_recovers_on_another_worker(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    first = on_worker(clients, workers, 0)
    ack = first.request(op="subscribe", topic="r.t")
    publisher = on_worker(clients, workers, 2)
    publisher.request(op="publish", topic="r.t", data="a")
    assert first.messages(1)[0]["seq"] == ack["seq"] + 1
    first.close()
    for data in ("b", "c", "d"):
        publisher.request(op="publish", topic="r.t", data=data)
    again = on_worker(clients, workers, 1)
    since = {"epoch": ack["epoch"], "seq": ack["seq"] + 1}
    reply = again.request(op="subscribe", topic="r.t", since=since)
    assert reply["recovered"] is True and reply["seq"] == ack["seq"] + 4
    publisher.request(op="publish", topic="r.t", data="e")
    got = again.messages(4)
    assert [(m["data"], m["seq"]) for m in got] == [("b", 2), ("c", 3), ("d", 4), ("e", 5)]
    assert again.quiet()


def test_http_publish_and_history_go_through_the_hub(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    subs = spread(clients, workers, per_worker=1)
    for c in subs:
        c.request(op="subscribe", topic="h.t")
    for i in range(6):  # fresh HTTP connections: spread over the workers too
        assert http(workers, "/publish/h.t", json.dumps(i).encode()) == (202, {"delivered": 3})
    for c in subs:
        assert [m["data"] for m in c.messages(6)] == list(range(6))
    for _ in range(3):
        status, body = http(workers, "/history/h.t?limit=4")
        assert status == 200
        assert [m["seq"] for m in body["messages"]] == [1, 2, 3, 4]
    history = subs[0].request(op="history", topic="h.t", since={"epoch": body["epoch"], "seq": 4})
    assert history["recovered"] is True
    assert [m["data"] for m in history["messages"]] == [4, 5]


def test_metrics_are_gathered_from_every_worker(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    pubs = spread(clients, workers, per_worker=1)
    for p in pubs:
        p.request(op="publish", topic="m.t", data=1)
    for _ in range(3):  # whichever worker answers, the same series
        status, text = http(workers, "/metrics")
        assert status == 200
        published = {
            line.split("{")[1].split("}")[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("broker_messages_published_total{")
        }
        assert published == {'worker="0"': 1.0, 'worker="1"': 1.0, 'worker="2"': 1.0}
        assert 'broker_workers{worker="hub"} 3.0' in text
        assert 'broker_backplane_up{worker="1"} 1.0' in text
        assert 'process_resident_memory_bytes{worker="hub"}' in text


def test_a_killed_worker_is_restarted_and_its_clients_recover(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    victim = on_worker(clients, workers, 1)
    ack = victim.request(op="subscribe", topic="k.t")
    publisher = on_worker(clients, workers, 0)
    old = worker_pid(workers, 1)
    os.kill(old, signal.SIGKILL)
    with pytest.raises(ConnectionClosed):
        victim.recv(5)
    for data in range(3):
        publisher.request(op="publish", topic="k.t", data=data)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, FileNotFoundError, OSError):
            if worker_pid(workers, 1) != old:
                break
        time.sleep(0.05)
    assert worker_pid(workers, 1) != old
    again = on_worker(clients, workers, 1)  # the restarted worker
    reply = again.request(op="subscribe", topic="k.t", since={"epoch": ack["epoch"], "seq": 0})
    assert reply["recovered"] is True
    assert [m["data"] for m in again.messages(3)] == [0, 1, 2]
    assert workers.wait_metric("broker_worker_restarts_total", 'worker="hub"', equals=1) == 1


def test_sigterm_drains_every_worker_and_the_parent_exits_0(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    subs = spread(clients, workers, per_worker=1)
    pids = worker_pids(workers)
    assert len(pids) == WORKERS
    assert workers.terminate(timeout=15) == 0
    for c in subs:
        with pytest.raises(ConnectionClosed) as info:
            c.recv(5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_data_msgpack_cannot_carry_crosses_the_hub(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    sub = on_worker(clients, workers, 0)
    sub.request(op="subscribe", topic="big")
    pub = on_worker(clients, workers, 1)
    pub.ws.send('{"op":"publish","topic":"big","data":{"n":1180591620717411303424},"id":1}')
    (got,) = sub.messages(1)
    assert got["data"] == {"n": 2**70}
    status, body = http(workers, "/history/big")
    assert status == 200 and body["messages"][0]["data"] == {"n": 2**70}


def test_workers_with_redis_talk_to_redis_each(
    redis: RedisServer,
    broker_factory: Callable[..., BrokerProcess],
    clients: Callable[[BrokerProcess], Client],
) -> None:
    """--workers with --redis: every worker is a node of the cluster (the hub routes nothing,
    it still supervises and gathers the metrics)."""
    node = broker_factory("--workers", str(WORKERS), "--redis", redis.url)
    other = broker_factory("--redis", redis.url)  # a single-process node beside them
    subs = spread(clients, node, per_worker=1)
    for c in subs:
        c.request(op="subscribe", topic="x.t")
    outside = clients(other)
    outside.early = []
    ack = outside.request(op="publish", topic="x.t", data="hi")
    assert ack["op"] == "ack", ack
    seqs = {c.messages(1)[0]["seq"] for c in subs}
    assert seqs == {1}
    status, text = http(node, "/metrics")
    assert status == 200
    up = [line for line in text.splitlines() if line.startswith("broker_backplane_up{")]
    assert sorted(up) == [f'broker_backplane_up{{worker="{w}"}} 1.0' for w in range(WORKERS)]
    assert 'broker_hub_messages_total{worker="hub"} 0.0' in text


def test_stats_sum_every_worker(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    subs = spread(clients, workers, per_worker=2)
    for c in subs:
        c.request(op="subscribe", topic="s.t")
    subs[0].request(op="publish", topic="s.t", data=1)
    for c in subs:
        c.messages(1)
    for _ in range(3):  # whichever worker answers
        # Our 6 WebSockets plus this HTTP request's own connection (those closed on the way,
        # and the previous request's, may take a moment to be seen closed: poll, bounded).
        deadline = time.monotonic() + 5
        while True:
            status, stats = http(workers, "/stats")
            assert status == 200
            if stats["connections"] == len(subs) + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert stats["connections"] == len(subs) + 1
        assert stats["subscriptions"] == len(subs)
        assert stats["published_total"] == 1 and stats["delivered_total"] == len(subs)
        assert sorted(w["worker"] for w in stats["workers"]) == list(range(WORKERS))
        assert stats["workers_running"] == WORKERS


def test_connections_and_topics_list_every_worker(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    """GET /connections and /topics answer for the host, whichever worker takes the request:
    every worker's connections, each tagged with its worker; a topic's subscribers (and rate)
    summed over the workers."""
    subs = spread(clients, workers, per_worker=2)
    for i, c in enumerate(subs):
        c.request(op="subscribe", topic="v.t")
        c.request(op="subscribe", topic=f"v.own{i}")
    for c in subs:  # publishes from every worker
        c.request(op="publish", topic="v.t", data=0)
    for _ in range(3):  # whichever worker answers
        status, body = http(workers, "/connections?sort=age&limit=100")
        assert status == 200, body
        ws = [c for c in body["connections"] if c["subscriptions"] == 2]
        assert sorted(c["worker"] for c in ws) == sorted(c.worker for c in subs)
        assert body["total"] >= len(subs) and body["sort"] == "age"
        ages = [c["connected_s"] for c in body["connections"]]
        assert ages == sorted(ages, reverse=True)
        status, body = http(workers, "/connections?limit=1")
        assert status == 200 and len(body["connections"]) == 1
        assert http(workers, "/connections?sort=nope")[0] == 400
        status, body = http(workers, "/topics?sort=subscribers&limit=3")
        assert status == 200, body
        assert body["topics"][0]["topic"] == "v.t"
        assert body["topics"][0]["subscribers"] == len(subs)
        assert len(body["topics"]) == 3
    # Rates are per stats tick (each worker's own second): the publishes show within ~1 s.
    deadline = time.monotonic() + 5
    found: list[dict[str, Any]] = []
    while not found and time.monotonic() < deadline:
        body = http(workers, "/topics?sort=rate&limit=5")[1]
        found = [t for t in body["topics"] if t["topic"] == "v.t" and t["rate"] > 0]
        time.sleep(0.1)
    assert found and found[0]["subscribers"] == len(subs), body


def test_workers_that_cannot_start_stop_the_broker_with_their_exit_code(tmp_path: Any) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate")
    port = free_port()
    cmd = [sys.executable, "-m", "broker", "--port", str(port), "--workers", "2"]
    proc = subprocess.run(
        [*cmd, "--tls-cert", str(bad), "--tls-key", str(bad)],
        check=False,
        capture_output=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert b"could not start" in proc.stderr


def test_workers_exit_when_the_parent_is_killed(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    subs = spread(clients, workers, per_worker=1)
    pids = worker_pids(workers)
    os.kill(workers.pid, signal.SIGKILL)
    workers.proc.wait(5)  # type: ignore[union-attr]
    for c in subs:  # each worker lost its hub: it drains its clients (1001) and exits
        with pytest.raises(ConnectionClosed) as info:
            c.recv(10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_zombie_or_gone(p) for p in pids):
        time.sleep(0.05)
    assert all(_zombie_or_gone(p) for p in pids)


def test_each_worker_gets_the_frames_of_the_encodings_it_holds(
    workers: BrokerProcess, clients: Callable[[BrokerProcess], Client]
) -> None:
    json_sub = on_worker(clients, workers, 0)
    json_sub.request(op="subscribe", topic="enc.t")
    for _ in range(MAX_TRIES):  # a msgpack subscriber on worker 1
        with contextlib.ExitStack() as stack:
            ws = stack.enter_context(
                connect(workers.url, subprotocols=["pubsub.v1.msgpack"], open_timeout=5)  # type: ignore[list-item]
            )
            if ws.response.headers.get("x-broker-worker") != "1":
                continue
            ws.send(msgpack.packb({"op": "subscribe", "topic": "enc.*", "id": 1}))
            assert msgpack.unpackb(ws.recv(5)) == {"op": "ack", "id": 1}
            pub = on_worker(clients, workers, 2)
            assert pub.request(op="publish", topic="enc.t", data={"b": 1})["delivered"] == 2
            got = msgpack.unpackb(ws.recv(5))
            assert got == {"op": "message", "topic": "enc.t", "data": {"b": 1}, "seq": 1}
            assert json_sub.messages(1)[0]["seq"] == 1
            return
    raise AssertionError("no msgpack connection landed on worker 1")


def test_the_python_client_recovers_by_itself_on_another_worker(workers: BrokerProcess) -> None:
    def worker_of(client: BrokerClient) -> str:
        ws = client._ws
        assert ws is not None and ws.response is not None
        return str(ws.response.headers.get("x-broker-worker"))

    def wait_until(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    got: list[Message] = []
    lost: list[Any] = []
    slow = Backoff(initial=0.3, maximum=0.3, jitter=0.0)  # an outage long enough to publish in
    with (
        BrokerClient(workers.url) as publisher,
        BrokerClient(workers.url, backoff=slow, on_unrecovered=lost.append) as client,
    ):
        client.subscribe("pc.t", got.append)
        publisher.publish("pc.t", 0)
        wait_until(lambda: len(got) == 1, "the first message")
        sent = 1
        seen = {worker_of(client)}
        for _ in range(20):  # reconnect until one lands on another worker (2 in 3 do)
            if len(seen) > 1:
                break
            assert cut(client, rst=True)
            wait_until(lambda: client.state is not ConnectionState.CONNECTED, "the cut")
            for _ in range(3):
                publisher.publish("pc.t", sent)
                sent += 1
            client.wait_for_state(ConnectionState.CONNECTED, timeout=5)
            seen.add(worker_of(client))
        wait_until(lambda: len(got) >= sent, "the replay")
    assert len(seen) > 1, seen
    assert [(m.seq, m.data) for m in got] == [(i + 1, i) for i in range(sent)]
    assert lost == []


# -- --worker-timeout: a hung worker is killed and restarted ------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (errors count as false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, OSError):
            if predicate():
                return True
        time.sleep(0.05)
    return False


def _served(client: Client) -> None:
    reply = client.request(op="publish", topic="alive", data=client.worker)
    assert reply["op"] == "ack", reply


def test_a_hung_worker_is_killed_and_restarted(
    broker_factory: Callable[..., BrokerProcess], clients: Callable[[BrokerProcess], Client]
) -> None:
    broker = broker_factory("--workers", "2", "--worker-timeout", "2", "--shutdown-timeout", "3")
    for index in (0, 1):
        _served(on_worker(clients, broker, index))
    hung = worker_pid(broker, 1)
    os.kill(hung, signal.SIGSTOP)  # its socket stays open: only the missing heartbeats tell
    try:
        stopped = time.monotonic()
        assert _wait_for(lambda: _zombie_or_gone(hung), 15), "the hung worker was not killed"
        silent = time.monotonic() - stopped
        # Killed for the timeout, not before it: the last heartbeat came at most one interval
        # (0.5 s at a 2 s timeout) before the SIGSTOP.
        assert silent >= 1.4, silent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
    assert _wait_for(lambda: worker_pid(broker, 1) != hung, 10), "worker 1 was not restarted"
    assert broker.wait_metric("broker_worker_timeouts_total", 'worker="hub"', equals=1) == 1
    assert broker.wait_metric("broker_worker_restarts_total", 'worker="hub"', equals=1) == 1
    assert broker.wait_metric("broker_workers", 'worker="hub"', equals=2) == 2
    for index in (0, 1):  # new clients are served by both workers again
        _served(on_worker(clients, broker, index))
    assert f"worker 1 (pid {hung}) silent for" in broker.log()


def test_healthy_idle_workers_are_not_killed(
    broker_factory: Callable[..., BrokerProcess], clients: Callable[[BrokerProcess], Client]
) -> None:
    """Idle workers still send heartbeats: several timeouts of quiet restart nothing."""
    broker = broker_factory("--workers", "2", "--worker-timeout", "1")
    pids = {index: worker_pid(broker, index) for index in (0, 1)}
    time.sleep(5)  # five timeouts with no client at all
    assert {index: worker_pid(broker, index) for index in (0, 1)} == pids
    assert broker.metric("broker_worker_timeouts_total", 'worker="hub"') == 0
    assert broker.metric("broker_worker_restarts_total", 'worker="hub"') == 0
    for index in (0, 1):
        _served(on_worker(clients, broker, index))
    assert "hung" not in broker.log()


@pytest.mark.parametrize(
    ("value", "ok"),
    [("0", True), ("1", True), ("30", True), ("0.5", False), ("-1", False), ("nan", False)],
)
def test_worker_timeout_is_validated(value: str, ok: bool) -> None:
    problems = validate(Config(worker_timeout=float(value)))
    assert (problems == []) is ok, problems
    if not ok:
        proc = subprocess.run(
            [sys.executable, "-m", "broker", "--workers", "2", "--worker-timeout", value],
            check=False,
            capture_output=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 2
        assert b"worker_timeout must be 0 (off) or at least 1 second" in proc.stderr
