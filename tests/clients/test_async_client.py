"""The asyncio client against a real broker process: every operation in both encodings, typed
errors, state changes, and reconnect across a broker restart on the same port."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from broker_client import (
    AsyncClient,
    Backoff,
    BadRequestError,
    ConnectError,
    ConnectionLostError,
    ConnectionState,
    Encoding,
    NotFoundError,
    RequestTimeoutError,
    StateChange,
    TooLargeError,
)

from tests.conftest import BrokerProcess, free_port

ENCODINGS: list[Encoding] = ["json", "msgpack"]
FAST = Backoff(initial=0.05, maximum=0.5)


def run(coro: Coroutine[Any, Any, None], timeout: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await coro

    asyncio.run(bounded())


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_publish_subscribe_unsubscribe_ping(broker: BrokerProcess, encoding: Encoding) -> None:
    async def main() -> None:
        async with (
            AsyncClient(broker.url, encoding=encoding) as sub_client,
            AsyncClient(broker.url, encoding=encoding) as pub_client,
        ):
            sub = await sub_client.subscribe("sensors.>")
            payload = {"t": 21.5, "tags": ["a", "b"], "ok": True, "none": None}
            assert await pub_client.publish("sensors.kitchen", payload) == 1
            assert await pub_client.publish("sensors.garage.door", "open") == 1
            first, second = await sub.get(5), await sub.get(5)
            assert (first.topic, first.data, first.seq) == ("sensors.kitchen", payload, 1)
            assert (second.topic, second.data, second.seq) == ("sensors.garage.door", "open", 1)
            assert await pub_client.publish("sensors.kitchen", 2) == 1
            assert (await sub.get(5)).seq == 2  # seq counts per topic

            assert await pub_client.publish("elsewhere", 1) == 0
            assert await pub_client.publish("sensors.kitchen", 3, ack=False) is None
            assert (await sub.get(5)).data == 3

            rtt = await sub_client.ping()
            assert 0 < rtt < 5

            await sub.unsubscribe()
            assert sub.ended
            assert sub_client.subscriptions == []
            assert await pub_client.publish("sensors.kitchen", 4) == 0
            with pytest.raises(StopAsyncIteration):
                await sub.__anext__()

    run(main())


def test_msgpack_carries_bytes_and_json_subscribers_get_them_from_http(
    broker: BrokerProcess,
) -> None:
    async def main() -> None:
        async with (
            AsyncClient(broker.url, encoding="msgpack") as mp,
            AsyncClient(broker.url, encoding="json") as js,
        ):
            mp_sub = await mp.subscribe("bin")
            js_sub = await js.subscribe("bin")
            assert await mp.publish("bin", b"\x00\x01\xff") >= 1
            assert (await mp_sub.get(5)).data == b"\x00\x01\xff"
            # An HTTP octet-stream publish reaches JSON connections as base64; the client decodes.
            request = urllib.request.Request(
                broker.http + "/publish/bin",
                data=b"\x89PNG",
                headers={"Content-Type": "application/octet-stream"},
            )
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
            got = [m.data for m in [await js_sub.get(5) for _ in range(2)]]
            assert b"\x89PNG" in got
            assert (await mp_sub.get(5)).data == b"\x89PNG"

    run(main())


def test_cross_encoding_delivery(broker: BrokerProcess) -> None:
    async def main() -> None:
        async with (
            AsyncClient(broker.url, encoding="msgpack") as mp,
            AsyncClient(broker.url, encoding="json") as js,
        ):
            js_sub = await js.subscribe("x.*")
            mp_sub = await mp.subscribe("x.*")
            assert await js.publish("x.a", {"from": "json"}) == 2
            assert await mp.publish("x.b", {"from": "msgpack"}) == 2
            assert [(await js_sub.get(5)).data for _ in range(2)] == [
                {"from": "json"},
                {"from": "msgpack"},
            ]
            assert [(await mp_sub.get(5)).data for _ in range(2)] == [
                {"from": "json"},
                {"from": "msgpack"},
            ]

    run(main())


def test_overlapping_and_shared_subscriptions(broker: BrokerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(broker.url) as client:
            wide = await client.subscribe("a.*")
            narrow = await client.subscribe("a.b")
            twin = await client.subscribe("a.b")
            got: list[int] = []
            calls = await client.subscribe("a.>", lambda m: got.append(m.seq))
            # One delivery per connection (the broker counts connections), every local sub sees it.
            assert await client.publish("a.b", "x") == 1
            for sub in (wide, narrow, twin):
                assert (await sub.get(5)).data == "x"
            assert got == [1]
            assert broker.metric("broker_subscriptions") == 3  # a.*, a.b, a.> at the broker
            await twin.unsubscribe()
            assert broker.metric("broker_subscriptions") == 3  # narrow still holds a.b
            await client.publish("a.b", "y")
            assert (await narrow.get(5)).data == "y"
            await client.unsubscribe("a.b")
            assert narrow.ended
            assert sorted(client.subscriptions) == ["a.*", "a.>"]
            await calls.unsubscribe()
            assert broker.metric("broker_subscriptions") == 1

    run(main())


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_broker_errors_are_typed(broker: BrokerProcess, encoding: Encoding) -> None:
    async def main() -> None:
        async with AsyncClient(broker.url, encoding=encoding) as client:
            with pytest.raises(BadRequestError) as info:
                await client.publish("a.*", 1)
            assert info.value.code == "bad_request"
            assert isinstance(info.value.request_id, int)
            with pytest.raises(BadRequestError):
                await client.subscribe("a..b")
            with pytest.raises(BadRequestError):
                await client.publish("x" * 256, 1)  # topics are 1..255 bytes
            assert client.subscriptions == []
            # The connection stays open after an error reply.
            assert await client.publish("fine", 1) == 0

    run(main())


def test_unsubscribe_unknown_topic_is_not_found(broker: BrokerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(broker.url, request_timeout=3) as client:
            with pytest.raises(NotFoundError) as info:
                await client.unsubscribe("never.subscribed")
            assert info.value.code == "not_found"

    run(main())


def test_subscription_limit_is_too_large(broker_factory: Callable[..., BrokerProcess]) -> None:
    broker = broker_factory("--max-subscriptions", "2")

    async def main() -> None:
        async with AsyncClient(broker.url, request_timeout=3) as client:
            await client.subscribe("one")
            await client.subscribe("two")
            with pytest.raises(TooLargeError) as info:
                await client.subscribe("three")
            assert info.value.code == "too_large"
            assert sorted(client.subscriptions) == ["one", "two"]

    run(main())


def test_connect_errors_are_clear() -> None:
    async def main() -> None:
        port = free_port()
        client = AsyncClient(f"ws://127.0.0.1:{port}/ws")
        with pytest.raises(ConnectError, match="connection refused"):
            await client.connect()
        assert client.state is ConnectionState.CLOSED
        with pytest.raises(ConnectError, match="invalid broker URL"):
            await AsyncClient("http://nope").connect()

    run(main())


def test_wrong_path_is_a_connect_error_with_the_status(broker: BrokerProcess) -> None:
    async def main() -> None:
        with pytest.raises(ConnectError, match="HTTP 404"):
            await AsyncClient(broker.http.replace("http", "ws") + "/nope").connect()

    run(main())


def test_request_timeout_when_the_broker_stops_answering(broker: BrokerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(broker.url, request_timeout=0.5, ping_interval=None) as client:
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                with pytest.raises(RequestTimeoutError, match="ping"):
                    await client.ping()
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            assert await client.ping() < 5  # the late pong was dropped; the next one matches

    run(main())


def test_state_changes_are_reported(broker: BrokerProcess) -> None:
    changes: list[StateChange] = []

    async def main() -> None:
        client = AsyncClient(broker.url, on_state_change=changes.append)
        assert client.state is ConnectionState.IDLE
        async with client:
            assert client.state is ConnectionState.CONNECTED
        assert client.state is ConnectionState.CLOSED
        await client.close()  # idempotent

    run(main())
    assert [(c.previous, c.state) for c in changes] == [
        (ConnectionState.IDLE, ConnectionState.CONNECTING),
        (ConnectionState.CONNECTING, ConnectionState.CONNECTED),
        (ConnectionState.CONNECTED, ConnectionState.CLOSED),
    ]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_reconnects_and_resubscribes_after_broker_restart(
    broker_factory: Callable[..., BrokerProcess], encoding: Encoding
) -> None:
    old = broker_factory()
    changes: list[StateChange] = []

    async def main() -> None:
        reconnected = asyncio.Event()

        def on_state(change: StateChange) -> None:
            changes.append(change)
            if (
                change.state is ConnectionState.CONNECTED
                and change.attempt == 0
                and len(changes) > 2
            ):
                reconnected.set()

        async with AsyncClient(
            old.url,
            encoding=encoding,
            backoff=FAST,
            on_state_change=on_state,
        ) as client:
            sub = await client.subscribe("re.>")
            assert await client.publish("re.a", "before") == 1
            assert (await sub.get(5)).data == "before"

            await asyncio.to_thread(old.terminate)
            await client.wait_for_state(ConnectionState.RECONNECTING, timeout=5)
            # A publish while the broker is away waits for the reconnection (within the timeout).
            pending = asyncio.create_task(client.publish("re.b", "queued"))
            new = await asyncio.to_thread(broker_factory, port=old.port)
            await asyncio.wait_for(reconnected.wait(), 10)
            assert await pending == 1  # delivered to ourselves: re-subscribed before it was sent
            got = await sub.get(5)
            assert (got.topic, got.data, got.seq) == ("re.b", "queued", 1)  # a new broker: seq anew

            # Messages published by someone else after the restart arrive too.
            async with AsyncClient(new.url) as other:
                assert await other.publish("re.c", "after") == 1
            assert (await sub.get(5)).data == "after"
            assert new.metric("broker_subscriptions") == 1

    run(main())
    states = [c.state for c in changes]
    lost = states.index(ConnectionState.RECONNECTING)
    assert isinstance(changes[lost].error, ConnectionLostError)
    assert changes[lost].delay is not None and 0 < changes[lost].delay <= FAST.initial
    assert states[-2:] == [ConnectionState.CONNECTED, ConnectionState.CLOSED]


def test_without_reconnect_a_lost_connection_ends_everything(broker: BrokerProcess) -> None:
    async def main() -> None:
        client = await AsyncClient(broker.url, reconnect=False).connect()
        sub = await client.subscribe("t")
        await asyncio.to_thread(broker.terminate)
        await client.wait_for_state(ConnectionState.CLOSED, timeout=5)
        with pytest.raises(ConnectionLostError):
            await sub.__anext__()
        with pytest.raises(ConnectionLostError):
            await client.publish("t", 1)
        await client.close()

    run(main())
