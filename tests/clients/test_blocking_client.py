"""The blocking client against a real broker process: every operation in both encodings, iterator
and callback subscriptions, typed errors, and reconnect across a broker restart on the same port."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from broker_client import (
    Backoff,
    BadRequestError,
    Client,
    ClientClosedError,
    ConnectError,
    ConnectionLostError,
    ConnectionState,
    Encoding,
    Message,
    NotFoundError,
    StateChange,
    TooLargeError,
)

from tests.conftest import BrokerProcess, free_port

ENCODINGS: list[Encoding] = ["json", "msgpack"]
FAST = Backoff(initial=0.05, maximum=0.5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_publish_subscribe_unsubscribe_ping(broker: BrokerProcess, encoding: Encoding) -> None:
    with (
        Client(broker.url, encoding=encoding) as sub_client,
        Client(broker.url, encoding=encoding) as pub_client,
    ):
        sub = sub_client.subscribe("orders.*")
        assert pub_client.publish("orders.new", {"id": 1, "qty": 2.5}) == 1
        assert pub_client.publish("orders.new", [1, "two", None]) == 1
        assert pub_client.publish("orders.new.deep", 1) == 0  # `*` is exactly one token
        assert pub_client.publish("orders.paid", "x", ack=False) is None
        got = [sub.get(5) for _ in range(3)]
        assert got == [
            Message("orders.new", {"id": 1, "qty": 2.5}, 1),
            Message("orders.new", [1, "two", None], 2),
            Message("orders.paid", "x", 1),
        ]
        if encoding == "msgpack":
            assert pub_client.publish("orders.bin", b"\x00\xfe") == 1
            assert sub.get(5).data == b"\x00\xfe"
        with pytest.raises(TimeoutError):
            sub.get(0.05)
        assert 0 < sub_client.ping() < 5
        sub.unsubscribe()
        assert pub_client.publish("orders.new", 3) == 0
        assert list(sub) == []  # the iterator ends once unsubscribed
        with pytest.raises(ClientClosedError):
            sub.get(1)


def test_iterator_and_callback_subscriptions(broker: BrokerProcess) -> None:
    seen: list[Message] = []
    three = threading.Event()

    def on_message(message: Message) -> None:
        seen.append(message)
        if len(seen) == 3:
            three.set()

    with Client(broker.url) as client:
        client.subscribe("cb.>", on_message)
        with client.subscribe("cb.it") as sub:
            for i in range(3):
                client.publish("cb.it", i)
            received = []
            for message in sub:
                received.append(message.data)
                if len(received) == 3:
                    break
            assert received == [0, 1, 2]
        assert three.wait(5)
        assert [m.data for m in seen] == [0, 1, 2]
        assert client.subscriptions == ["cb.>"]  # the `with` block unsubscribed cb.it


def test_callback_may_publish_without_ack_but_not_wait(broker: BrokerProcess) -> None:
    outcome: list[object] = []
    echoed = threading.Event()

    with Client(broker.url) as client:

        def on_ping(message: Message) -> None:
            client.publish("echo.pong", message.data, ack=False)  # fine: only sends
            try:
                client.publish("echo.other", 1)  # would wait for its own reader: refused
            except RuntimeError as exc:
                outcome.append(exc)

        client.subscribe("echo.ping", on_ping)
        client.subscribe("echo.pong", lambda m: echoed.set())
        client.publish("echo.ping", "hi")
        assert echoed.wait(5)
    assert len(outcome) == 1 and "callback" in str(outcome[0])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_broker_errors_are_typed(broker: BrokerProcess, encoding: Encoding) -> None:
    with Client(broker.url, encoding=encoding) as client:
        with pytest.raises(BadRequestError) as info:
            client.publish("bad.>", 1)
        assert info.value.code == "bad_request"
        with pytest.raises(BadRequestError, match="bad_request"):
            client.subscribe("has space")
        assert client.subscriptions == []
        assert client.publish("still.open", 1) == 0


def test_unsubscribe_unknown_topic_is_not_found(broker: BrokerProcess) -> None:
    with Client(broker.url, request_timeout=3) as client, pytest.raises(NotFoundError):
        client.unsubscribe("nobody.here")


def test_subscription_limit_is_too_large(broker_factory: Callable[..., BrokerProcess]) -> None:
    broker = broker_factory("--max-subscriptions", "1")
    with Client(broker.url, request_timeout=3) as client:
        client.subscribe("one")
        with pytest.raises(TooLargeError):
            client.subscribe("two")


def test_connect_refused_is_a_connect_error() -> None:
    client = Client(f"ws://127.0.0.1:{free_port()}/ws", open_timeout=2)
    with pytest.raises(ConnectError, match="refused"):
        client.connect()
    assert client.state is ConnectionState.CLOSED


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_reconnects_and_resubscribes_after_broker_restart(
    broker_factory: Callable[..., BrokerProcess], encoding: Encoding
) -> None:
    old = broker_factory()
    changes: list[StateChange] = []
    with Client(
        old.url,
        encoding=encoding,
        backoff=FAST,
        on_state_change=changes.append,
    ) as client:
        sub = client.subscribe("room.*")
        client.publish("room.a", 1)
        assert sub.get(5).data == 1

        old.terminate()
        client.wait_for_state(ConnectionState.RECONNECTING, timeout=5)
        new = broker_factory(port=old.port)
        client.wait_for_state(ConnectionState.CONNECTED, timeout=10)
        assert new.metric("broker_subscriptions") == 1  # re-subscribed before reporting connected

        with Client(new.url) as other:
            assert other.publish("room.b", "after restart") == 1
        got = sub.get(5)
        assert (got.topic, got.data, got.seq) == ("room.b", "after restart", 1)
    states = [c.state for c in changes]
    assert ConnectionState.RECONNECTING in states
    assert states[-2:] == [ConnectionState.CONNECTED, ConnectionState.CLOSED]


def test_without_reconnect_a_lost_connection_ends_everything(broker: BrokerProcess) -> None:
    client = Client(broker.url, reconnect=False).connect()
    sub = client.subscribe("t")
    broker.terminate()
    client.wait_for_state(ConnectionState.CLOSED, timeout=5)
    with pytest.raises(ConnectionLostError):
        list(sub)
    with pytest.raises(ConnectionLostError):
        client.publish("t", 1)
    client.close()


def test_close_ends_iterators_blocked_in_other_threads(broker: BrokerProcess) -> None:
    client = Client(broker.url).connect()
    sub = client.subscribe("t")
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(list(sub)))
    reader.start()
    client.close()
    reader.join(5)
    assert result == [[]]
    with pytest.raises(ClientClosedError):
        client.publish("t", 1)
