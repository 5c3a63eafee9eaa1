"""Recovery through the Python clients against real broker processes (issue 8): positions from the
subscribe ack, `since` after every reconnect, `Unrecovered` when the window is exceeded or the
broker restarted, `history()`, broker-cli's --show-seq/--since/history, and the chaos test.

The chaos test: publishers at a steady rate over HTTP and over WebSocket, subscribers (async and
blocking clients) whose TCP connections are cut at random moments by RST (SO_LINGER 0) or by a
clean FIN, each reconnecting by itself. While every outage stays within the history window, each
subscriber's stream of each topic must be seq 1..N exactly (no loss, no duplicate, in order) and
hold every published payload once, in each publisher's order.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from broker_client import (
    AsyncClient,
    Backoff,
    Client,
    ConnectionState,
    Message,
    Position,
    StateChange,
    Unrecovered,
)

from tests.clients.chaos import cut
from tests.clients.test_cli import CLI, ENV, cli
from tests.conftest import BrokerProcess

Factory = Callable[..., BrokerProcess]
FAST = Backoff(initial=0.05, maximum=0.2)


def http_publish(conn: http.client.HTTPConnection, topic: str, data: Any) -> None:
    conn.request(
        "POST", f"/publish/{topic}", json.dumps(data), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    response.read()
    assert response.status == 202, response.status


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- positions and one reconnect ------------------------------------------------------------------


def test_subscribe_ack_position_and_history(broker_factory: Factory) -> None:
    broker = broker_factory("--history-size", "10")
    with Client(broker.url) as client:
        for i in range(3):
            client.publish("h.t", i)
        sub = client.subscribe("h.t")
        start = sub.position
        assert start is not None and start.seq == 3
        client.publish("h.t", 3)
        assert sub.get(timeout=5).seq == 4
        assert client.position("h.t") == Position(start.epoch, 4)
        whole = client.history("h.t")
        assert whole.position == Position(start.epoch, 4) and whole.recovered
        assert [(m.seq, m.data) for m in whole.messages] == [(1, 0), (2, 1), (3, 2), (4, 3)]
        part = client.history("h.t", since=Position(start.epoch, 2), limit=1)
        assert [m.seq for m in part.messages] == [3]
        assert not client.history("h.t", since=Position("other", 2)).recovered
        assert client.subscribe("h.*").position is None  # patterns have no position


@pytest.mark.parametrize("flavour", ["aio", "blocking"])
def test_reconnect_recovers_what_was_published_during_the_outage(
    broker_factory: Factory, flavour: str
) -> None:
    broker = broker_factory()
    got: list[Message] = []
    lost: list[Unrecovered] = []
    slow = Backoff(initial=0.8, maximum=0.8, jitter=0.0)  # an outage long enough to publish in
    with Client(broker.url) as publisher:

        def during_outage(client: AsyncClient | Client) -> None:
            """Publish 5 while `client` (already cut) is away."""
            wait_until(lambda: client.state is not ConnectionState.CONNECTED, 5, "the cut")
            for i in range(3, 8):
                publisher.publish("r.t", i)

        if flavour == "aio":

            async def run() -> AsyncClient:
                client = AsyncClient(broker.url, backoff=slow, on_unrecovered=lost.append)
                async with client:
                    await client.subscribe("r.t", got.append)
                    for i in range(3):
                        await client.publish("r.t", i)
                    for _ in range(200):
                        if len(got) >= 3:
                            break
                        await asyncio.sleep(0.02)
                    here = client.position("r.t")
                    assert here is not None and here.seq == 3
                    assert cut(
                        client, rst=True
                    )  # in the loop's thread: transports are not thread-safe
                    await asyncio.to_thread(during_outage, client)
                    await client.wait_for_state(ConnectionState.CONNECTED, timeout=5)
                    for _ in range(200):
                        if len(got) >= 8:
                            break
                        await asyncio.sleep(0.02)
                return client

            client: AsyncClient | Client = asyncio.run(run())
        else:
            with Client(broker.url, backoff=slow, on_unrecovered=lost.append) as client:
                client.subscribe("r.t", got.append)
                for i in range(3):
                    client.publish("r.t", i)
                wait_until(lambda: len(got) >= 3, 5, "3 messages")
                assert cut(client, rst=True)
                during_outage(client)
                client.wait_for_state(ConnectionState.CONNECTED, timeout=5)
                wait_until(lambda: len(got) >= 8, 5, "the replay")
    assert [(m.seq, m.data) for m in got] == [(i + 1, i) for i in range(8)]
    assert lost == []
    assert client.stats.recovered == 1 and client.stats.out_of_order == 0


def test_outage_beyond_the_window_is_reported_unrecovered(broker_factory: Factory) -> None:
    broker = broker_factory("--history-size", "5")
    lost: list[Unrecovered] = []
    got: list[Message] = []
    slow = Backoff(initial=0.8, maximum=0.8, jitter=0.0)
    with (
        Client(broker.url) as publisher,
        Client(broker.url, backoff=slow, on_unrecovered=lost.append) as client,
    ):
        client.subscribe("w.t", got.append)
        publisher.publish("w.t", 0)
        wait_until(lambda: len(got) == 1, 5, "the first message")
        before = client.position("w.t")
        assert cut(client, rst=False)
        wait_until(lambda: client.state is not ConnectionState.CONNECTED, 5, "the cut")
        for i in range(1, 21):  # 20 missed, only 5 retained
            publisher.publish("w.t", i)
        client.wait_for_state(ConnectionState.CONNECTED, timeout=5)
        publisher.publish("w.t", 21)
        wait_until(lambda: len(got) == 2, 5, "the next live message")
    assert before is not None
    assert lost == [Unrecovered("w.t", before, Position(before.epoch, 21))]
    assert lost[0].reason == "the messages after it are no longer retained"
    assert [m.seq for m in got] == [1, 22]  # nothing replayed, live delivery resumed
    assert client.stats.gaps == 0  # the position restarted from the ack: not a gap


def test_broker_restart_gives_a_new_epoch_and_unrecovered(broker_factory: Factory) -> None:
    broker = broker_factory()
    lost: list[Unrecovered] = []
    got: list[Message] = []
    with Client(broker.url, backoff=FAST, on_unrecovered=lost.append) as client:
        client.subscribe("e.t", got.append)
        client.publish("e.t", "before")
        wait_until(lambda: len(got) == 1, 5, "the first message")
        before = client.position("e.t")
        broker.terminate()
        broker_factory(port=broker.port)
        client.wait_for_state(ConnectionState.CONNECTED, timeout=10)
        after = client.position("e.t")
        client.publish("e.t", "after")
        wait_until(lambda: len(got) == 2, 5, "a message after the restart")
    assert before is not None and after is not None
    assert after.epoch != before.epoch and after.seq == 0
    assert lost == [Unrecovered("e.t", before, after)]
    assert "epoch changed" in lost[0].reason
    assert [m.seq for m in got] == [1, 1]


def test_slow_consumer_closed_with_1008_reconnects_and_recovers(broker_factory: Factory) -> None:
    """A subscriber whose callback stalls stops reading; the broker closes it as a slow consumer
    (1008); the client reads what it had, reconnects and recovers the rest from history."""
    total, size = 1000, 16 * 1024  # 16 MB: past the kernel's socket buffers and the mark
    broker = broker_factory(
        "--outbound-high-water", "262144", "--history-size", str(total), "--history-ttl", "60"
    )
    gate = threading.Event()
    got: list[int] = []
    lost: list[Unrecovered] = []
    changes: list[StateChange] = []

    def stall_then_record(message: Message) -> None:
        gate.wait(30)  # the reader thread stops here: nothing more is read from the socket
        got.append(message.seq)

    with (
        Client(
            broker.url, backoff=FAST, on_unrecovered=lost.append, on_state_change=changes.append
        ) as slow,
        Client(broker.url) as publisher,
    ):
        slow.subscribe("feed", stall_then_record)
        payload = "x" * size
        for _ in range(total):
            publisher.publish("feed", payload)
        assert broker.wait_metric("broker_slow_consumers_total", equals=1) == 1
        gate.set()
        wait_until(lambda: len(got) >= total, 20, "the recovered stream")
        time.sleep(0.2)  # a duplicate would arrive now
        stats = slow.stats
    assert got == list(range(1, total + 1))
    assert lost == [] and stats.recovered == 1 and stats.out_of_order == 0
    assert any("1008" in str(c.error) for c in changes if c.state is ConnectionState.RECONNECTING)


def test_a_pattern_is_reported_unrecovered_after_a_reconnect(broker: BrokerProcess) -> None:
    lost: list[Unrecovered] = []

    async def run() -> None:
        async with AsyncClient(broker.url, backoff=FAST, on_unrecovered=lost.append) as client:
            await client.subscribe("p.>")
            assert cut(client, rst=True)
            await client.wait_for_state(ConnectionState.RECONNECTING, timeout=5)
            await client.wait_for_state(ConnectionState.CONNECTED, timeout=5)

    asyncio.run(run())
    assert lost == [Unrecovered("p.>", None, None)]
    assert "no position" in lost[0].reason


# -- broker-cli -----------------------------------------------------------------------------------


def test_cli_show_seq_since_and_history(broker: BrokerProcess) -> None:
    url = ["--url", broker.url, "--timeout", "5"]
    for i in range(4):
        assert cli(*url, "publish", "c.t", str(i)).returncode == 0
    done = cli(*url, "history", "c.t", "--limit", "2")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["seq"], r["data"]) for r in lines] == [(1, 0), (2, 1)]
    epoch = lines[0]["epoch"]
    assert f"c.t at {epoch}:4" in done.stderr and "complete" in done.stderr
    proc = subprocess.run(
        [*CLI, *url, "subscribe", "c.t", "--show-seq", "--since", f"{epoch}:2", "--count", "2"],
        capture_output=True, text=True, timeout=20, env=ENV, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    replayed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["epoch"], r["seq"], r["data"]) for r in replayed] == [(epoch, 3, 2), (epoch, 4, 3)]
    stale = subprocess.Popen(
        [*CLI, *url, "subscribe", "c.t", "--since", "gone:2", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert stale.stderr is not None
        err = ""
        while "subscribed to" not in err:  # bounded by the CLI's --timeout 5 and the assert
            line = stale.stderr.readline()
            assert line, f"broker-cli subscribe exited: {stale.wait(5)}"
            err += line
        assert cli(*url, "publish", "c.t", '"live"').returncode == 0
        out, rest = stale.communicate(timeout=10)
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.communicate(timeout=5)
    assert json.loads(out)["data"] == "live", err + rest
    assert "c.t: not recovered from gone:2 (the topic's epoch changed" in err


# -- chaos ----------------------------------------------------------------------------------------

TOPICS = ("chaos.a", "chaos.b")
CHAOS_SECONDS = 6.0
RATE = 80  # messages per second per publisher


class Recorder:
    """One subscriber's view: every delivery, in arrival order, per topic (thread-safe)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.seen: dict[str, list[Message]] = {t: [] for t in TOPICS}
        self.unrecovered: list[Unrecovered] = []
        self.reconnects = 0

    def deliver(self, message: Message) -> None:
        with self.lock:
            self.seen[message.topic].append(message)

    def state(self, change: StateChange) -> None:
        if change.state is ConnectionState.RECONNECTING and change.attempt == 1:
            self.reconnects += 1

    def count(self, topic: str) -> int:
        with self.lock:
            return len(self.seen[topic])


