"""Tokens through the Python clients and broker-cli against a broker with auth on (real HS256
tokens): the Bearer header, typed errors for 401 / forbidden / 4001, refresh with a callback
before `exp` (the connection outlives its first token), revoked subscriptions, and the policy for a
401 on reconnect."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from broker_client import (
    AsyncClient,
    Backoff,
    BrokerClientError,
    Client,
    ConnectError,
    ConnectionLostError,
    ConnectionState,
    Forbidden,
    StateChange,
    TokenExpired,
    Unauthorized,
)

from tests.auth.keys import SECRET, claims, sign
from tests.clients.chaos import cut
from tests.clients.test_cli import CLI, ENV, assert_clean_failure
from tests.conftest import BrokerProcess

Factory = Callable[..., BrokerProcess]
FAST = Backoff(initial=0.05, maximum=0.2)


@pytest.fixture
def secured(broker_factory: Factory) -> BrokerProcess:
    return broker_factory("--auth-secret", SECRET, "--auth-leeway", "1")


def token(publish: list[str] | None = None, subscribe: list[str] | None = None, **kw: Any) -> str:
    return sign(
        claims(
            [">"] if publish is None else publish, [">"] if subscribe is None else subscribe, **kw
        )
    )


def test_valid_token_publishes_and_subscribes_within_its_claims(secured: BrokerProcess) -> None:
    with Client(secured.url, token=token(["a.>"], ["a.*"])) as client:
        sub = client.subscribe("a.b")
        assert client.publish("a.b", 1) == 1
        assert sub.get(timeout=5).data == 1
        with pytest.raises(Forbidden) as refused:
            client.publish("z", 1)
        assert refused.value.code == "forbidden" and refused.value.status is None
        with pytest.raises(Forbidden):
            client.subscribe("a.>")  # wider than a.*
        with pytest.raises(Forbidden):
            client.history("z.b")
        assert client.history("a.b").position.seq == 1
        assert client.subscriptions == ["a.b"]
        assert client.ping() > 0  # the connection stays


@pytest.mark.parametrize("bad", [None, "junk", "expired"])
def test_no_or_bad_token_is_unauthorized_at_connect(
    secured: BrokerProcess, bad: str | None
) -> None:
    tok = token(exp=int(time.time()) - 30) if bad == "expired" else bad
    with pytest.raises(Unauthorized) as info:
        Client(secured.url, token=tok).connect()
    assert info.value.status == 401 and "HTTP 401" in str(info.value)
    assert isinstance(info.value, ConnectError)  # as a refused handshake always was

    async def run() -> None:
        client = AsyncClient(secured.url, token=tok)
        with pytest.raises(Unauthorized):
            await client.connect()
        assert client.state is ConnectionState.CLOSED

    asyncio.run(run())


async def _refresh_async(url: str, issued: list[float], changes: list[StateChange]) -> None:
    async def fresh() -> str:  # an async callback, as a token endpoint would be
        issued.append(time.time())
        return token(ttl=3)

    async with AsyncClient(
        url, token=fresh, on_state_change=changes.append, backoff=FAST
    ) as client:
        sub = await client.subscribe("r.t")
        first_exp = issued[0] + 3
        while time.time() < first_exp + 2.5:  # past exp + leeway (1 s) with margin
            assert await client.publish("r.t", "x") == 1
            await sub.get(timeout=5)
            await asyncio.sleep(0.2)
        assert client.state is ConnectionState.CONNECTED


def _refresh_blocking(url: str, issued: list[float], changes: list[StateChange]) -> None:
    def fresh() -> str:
        issued.append(time.time())
        return token(ttl=3)

    with Client(url, token=fresh, on_state_change=changes.append, backoff=FAST) as client:
        sub = client.subscribe("r.t")
        first_exp = issued[0] + 3
        while time.time() < first_exp + 2.5:
            assert client.publish("r.t", "x") == 1
            sub.get(timeout=5)
            time.sleep(0.2)
        assert client.state is ConnectionState.CONNECTED


@pytest.mark.parametrize("flavour", ["aio", "blocking"])
def test_refresh_with_a_callback_outlives_the_first_token(
    secured: BrokerProcess, flavour: str
) -> None:
    issued: list[float] = []
    changes: list[StateChange] = []
    if flavour == "aio":
        asyncio.run(_refresh_async(secured.url, issued, changes))
    else:
        _refresh_blocking(secured.url, issued, changes)
    assert len(issued) >= 3, issued  # the connect, then refreshes before each exp
    assert [c.state for c in changes if c.state is not ConnectionState.CONNECTED] == [
        ConnectionState.CONNECTING,
        ConnectionState.CLOSED,
    ], "refreshed on the open connection: no reconnect"
    assert secured.metric("broker_connections_closed_total", 'reason="token_expired"') == 0


def test_expiry_without_a_callback_is_token_expired(secured: BrokerProcess) -> None:
    changes: list[StateChange] = []
    client = Client(secured.url, token=token(ttl=1), on_state_change=changes.append).connect()
    try:
        client.wait_for_state(ConnectionState.CLOSED, timeout=6)
        assert isinstance(changes[-1].error, TokenExpired)
        assert "4001" in str(changes[-1].error)
        with pytest.raises(TokenExpired):
            client.publish("a", 1)
        assert issubclass(TokenExpired, ConnectionLostError)
    finally:
        client.close()


def test_auth_with_a_narrower_token_revokes_subscriptions(secured: BrokerProcess) -> None:
    async def run() -> None:
        async with AsyncClient(secured.url, token=token()) as client:
            kept = await client.subscribe("a.b")
            lost = await client.subscribe("z.>")
            assert await client.auth(token(subscribe=["a.*"])) == ["z.>"]
            with pytest.raises(Forbidden):
                await lost.get(timeout=5)
            assert client.subscriptions == ["a.b"] and not kept.ended
            with pytest.raises(Unauthorized):
                await client.auth("junk")
            assert await client.ping() > 0

    asyncio.run(run())


def test_a_401_on_reconnect_is_retried_once_with_a_new_token_then_ends(
    secured: BrokerProcess,
) -> None:
    calls: list[int] = []

    def source() -> str:
        calls.append(1)
        return token() if len(calls) == 1 else "junk"  # the identity provider starts failing

    changes: list[StateChange] = []
    with Client(secured.url, token=source, backoff=FAST, on_state_change=changes.append) as client:
        cut(client, rst=True)
        client.wait_for_state(ConnectionState.CLOSED, timeout=10)
    assert len(calls) == 3  # the connect, then two attempts
    assert isinstance(changes[-1].error, Unauthorized)
    attempts = [c for c in changes if c.state is ConnectionState.CONNECTING and c.attempt]
    assert len(attempts) == 2


def test_cli_token_flag_and_environment(secured: BrokerProcess) -> None:
    import subprocess

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "--url", secured.url, "--timeout", "5", *args],
            capture_output=True, text=True, timeout=20, env=env or ENV, check=False,
        )  # fmt: skip

    assert_clean_failure(run("ping"), 1, "401")
    good = token(["cli.>"], ["cli.>"])
    assert run("--token", good, "publish", "cli.t", "1").stdout.strip() == "0"
    assert_clean_failure(run("--token", good, "publish", "other", "1"), 1, "forbidden")
    env = {**ENV, "BROKER_TOKEN": good}
    done = run("publish", "cli.t", "1", env=env)
    assert done.returncode == 0, done.stderr
    minted = subprocess.run(
        [*CLI, "token", "--secret", SECRET, "--sub", "me", "--publish", "m.>"],
        capture_output=True, text=True, timeout=20, env=ENV, check=True,
    ).stdout.strip()  # fmt: skip
    assert run("--token", minted, "publish", "m.x", "1").returncode == 0


def test_4001_with_a_callback_reconnects_with_a_fresh_token_and_recovers(
    secured: BrokerProcess,
) -> None:
    """The identity provider fails the refresh (the broker refuses it: `unauthorized`), so the
    token expires and the broker closes with 4001; the client reconnects, asking the callback
    again, and recovers its subscription from where it stood."""
    expired_seen = threading.Event()
    reported: list[BrokerClientError] = []
    changes: list[StateChange] = []
    got: list[int] = []

    calls: list[int] = []

    def source() -> str:
        calls.append(1)
        if expired_seen.is_set():
            return token()  # the provider is back
        return token(ttl=2) if len(calls) == 1 else "junk"

    def on_state(change: StateChange) -> None:
        changes.append(change)
        if isinstance(change.error, TokenExpired):
            expired_seen.set()

    with (
        Client(secured.url, token=source, backoff=FAST, on_state_change=on_state,
               on_error=reported.append) as client,
        Client(secured.url, token=token()) as publisher,
    ):  # fmt: skip
        client.subscribe("x.t", lambda m: got.append(m.seq))
        publisher.publish("x.t", 1)
        assert expired_seen.wait(6), "no 4001"
        client.wait_for_state(ConnectionState.CONNECTED, timeout=5)
        publisher.publish("x.t", 2)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = client.stats
    assert got == [1, 2]
    assert any(isinstance(e, Unauthorized) for e in reported)  # the refused refresh, reported
    assert stats.recovered == 1 and stats.unrecovered == 0
