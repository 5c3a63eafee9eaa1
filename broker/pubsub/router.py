"""Requests -> topic routing -> outbound buffers. Sans-IO: the caller owns sockets and time.

Theory of operation: `handle` takes one client message, validates it (wire.messages) and runs it.
A publish is matched against the subscriptions (topics.Sublist, cached), numbered with the topic's
`seq`, encoded once per encoding that has subscribers, and the same frame bytes are appended to
every subscriber's `out`. The router never writes to a socket and never calls a connection: it
appends, and it lists in `dirty` each session whose buffer went from empty to non-empty, so the
loop flushes each one once at the end of the iteration (one send carries many frames).

Slow consumers: a session whose `out` is over the high-water mark gets nothing more (the drop is
counted) and is listed once in `over`; the loop applies the configured policy to it. So a slow
session's memory is bounded by the mark plus one frame, and it never slows anyone else.

Permissions (broker/auth): a session's `grant` is None when auth is off, and then a publish pays
one `is None` test for it. Otherwise a publish outside the token's `publish` claim, or a subscribe
its `subscribe` claim does not cover (permissions.covers), is refused with `forbidden` before it
has any effect. `auth` replaces the grant and removes the subscriptions the new one does not cover.

`seq` is one counter per concrete topic, kept for the most recently published `seq_topics` topics
(an LRU): a topic unseen for that long restarts at 1, which clients treat as a restart, not a gap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from broker.auth.tokens import AuthError, TokenVerifier
from broker.config import Config
from broker.errors import ErrorCode, RequestError
from broker.metrics import Stats
from broker.pubsub.session import Session
from broker.pubsub.topics import Sublist
from broker.wire import codec, messages
from broker.wire.codec import Encoding
from broker.wire.messages import AUTH, PING, PUBLISH, SUBSCRIBE


def _nothing(session: Session) -> None:
    pass


class Router:
    def __init__(self, config: Config, stats: Stats, verifier: TokenVerifier | None = None) -> None:
        self.config = config
        self.stats = stats
        self.verifier = verifier  # None: auth is off
        # Called after `auth` gave a session a new grant (the server re-arms its expiry).
        self.on_grant: Callable[[Session], None] = _nothing
        self.sublist: Sublist[Session] = Sublist(
            attrgetter("encoding"), groups=len(Encoding), cache_size=config.topic_cache_size
        )
        self.seqs: OrderedDict[str, int] = OrderedDict()
        self.dirty: list[Session] = []  # buffers that became non-empty this iteration
        self.over: list[Session] = []  # sessions that went over the high-water mark
        self.topic_counts: dict[str, int] = {}  # publishes per topic since the last stats tick
        self.now = 0.0  # set by the loop each iteration; the rate limiter's clock

    # -- requests ------------------------------------------------------------------------------

    def handle(self, session: Session, payload: str | bytes, binary: bool) -> None:
        """Run one client message; replies go to `session.out`."""
        req_id = None
        try:
            req = messages.parse_request(payload, binary)
            req_id = req.id
            op = req.op
            if op == PUBLISH:
                grant = session.grant
                if grant is not None and not grant.may_publish(req.topic):
                    self._forbid("publish", "publishing to this topic")
                self._check_rate(session)
                delivered = self.publish(req.topic, req.data)
                if req.id is not None:
                    self.reply(session, messages.ack(req.id, session.encoding, delivered))
            elif op == SUBSCRIBE:
                grant = session.grant
                if grant is not None and not grant.may_subscribe(req.topic):
                    self._forbid("subscribe", "subscribing to this pattern")
                self.subscribe(session, req.topic)
                self.reply(session, messages.ack(req.id, session.encoding))
            elif op == PING:
                self.reply(session, messages.pong(req.id, session.encoding))
            elif op == AUTH:
                revoked = self.reauthenticate(session, req.data)
                self.reply(session, messages.auth_ack(req.id, session.encoding, revoked))
            else:
                self.unsubscribe(session, req.topic)
                self.reply(session, messages.ack(req.id, session.encoding))
        except RequestError as exc:
            if exc.request_id is None:
                exc.request_id = req_id
            self.reply(session, messages.error(exc, session.encoding))

    def reply(self, session: Session, frame: bytes) -> None:
        # Replies are not subject to the high-water mark: the loop stops reading a session that
        # is over it, so its own requests cannot grow the buffer without bound.
        if not session.queued:
            self.dirty.append(session)
        session.out.append(frame)
        session.queued += len(frame)

    def _forbid(self, op: str, what: str) -> None:
        self.stats.forbidden[op] += 1
        raise RequestError(ErrorCode.FORBIDDEN, f"the token does not allow {what}")

    def reauthenticate(self, session: Session, token: str) -> list[str]:
        """Replace the session's grant with `token`'s; returns the patterns unsubscribed because
        the new grant does not cover them. An invalid token changes nothing (`unauthorized`).
        With auth off the token is ignored, so a client that refreshes works anywhere."""
        verifier = self.verifier
        if verifier is None:
            return []
        try:
            grant = verifier.verify(token)
        except AuthError as exc:
            self.stats.auth_failures[exc.reason] += 1
            raise RequestError(ErrorCode.UNAUTHORIZED, f"invalid token ({exc.reason})") from None
        revoked = sorted(p for p in session.patterns or () if not grant.may_subscribe(p))
        for pattern in revoked:
            self.unsubscribe(session, pattern)
        session.grant = grant
        self.on_grant(session)
        return revoked

    def _check_rate(self, session: Session) -> None:
        rate = self.config.publish_rate
        if not rate:
            return
        burst = self.config.publish_burst
        tokens = min(burst, session.rate_tokens + (self.now - session.rate_at) * rate)
        session.rate_at = self.now
        if tokens < 1.0:
            session.rate_tokens = tokens
            self.stats.dropped["rate_limited"] += 1
            raise RequestError(ErrorCode.RATE_LIMITED, f"over {rate:g} publishes/s")
        session.rate_tokens = tokens - 1.0

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(self, session: Session, pattern: str) -> None:
        patterns = session.patterns
        if patterns is None:
            patterns = session.patterns = set()
        elif pattern in patterns:
            return
        if len(patterns) >= self.config.max_subscriptions:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"too many subscriptions (limit {self.config.max_subscriptions})",
            )
        patterns.add(pattern)
        self.sublist.insert(pattern, session)

    def unsubscribe(self, session: Session, pattern: str) -> None:
        if not session.patterns or pattern not in session.patterns:
            raise RequestError(ErrorCode.NOT_FOUND, "not subscribed to that topic")
        session.patterns.discard(pattern)
        self.sublist.remove(pattern, session)

    def drop(self, session: Session) -> None:
        """Forget every subscription of a session that is going away."""
        if session.patterns:
            for pattern in session.patterns:
                self.sublist.remove(pattern, session)
        session.patterns = None

    # -- publish -------------------------------------------------------------------------------

    def next_seq(self, topic: str) -> int:
        seqs = self.seqs
        seq = seqs.get(topic)
        if seq is None:
            seq = 1
            if len(seqs) >= self.config.seq_topics:
                seqs.popitem(last=False)
        else:
            seq += 1
            seqs.move_to_end(topic)
        seqs[topic] = seq
        return seq

    def publish(self, topic: str, data: Any) -> int:
        """Queue `data` to every subscriber of concrete `topic`; returns how many got it."""
        stats = self.stats
        stats.published += 1
        counts = self.topic_counts
        counts[topic] = counts.get(topic, 0) + 1
        seq = self.next_seq(topic)
        delivered = 0
        for encoding, subs in enumerate(self.sublist.match(topic)):
            if not subs:
                continue
            try:
                frame = messages.message(topic, data, seq, Encoding(encoding))
            except codec.EncodeError:
                stats.dropped["unencodable"] += len(subs)
                continue
            delivered += self._fan_out(subs, frame)
        stats.delivered += delivered
        return delivered

    def _fan_out(self, subs: tuple[Session, ...], frame: bytes) -> int:
        """The hot loop: one append of the shared frame per subscriber, nothing copied."""
        high_water = self.config.outbound_high_water
        dirty = self.dirty
        size = len(frame)
        dropped = 0
        for session in subs:
            queued = session.queued
            if not queued:
                dirty.append(session)
            elif queued > high_water:
                dropped += 1
                if not session.slow:
                    session.slow = True
                    self.over.append(session)
                continue
            session.out.append(frame)
            session.queued = queued + size
        if dropped:
            self.stats.dropped["slow_consumer"] += dropped
        return len(subs) - dropped
