"""The blocking client for scripts, on `websockets.sync` (wire protocol v1, docs/clients.md).

Theory of operation: as in `aio`, with a thread where the async client has a task. A daemon reader
thread owns the connection: it reads every frame into the `Session`, and after a loss it fails
waiting requests, sleeps out the backoff, reconnects and re-subscribes; CONNECTED means every
pattern is acknowledged again. Caller threads send (under one lock, so frames never interleave) and
block on a `concurrent.futures.Future` that the reader resolves. As two threads read and write one
connection, wss:// runs over `_tls.ThreadSafeTls`, not an `ssl.SSLSocket` (OpenSSL forbids that).

Subscriptions are blocking iterators over a `queue.SimpleQueue`, or callbacks run in the reader
thread. A callback must not make a request that waits for an answer (only `publish(...,
ack=False)`): the reader would wait for itself, so that raises `RuntimeError` instead of hanging.

With a token callback a second daemon thread, the refresher, sleeps until shortly before the token's
`exp`, calls the callback and sends `auth`. Protocol bookkeeping lives in the sans-IO
`session.Session`, shared with the async client; this module only waits and does I/O.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, Self, overload

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

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
from ._tls import connect
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

__all__ = ["Client", "Subscription"]

log = logging.getLogger("broker_client")


class Subscription(SubscriptionBase):
    """One `subscribe()`: a blocking iterator of `Message`s (or a callback), until `unsubscribe()`.

    Iteration stops when the subscription is unsubscribed or the client closed, and raises the error
    when it ended for a reason (re-subscription refused, revoked by a new token, connection lost
    with reconnect disabled).
    """

    __slots__ = ("_queue",)
    _client: Client

    def __init__(self, client: Client, topic: str, callback: MessageCallback | None) -> None:
        super().__init__(client, topic, callback)
        self._queue: queue.SimpleQueue[Message | End] = queue.SimpleQueue()

    def _put(self, item: Message | End) -> None:
        self._queue.put(item)

    def _take(self, timeout: float | None) -> Message | End:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message on {self.topic!r} within {timeout:g} s") from None
        if isinstance(item, End):
            self._queue.put(item)  # every later call ends the same way
        return item

    def __iter__(self) -> Iterator[Message]:
        while True:
            item = self._take(None)
            if isinstance(item, End):
                if item.error is not None:
                    raise item.error
                return
            yield item

    def get(self, timeout: float | None = None) -> Message:
        """The next message; `TimeoutError` after `timeout` s, `ClientClosedError` once it ended."""
        item = self._take(timeout)
        if isinstance(item, End):
            raise ClientClosedError(f"subscription to {self.topic!r} ended") from item.error
        return item

    def unsubscribe(self) -> None:
        self._client._unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._ended:
            self.unsubscribe()


class Client(ClientBase):
    """A blocking client for one broker URL; use `with Client(url) as client:`.

    Same options and behaviour as `AsyncClient`: `encoding` `"json"` or `"msgpack"`; `reconnect`
    with `backoff` after an open connection is lost (the first `connect()` tries once and raises
    `ConnectError`, or `UnauthorizedError` / `ForbiddenError` for an HTTP 401 / 403); each request
    waits at most `request_timeout` s, reconnection time included; `token` a str or a callable
    returning one; `ssl` the context for `wss://`; `on_unrecovered` for lost messages.
    """

    _ready: threading.Event
    _closing: threading.Event

    def _setup(self) -> None:
        self._entered: dict[ConnectionState, int] = dict.fromkeys(ConnectionState, 0)
        self._state_changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._ws: ClientConnection | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._token_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresher: threading.Thread | None = None

    # life cycle

    def connect(self) -> Self:
        """Open the connection (one attempt); `ConnectError`, `UnauthorizedError` (HTTP 401) or
        `ForbiddenError` (HTTP 403) if it cannot be opened."""
        if self._state is not ConnectionState.IDLE:
            raise RuntimeError(f"connect() on a client that is {self._state}")
        self._set_state(ConnectionState.CONNECTING)
        try:
            ws = self._open()
        except ConnectError as exc:
            self._finish(exc)
            raise
        self._ws = ws
        self._set_state(ConnectionState.CONNECTED)
        self._ready.set()
        self._thread = threading.Thread(
            target=self._run, args=(ws,), name=f"broker-client {self.url}", daemon=True
        )
        self._thread.start()
        if self._policy.renewable:
            self._refresher = threading.Thread(
                target=self._refresh, name=f"token {self.url}", daemon=True
            )
            self._refresher.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection, end every subscription and stop the reader thread; idempotent."""
        self._closing.set()
        self._token_event.set()
        ws = self._ws
        if ws is not None:
            ws.close()
        for thread in (self._thread, self._refresher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        self._finish(None)

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_for_state(self, state: ConnectionState, timeout: float | None = None) -> None:
        """Return once the client is in `state` (now or later); `TimeoutError` after `timeout`."""
        with self._state_changed:
            seen = self._entered[state]
            if not self._state_changed.wait_for(
                lambda: self._state is state or self._entered[state] > seen, timeout
            ):
                raise TimeoutError(f"client not {state} within {timeout} s (it is {self._state})")

    # operations

    @overload
    def publish(self, topic: str, data: Any, *, ack: Literal[True] = ...) -> int: ...
    @overload
    def publish(self, topic: str, data: Any, *, ack: Literal[False]) -> None: ...
    @overload
    def publish(self, topic: str, data: Any, *, ack: bool) -> int | None: ...
    def publish(self, topic: str, data: Any, *, ack: bool = True) -> int | None:
        """Publish `data` to `topic`.

        With `ack` (the default) wait for the broker's acknowledgement and return how many
        connections the message was queued to; with `ack=False` return None once it is sent.
        """
        if not ack:
            _, frame = self._session.request("publish", topic=topic, data=data)
            ws = self._usable(time.monotonic() + self._request_timeout, "publish")
            self._send(ws, frame, "publish")
            return None
        return delivered_count(self._request("publish", topic=topic, data=data))

    def subscribe(
        self,
        topic: str,
        callback: MessageCallback | None = None,
        *,
        since: Position | None = None,
    ) -> Subscription:
        """Subscribe to a topic or pattern (`*` one token, final `>` the rest) once the broker acks.

        Without `callback` iterate the returned subscription (`for message in sub`) or call `get()`.
        `since` (a concrete topic's `Position`) asks for the messages after it first.
        """
        sub = Subscription(self, topic, callback)
        self._usable(time.monotonic() + self._request_timeout, "subscribe")
        if not self._session.add(sub):
            return sub  # the pattern is already subscribed at the broker; share it
        try:
            self._request("subscribe", topic=topic, since=since)
        except BaseException as exc:
            self._subscribe_failed(sub, exc)
            raise
        return sub

    def unsubscribe(self, topic: str) -> None:
        """Drop every local subscription to `topic` and the broker's subscription."""
        for sub in self._session.remove_pattern(topic):
            sub._end(None)
        self._request("unsubscribe", topic=topic)

    def history(
        self, topic: str, *, since: Position | None = None, limit: int | None = None
    ) -> History:
        """The retained messages of a concrete topic after `since` (from the oldest without it),
        at most `limit`. `recovered` False: the range after `since` is not all retained (or the
        epoch changed), and the messages are the oldest retained. The broker cuts a reply at
        about its --max-message-size: ask again from the last seq for more."""
        reply = self._request("history", topic=topic, since=since, limit=limit)
        return self._session.history(topic, reply)

    def auth(self, token: str) -> list[str]:
        """Replace the connection's token; returns the patterns the broker dropped because the new
        token does not allow them (their subscriptions end with `ForbiddenError`)."""
        revoked = revoked_patterns(self._request("auth", token=token))
        self._accept_token(token)
        return revoked

    def ping(self) -> float:
        """Round trip of a protocol-level ping through the broker's loop, in seconds."""
        start = time.perf_counter()
        self._request("ping")
        return time.perf_counter() - start

    # internals

    def _unsubscribe(self, sub: Subscription) -> None:
        sub._end(None)
        if self._session.remove(sub) and self._state is ConnectionState.CONNECTED:
            with contextlib.suppress(ConnectionLostError, ClientClosedError):
                self._request("unsubscribe", topic=sub.topic)

    def _usable(self, deadline: float, what: str) -> ClientConnection:
        """The open connection, waiting until `deadline` for a reconnection if there is none."""
        while not self._usable_now(ws := self._ws):
            if threading.current_thread() is self._thread:
                raise RuntimeError("a callback cannot wait for a reconnection of its own client")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._ready.wait(remaining):
                limit = self._request_timeout
                raise RequestTimeoutError(
                    f"{what}: not connected within {limit:g} s (client {self._state})"
                )
        assert ws is not None
        return ws

    def _send(self, ws: ClientConnection, frame: str | bytes, what: str) -> None:
        try:
            with self._send_lock:
                ws.send(frame)
        except ConnectionClosed as exc:
            raise ConnectionLostError(f"connection lost during {what}: {exc}") from exc

    def _request(self, op: str, **fields: Any) -> Reply:
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                f"{op} from a callback would wait for an answer that only the callback's thread"
                " reads; use publish(..., ack=False) or hand the work to another thread"
            )
        deadline = time.monotonic() + self._request_timeout
        future: Future[Reply | BaseException] = Future()

        def resolve(result: Reply | BaseException) -> None:
            with contextlib.suppress(Exception):  # already resolved: the first answer wins
                future.set_result(result)

        ws = self._usable(deadline, op)
        rid, frame = self._session.request(op, resolve, **fields)
        try:
            self._send(ws, frame, op)
            try:
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestTimeoutError(
                    f"{op}: no answer within {self._request_timeout:g} s"
                ) from None
        finally:
            if rid is not None:
                self._session.cancel(rid)
        return self._session.outcome(result)

    def _fetch_token(self) -> None:
        """Call the token callback before a connect or a refresh."""
        source = self._token_source
        if not callable(source):
            return
        try:
            self._accept_token(source())
        except Exception as exc:
            raise ConnectError(f"token callback: {type(exc).__name__}: {exc}") from exc

    def _open(self) -> ClientConnection:
        self._fetch_token()
        try:
            # websockets' connect in its plain-connection form (the reader thread owns the
            # connection's life); wss:// runs over a _tls.ThreadSafeTls (see there why).
            ws = connect(self.url, **self._connect_options())
        except Exception as exc:
            raise self._open_failed(exc) from exc
        problem = wrong_subprotocol(self._codec, ws.subprotocol)
        if problem is not None:
            ws.close()
            raise ConnectError(f"{self.url}: {problem}")
        return ws

    def _run(self, ws: ClientConnection) -> None:
        final: BaseException | None = None
        try:
            while True:
                error = self._read(ws)
                if not self._ended(error):
                    final = None if self._closing.is_set() else error
                    break
                reopened, final = self._reopen(error)
                if reopened is None:
                    break
                ws = reopened
        except Exception as exc:  # a bug in this module: end the client visibly, once
            log.exception("broker client reader failed")
            final = exc
        finally:
            self._ws = None
            self._finish(final)

    def _read(self, ws: ClientConnection) -> ConnectionLostError:
        try:
            for frame in ws:
                if self._session.receive(frame):
                    self._connected()
        except ConnectionClosed as exc:
            return lost_error(exc.rcvd, exc.sent)
        return lost_error(ws.protocol.close_rcvd, ws.protocol.close_sent)

    def _reopen(self, error: BaseException) -> tuple[ClientConnection | None, BaseException | None]:
        """Reconnect and resubscribe; (None, why) when the policy gives up or the client closes."""
        attempts = self._policy.attempts(error)
        for attempt, delay in attempts:
            self._set_state(
                ConnectionState.RECONNECTING, error=attempts.error, delay=delay, attempt=attempt
            )
            if self._closing.wait(delay):
                return None, None
            self._set_state(ConnectionState.CONNECTING, attempt=attempt)
            try:
                ws = self._open()
            except ConnectError as exc:
                attempts.failed(exc)
                continue
            if self._closing.is_set():
                ws.close()
                return None, None
            frames = self._reopened(ws)
            # The reader sees the close, if the connection drops meanwhile.
            with contextlib.suppress(ConnectionClosed), self._send_lock:
                for frame in frames:
                    ws.send(frame)
            return ws, None
        return None, attempts.error

    def _refresh(self) -> None:
        """Renew the token shortly before it expires: call the callback, send `auth`."""
        while not self._closing.is_set() and self._state is not ConnectionState.CLOSED:
            self._token_event.clear()
            if self._token_event.wait(self._refresh_delay()):
                continue  # the token changed (a reconnect fetched one) or the client closes
            try:
                self._usable(time.monotonic() + self._request_timeout, "token refresh")
                self._fetch_token()
                assert self._token is not None
                self.auth(self._token)
            except (ClientClosedError, ConnectionLostError):
                continue  # a reconnect calls the callback anyway, or the client is closing
            except BrokerClientError as exc:
                self._report(
                    exc
                    if isinstance(exc, UnauthorizedError)
                    else ConnectError(f"token refresh failed: {exc}")
                )
                self._closing.wait(1.0)  # do not spin while the token is refused
            except Exception:  # a bug in this module; the broker's 4001 will end the connection
                log.exception("token refresher failed")
                return

    def _token_changed(self) -> None:
        self._token_event.set()

    def _swap_state(self, state: ConnectionState) -> ConnectionState:
        with self._state_changed:
            previous = super()._swap_state(state)
            self._entered[state] += 1
            self._state_changed.notify_all()
        return previous
