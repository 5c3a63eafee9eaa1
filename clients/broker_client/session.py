"""The sans-IO core both client flavours share: requests, subscriptions, positions, recovery, tokens
and the reconnect policy. No sockets, no asyncio, no threads here (but one lock); `aio.py` and
`blocking.py` are I/O shells around it.

Theory of operation. A client owns one `Session` for its whole life, across reconnects. Requests get
an integer id and a resolver (a callable that the async client points at an `asyncio.Future` and the
blocking client at a `concurrent.futures.Future`); `receive(frame)` decodes a frame from the broker,
resolves the request it answers or hands a message to every local subscription whose pattern matches
its topic. `outcome(result)` turns what a resolver got into the reply or the typed exception.

Positions (issue 8). For every concrete-topic subscription the session keeps the topic's
(`epoch`, `seq`): from the subscribe ack, then from every message. After a reconnect
`begin_resubscribe` sends each concrete topic's subscribe with `since` that position; the ack says
`recovered` (the missed messages follow it, in order) or not, and then `on_unrecovered` gets one
`Unrecovered` event so the application reloads its state. A pattern has no position: after a
reconnect it is always reported unrecovered. Nothing is deduplicated: the broker promises no
duplicates, so a `seq` at or below the last one is counted (`stats.out_of_order`) and reported
through `on_error`, and the message is still delivered.

Invariants:
- The broker holds one subscription per pattern, however many local `Subscription`s share it: `add`
  says when the first one needs a wire subscribe and `remove` when the last one needs a wire
  unsubscribe.
- A message reaches every local subscription whose pattern matches, once each (the broker sends a
  connection one copy even when several of its patterns match).
- After a reconnect `begin_resubscribe` makes one subscribe request per pattern, concrete topics
  first (so a pattern's live messages cannot overtake a topic's replay); `receive` returns True when
  the last of them is answered, which is when the client calls itself connected again.
- A position is recorded in `receive`, before any later frame is read, so the message right after an
  ack is checked against it.
- Resolvers and callbacks run outside the lock, so they may call back into the session.

The lock is for the blocking client, whose reader thread and caller threads share the session; the
async client calls in from one thread, where an uncontended lock costs next to nothing.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import (
    BrokerClientError,
    BrokerError,
    ClientClosedError,
    ForbiddenError,
    HandshakeForbiddenError,
    ProtocolError,
    TokenExpiredError,
    UnauthorizedError,
    error_from_reply,
)
from .protocol import (
    Ack,
    Backoff,
    Codec,
    ErrorReply,
    History,
    Message,
    Position,
    Reply,
    is_concrete,
    parse_reply,
    topic_matches,
)

__all__ = [
    "ReconnectPolicy",
    "Resolver",
    "Session",
    "SessionStats",
    "Subscriber",
    "Unrecovered",
    "refresh_delay",
]

Resolver = Callable[[Reply | BaseException], None]


class Subscriber(Protocol):
    """What the session needs from a local subscription."""

    @property
    def topic(self) -> str: ...

    def _deliver(self, message: Message) -> None: ...

    def _end(self, error: BaseException | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Unrecovered:
    """A subscription lost messages it cannot get back: reload the state it feeds.

    `previous` is where the client stood, `current` where live delivery resumes (the topic's new
    position); either is None where there is no position (a pattern; a broker without history)."""

    topic: str
    previous: Position | None
    current: Position | None

    @property
    def reason(self) -> str:
        if self.previous is None or self.current is None:
            return "no position to recover from (a pattern, or a broker without history)"
        if self.previous.epoch != self.current.epoch:
            return f"the topic's epoch changed ({self.previous.epoch} -> {self.current.epoch})"
        return "the messages after it are no longer retained"


@dataclass(slots=True)
class SessionStats:
    """Counts of what the session saw on the wire, for the application and the tests."""

    messages: int = 0
    recovered: int = 0  # resubscriptions answered "recovered": true
    unrecovered: int = 0  # Unrecovered events raised
    gaps: int = 0  # a seq jumped forward (the drop policy, or an unrecovered resubscribe)
    out_of_order: int = 0  # a seq at or below the last one: a broker bug or a reset counter


@dataclass(slots=True)
class _Mark:
    """A topic's position as the session tracks it: updated in place for every message (a
    `Position` per message would cost an allocation each; see `Session._message`)."""

    epoch: str
    seq: int

    def position(self) -> Position:
        return Position(self.epoch, self.seq)


@dataclass(slots=True)
class _Pending:
    resolver: Resolver
    op: str
    topic: str | None
    since: Position | None


def refresh_delay(expires: float, obtained: float, now: float, before: float) -> float:
    """Seconds until a token that expires at `expires` (obtained at `obtained`) should be replaced:
    `before` s ahead of expiry, but never later than two thirds into a short token's life, so a
    60 s token used with `before=30` is still refreshed while a round trip fits."""
    margin = min(before, (expires - obtained) / 3)
    return max(0.0, expires - margin - now)


class ReconnectPolicy:
    """When to try again. A lost connection is reconnected (if `reconnect`), except after a 4001
    close with a token that cannot be renewed. A failed attempt is retried with backoff, except an
    HTTP 403 (never: the broker's perimeter said no) and a 401, which is retried once, and only when
    a token callback can supply a new token; a second 401 in a row ends the client."""

    __slots__ = ("backoff", "reconnect", "renewable")

    def __init__(self, backoff: Backoff, *, reconnect: bool, renewable: bool) -> None:
        self.backoff = backoff
        self.reconnect = reconnect
        self.renewable = renewable

    def after_loss(self, error: BaseException) -> bool:
        if not self.reconnect:
            return False
        return self.renewable or not isinstance(error, TokenExpiredError)

    def attempts(self, error: BaseException) -> Attempts:
        return Attempts(self, error)


class Attempts:
    """The reconnect attempts after one loss: iterate for (attempt, delay); report each failure
    with `failed(error)`; iteration stops when the policy gives up, and `error` says why."""

    __slots__ = ("_delays", "_policy", "_unauthorized", "attempt", "error")

    def __init__(self, policy: ReconnectPolicy, error: BaseException) -> None:
        self._policy = policy
        self._delays = policy.backoff.delays()
        self._unauthorized = 0
        self.attempt = 0
        self.error = error

    def __iter__(self) -> Iterator[tuple[int, float]]:
        while self._go_on():
            self.attempt += 1
            yield self.attempt, next(self._delays)

    def failed(self, error: BaseException) -> None:
        self.error = error
        self._unauthorized = self._unauthorized + 1 if isinstance(error, UnauthorizedError) else 0

    def _go_on(self) -> bool:
        if isinstance(self.error, HandshakeForbiddenError):
            return False
        if self._unauthorized:
            return self._policy.renewable and self._unauthorized < 2
        return True


class Session:
    __slots__ = (
        "_codec",
        "_ids",
        "_lock",
        "_on_error",
        "_on_unrecovered",
        "_pending",
        "_positions",
        "_resubscribing",
        "_subs",
        "stats",
    )

    def __init__(
        self,
        codec: Codec,
        on_error: Callable[[BrokerClientError], None],
        on_unrecovered: Callable[[Unrecovered], None] | None = None,
    ) -> None:
        self._codec = codec
        self._on_error = on_error
        self._on_unrecovered = on_unrecovered
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._subs: dict[str, list[Subscriber]] = {}
        self._positions: dict[str, _Mark] = {}
        self._resubscribing: dict[int, tuple[str, Position | None]] = {}
        self.stats = SessionStats()

    # requests

    def request(
        self, op: str, resolver: Resolver | None = None, **fields: Any
    ) -> tuple[int | None, str | bytes]:
        """A request frame; with a resolver it carries an id and the resolver gets the answer.

        `since` (a `Position`) on a subscribe or history goes on the wire as {"epoch","seq"};
        `since` and `limit` are left out when None."""
        for optional in ("since", "limit"):
            if optional in fields and fields[optional] is None:
                del fields[optional]
        since = fields.get("since")
        if isinstance(since, Position):
            fields["since"] = {"epoch": since.epoch, "seq": since.seq}
        body: dict[str, Any] = {"op": op, **fields}
        if resolver is None:
            return None, self._codec.encode(body)
        with self._lock:
            rid = next(self._ids)
            body["id"] = rid
            frame = self._codec.encode(body)
            topic = fields.get("topic")
            self._pending[rid] = _Pending(
                resolver,
                op,
                topic if isinstance(topic, str) else None,
                since if isinstance(since, Position) else None,
            )
        return rid, frame

    def cancel(self, rid: int) -> None:
        """Forget a request whose caller stopped waiting (timeout, cancellation, failed send)."""
        with self._lock:
            self._pending.pop(rid, None)

    @staticmethod
    def outcome(result: Reply | BaseException) -> Reply:
        """What a resolver received, as the reply or the typed exception it stands for."""
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, ErrorReply):
            raise error_from_reply(result.code, result.message, result.id)
        return result

    @staticmethod
    def history(topic: str, reply: Reply) -> History:
        """The `History` a history ack carries."""
        if not isinstance(reply, Ack) or reply.position is None or reply.messages is None:
            raise ProtocolError(f"history answered without epoch, seq or messages: {reply!r:.200}")
        messages = [Message(topic, data, seq) for seq, data in reply.messages]
        return History(topic, reply.position, bool(reply.recovered), messages)

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
            self._positions.pop(sub.topic, None)
            return True

    def remove_pattern(self, pattern: str) -> list[Subscriber]:
        with self._lock:
            self._positions.pop(pattern, None)
            return self._subs.pop(pattern, [])

    def refused(self, sub: Subscriber, error: BaseException) -> None:
        """A first subscribe was refused: end whoever joined the pattern meanwhile with it too."""
        for other in self.remove_pattern(sub.topic):
            if other is not sub:
                other._end(error)

    def patterns(self) -> list[str]:
        with self._lock:
            return list(self._subs)

    def position(self, topic: str) -> Position | None:
        """The last position seen on a concrete subscribed topic (None before its ack)."""
        with self._lock:
            mark = self._positions.get(topic)
            return mark.position() if mark is not None else None

    def begin_resubscribe(self) -> list[str | bytes]:
        """One subscribe frame per pattern, to send on a fresh connection (maybe none); concrete
        topics with a known position ask for what they missed with `since`."""
        frames: list[str | bytes] = []
        with self._lock:
            self._resubscribing.clear()
            for pattern in sorted(self._subs, key=lambda p: not is_concrete(p)):
                rid = next(self._ids)
                mark = self._positions.get(pattern)
                since = mark.position() if mark is not None else None
                self._resubscribing[rid] = (pattern, since)
                body: dict[str, Any] = {"op": "subscribe", "topic": pattern, "id": rid}
                if since is not None:
                    body["since"] = {"epoch": since.epoch, "seq": since.seq}
                frames.append(self._codec.encode(body))
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
            self._message(reply)
            return False
        rid = reply.id
        ended: list[Subscriber] = []
        unrecovered: Unrecovered | None = None
        with self._lock:
            pending = self._pending.pop(rid, None) if isinstance(rid, int) else None
            resub = self._resubscribing.pop(rid, None) if isinstance(rid, int) else None
            if resub is not None:
                if isinstance(reply, ErrorReply):
                    ended = self._subs.pop(resub[0], [])
                    self._positions.pop(resub[0], None)
                elif isinstance(reply, Ack):
                    unrecovered = self._subscribed(resub[0], resub[1], reply, again=True)
            elif pending is not None and isinstance(reply, Ack):
                if pending.op == "subscribe" and pending.topic is not None:
                    unrecovered = self._subscribed(pending.topic, pending.since, reply, again=False)
                elif pending.op == "auth" and reply.revoked:
                    for pattern in reply.revoked:
                        ended += self._subs.pop(pattern, [])
                        self._positions.pop(pattern, None)
            ready = resub is not None and not self._resubscribing
        if unrecovered is not None:
            self.stats.unrecovered += 1
            if self._on_unrecovered is not None:
                self._on_unrecovered(unrecovered)
        if pending is not None:
            pending.resolver(reply)
        if isinstance(reply, ErrorReply) and pending is None:
            error: BrokerError = error_from_reply(reply.code, reply.message, reply.id)
            for sub in ended:
                sub._end(error)
            if not ended:
                self._on_error(error)
        elif ended:
            revoked = ForbiddenError(
                "forbidden", "the new token no longer allows this subscription"
            )
            for sub in ended:
                sub._end(revoked)
        # Any other answer belongs to a request whose caller gave up waiting: nothing to do.
        return ready

    def _subscribed(
        self, topic: str, since: Position | None, ack: Ack, *, again: bool
    ) -> Unrecovered | None:
        """Record a subscribe ack's position (under the lock); the event to raise, if any."""
        if topic not in self._subs:
            return None  # unsubscribed while the subscribe was on its way
        current = ack.position
        if not is_concrete(topic):
            return Unrecovered(topic, None, None) if again else None
        if since is not None and ack.recovered is True:
            # The missed messages follow this ack: keep counting from where we stood.
            self.stats.recovered += 1
            self._positions[topic] = _Mark(since.epoch, since.seq)
            return None
        if current is not None:
            self._positions[topic] = _Mark(current.epoch, current.seq)
        else:
            self._positions.pop(topic, None)  # a broker without positions (history off)
        if since is not None or again:
            return Unrecovered(topic, since, current)
        return None

    def _message(self, message: Message) -> None:
        with self._lock:
            self.stats.messages += 1
            last = self._positions.get(message.topic)
            problem = None
            if last is not None:
                if message.seq <= last.seq:
                    self.stats.out_of_order += 1
                    problem = ProtocolError(
                        f"seq {message.seq} on {message.topic!r} after {last.seq}: the broker "
                        "promises no duplicates and no reordering"
                    )
                elif message.seq > last.seq + 1:
                    self.stats.gaps += 1
                last.seq = message.seq
            targets = [
                sub
                for pattern, subs in self._subs.items()
                if topic_matches(pattern, message.topic)
                for sub in subs
            ]
        if problem is not None:
            self._on_error(problem)
        for sub in targets:
            sub._deliver(message)

    # connection life

    def connection_lost(self, error: BaseException) -> None:
        """Fail every waiting request; subscriptions and positions stay for the next connection."""
        with self._lock:
            pending = [p.resolver for p in self._pending.values()]
            self._pending.clear()
            self._resubscribing.clear()
        for resolver in pending:
            resolver(error)

    def close(self, error: BaseException | None) -> None:
        """End every subscription (cleanly when error is None) and fail what still waits."""
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
            self._subs.clear()
            self._positions.clear()
        self.connection_lost(error or ClientClosedError("the client was closed"))
        for sub in subs:
            sub._end(error)
