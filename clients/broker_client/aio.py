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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self, overload

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from ._common import (
    DEFAULT_MAX_SIZE,
    End,
    describe_close,
    log_callback_error,
    open_error,
    wrong_subprotocol,
)
from ._common import (
    delivered_count as _delivered,
)
from .errors import (
    BrokerClientError,
    BrokerError,
    ClientClosedError,
    ConnectError,
    ConnectionLostError,
    RequestTimeoutError,
    error_from_reply,
)
from .protocol import (
    DEFAULT_URL,
    Backoff,
    Codec,
    ConnectionState,
    Encoding,
    ErrorReply,
    Message,
    Reply,
    StateChange,
)
from .session import Session

__all__ = ["AsyncClient", "AsyncSubscription"]

log = logging.getLogger("broker_client")

MessageCallback = Callable[[Message], object]
StateCallback = Callable[[StateChange], object]


class AsyncSubscription:
    """One `subscribe()`: an async iterator of `Message`s (or a callback), until `unsubscribe()`.

    Iteration stops when the subscription is unsubscribed or the client closed; it raises the error
    when the subscription ends for a reason (the broker refused the re-subscription after a
    reconnect, or the connection was lost with reconnect disabled).
    """

    __slots__ = ("_callback", "_client", "_ended", "_queue", "topic")

    def __init__(self, client: AsyncClient, topic: str, callback: MessageCallback | None) -> None:
        self.topic = topic
        self._client = client
        self._callback = callback
        self._queue: asyncio.Queue[Message | End] = asyncio.Queue()
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def _deliver(self, message: Message) -> None:
        if self._ended:
            return
        if self._callback is None:
            self._queue.put_nowait(message)
            return
        try:
            self._callback(message)
        except Exception:
            log_callback_error(log, "message callback", self.topic)

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(End(error))

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

    def __repr__(self) -> str:
        return f"<AsyncSubscription {self.topic!r}{' ended' if self._ended else ''}>"


