"""The asyncio client, on `websockets.asyncio` (wire protocol v1, docs/clients.md).

Theory of operation. One task, the runner, owns the connection: it reads every frame and hands it to
the `Session` (pending requests, subscriptions), and when the connection drops it fails the requests
that were waiting, sleeps out a capped exponential backoff with jitter, reconnects and re-subscribes
every pattern. The client reports CONNECTED again only once the broker acknowledged all of them, so
a message published after that is one the client will receive. Callers' coroutines only send:
`publish`, `subscribe`, ... wait (within `request_timeout`) until the client is connected, send a
frame and await the future the runner resolves.

Messages wait in an unbounded `asyncio.Queue` per subscription (iterate with `async for`), or go to
a callback, called in the runner task: it must not block or await a request of this client, because
the runner is the one that would read the answer.

With a token callback a second task, the refresher, sleeps until shortly before the token's `exp`,
awaits the callback and sends `auth` (see `ClientBase`). Protocol bookkeeping (ids, subscriptions,
positions, recovery, error mapping, the reconnect policy) lives in the sans-IO `session.Session`;
this module only waits and does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from types import TracebackType
from typing import Any, Literal, Self, overload

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ._common import (
    ClientBase,
    End,
    MessageCallback,
    SubscriptionBase,
    delivered_count,
    lost_error,
    revoked_patterns,
    wrong_subprotocol,
)
from .errors import (
    BrokerClientError,
    ClientClosedError,
    ConnectError,
    ConnectionLostError,
    RequestTimeoutError,
    UnauthorizedError,
)
from .protocol import (
    ConnectionState,
    History,
    Message,
    Position,
    Reply,
)

__all__ = ["AsyncClient", "AsyncSubscription"]

log = logging.getLogger("broker_client")


class AsyncSubscription(SubscriptionBase):
    """One `subscribe()`: an async iterator of `Message`s (or a callback), until `unsubscribe()`.

    Iteration stops when the subscription is unsubscribed or the client closed; it raises the error
    when the subscription ends for a reason (the broker refused the re-subscription after a
    reconnect, a new token revoked it, or the connection was lost with reconnect disabled).
    """

    __slots__ = ("_queue",)
    _client: AsyncClient

    def __init__(self, client: AsyncClient, topic: str, callback: MessageCallback | None) -> None:
        super().__init__(client, topic, callback)
        self._queue: asyncio.Queue[Message | End] = asyncio.Queue()

    def _put(self, item: Message | End) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if isinstance(item, End):
            self._queue.put_nowait(item)  # every later call ends the same way
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    async def get(self, timeout: float | None = None) -> Message:
        """The next message; `TimeoutError` after `timeout` s, `ClientClosedError` once it ended."""
        async with asyncio.timeout(timeout):
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                raise ClientClosedError(f"subscription to {self.topic!r} ended") from None

    async def unsubscribe(self) -> None:
        await self._client._unsubscribe(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._ended:
            await self.unsubscribe()


class AsyncClient(ClientBase):
    """An asyncio client for one broker URL; use `async with AsyncClient(url) as client:`.

    `encoding` picks the subprotocol (`"json"` or `"msgpack"`; only msgpack carries bytes).
    `reconnect` turns on automatic reconnection with `backoff` after a connection that was open is
    lost; the first `connect()` tries once and raises `ConnectError` (or `UnauthorizedError` /
    `ForbiddenError` for an HTTP 401 / 403). Every request waits at most `request_timeout` s,
    including the time spent waiting for a reconnection. `token` (a str, or a callable returning
    one or an awaitable of one) authenticates; `ssl` is the context for `wss://` URLs;
    `on_unrecovered` hears about subscriptions that lost messages across a reconnect.
    """

    _ready: asyncio.Event
    _closing: asyncio.Event

    def _setup(self) -> None:
        self._state_waiters: list[tuple[ConnectionState, asyncio.Future[None]]] = []
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._token_event = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    # life cycle

    async def connect(self) -> Self:
        """Open the connection (one attempt); `ConnectError`, `UnauthorizedError` (HTTP 401) or
        `ForbiddenError` (HTTP 403) if it cannot be opened."""
        if self._state is not ConnectionState.IDLE:
            raise RuntimeError(f"connect() on a client that is {self._state}")
        self._set_state(ConnectionState.CONNECTING)
        try:
            ws = await self._open()
        except ConnectError as exc:
            self._finish(exc)
            raise
        self._ws = ws
        self._set_state(ConnectionState.CONNECTED)
        self._ready.set()
        self._runner = asyncio.create_task(self._run(ws), name=f"broker-client {self.url}")
        if self._policy.renewable:
            self._refresher = asyncio.create_task(self._refresh(), name=f"token {self.url}")
        return self

    async def close(self) -> None:
        """Close the connection and end every subscription; idempotent."""
        self._closing.set()
        self._token_event.set()
        if self._state is ConnectionState.IDLE:
            self._finish(None)
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._refresher is not None:
            self._refresher.cancel()  # it may be awaiting a slow token callback: do not wait
        for task in (self._runner, self._refresher):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._finish(None)

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_for_state(self, state: ConnectionState, timeout: float | None = None) -> None:
        """Return when the client is in `state` (now or later); `TimeoutError` after `timeout` s."""
        if self._state is state:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state_waiters.append((state, future))
        try:
            async with asyncio.timeout(timeout):
                await future
        finally:
            with contextlib.suppress(ValueError):
                self._state_waiters.remove((state, future))

    # operations

    @overload
    async def publish(self, topic: str, data: Any, *, ack: Literal[True] = ...) -> int: ...
    @overload
    async def publish(self, topic: str, data: Any, *, ack: Literal[False]) -> None: ...
    @overload
    async def publish(self, topic: str, data: Any, *, ack: bool) -> int | None: ...
    async def publish(self, topic: str, data: Any, *, ack: bool = True) -> int | None:
        """Publish `data` to `topic`.

        With `ack` (the default) wait for the broker's acknowledgement and return how many
        connections the message was queued to; with `ack=False` return None once it is sent.
        """
        if not ack:
            _, frame = self._session.request("publish", topic=topic, data=data)
            async with self._deadline("publish"):
                ws = await self._usable()
            try:
                await ws.send(frame)
            except ConnectionClosed as exc:
                raise ConnectionLostError(f"connection lost while publishing: {exc}") from exc
            return None
        return delivered_count(await self._request("publish", topic=topic, data=data))

    async def subscribe(
        self,
        topic: str,
        callback: MessageCallback | None = None,
        *,
        since: Position | None = None,
    ) -> AsyncSubscription:
        """Subscribe to a topic or pattern (`*` one token, final `>` the rest) once the broker acks.

        Without `callback` iterate the returned subscription: `async for message in sub`. `since`
        (a concrete topic's `Position`) asks for the messages after it first; if the broker no
        longer has them all, `on_unrecovered` is told and live delivery starts.
        """
        sub = AsyncSubscription(self, topic, callback)
        async with self._deadline("subscribe"):
            await self._usable()
        if not self._session.add(sub):
            return sub  # the pattern is already subscribed at the broker; share it
        try:
            await self._request("subscribe", topic=topic, since=since)
        except BaseException as exc:
            self._subscribe_failed(sub, exc)
            raise
        return sub

    async def unsubscribe(self, topic: str) -> None:
        """Drop every local subscription to `topic` and the broker's subscription."""
        for sub in self._session.remove_pattern(topic):
            sub._end(None)
        await self._request("unsubscribe", topic=topic)

    async def history(
        self, topic: str, *, since: Position | None = None, limit: int | None = None
    ) -> History:
        """The retained messages of a concrete topic after `since` (from the oldest without it),
        at most `limit`. `recovered` False: the range after `since` is not all retained (or the
        epoch changed), and the messages are the oldest retained. The broker cuts a reply at
        about its --max-message-size: ask again from the last seq for more."""
        reply = await self._request("history", topic=topic, since=since, limit=limit)
        return self._session.history(topic, reply)

    async def auth(self, token: str) -> list[str]:
        """Replace the connection's token; returns the patterns the broker dropped because the new
        token does not allow them (their subscriptions end with `ForbiddenError`)."""
        revoked = revoked_patterns(await self._request("auth", token=token))
        self._accept_token(token)
        return revoked

    async def ping(self) -> float:
        """Round trip of a protocol-level ping through the broker's loop, in seconds."""
        start = time.perf_counter()
        await self._request("ping")
        return time.perf_counter() - start

    # internals

    async def _unsubscribe(self, sub: AsyncSubscription) -> None:
        sub._end(None)
        if self._session.remove(sub) and self._state is ConnectionState.CONNECTED:
            with contextlib.suppress(ConnectionLostError, ClientClosedError):
                await self._request("unsubscribe", topic=sub.topic)

    def _deadline(self, what: str) -> _Deadline:
        return _Deadline(self._request_timeout, what, self)

    async def _usable(self) -> ClientConnection:
        """The open connection, waiting for a reconnection if there is none right now."""
        while not self._usable_now(self._ws):
            await self._ready.wait()
        assert self._ws is not None
        return self._ws

    async def _request(self, op: str, **fields: Any) -> Reply:
        future: asyncio.Future[Reply | BaseException] = asyncio.get_running_loop().create_future()

        def resolve(result: Reply | BaseException) -> None:
            if not future.done():
                future.set_result(result)

        rid: int | None = None
        try:
            async with self._deadline(op):
                ws = await self._usable()
                rid, frame = self._session.request(op, resolve, **fields)
                try:
                    await ws.send(frame)
                except ConnectionClosed as exc:
                    raise ConnectionLostError(f"connection lost during {op}: {exc}") from exc
                result = await future
        finally:
            if rid is not None:
                self._session.cancel(rid)
        return self._session.outcome(result)

    async def _fetch_token(self) -> None:
        """Call the token callback (awaiting what it returns if need be) before a connect."""
        source = self._token_source
        if not callable(source):
            return
        try:
            token = source()
            if inspect.isawaitable(token):
                token = await token
            self._accept_token(token)
        except Exception as exc:
            raise ConnectError(f"token callback: {type(exc).__name__}: {exc}") from exc

    async def _open(self) -> ClientConnection:
        await self._fetch_token()
        try:
            ws = await connect(self.url, **self._connect_options())
        except Exception as exc:
            raise self._open_failed(exc) from exc
        problem = wrong_subprotocol(self._codec, ws.subprotocol)
        if problem is not None:
            await ws.close()
            raise ConnectError(f"{self.url}: {problem}")
        return ws

    async def _run(self, ws: ClientConnection) -> None:
        final: BaseException | None = None
        try:
            while True:
                error = await self._read(ws)
                if not self._ended(error):
                    final = None if self._closing.is_set() else error
                    break
                reopened, final = await self._reopen(error)
                if reopened is None:
                    break
                ws = reopened
        except Exception as exc:  # a bug in this module: end the client visibly, once
            log.exception("broker client runner failed")
            final = exc
        finally:
            self._ws = None
            self._finish(final)

    async def _read(self, ws: ClientConnection) -> ConnectionLostError:
        try:
            async for frame in ws:
                if self._session.receive(frame):
                    self._connected()
        except ConnectionClosed as exc:
            return lost_error(exc.rcvd, exc.sent)
        return lost_error(ws.protocol.close_rcvd, ws.protocol.close_sent)

    async def _reopen(
        self, error: BaseException
    ) -> tuple[ClientConnection | None, BaseException | None]:
        """Reconnect and resubscribe; (None, why) when the policy gives up or the client closes."""
        attempts = self._policy.attempts(error)
        for attempt, delay in attempts:
            self._set_state(
                ConnectionState.RECONNECTING, error=attempts.error, delay=delay, attempt=attempt
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            if self._closing.is_set():
                return None, None
            self._set_state(ConnectionState.CONNECTING, attempt=attempt)
            try:
                ws = await self._open()
            except ConnectError as exc:
                attempts.failed(exc)
                continue
            if self._closing.is_set():
                await ws.close()
                return None, None
            frames = self._reopened(ws)
            with contextlib.suppress(ConnectionClosed):  # the read loop sees the close
                for frame in frames:
                    await ws.send(frame)
            return ws, None
        return None, attempts.error

    async def _refresh(self) -> None:
        """Renew the token shortly before it expires: await the callback, send `auth`."""
        while not self._closing.is_set() and self._state is not ConnectionState.CLOSED:
            self._token_event.clear()
            delay = self._refresh_delay()
            try:
                async with asyncio.timeout(delay):
                    await self._token_event.wait()
                continue  # the token changed (a reconnect fetched one) or the client closes
            except TimeoutError:
                pass
            try:
                async with self._deadline("token refresh"):
                    await self._usable()
                await self._fetch_token()
                assert self._token is not None
                await self.auth(self._token)
            except (ClientClosedError, ConnectionLostError):
                continue  # a reconnect calls the callback anyway, or the client is closing
            except BrokerClientError as exc:
                self._report(
                    exc
                    if isinstance(exc, UnauthorizedError)
                    else ConnectError(f"token refresh failed: {exc}")
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # do not spin while the token is refused
                        await self._closing.wait()
            except Exception:  # a bug in this module; the broker's 4001 will end the connection
                log.exception("token refresher failed")
                return

    def _token_changed(self) -> None:
        self._token_event.set()

    def _state_entered(self, state: ConnectionState) -> None:
        for wanted, future in list(self._state_waiters):
            if wanted is state and not future.done():
                future.set_result(None)


class _Deadline:
    """`asyncio.timeout` that turns the timeout into `RequestTimeoutError` naming the operation."""

    __slots__ = ("_client", "_cm", "_timeout", "_what")

    def __init__(self, seconds: float, what: str, client: AsyncClient) -> None:
        self._timeout = seconds
        self._what = what
        self._client = client
        self._cm = asyncio.timeout(seconds)

    async def __aenter__(self) -> None:
        await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._cm.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            state = self._client.state
            detail = "" if state is ConnectionState.CONNECTED else f" (client {state})"
            raise RequestTimeoutError(
                f"{self._what}: no answer within {self._timeout:g} s{detail}"
            ) from None
