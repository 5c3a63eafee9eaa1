"""What both client flavours share, without I/O: request ids, pending requests, subscriptions.

Theory of operation. A client owns one `Session` for its whole life, across reconnects. Requests get
an integer id and a resolver (a callable that the async client points at an `asyncio.Future` and the
blocking client at a `concurrent.futures.Future`); `receive(frame)` decodes a frame from the broker,
resolves the request it answers or hands a message to every local subscription whose pattern matches
its topic.

Invariants:
- The broker holds one subscription per pattern, however many local `Subscription`s share it: `add`
  says when the first one needs a wire subscribe and `remove` when the last one needs a wire
  unsubscribe.
- A message reaches every local subscription whose pattern matches, once each, even when the broker
  holds several matching patterns for this connection.
- After a reconnect `begin_resubscribe` makes one subscribe request per pattern; `receive` returns
  True when the last of them is answered, which is when the client calls itself connected again.
- Resolvers and subscription callbacks run outside the lock, so they may call back into the session.

The lock is for the blocking client, whose reader thread and caller threads share the session; the
async client calls in from one thread, where an uncontended lock costs next to nothing.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .errors import BrokerClientError, ClientClosedError, ProtocolError, error_from_reply
from .protocol import Codec, ErrorReply, Message, Reply, parse_reply, topic_matches

__all__ = ["Resolver", "Session", "Subscriber"]

Resolver = Callable[[Reply | BaseException], None]


class Subscriber(Protocol):
    """What the session needs from a local subscription."""

    @property
    def topic(self) -> str: ...

    def _deliver(self, message: Message) -> None: ...

    def _end(self, error: BaseException | None) -> None: ...


class Session:
    __slots__ = ("_codec", "_ids", "_lock", "_on_error", "_pending", "_resubscribing", "_subs")

    def __init__(self, codec: Codec, on_error: Callable[[BrokerClientError], None]) -> None:
        self._codec = codec
        self._on_error = on_error
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Resolver] = {}
        self._subs: dict[str, list[Subscriber]] = {}
        self._resubscribing: dict[int, str] = {}

    # requests

    def request(
        self, op: str, resolver: Resolver | None = None, **fields: Any
    ) -> tuple[int | None, str | bytes]:
        """A request frame; with a resolver it carries an id and the resolver gets the answer."""
        body: dict[str, Any] = {"op": op, **fields}
        if resolver is None:
            return None, self._codec.encode(body)
        with self._lock:
            rid = next(self._ids)
            body["id"] = rid
            frame = self._codec.encode(body)
            self._pending[rid] = resolver
        return rid, frame

    def cancel(self, rid: int) -> None:
        """Forget a request whose caller stopped waiting (timeout, cancellation, failed send)."""
        with self._lock:
            self._pending.pop(rid, None)

    # subscriptions

    def add(self, sub: Subscriber) -> bool:
        """Register a subscription; True when its pattern is new and needs a wire subscribe."""
        with self._lock:
            subs = self._subs.setdefault(sub.topic, [])
            subs.append(sub)
            return len(subs) == 1

    def remove(self, sub: Subscriber) -> bool:
        """Unregister; True when it was its pattern's last and needs a wire unsubscribe."""
        with self._lock:
            subs = self._subs.get(sub.topic)
            if subs is None or sub not in subs:
                return False
            subs.remove(sub)
            if subs:
                return False
            del self._subs[sub.topic]
            return True

    def remove_pattern(self, pattern: str) -> list[Subscriber]:
        with self._lock:
            return self._subs.pop(pattern, [])

    def patterns(self) -> list[str]:
        with self._lock:
            return list(self._subs)

    def begin_resubscribe(self) -> list[str | bytes]:
        """One subscribe frame per pattern, to send on a fresh connection (maybe none)."""
        frames: list[str | bytes] = []
        with self._lock:
            self._resubscribing.clear()
            for pattern in self._subs:
                rid = next(self._ids)
                self._resubscribing[rid] = pattern
                frames.append(self._codec.encode({"op": "subscribe", "topic": pattern, "id": rid}))
        return frames

    # incoming

    def receive(self, frame: str | bytes) -> bool:
        """Handle one frame from the broker; True when it completed a re-subscription round."""
        try:
            reply = parse_reply(self._codec.decode(frame))
        except ProtocolError as exc:
            self._on_error(exc)
            return False
        if reply is None:
            return False
        if isinstance(reply, Message):
            with self._lock:
                targets = [
                    sub
                    for pattern, subs in self._subs.items()
                    if topic_matches(pattern, reply.topic)
                    for sub in subs
                ]
            for sub in targets:
                sub._deliver(reply)
            return False
        rid = reply.id
        ended: list[Subscriber] = []
        with self._lock:
            resolver = self._pending.pop(rid, None) if isinstance(rid, int) else None
            pattern = self._resubscribing.pop(rid, None) if isinstance(rid, int) else None
            if pattern is not None and isinstance(reply, ErrorReply):
                ended = self._subs.pop(pattern, [])
            ready = pattern is not None and not self._resubscribing
        if resolver is not None:
            resolver(reply)
        elif isinstance(reply, ErrorReply):
            error = error_from_reply(reply.code, reply.message, reply.id)
            for sub in ended:
                sub._end(error)
            if not ended:
                self._on_error(error)
        # Any other answer belongs to a request whose caller gave up waiting: nothing to do.
        return ready

    # connection life

    def connection_lost(self, error: BaseException) -> None:
        """Fail every waiting request; subscriptions stay for the next connection."""
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            self._resubscribing.clear()
        for resolver in pending:
            resolver(error)

    def close(self, error: BaseException | None) -> None:
        """End every subscription (cleanly when error is None) and fail what still waits."""
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
            self._subs.clear()
        self.connection_lost(error or ClientClosedError("the client was closed"))
        for sub in subs:
            sub._end(error)
