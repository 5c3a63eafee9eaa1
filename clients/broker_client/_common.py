"""What the two client shells share beyond the sans-IO `Session`: options, connection state and its
callbacks, the arguments of a `websockets` connect, typed errors for transport failures, token
bookkeeping, and the parts of a subscription that do not depend on how a caller waits.

`ClientBase` and `SubscriptionBase` hold no I/O either; `aio.AsyncClient` and `blocking.Client`
add the waiting (futures, events, a task or a thread) and the socket calls.
"""

from __future__ import annotations

import logging
import socket
import ssl as ssl_module
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close
from websockets.typing import Subprotocol

from .errors import (
    BrokerClientError,
    BrokerError,
    ClientClosedError,
    ConnectError,
    ConnectionLostError,
    HandshakeForbiddenError,
    HandshakeUnauthorizedError,
    ProtocolError,
    TokenExpiredError,
)
from .protocol import (
    DEFAULT_URL,
    JSON_SUBPROTOCOL,
    Ack,
    Backoff,
    Codec,
    ConnectionState,
    Encoding,
    Message,
    Position,
    Reply,
    StateChange,
    token_expiry,
)
from .session import ReconnectPolicy, Session, SessionStats, Unrecovered, refresh_delay

log = logging.getLogger("broker_client")

# The broker accepts messages up to 1 MiB; a delivery adds an envelope, and an octet-stream HTTP
# publish reaches JSON connections as base64 (4/3 the size), so the client accepts well above that.
DEFAULT_MAX_SIZE = 4 * 2**20

#: The close code the broker uses when a connection's token expires (docs/protocol.md).
TOKEN_EXPIRED = 4001

MessageCallback = Callable[[Message], object]
StateCallback = Callable[[StateChange], object]
UnrecoveredCallback = Callable[[Unrecovered], object]
#: A token, or a callable returning one (the async client also awaits an awaitable result).
TokenSource = str | Callable[[], str | Awaitable[str]]


@dataclass(frozen=True, slots=True)
class End:
    """The sentinel a subscription's queue ends with: why it ended, None when asked to."""

    error: BaseException | None


class _Flag(Protocol):
    """`asyncio.Event` or `threading.Event`, as far as the shared code uses them."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...


def describe_close(rcvd: Close | None, sent: Close | None) -> str:
    """A one-line reason for a closed connection, e.g. 'closed by the broker: 1001 (going away)'."""
    if rcvd is not None:
        reason = f" {rcvd.reason}" if rcvd.reason else ""
        return f"closed by the broker: {rcvd.code}{reason}"
    if sent is not None:
        return f"closed by the client: {sent.code}"
    return "connection dropped without a close frame"


def lost_error(rcvd: Close | None, sent: Close | None) -> ConnectionLostError:
    """The error for a connection that ended: `TokenExpiredError` for the broker's 4001."""
    cls = TokenExpiredError if rcvd is not None and rcvd.code == TOKEN_EXPIRED else None
    return (cls or ConnectionLostError)(describe_close(rcvd, sent))


def open_error(url: str, exc: Exception, timeout: float) -> ConnectError:
    """The typed error for an exception raised while opening a connection: for an HTTP 401 / 403
    one that is also an `UnauthorizedError` / `ForbiddenError` (`status` set)."""
    if isinstance(exc, InvalidURI):
        return ConnectError(f"invalid broker URL {url!r}: {exc.msg}")
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        body = (
            exc.response.body.decode("utf-8", "replace").strip()[:200] if exc.response.body else ""
        )
        detail = f"{url}: the server refused the WebSocket handshake with HTTP {status}"
        if status == 401:
            message = f"{detail} ({body or 'no token'})"
            return HandshakeUnauthorizedError("unauthorized", message, status=401)
        if status == 403:
            return HandshakeForbiddenError(
                "forbidden", f"{detail} ({body or 'refused'})", status=403
            )
        return ConnectError(f"{detail}{f' ({body})' if body else ''}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"cannot connect to {url}: connection refused (is the broker running?)")
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot connect to {url}: unknown host ({exc.strerror})")
    if isinstance(exc, TimeoutError):
        return ConnectError(f"cannot connect to {url}: no answer within {timeout:g} s")
    if isinstance(exc, ssl_module.SSLError):
        return ConnectError(f"cannot connect to {url}: TLS failed ({exc.reason or exc})")
    if isinstance(exc, OSError | InvalidHandshake):
        return ConnectError(f"cannot connect to {url}: {exc}")
    return ConnectError(f"cannot connect to {url}: {type(exc).__name__}: {exc}")


def wrong_subprotocol(codec: Codec, chosen: str | None) -> str | None:
    """Why the negotiated subprotocol is unusable, or None when it fits the codec."""
    # Protocol v1: no subprotocol chosen means JSON, so that is only acceptable for a JSON client.
    effective = chosen or JSON_SUBPROTOCOL
    if effective == codec.subprotocol:
        return None
    return f"the server picked subprotocol {chosen!r}, not {codec.subprotocol!r}"


def log_callback_error(logger: logging.Logger, what: str, where: str) -> None:
    """A user callback raised: log it with its traceback and keep the connection going."""
    logger.exception("%s for %r raised; ignored", what, where)


def delivered_count(reply: Reply) -> int:
    """The count a publish ack carries. Protocol v1 lets acks add "delivered" and our broker always
    does for a publish; without it the caller's `int` would be a guess, so that is an error."""
    if isinstance(reply, Ack) and reply.delivered is not None:
        return reply.delivered
    raise ProtocolError(f"publish answered without a delivered count: {reply!r}")


def revoked_patterns(reply: Reply) -> list[str]:
    """The patterns an `auth` ack says the new token no longer allows (removed by the broker)."""
    if isinstance(reply, Ack):
        return list(reply.revoked or ())
    raise ProtocolError(f"auth answered with {reply!r}")


class SubscriptionBase:
    """The part of a subscription both flavours share; subclasses add a queue and `_put`."""

    __slots__ = ("_callback", "_client", "_ended", "topic")

    def __init__(self, client: ClientBase, topic: str, callback: MessageCallback | None) -> None:
        self.topic = topic
        self._client = client
        self._callback = callback
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def position(self) -> Position | None:
        """The topic's (epoch, seq) as last seen: the ack, then each message (None for a pattern,
        or against a broker without history)."""
        return self._client._session.position(self.topic)

    def _put(self, item: Message | End) -> None:
        raise NotImplementedError

    def _deliver(self, message: Message) -> None:
        if self._ended:
            return
        if self._callback is None:
            self._put(message)
            return
        try:
            self._callback(message)
        except Exception:
            log_callback_error(log, "message callback", self.topic)

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._put(End(error))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.topic!r}{' ended' if self._ended else ''}>"