class AsyncClient:
    """An asyncio client for one broker URL; use `async with AsyncClient(url) as client:`.

    `encoding` picks the subprotocol (`"json"` or `"msgpack"`; only msgpack carries bytes).
    `reconnect` turns on automatic reconnection with `backoff` after a connection that was open is
    lost; the first `connect()` tries once and raises `ConnectError`. Every request waits at most
    `request_timeout` s, including the time spent waiting for a reconnection.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        encoding: Encoding = "json",
        reconnect: bool = True,
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
        open_timeout: float = 5.0,
        ping_interval: float | None = 20.0,
        max_size: int | None = DEFAULT_MAX_SIZE,
        on_state_change: StateCallback | None = None,
        on_error: Callable[[BrokerClientError], object] | None = None,
    ) -> None:
        self.url = url
        self.encoding: Encoding = encoding
        self._codec = Codec(encoding)
        self._reconnect = reconnect
        self._backoff = backoff or Backoff()
        self._request_timeout = request_timeout
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._max_size = max_size
        self._state_callbacks: list[StateCallback] = [on_state_change] if on_state_change else []
        self._on_error = on_error
        self._session = Session(self._codec, self._report)
        self._state = ConnectionState.IDLE
        self._state_waiters: list[tuple[ConnectionState, asyncio.Future[None]]] = []
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()  # set while CONNECTED or CLOSED: a caller may stop waiting
        self._closing = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._final_error: BaseException | None = None

    # life cycle

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def subscriptions(self) -> list[str]:
        """The patterns this client holds at the broker (re-subscribed after a reconnect)."""
        return self._session.patterns()

    def add_state_callback(self, callback: StateCallback) -> None:
        """Call `callback(StateChange)` on every state change (in the event loop; keep it quick)."""
        self._state_callbacks.append(callback)

    async def connect(self) -> Self:
        """Open the connection (one attempt); `ConnectError` if the broker cannot be reached."""
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
        return self

    async def close(self) -> None:
        """Close the connection and end every subscription; idempotent."""
        self._closing.set()
        if self._state is ConnectionState.IDLE:
            self._finish(None)
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
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
        reply = await self._request("publish", topic=topic, data=data)
        return _delivered(reply)

    async def subscribe(
        self, topic: str, callback: MessageCallback | None = None
    ) -> AsyncSubscription:
        """Subscribe to a topic or pattern (`*` one token, final `>` the rest) once the broker acks.

        Without `callback` iterate the returned subscription: `async for message in sub`.
        """
        sub = AsyncSubscription(self, topic, callback)
        async with self._deadline("subscribe"):
            await self._usable()
        if not self._session.add(sub):
            return sub  # the pattern is already subscribed at the broker; share it
        try:
            await self._request("subscribe", topic=topic)
        except BrokerError as exc:
            # Refused: whoever joined this pattern meanwhile is refused with it.
            for other in self._session.remove_pattern(topic):
                if other is not sub:
                    other._end(exc)
            sub._ended = True
            raise
        except BaseException:
            # Timed out or lost: the pattern stays for the others (re-subscribed on reconnect).
            self._session.remove(sub)
            sub._ended = True
            raise
        return sub

    async def unsubscribe(self, topic: str) -> None:
        """Drop every local subscription to `topic` and the broker's subscription."""
        for sub in self._session.remove_pattern(topic):
            sub._end(None)
        await self._request("unsubscribe", topic=topic)

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
        if self._state is ConnectionState.IDLE:
            raise RuntimeError("the client is not connected: call connect() first")
        while True:
            if self._closing.is_set() or self._state is ConnectionState.CLOSED:
                if self._final_error is not None:
                    raise ConnectionLostError(str(self._final_error)) from self._final_error
                raise ClientClosedError("the client is closed")
            if self._state is ConnectionState.CONNECTED and self._ws is not None:
                return self._ws
            await self._ready.wait()
            if not self._ready.is_set():  # pragma: no cover - cleared again before we ran
                continue

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
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, ErrorReply):
            raise error_from_reply(result.code, result.message, result.id)
        return result

    async def _open(self) -> ClientConnection:
        try:
            ws = await connect(
                self.url,
                subprotocols=[Subprotocol(self._codec.subprotocol)],
                compression=None,  # the broker does not negotiate permessage-deflate (encode-once)
                proxy=None,
                open_timeout=self._open_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                close_timeout=2,
                max_size=self._max_size,
            )
        except Exception as exc:
            raise open_error(self.url, exc, self._open_timeout) from exc
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
                self._ws = None
                self._ready.clear()
                self._session.connection_lost(error)
                if self._closing.is_set():
                    break
                if not self._reconnect:
                    final = error
                    break
                reopened = await self._reopen(error)
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
            return ConnectionLostError(describe_close(exc.rcvd, exc.sent))
        return ConnectionLostError(describe_close(ws.protocol.close_rcvd, ws.protocol.close_sent))

    async def _reopen(self, error: BaseException) -> ClientConnection | None:
        for attempt, delay in enumerate(self._backoff.delays(), 1):
            self._set_state(ConnectionState.RECONNECTING, error=error, delay=delay, attempt=attempt)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            if self._closing.is_set():
                return None
            self._set_state(ConnectionState.CONNECTING, attempt=attempt)
            try:
                ws = await self._open()
            except ConnectError as exc:
                error = exc
                continue
            if self._closing.is_set():
                await ws.close()
                return None
            self._ws = ws
            frames = self._session.begin_resubscribe()
            if not frames:
                self._connected()
            with contextlib.suppress(ConnectionClosed):  # the read loop sees the close
                for frame in frames:
                    await ws.send(frame)
            return ws
        raise AssertionError("unreachable: Backoff.delays() is endless")

    def _connected(self) -> None:
        self._set_state(ConnectionState.CONNECTED)
        self._ready.set()

    def _finish(self, error: BaseException | None) -> None:
        if self._state is ConnectionState.CLOSED:
            return
        self._final_error = error
        self._set_state(ConnectionState.CLOSED, error=error)
        self._session.close(error)
        self._ready.set()

    def _set_state(
        self,
        state: ConnectionState,
        *,
        error: BaseException | None = None,
        delay: float | None = None,
        attempt: int = 0,
    ) -> None:
        previous, self._state = self._state, state
        change = StateChange(state, previous, error, delay, attempt)
        for callback in list(self._state_callbacks):
            try:
                callback(change)
            except Exception:
                log_callback_error(log, "state callback", str(state))
        for wanted, future in list(self._state_waiters):
            if wanted is state and not future.done():
                future.set_result(None)

    def _report(self, error: BrokerClientError) -> None:
        if self._on_error is None:
            log.warning("broker client %s: %s", self.url, error)
            return
        try:
            self._on_error(error)
        except Exception:
            log_callback_error(log, "error callback", str(error))


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