def _publish_http(port: int, stop: threading.Event, sent: dict[str, list[Any]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        n = 0
        start = time.monotonic()
        while not stop.is_set():
            data = {"p": "http", "n": n}
            http_publish(conn, "chaos.a", data)
            sent["chaos.a"].append(data)
            n += 1
            time.sleep(max(0.0, start + n / RATE - time.monotonic()))
    finally:
        conn.close()


def _publish_ws(url: str, stop: threading.Event, sent: dict[str, list[Any]]) -> None:
    with Client(url) as client:
        n = 0
        start = time.monotonic()
        while not stop.is_set():
            for topic in TOPICS:
                data = {"p": "ws", "n": n}
                client.publish(topic, data)
                sent[topic].append(data)
            n += 1
            time.sleep(max(0.0, start + n / RATE - time.monotonic()))


def test_chaos_every_message_exactly_once_in_order(broker_factory: Factory) -> None:
    broker = broker_factory("--history-size", "2000")
    # A new cut schedule each run; CHAOS_SEED=N replays one (the seed is in every failure).
    seed = int(os.environ.get("CHAOS_SEED") or time.time_ns() % 10**6)
    rng = random.Random(seed)
    recorders = [Recorder(f"sub{i}") for i in range(4)]
    sent: dict[str, list[Any]] = {t: [] for t in TOPICS}
    cuts = {"rst": 0, "fin": 0}

    async def main() -> None:
        loop_clients: list[AsyncClient] = []
        blocking: list[Client] = []
        for i, rec in enumerate(recorders):
            options: dict[str, Any] = {
                "backoff": FAST,
                "on_unrecovered": rec.unrecovered.append,
                "on_state_change": rec.state,
                "encoding": "msgpack" if i % 2 else "json",
            }
            if i == len(recorders) - 1:  # one blocking client, its own reader thread
                client = await asyncio.to_thread(Client(broker.url, **options).connect)
                for topic in TOPICS:
                    await asyncio.to_thread(client.subscribe, topic, rec.deliver)
                blocking.append(client)
            else:
                aclient = await AsyncClient(broker.url, **options).connect()
                for topic in TOPICS:
                    await aclient.subscribe(topic, rec.deliver)
                loop_clients.append(aclient)
        everyone: list[AsyncClient | Client] = [*loop_clients, *blocking]

        stop = threading.Event()
        publishers = [
            asyncio.to_thread(_publish_http, broker.port, stop, sent),
            asyncio.to_thread(_publish_ws, broker.url, stop, sent),
        ]
        running = asyncio.gather(*publishers)
        deadline = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            victim = rng.choice(everyone)
            rst = rng.random() < 0.5
            if cut(victim, rst=rst):
                cuts["rst" if rst else "fin"] += 1
        stop.set()
        await running
        for client in everyone:
            if isinstance(client, AsyncClient):
                await client.wait_for_state(ConnectionState.CONNECTED, timeout=10)
            else:
                await asyncio.to_thread(client.wait_for_state, ConnectionState.CONNECTED, 10)
        # Wait until everyone has everything, or nobody made progress for 3 s (then the exact
        # assertions below say what is missing).
        progress, still = -1, time.monotonic()
        while any(r.count(t) < len(sent[t]) for r in recorders for t in TOPICS):
            now_have = sum(r.count(t) for r in recorders for t in TOPICS)
            if now_have != progress:
                progress, still = now_have, time.monotonic()
            if time.monotonic() - still > 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # anything extra (a duplicate) would arrive now
        for aclient in loop_clients:
            assert aclient.stats.out_of_order == 0 and aclient.stats.unrecovered == 0
            await aclient.close()
        for client in blocking:
            assert client.stats.out_of_order == 0 and client.stats.unrecovered == 0
            await asyncio.to_thread(client.close)

    asyncio.run(asyncio.wait_for(main(), timeout=50))
    print(  # the run's figures, with -s
        f"chaos (CHAOS_SEED={seed}): cuts {cuts}, reconnects {[r.reconnects for r in recorders]}, "
        f"messages {[len(sent[t]) for t in TOPICS]} per topic"
    )

    assert cuts["rst"] >= 3 and cuts["fin"] >= 3, (seed, cuts)
    for rec in recorders:
        assert rec.unrecovered == [], (seed, rec.name, rec.unrecovered)
        assert rec.reconnects >= 2, (seed, rec.name, rec.reconnects)
        for topic in TOPICS:
            stream = rec.seen[topic]
            # Exactly once, in order: the broker's seqs 1..N, and every payload once, in the
            # order each publisher sent them.
            seqs = [m.seq for m in stream]
            assert seqs == list(range(1, len(sent[topic]) + 1)), (seed, rec.name, topic)
            for source in ("http", "ws"):
                ns = [m.data["n"] for m in stream if m.data["p"] == source]
                want = [d["n"] for d in sent[topic] if d["p"] == source]
                assert ns == want, (seed, rec.name, topic, source)