class ClientBase:
    """Options, state and token bookkeeping of a client, without I/O (see aio.py, blocking.py).

    Options (the same for both flavours): `encoding` picks the subprotocol (`"json"` or
    `"msgpack"`; only msgpack carries bytes). `reconnect` turns on automatic reconnection with
    `backoff` after a connection that was open is lost (see `session.ReconnectPolicy`); the first
    `connect()` tries once. Every request waits at most `request_timeout` s, including the time
    spent waiting for a reconnection. `ssl` is the context for `wss://` URLs (None: the system's
    CAs). `on_state_change`, `on_error` and `on_unrecovered` are callbacks run in the client's
    reader (task or thread): keep them quick.

    `token` is a string, or a callable returning one (the async client also accepts one returning
    an awaitable): it goes to the broker as `Authorization: Bearer` on every connect, the callable
    being called again for each (re)connection. With a callable, a token whose JWT payload has an
    `exp` claim is replaced `refresh_before` s before it expires (at most a third of its life
    early) with an `auth` request on the open connection, so the connection outlives it.
    """

    _ready: _Flag  # set while CONNECTED or CLOSED: a caller may stop waiting
    _closing: _Flag
    _ws: Any  # the open connection of the flavour's `websockets` API, None between connections

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
        on_unrecovered: UnrecoveredCallback | None = None,
        token: TokenSource | None = None,
        ssl: ssl_module.SSLContext | None = None,
        refresh_before: float = 30.0,
    ) -> None:
        if not (token is None or isinstance(token, str) or callable(token)):
            raise TypeError(f"token must be a str or a callable, not {type(token).__name__}")
        self.url = url
        self.encoding: Encoding = encoding
        self._codec = Codec(encoding)
        self._policy = ReconnectPolicy(
            backoff or Backoff(), reconnect=reconnect, renewable=callable(token)
        )
        self._request_timeout = request_timeout
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._max_size = max_size
        self._ssl = ssl
        self._token_source = token
        self._token: str | None = token if isinstance(token, str) else None
        self._token_obtained = time.time()
        self._refresh_before = refresh_before
        self._state_callbacks: list[StateCallback] = [on_state_change] if on_state_change else []
        self._on_error = on_error
        self._on_unrecovered = on_unrecovered
        self._session = Session(self._codec, self._report, self._unrecovered)
        self._state = ConnectionState.IDLE
        self._final_error: BaseException | None = None
        self._finish_lock = threading.Lock()
        self._finished = False
        self._setup()

    def _setup(self) -> None:
        """Hook: the flavour's own waiting primitives (events, queues, locks)."""

    # public, shared by both flavours

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def subscriptions(self) -> list[str]:
        """The patterns this client holds at the broker (re-subscribed after a reconnect)."""
        return self._session.patterns()

    @property
    def stats(self) -> SessionStats:
        """Counts of messages, recovered and unrecovered resubscriptions, seq gaps and seqs that
        went backwards (which the broker promises never to send: reported, never hidden)."""
        return self._session.stats

    @property
    def token(self) -> str | None:
        """The token the connection was opened or last re-authenticated with."""
        return self._token

    def position(self, topic: str) -> Position | None:
        """The last (epoch, seq) seen on a subscribed concrete topic."""
        return self._session.position(topic)

    def add_state_callback(self, callback: StateCallback) -> None:
        """Call `callback(StateChange)` on every state change (in the client's reader; be quick)."""
        self._state_callbacks.append(callback)

    # tokens

    def _accept_token(self, token: object) -> str:
        if not isinstance(token, str) or not token:
            raise TypeError(f"the token callback returned {type(token).__name__}, not a str")
        self._token = token
        self._token_obtained = time.time()
        self._token_changed()
        return token

    def _token_changed(self) -> None:
        """Hook: the token was replaced (the refresher computes its next wake-up)."""

    def _refresh_delay(self) -> float | None:
        """Seconds until the token should be renewed; None when there is nothing to renew."""
        if not self._policy.renewable or self._token is None:
            return None
        expires = token_expiry(self._token)
        if expires is None:
            return None
        return refresh_delay(expires, self._token_obtained, time.time(), self._refresh_before)

    # connection

    def _connect_options(self) -> dict[str, Any]:
        """Keyword arguments of `websockets` `connect`, the same for its sync and asyncio forms."""
        token = self._token
        options: dict[str, Any] = {
            "subprotocols": [Subprotocol(self._codec.subprotocol)],
            "compression": None,  # the broker does not negotiate permessage-deflate (encode-once)
            "proxy": None,
            "open_timeout": self._open_timeout,
            "ping_interval": self._ping_interval,
            "ping_timeout": self._ping_interval,
            "close_timeout": 2,
            "max_size": self._max_size,
            "additional_headers": {"Authorization": f"Bearer {token}"} if token else None,
        }
        # websockets refuses an ssl context with a ws:// URL; for wss:// None means the defaults.
        if self._ssl is not None and self.url.startswith("wss:"):
            options["ssl"] = self._ssl
        return options

    def _open_failed(self, exc: Exception) -> ConnectError:
        return open_error(self.url, exc, self._open_timeout)

    def _ended(self, error: BaseException) -> bool:
        """A connection ended: fail its waiting requests; True when the client should reconnect."""
        self._ws = None
        self._ready.clear()
        self._session.connection_lost(error)
        return not self._closing.is_set() and self._policy.after_loss(error)

    def _reopened(self, ws: Any) -> list[str | bytes]:
        """A new connection is open: the subscribe frames to send on it (CONNECTED at once when
        there are none, else when the broker acknowledged the last of them)."""
        self._ws = ws
        frames = self._session.begin_resubscribe()
        if not frames:
            self._connected()
        return frames

    def _usable_now(self, ws: Any) -> bool:
        """True when a request can go out on `ws` now, False to wait; raises when it never will."""
        if self._state is ConnectionState.IDLE:
            raise RuntimeError("the client is not connected: call connect() first")
        if self._closing.is_set() or self._state is ConnectionState.CLOSED:
            final = self._final_error
            if final is not None:
                # Keep the type a script may test (TokenExpiredError after a 4001).
                cls = type(final) if isinstance(final, ConnectionLostError) else ConnectionLostError
                raise cls(str(final)) from final
            raise ClientClosedError("the client is closed")
        return self._state is ConnectionState.CONNECTED and ws is not None

    # subscriptions

    def _subscribe_failed(self, sub: SubscriptionBase, exc: BaseException) -> None:
        if isinstance(exc, BrokerError):
            self._session.refused(sub, exc)  # whoever joined this pattern meanwhile is refused too
        else:
            # Timed out or lost: the pattern stays for the others (re-subscribed on reconnect).
            self._session.remove(sub)
        sub._ended = True

    # state

    def _swap_state(self, state: ConnectionState) -> ConnectionState:
        previous, self._state = self._state, state
        return previous

    def _state_entered(self, state: ConnectionState) -> None:
        """Hook: wake whoever waits for `state`."""

    def _set_state(
        self,
        state: ConnectionState,
        *,
        error: BaseException | None = None,
        delay: float | None = None,
        attempt: int = 0,
    ) -> None:
        previous = self._swap_state(state)
        change = StateChange(state, previous, error, delay, attempt)
        for callback in list(self._state_callbacks):
            try:
                callback(change)
            except Exception:
                log_callback_error(log, "state callback", str(state))
        self._state_entered(state)

    def _connected(self) -> None:
        self._set_state(ConnectionState.CONNECTED)
        self._ready.set()

    def _finish(self, error: BaseException | None) -> None:
        with self._finish_lock:
            if self._finished:
                return
            self._finished = True
            self._final_error = error
        self._set_state(ConnectionState.CLOSED, error=error)
        self._session.close(error)
        self._ready.set()
        self._token_changed()  # wakes the refresher, which sees the end

    # callbacks

    def _report(self, error: BrokerClientError) -> None:
        if self._on_error is None:
            log.warning("broker client %s: %s", self.url, error)
            return
        try:
            self._on_error(error)
        except Exception:
            log_callback_error(log, "error callback", str(error))

    def _unrecovered(self, event: Unrecovered) -> None:
        if self._on_unrecovered is None:
            log.warning(
                "broker client %s: subscription %r not recovered (%s); reload its state",
                self.url,
                event.topic,
                event.reason,
            )
            return
        try:
            self._on_unrecovered(event)
        except Exception:
            log_callback_error(log, "unrecovered callback", event.topic)
