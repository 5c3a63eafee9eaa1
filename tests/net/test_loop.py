"""Loop behaviour seen from outside: no busy loop at rest, EPOLLOUT only under backpressure,
writes coalesced per iteration, and the flags and environment that configure it; and, in this
process, callbacks handed to the loop by other threads."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from broker.metrics import Stats
from broker.net.loop import EventLoop
from tests.conftest import REPO, BrokerProcess
from tests.wsraw import OP_TEXT, RawWs, encode_frame

Ws = Callable[..., RawWs]


def test_idle_connections_do_not_wake_the_loop(broker: BrokerProcess, raw_ws: Ws) -> None:
    clients = [raw_ws(broker) for _ in range(50)]
    for i, c in enumerate(clients):
        c.send_json({"op": "subscribe", "topic": f"idle.{i}", "id": i})
        assert c.recv_json().items() >= {"op": "ack", "id": i}.items()
    before = broker.metric("broker_epoll_wait_total")
    time.sleep(3)
    woken = broker.metric("broker_epoll_wait_total") - before
    # The 1 s sweep and our two scrapes, nothing per connection.
    assert woken <= 10, woken
    assert broker.metric("broker_epoll_events_total", 'kind="out"') == 0
    assert broker.metric("broker_backpressure_total") == 0


def test_frames_of_one_iteration_leave_in_one_send(broker: BrokerProcess, raw_ws: Ws) -> None:
    sub, pub = raw_ws(broker), raw_ws(broker)
    sub.send_json({"op": "subscribe", "topic": "c", "id": 1})
    assert sub.recv_json().items() >= {"op": "ack", "id": 1}.items()
    sends_before = broker.metric("broker_socket_sends_total")
    burst = b"".join(
        encode_frame(OP_TEXT, json.dumps({"op": "publish", "topic": "c", "data": i}).encode())
        for i in range(200)
    )
    pub.sock.sendall(burst)  # 200 publishes, read by the broker in one or a few recv calls
    assert [sub.recv_json()["data"] for _ in range(200)] == list(range(200))
    sends = broker.metric("broker_socket_sends_total") - sends_before - 1  # minus the scrape
    assert sends <= 10, f"{sends} sends for 200 deliveries: writes are not coalesced"


@pytest.mark.parametrize("poller", ["epoll", "poll", "select"])
def test_backpressure_arms_epollout(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws, poller: str
) -> None:
    """(Under every --poller: with poll and select the write interest is their writer set.)"""
    broker = broker_factory("--outbound-high-water", str(64 << 20), "--poller", poller)
    c = raw_ws(broker, rcvbuf=4096)
    c.send_json({"op": "subscribe", "topic": "b", "id": 1})
    assert c.recv_json().items() >= {"op": "ack", "id": 1}.items()
    big = "x" * 100_000
    count = 120  # 12 MB into a 4 KB receive window: more than the kernel's buffers hold
    for _ in range(count):
        c.send_json({"op": "publish", "topic": "b", "data": big})
    deadline = time.monotonic() + 10
    while broker.metric("broker_backpressure_total") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.metric("broker_backpressure_total") >= 1
    c.sock.settimeout(10)
    assert broker.metric("broker_outbound_queued_bytes") > 0
    total, want = 0, count * 100_000
    while total < want:  # reading drains the queue through EPOLLOUT
        total += c.recv_json()["data"].count("x")
    assert broker.metric("broker_epoll_events_total", 'kind="out"') >= 1
    assert broker.wait_metric("broker_outbound_queued_bytes", equals=0) == 0


def test_configuration_from_environment_and_flags(
    broker_factory: Callable[..., BrokerProcess], raw_ws: Ws
) -> None:
    broker = broker_factory(
        "--max-message-size",
        "2000",
        env={"BROKER_MAX_MESSAGE_SIZE": "100", "BROKER_LOG_FORMAT": "json"},
    )
    c = raw_ws(broker)
    c.send_frame(OP_TEXT, b'"' + b"x" * 500 + b'"')  # over the env's 100, under the flag's 2000
    assert c.recv_json()["code"] == "bad_request"
    line = broker.log().strip().splitlines()[0]
    entry = json.loads(line)
    assert entry["level"] == "info" and "listening on" in entry["message"]


def test_bad_configuration_exits_with_usage() -> None:
    for args, env in (
        (["--port", "70000"], {}),
        (["--slow-consumer-policy", "ignore"], {}),
        ([], {"BROKER_PING_INTERVAL": "soon"}),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "broker", *args],
            env={"PYTHONPATH": str(REPO), **env},
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 2, proc
        assert b"usage: broker" in proc.stderr


def test_call_soon_threadsafe_runs_callbacks_on_the_loop_thread() -> None:
    """Every callback from two threads runs once, on the loop's thread, each thread's in order."""
    loop = EventLoop(Stats(), 1024)
    ran: list[tuple[int, int, int]] = []
    per_thread = 200

    def produce(k: int) -> None:
        for i in range(per_thread):
            loop.call_soon_threadsafe(lambda i=i: ran.append((k, i, threading.get_ident())))

    producers = [threading.Thread(target=produce, args=(k,)) for k in range(2)]
    try:
        for t in producers:
            t.start()
        deadline = time.monotonic() + 5
        while len(ran) < 2 * per_thread and time.monotonic() < deadline:
            loop.call_later(0.05, lambda: None)  # bounds each wait
            loop.run_once()
        for t in producers:
            t.join(5)
        assert len(ran) == 2 * per_thread
        assert {ident for _, _, ident in ran} == {threading.get_ident()}
        for k in range(2):
            assert [i for kk, i, _ in ran if kk == k] == list(range(per_thread))
    finally:
        loop.close()
    loop.call_soon_threadsafe(lambda: None)  # after close: dropped, no error
