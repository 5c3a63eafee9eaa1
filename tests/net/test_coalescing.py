"""Write coalescing under load (--busy-flush-delay, Server._hold): while a recv fills
--read-size, deliveries are held back and written together; never past the delay, never past
half the high-water mark, and never when the load is light. Real broker processes and sockets."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from broker.config import Config, validate
from tests.conftest import BrokerProcess
from tests.wsraw import OP_TEXT, RawWs, encode_frame

Factory = Callable[..., BrokerProcess]


@pytest.fixture
def clients() -> Iterator[list[RawWs]]:
    """Connections a test opened, closed at teardown whatever happened."""
    opened: list[RawWs] = []
    yield opened
    for ws in opened:
        ws.close()


def _publish_frame(topic: str, data: str) -> bytes:
    payload = json.dumps({"op": "publish", "topic": topic, "data": data}, separators=(",", ":"))
    return encode_frame(OP_TEXT, payload.encode())


def _subscribe(port: int, topic: str) -> RawWs:
    ws = RawWs(port)
    ws.send_json({"op": "subscribe", "topic": topic, "id": 1})
    assert ws.recv_json()["op"] == "ack"
    return ws


def _flood(
    port: int, seconds: float, flooding: threading.Event, stop: threading.Event
) -> threading.Thread:
    """A thread publishing to "flood" as fast as the broker reads, for at most `seconds` or
    until `stop`; `flooding` is set once the first chunk went."""
    chunk = b"".join(_publish_frame("flood", "#" * 40) for _ in range(200))

    def flood() -> None:
        flooder = RawWs(port)
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            flooder.sock.sendall(chunk)
            flooding.set()
        flooder.close()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    return thread


def _sends_for_a_burst(broker: BrokerProcess, topics: int, rounds: int) -> tuple[float, float]:
    """Publish `rounds` messages to each of `topics` topics in one burst; every subscriber gets
    its messages in order. Returns (socket sends, deliveries) the burst cost the broker."""
    subs = [_subscribe(broker.port, f"t{i}") for i in range(topics)]
    publisher = RawWs(broker.port)
    sends_before = broker.metric("broker_socket_sends_total")
    delivered_before = broker.metric("broker_messages_delivered_total")
    burst = b"".join(_publish_frame(f"t{i}", f"{r}") for r in range(rounds) for i in range(topics))
    publisher.sock.sendall(burst)
    for sub in subs:
        got = [sub.recv_json() for _ in range(rounds)]
        assert [m["data"] for m in got] == [f"{r}" for r in range(rounds)]
    deliveries = topics * rounds
    broker.wait_metric("broker_messages_delivered_total", at_least=delivered_before + deliveries)
    sends = broker.metric("broker_socket_sends_total") - sends_before
    for ws in [*subs, publisher]:
        ws.close()
    return sends, deliveries


def test_a_burst_is_written_in_fewer_sends_while_input_waits(broker_factory: Factory) -> None:
    # 1 KiB reads hold ~17 publishes to 17 different topics: written after every read, each
    # delivery is a send of its own; held back while reads come full, a subscriber gets its
    # messages in a few sends.
    held = broker_factory("--read-size", "1024", "--busy-flush-delay", "5")
    held_sends, deliveries = _sends_for_a_burst(held, topics=100, rounds=30)
    at_once = broker_factory("--read-size", "1024", "--busy-flush-delay", "0")
    at_once_sends, _ = _sends_for_a_burst(at_once, topics=100, rounds=30)
    assert at_once_sends > deliveries / 2
    assert held_sends * 3 < at_once_sends


def test_holding_back_never_makes_a_reader_a_slow_consumer(
    broker_factory: Factory, clients: list[RawWs]
) -> None:
    """A subscriber that reads keeps up however long deliveries may be held: a buffer past half
    the high-water mark is written at the end of its iteration (Router.urgent)."""
    broker = broker_factory(
        "--read-size", "4096", "--busy-flush-delay", "10", "--outbound-high-water", "65536"
    )
    sub = _subscribe(broker.port, "x")
    clients.append(sub)
    count = 3000
    got: list[object] = []

    def read() -> None:
        for _ in range(count):
            got.append(sub.recv_json()["data"])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    publisher = RawWs(broker.port)
    clients.append(publisher)
    data = "#" * 100  # 3,000 x ~140 bytes: several times the high-water mark in one burst
    publisher.sock.sendall(b"".join(_publish_frame("x", f"{i}{data}") for i in range(count)))
    reader.join(20)
    assert got == [f"{i}{data}" for i in range(count)]
    assert broker.metric("broker_slow_consumers_total") == 0


def test_a_light_load_is_written_in_the_iteration_it_came(
    broker_factory: Factory, clients: list[RawWs]
) -> None:
    broker = broker_factory("--busy-flush-delay", "10")
    sub = _subscribe(broker.port, "x")
    publisher = RawWs(broker.port)
    clients.extend((sub, publisher))
    for i in range(5):
        start = time.monotonic()
        publisher.send_json({"op": "publish", "topic": "x", "data": i})
        assert sub.recv_json()["data"] == i
        assert time.monotonic() - start < 1.0  # a hold would have lasted 10 s


def test_a_hold_ends_after_the_delay_while_a_flood_goes_on(
    broker_factory: Factory, clients: list[RawWs]
) -> None:
    """Another client's message waits at most about --busy-flush-delay behind a flood that
    keeps every read full, not until the flood ends. (The flood's topic has no subscriber, so
    no buffer nears the high-water mark and ends the hold early.)"""
    broker = broker_factory("--read-size", "1024", "--busy-flush-delay", "0.2")
    sub = _subscribe(broker.port, "x")
    clients.append(sub)
    flooding = threading.Event()
    stop = threading.Event()
    thread = _flood(broker.port, 8, flooding, stop)
    try:
        assert flooding.wait(5)
        time.sleep(0.5)  # well into the flood
        publisher = RawWs(broker.port)
        clients.append(publisher)
        waits = []
        for i in range(3):
            start = time.monotonic()
            publisher.send_json({"op": "publish", "topic": "x", "data": i})
            assert sub.recv_json()["data"] == i
            waits.append(time.monotonic() - start)
        assert max(waits) < 2.0, waits  # the flood lasts 8 s
    finally:
        stop.set()
        thread.join(10)


def test_held_deliveries_show_as_lag(broker_factory: Factory, clients: list[RawWs]) -> None:
    """While deliveries are held back, GET /connections counts their age from the start of the
    hold (no flush has stamped the subscriber's `since`: it reads everything, so no send is
    ever short). The mark is far, so only the delay ends a hold."""
    broker = broker_factory(
        "--read-size", "1024", "--busy-flush-delay", "3", "--outbound-high-water", str(64 << 20)
    )
    sub = _subscribe(broker.port, "flood")
    clients.append(sub)
    flooding = threading.Event()
    stop = threading.Event()

    def drain() -> None:
        sub.sock.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                if not sub.sock.recv(1 << 16):
                    return

    thread = _flood(broker.port, 12, flooding, stop)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert flooding.wait(5)
        ages = []
        for _ in range(3):  # a request served in the hold's first iteration would see age 0
            time.sleep(0.3)
            url = broker.http + "/connections?sort=lag&limit=1"
            with urllib.request.urlopen(url, timeout=10) as r:  # answered when the hold ends
                top = json.loads(r.read())["connections"][0]
            assert top["queued_bytes"] > 0
            ages.append(top["queue_age_s"])
            if top["queue_age_s"] > 0:
                break
        assert max(ages) > 0, ages
        assert max(ages) <= 3 + 1, ages
    finally:
        stop.set()
        thread.join(15)
        reader.join(5)


@pytest.mark.parametrize("delay", [-0.1, 11.0])
def test_busy_flush_delay_is_bounded(delay: float) -> None:
    assert "busy_flush_delay must be 0..10 seconds" in validate(Config(busy_flush_delay=delay))
