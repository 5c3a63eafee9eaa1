"""The blocking client for scripts, on `websockets.sync` (wire protocol v1, docs/clients.md).

Theory of operation: as in `aio`, with a thread where the async client has a task. A daemon reader
thread owns the connection: it reads every frame into the `Session`, and after a loss it fails
waiting requests, sleeps out the backoff, reconnects and re-subscribes; CONNECTED means every
pattern is acknowledged again. Caller threads send (under one lock, so frames never interleave) and
block on a `concurrent.futures.Future` that the reader resolves.

Subscriptions are blocking iterators over a `queue.SimpleQueue`, or callbacks run in the reader
thread. A callback must not make a request that waits for an answer (only `publish(...,
ack=False)`): the reader would wait for itself, so that raises `RuntimeError` instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, Self, overload

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
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

__all__ = ["Client", "Subscription"]

log = logging.getLogger("broker_client")

MessageCallback = Callable[[Message], object]
StateCallback = Callable[[StateChange], object]


class Subscription:
    """One `subscribe()`: a blocking iterator of `Message`s (or a callback), until `unsubscribe()`.

    Iteration stops when the subscription is unsubscribed or the client closed, and raises the error
    when it ended for a reason (re-subscription refused, connection lost with reconnect disabled).
    """

    __slots__ = ("_callback", "_client", "_ended", "_queue", "topic")

    def __init__(self, client: Client, topic: str, callback: MessageCallback | None) -> None:
        self.topic = topic
        self._client = client
        self._callback = callback
        self._queue: queue.SimpleQueue[Message | End] = queue.SimpleQueue()
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def _deliver(self, message: Message) -> None:
        if self._ended:
            return
        if self._callback is None:
            self._queue.put(message)
            return
        try:
            self._callback(message)
        except Exception:
            log_callback_error(log, "message callback", self.topic)

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put(End(error))

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

    def __repr__(self) -> str:
        return f"<Subscription {self.topic!r}{' ended' if self._ended else ''}>"


class Client:
    """A blocking client for one broker URL; use `with Client(url) as client:`.

    Same options and behaviour as `AsyncClient`: `encoding` `"json"` or `"msgpack"`; `reconnect`
    with `backoff` after an open connection is lost (the first `connect()` tries once and raises
    `ConnectError`); each request waits at most `request_timeout` s, reconnection time included.
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
        self._entered: dict[ConnectionState, int] = dict.fromkeys(ConnectionState, 0)
        self._state_changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._ws: ClientConnection | None = None
        self._ready = threading.Event()  # set while CONNECTED or CLOSED: a caller may stop waiting
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._final_error: BaseException | None = None
        self._finished = False

    # life cycle

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def subscriptions(self) -> list[str]:
        """The patterns this client holds at the broker (re-subscribed after a reconnect)."""
        return self._session.patterns()

    def add_state_callback(self, callback: StateCallback) -> None:
        """Call `callback(StateChange)` on each state change (in the reader thread; be quick)."""
        self._state_callbacks.append(callback)

    def connect(self) -> Self:
        """Open the connection (one attempt); `ConnectError` if the broker cannot be reached."""
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
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection, end every subscription and stop the reader thread; idempotent."""
        self._closing.set()
        ws = self._ws
        if ws is not None:
            ws.close()
        thread = self._thread
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
        reply = self._request("publish", topic=topic, data=data)
        return _delivered(reply)

    def subscribe(self, topic: str, callback: MessageCallback | None = None) -> Subscription:
        """Subscribe to a topic or pattern (`*` one token, final `>` the rest) once the broker acks.

        Without `callback` iterate the returned subscription (`for message in sub`) or call `get()`.
        """
        sub = Subscription(self, topic, callback)
        self._usable(time.monotonic() + self._request_timeout, "subscribe")
        if not self._session.add(sub):
            return sub  # the pattern is already subscribed at the broker; share it
        try:
            self._request("subscribe", topic=topic)
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

    def unsubscribe(self, topic: str) -> None:
        """Drop every local subscription to `topic` and the broker's subscription."""
        for sub in self._session.remove_pattern(topic):
            sub._end(None)
        self._request("unsubscribe", topic=topic)

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
        if self._state is ConnectionState.IDLE:
            raise RuntimeError("the client is not connected: call connect() first")
        while True:
            if self._closing.is_set() or self._state is ConnectionState.CLOSED:
                if self._final_error is not None:
                    raise ConnectionLostError(str(self._final_error)) from self._final_error
                raise ClientClosedError("the client is closed")
            ws = self._ws
            if self._state is ConnectionState.CONNECTED and ws is not None:
                return ws
            if threading.current_thread() is self._thread:
                raise RuntimeError("a callback cannot wait for a reconnection of its own client")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._ready.wait(remaining):
                limit = self._request_timeout
                raise RequestTimeoutError(
                    f"{what}: not connected within {limit:g} s (client {self._state})"
                )

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
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, ErrorReply):
            raise error_from_reply(result.code, result.message, result.id)
        return result

    def _open(self) -> ClientConnection:
        try:
            ws = connect(
                self.url,
                subprotocols=[Subprotocol(self._codec.subprotocol)],
                compression=None,  # the broker does not negotiate permessage-deflate (encode-once)
                proxy=None,
                open_timeout=self._open_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                close_timeout=2,
                max_size=self._max_size,
                # websockets >= 17.1: we own the connection's life (the reader thread closes it),
                # so opt in to the plain-connection form instead of a context manager.
                legacy=True,
            )
        except Exception as exc:
            raise open_error(self.url, exc, self._open_timeout) from exc
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
                self._ws = None
                self._ready.clear()
                self._session.connection_lost(error)
                if self._closing.is_set():
                    break
                if not self._reconnect:
                    final = error
                    break
                reopened = self._reopen(error)
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
            return ConnectionLostError(describe_close(exc.rcvd, exc.sent))
        return ConnectionLostError(describe_close(ws.protocol.close_rcvd, ws.protocol.close_sent))

    def _reopen(self, error: BaseException) -> ClientConnection | None:
        for attempt, delay in enumerate(self._backoff.delays(), 1):
            self._set_state(ConnectionState.RECONNECTING, error=error, delay=delay, attempt=attempt)
            if self._closing.wait(delay):
                return None
            self._set_state(ConnectionState.CONNECTING, attempt=attempt)
            try:
                ws = self._open()
            except ConnectError as exc:
                error = exc
                continue
            if self._closing.is_set():
                ws.close()
                return None
            self._ws = ws
            frames = self._session.begin_resubscribe()
            if not frames:
                self._connected()
            with (
                contextlib.suppress(ConnectionClosed),
                self._send_lock,
            ):  # the reader sees the close
                for frame in frames:
                    ws.send(frame)
            return ws
        raise AssertionError("unreachable: Backoff.delays() is endless")

    def _connected(self) -> None:
        self._set_state(ConnectionState.CONNECTED)
        self._ready.set()

    def _finish(self, error: BaseException | None) -> None:
        with self._state_changed:
            if self._finished:
                return
            self._finished = True
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
        with self._state_changed:
            previous, self._state = self._state, state
            self._entered[state] += 1
            self._state_changed.notify_all()
        change = StateChange(state, previous, error, delay, attempt)
        for callback in list(self._state_callbacks):
            try:
                callback(change)
            except Exception:
                log_callback_error(log, "state callback", str(state))

    def _report(self, error: BrokerClientError) -> None:
        if self._on_error is None:
            log.warning("broker client %s: %s", self.url, error)
            return
        try:
            self._on_error(error)
        except Exception:
            log_callback_error(log, "error callback", str(error))
