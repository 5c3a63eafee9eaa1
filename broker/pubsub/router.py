"""Requests -> topic routing -> outbound buffers. Sans-IO: the caller owns sockets and time.

Theory of operation: `handle` takes one client message, validates it (wire.messages) and runs it.
A publish is matched against the subscriptions (topics.Sublist, cached), numbered with the topic's
`seq`, encoded once per encoding that has subscribers, and the same frame bytes are appended to
every subscriber's `out`. The router never writes to a socket and never calls a connection: it
appends, and it lists in `dirty` each session whose buffer went from empty to non-empty, so the
loop flushes each one once at the end of the iteration (one send carries many frames). One
exception, decided by the loop: for a read that is the iteration's only input (`handle_batch`'s
`lone`), there is nothing to coalesce, and the fan-out first hands the frame to the loop's
`write_through`, which writes it at once to each subscriber with an empty buffer and hands back
the others to be appended as usual (docs/design.md, "Write-through").

Slow consumers: a delivery that finds a session's `out` over the high-water mark does not append;
it applies the topic's overflow policy (pubsub/overflow.py, resolved only on this slow path):
`drop` counts the loss, `conflate` keeps the frame as the topic's newest in `session.conflated`
(replacing an older one, counted as dropped) until a flush brings the session back under the
mark and `release` queues them, and `disconnect` lists the session once in `over` for the loop
to close with 1008. So a slow session's memory is bounded by the mark plus one frame, plus at
most the mark again in conflated frames (past that, conflate disconnects), and it never slows
anyone else. The default policy costs the fan-out loop nothing more than before: one comparison.

Permissions (broker/auth): a session's `grant` is None when auth is off, and then a publish pays
one `is None` test for it. Otherwise a publish outside the token's `publish` claim, or a subscribe
its `subscribe` claim does not cover (permissions.covers), or a `history` request (op or
HTTP) for a topic the `subscribe` claim does not cover, is refused with `forbidden` before it
has any effect. `auth` replaces the grant and removes the subscriptions the new one does not cover.

Positions and history (`pubsub/history.py`, behind the `Streams` seam): a publish is numbered
by `streams.append` and the frames fan-out made are kept with it (`keep`), so a replay re-encodes
nothing. A subscribe to a concrete topic is acked with the topic's (epoch, seq); with `since`, the
ack says whether the messages after it are all retained and, if so, they are queued right behind
the ack, in the same call that adds the subscription, so no publish can fall between replay and
live delivery: no gap, no duplicate. A replay that would take the buffer past the high-water mark
is not counted as lag: it goes to `session.backlog` (with what `out` held before it), which the
connection writes first, a chunk per flush as the socket drains, while live frames wait in `out`
(still counted, so a client that cannot keep up with the live rate is still a slow consumer).

With a backplane (`pubsub/backplane.py`: `--workers N`, `--redis`), `self.backplane` is set and a
publish, a subscribe to a concrete topic and a `history` request become requests to the hub,
answered by callbacks: the hub numbers every message and sends it back to each process with a
matching subscriber (`deliver`, which fans out the frames the hub made). The publish ack then
waits for the hub's confirmation and its `delivered` counts the subscribers of every process. A
subscribe to a concrete topic is acked when the hub has answered with its position (and replay):
the session enters the sublist only then, its topic's live messages buffered meanwhile in a
`Recovery` (exactly once, in order). Without a backplane (`backplane is None`) none of this runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

from broker.auth.tokens import AuthError, TokenVerifier
from broker.config import Config
from broker.errors import ErrorCode, RequestError
from broker.metrics import Stats
from broker.pubsub.backplane import Backplane, Recovery
from broker.pubsub.history import Entry, LocalStreams, Streams, Window
from broker.pubsub.overflow import CONFLATE, DISCONNECT, NAMES, Conflated, OverflowPolicies
from broker.pubsub.session import Session
from broker.pubsub.topics import Sublist
from broker.speedups import load
from broker.wire import codec, messages
from broker.wire.codec import Encoding
from broker.wire.inbound import Ping, pong_frame
from broker.wire.messages import (
    AUTH,
    HISTORY,
    PING,
    PUBLISH,
    SUBSCRIBE,
    Request,
    Since,
    is_pattern,
)

_JSON, _MSGPACK = Encoding  # by value: the order of the Sublist's groups

# Topics whose publishes are counted per stats tick (GET /topics, the busiest list); publishes to
# further topics in the same tick still count in the totals, not per topic.
TOPIC_RATES_MAX = 10_000

_speedups = load("broker.pubsub._speedups")
if _speedups is not None:
    _speedups.bind(Session)


def _nothing(session: Session) -> None:
    pass


def _write_nothing(subs: tuple[Session, ...], frame: bytes) -> tuple[Session, ...]:
    return subs


def window_messages(window: Window, budget: int) -> list[tuple[int, Any]]:
    """(seq, data) of a history window, cut after `budget` bytes (at least one message), so
    that any client can read the reply; the caller asks again from the last seq it got."""
    found = []
    for entry in window.entries:
        found.append((entry.seq, entry.data))
        budget -= entry.size
        if budget <= 0:
            break
    return found


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
        self.streams: Streams = LocalStreams(
            config.history_size,
            config.history_ttl,
            config.history_memory,
            config.seq_topics,
            stats.history_evictions,
        )
        self.dirty: list[Session] = []  # buffers that became non-empty this iteration
        # A delivery found a buffer past half the high-water mark: write now, hold nothing back.
        self.urgent = False
        self.over: list[Session] = []  # sessions to close as slow consumers (disconnect policy)
        self.overflow = OverflowPolicies(
            config.overflow, config.slow_consumer_policy, config.topic_cache_size
        )
        self.topic_counts: dict[str, int] = {}  # publishes per topic since the last stats tick
        self.now = 0.0  # set by the loop each iteration; the rate limiter's clock
        self.backplane: Backplane | None = None  # set by the server with --workers/--redis
        # The loop's way to write a frame to subscribers at once (net.connection.write_through),
        # used while `write_now` is set: see `handle_batch`. It hands back those it did not write.
        self.write_through: Callable[[tuple[Session, ...], bytes], tuple[Session, ...] | None]
        self.write_through = _write_nothing
        self.write_now = False

    # -- requests ------------------------------------------------------------------------------

    def handle(
        self, session: Session, payload: str | bytes, binary: bool, simple_form: bool = True
    ) -> None:
        """Run one client message; replies go to `session.out`. `simple_form` False: the caller
        found it is not a publish in `messages.simple_publish`'s form (skip that test)."""
        req_id: Any = None
        try:
            simple = None
            if simple_form and not binary:
                simple = messages.simple_publish(payload)  # type: ignore[arg-type]
            if simple is not None:
                topic, data, req_id = simple
                self._publish(session, topic, data, req_id, len(payload), True)
                return
            req = messages.parse_request(payload, binary)
            req_id = req.id
            op = req.op
            if op == PUBLISH:
                self._publish(session, req.topic, req.data, req_id, len(payload))
            elif op == SUBSCRIBE:
                grant = session.grant
                if grant is not None and not grant.may_subscribe(req.topic):
                    self._forbid("subscribe", "subscribing to this pattern")
                if self.backplane is not None:
                    self._subscribe_remote(session, req)
                else:
                    self._subscribe(session, req)
            elif op == PING:
                self.reply(session, messages.pong(req.id, session.encoding))
            elif op == AUTH:
                revoked = self.reauthenticate(session, req.data)
                self.reply(session, messages.auth_ack(req.id, session.encoding, revoked))
            elif op == HISTORY:
                grant = session.grant
                if grant is not None and not grant.may_subscribe(req.topic):
                    self._forbid("history", "reading this topic")
                if self.backplane is not None:
                    self._history_remote(session, req)
                else:
                    self.reply(
                        session, self.history(req.topic, req.since, req.limit, session, req.id)
                    )
            else:
                self.unsubscribe(session, req.topic)
                self.reply(session, messages.ack(req.id, session.encoding))
        except RequestError as exc:
            if exc.request_id is None:
                exc.request_id = req_id
            self.reply(session, messages.error(exc, session.encoding))

    def _publish(
        self, session: Session, topic: str, data: Any, req_id: Any, size: int, plain: bool = False
    ) -> None:
        """`plain`: `data` is a string of printable ASCII without quotes or backslashes
        (messages.simple_publish), so its JSON form is itself in quotes."""
        grant = session.grant
        if grant is not None and not grant.may_publish(topic):
            self._forbid("publish", "publishing to this topic")
        if self.config.publish_rate:
            self._check_rate(session)
        if self.backplane is not None:
            self._publish_remote(session, topic, data, req_id, size)
            return
        delivered = self.publish(topic, data, size, plain)
        if req_id is not None:
            self.reply(session, messages.ack(req_id, session.encoding, delivered))

    def handle_batch(
        self, session: Session, events: list[str | bytes | Ping], lone: bool = False
    ) -> None:
        """Run the messages of one read in order (text: JSON, bytes: msgpack) and answer its
        pings with pongs, in their place among the replies. `lone`: the caller knows nothing
        else will queue output this iteration, so a lone message's deliveries are written at
        once (`write_through`) instead of buffered for the end-of-iteration flush: with nothing
        to coalesce, buffering only delays them (W3 in docs/benchmarks.md)."""
        self.write_now = lone and len(events) == 1
        try:
            handle = self.handle
            # A publisher's batch, the common case: with nothing to check per session (no token, no
            # rate limit, no backplane), a publish in the fast form goes straight to the fan-out
            # (`_publish`'s last two steps, inlined: a call less per publish is 2% of W4's).
            direct = (
                session.grant is None and not self.config.publish_rate and self.backplane is None
            )
            simple_publish = messages.simple_publish
            publish = self.publish
            for event in events:
                kind = type(event)
                if kind is str:
                    if direct:
                        try:
                            simple = simple_publish(event)  # type: ignore[arg-type]
                        except RequestError:  # a bad topic: `handle` answers it
                            handle(session, event, False)  # type: ignore[arg-type]
                            continue
                        if simple is None:  # any other request: the full parser, no second test
                            handle(session, event, False, False)  # type: ignore[arg-type]
                            continue
                        topic, data, req_id = simple
                        delivered = publish(topic, data, len(event), True)
                        if req_id is not None:
                            self.reply(session, messages.ack(req_id, session.encoding, delivered))
                        continue
                    handle(session, event, False)  # type: ignore[arg-type]
                elif kind is bytes:
                    handle(session, event, True)  # type: ignore[arg-type]
                else:
                    self.reply(session, pong_frame(event.payload))  # type: ignore[union-attr]
        finally:  # never beyond this batch: a backplane's deliveries are not this read's
            self.write_now = False

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

    def _subscribe(self, session: Session, req: Request) -> None:
        topic = req.topic
        added = self.subscribe(session, topic)
        encoding = session.encoding
        if is_pattern(topic):
            self.reply(session, messages.ack(req.id, encoding))
            return
        since = req.since
        if since is None:
            epoch, seq = self.streams.position(topic)
            self.reply(session, messages.position_ack(req.id, encoding, epoch, seq))
            return
        self.streams.position(topic)  # a subscribe creates the topic's stream (its epoch)
        window = self.streams.since(topic, since.epoch, since.seq, None, self.now)
        # A subscription the connection already held gets nothing replayed: it has been live.
        recovered = window.recovered and added
        self.reply(
            session,
            messages.position_ack(req.id, encoding, window.epoch, window.seq, recovered),
        )
        if recovered and window.entries:
            self._replay(session, topic, window.entries)

    def _replay(self, session: Session, topic: str, entries: list[Entry]) -> None:
        """Queue `entries` right behind what `session` already has: in `out` when they fit under
        the high-water mark, else in the backlog, written first as the socket drains."""
        frames: list[bytes | memoryview] = []
        make = self.streams.frame
        encoding = session.encoding
        for entry in entries:
            frame = make(entry, topic, encoding)
            if frame is None:
                self.stats.dropped["unencodable"] += 1
                continue
            frames.append(frame)
        if frames:
            self._queue_replay(session, frames)

    def _queue_replay(self, session: Session, frames: list[bytes | memoryview]) -> None:
        size = sum(map(len, frames))
        self.stats.replayed += len(frames)
        backlog = session.backlog
        if backlog is None and session.queued + size <= self.config.outbound_high_water:
            if not session.queued:
                self.dirty.append(session)
            session.out.extend(frames)
            session.queued += size
            return
        if backlog is None:
            backlog = session.backlog = deque()
        if session.conflated is not None:
            self.release(session)  # into `out`, so into the backlog ahead of the replay
        backlog.extend(session.out)
        backlog.extend(frames)
        session.out = []
        session.queued = 0
        self.dirty.append(session)

    def subscribe(self, session: Session, pattern: str) -> bool:
        """Add a subscription; False if the session already held it."""
        patterns = session.patterns
        if patterns is None:
            patterns = session.patterns = set()
        elif pattern in patterns:
            return False
        if len(patterns) >= self.config.max_subscriptions:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"too many subscriptions (limit {self.config.max_subscriptions})",
            )
        patterns.add(pattern)
        self.sublist.insert(pattern, session)
        return True

    def unsubscribe(self, session: Session, pattern: str) -> None:
        if not session.patterns or pattern not in session.patterns:
            raise RequestError(ErrorCode.NOT_FOUND, "not subscribed to that topic")
        session.patterns.discard(pattern)
        self.sublist.remove(pattern, session)
        if self.backplane is not None:
            self._forget_remote(session, pattern)

    def drop(self, session: Session) -> None:
        """Forget every subscription of a session that is going away."""
        if session.patterns:
            backplane = self.backplane
            for pattern in session.patterns:
                self.sublist.remove(pattern, session)
                if backplane is not None:
                    self._forget_remote(session, pattern)
        session.patterns = None
        session.conflated = None

    # -- publish -------------------------------------------------------------------------------

    def history(
        self, topic: str, since: Since | None, limit: int, session: Session | None, req_id: object
    ) -> bytes:
        """The `history` op's ack (HTTP: `history_body`)."""
        encoding = Encoding.JSON if session is None else session.encoding
        body = self.history_body(topic, since, limit, encoding)
        return self.history_reply(req_id, encoding, body)

    def history_reply(self, req_id: object, encoding: Encoding, body: dict[str, Any]) -> bytes:
        """The `history` op's ack around `body`, leaving out messages with no form in
        `encoding` (as live delivery does)."""
        try:
            return messages.history_ack(req_id, encoding, body)
        except codec.EncodeError:
            # Some data has no form in this encoding: leave those messages out, as live does.
            kept = []
            for m in body["messages"]:
                try:
                    codec.encode_payload(m, encoding)
                except codec.EncodeError:
                    self.stats.dropped["unencodable"] += 1
                else:
                    kept.append(m)
            body["messages"] = kept
            return messages.history_ack(req_id, encoding, body)

    def history_body(
        self, topic: str, since: Since | None, limit: int, encoding: Encoding
    ) -> dict[str, Any]:
        """Position, `recovered` and at most `limit` messages; the reply is also cut after
        --max-message-size bytes of messages (at least one message), so that any client can
        read it; the caller asks again from the last seq it got."""
        epoch, seq = (None, 0) if since is None else since
        window = self.streams.since(topic, epoch, seq, limit, self.now)
        found = window_messages(window, self.config.max_message_size)
        return messages.history_body(window.epoch, window.seq, window.recovered, found, encoding)

    def publish(self, topic: str, data: Any, size: int = 0, plain: bool = False) -> int:
        """Queue `data` to every subscriber of concrete `topic`; returns how many got it.
        `size` is the size of the request that carried it (history memory accounting); `plain`
        as in `_publish`."""
        stats = self.stats
        stats.published += 1
        counts = self.topic_counts  # _count, inlined: this runs once per publish
        n = counts.get(topic)
        if n is not None:
            counts[topic] = n + 1
        elif len(counts) < TOPIC_RATES_MAX:
            counts[topic] = 1
        entry = self.streams.append(topic, data, size, self.now)
        json_subs, msgpack_subs = self.sublist.match(topic)
        delivered = 0
        if json_subs:
            delivered = self._encode_fan_out(entry, topic, data, _JSON, json_subs, plain)
        if msgpack_subs:
            delivered += self._encode_fan_out(entry, topic, data, _MSGPACK, msgpack_subs)
        stats.delivered += delivered
        return delivered

    def _encode_fan_out(
        self,
        entry: Entry,
        topic: str,
        data: Any,
        encoding: Encoding,
        subs: tuple[Session, ...],
        plain: bool = False,
    ) -> int:
        """Make the message's frame in `encoding`, keep it with the entry, queue it to `subs`."""
        try:
            frame = messages.message(topic, data, entry.seq, encoding, plain)
        except codec.EncodeError:
            self.stats.dropped["unencodable"] += len(subs)
            return 0
        self.streams.keep(entry, encoding, frame)
        return self._fan_out(subs, frame, topic)

    def _count(self, topic: str) -> None:
        """One publish to `topic` in this stats tick (bounded: see TOPIC_RATES_MAX)."""
        counts = self.topic_counts
        n = counts.get(topic)
        if n is not None:
            counts[topic] = n + 1
        elif len(counts) < TOPIC_RATES_MAX:
            counts[topic] = 1

    def _fan_out(self, subs: tuple[Session, ...], frame: bytes, topic: str) -> int:
        """The hot loop: one append of the shared frame per subscriber, nothing copied. In C
        when the speedup is built; it leaves a session over half the mark to `_fan_out_py`.
        With `write_now`, the loop first writes the frame to every subscriber it can."""
        delivered = 0
        if self.write_now:
            rest = self.write_through(subs, frame)
            if rest is None:
                return len(subs)
            delivered = len(subs) - len(rest)
            subs = rest
        if _speedups is None:
            return delivered + self._fan_out_py(subs, frame, topic)
        rest = _speedups.fan_out(subs, frame, self.dirty, self.config.outbound_high_water >> 1)
        if rest is None:
            return delivered + len(subs)
        return delivered + len(subs) - len(rest) + self._fan_out_py(rest, frame, topic)

    def _fan_out_py(self, subs: Sequence[Session], frame: bytes, topic: str) -> int:
        """`_fan_out` in Python, and the C twin's path for sessions over half the mark."""
        high_water = self.config.outbound_high_water
        half = high_water >> 1
        dirty = self.dirty
        size = len(frame)
        dropped = 0
        for session in subs:
            queued = session.queued
            if not queued:
                dirty.append(session)
            elif queued > half:
                if queued > high_water:
                    dropped += self._overflow(session, topic, frame)
                    continue
                self.urgent = True
            session.out.append(frame)
            session.queued = queued + size
        if dropped:
            self.stats.dropped["slow_consumer"] += dropped
        return len(subs) - dropped

    # -- with a backplane (pubsub/backplane.py) ------------------------------------------------

    def _publish_remote(
        self, session: Session, topic: str, data: Any, req_id: Any, size: int
    ) -> None:
        """Hand a publish to the hub; acked (with `delivered` over every process) when it is
        confirmed. Refused at once with `unavailable` when it cannot go."""
        backplane = self.backplane
        assert backplane is not None
        done = None
        if req_id is not None:

            def done(result: Any) -> None:
                encoding = session.encoding
                if isinstance(result, RequestError):
                    result.request_id = req_id
                    self.reply(session, messages.error(result, encoding))
                else:
                    self.reply(session, messages.ack(req_id, encoding, result[2]))

        backplane.publish(topic, data, size, done)
        self.stats.published += 1
        self._count(topic)

    def publish_remote(self, topic: str, data: Any, size: int, done: Any) -> None:
        """An HTTP publish through the hub; `done` gets (epoch, seq, delivered) or the error."""
        backplane = self.backplane
        assert backplane is not None
        backplane.publish(topic, data, size, done)
        self.stats.published += 1
        self._count(topic)

    def _subscribe_remote(self, session: Session, req: Request) -> None:
        backplane = self.backplane
        assert backplane is not None
        topic = req.topic
        encoding = session.encoding
        if is_pattern(topic):
            if self.subscribe(session, topic):
                backplane.want(topic, encoding)
            req_id = req.id
            backplane.barrier(lambda _: self.reply(session, messages.ack(req_id, encoding)))
            return
        # Held in `patterns` now (limits, unsubscribe), entered in the sublist on the answer.
        patterns = session.patterns
        if patterns is None:
            patterns = session.patterns = set()
        added = topic not in patterns
        if added and len(patterns) >= self.config.max_subscriptions:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"too many subscriptions (limit {self.config.max_subscriptions})",
            )
        rec = Recovery(session, topic, req.id, req.since, added)
        if added:
            patterns.add(topic)
            backplane.want(topic, encoding)  # before the window: the hub sends what follows
            backplane.recovering.setdefault(topic, []).append(rec)
        try:
            backplane.window(topic, encoding, req.since, lambda result: self._answered(rec, result))
        except RequestError:  # refused at once (hub down or too many pending): undo
            if added:
                waiting = backplane.recovering[topic]
                waiting.remove(rec)
                if not waiting:
                    del backplane.recovering[topic]
                backplane.unwant(topic, encoding)
                patterns.discard(topic)
            raise

    def _answered(self, rec: Recovery, result: Any) -> None:
        """The hub's answer to a subscribe: ack, replay, buffered live messages, then live."""
        backplane = self.backplane
        assert backplane is not None
        topic = rec.topic
        waiting = backplane.recovering.get(topic)
        if waiting is not None and rec in waiting:
            waiting.remove(rec)
            if not waiting:
                del backplane.recovering[topic]
        if rec.cancelled:
            return
        session = rec.session
        encoding = session.encoding
        if isinstance(result, RequestError):
            if rec.added and session.patterns is not None:
                session.patterns.discard(topic)
                backplane.unwant(topic, encoding)
            result.request_id = rec.req_id
            self.reply(session, messages.error(result, encoding))
            return
        epoch, seq, recovered, frames = result
        if rec.since is None:
            self.reply(session, messages.position_ack(rec.req_id, encoding, epoch, seq))
        else:
            recovered = recovered and rec.added
            self.reply(session, messages.position_ack(rec.req_id, encoding, epoch, seq, recovered))
            if recovered and frames:
                self._replay_frames(session, frames)
        if rec.added:
            for n, live in rec.buffered:
                frame = live[encoding]
                if n > seq and frame is not None:
                    self._fan_out((session,), frame, topic)
            self.sublist.insert(topic, session)

    def _replay_frames(self, session: Session, frames: list[bytes | None]) -> None:
        found: list[bytes | memoryview] = []
        for frame in frames:
            if frame is None:
                self.stats.dropped["unencodable"] += 1
            else:
                found.append(frame)
        if found:
            self._queue_replay(session, found)

    def _forget_remote(self, session: Session, pattern: str) -> None:
        """A pattern the session no longer holds: release its interest, cancel its recovery."""
        backplane = self.backplane
        assert backplane is not None
        backplane.unwant(pattern, session.encoding)
        waiting = backplane.recovering.get(pattern)
        if waiting:
            for rec in waiting:
                if rec.session is session:
                    rec.cancelled = True

    def _history_remote(self, session: Session, req: Request) -> None:
        backplane = self.backplane
        assert backplane is not None
        req_id = req.id

        def done(result: Any) -> None:
            encoding = session.encoding
            if isinstance(result, RequestError):
                result.request_id = req_id
                self.reply(session, messages.error(result, encoding))
                return
            epoch, seq, recovered, found = result
            body = messages.history_body(epoch, seq, recovered, found, encoding)
            self.reply(session, self.history_reply(req_id, encoding, body))

        backplane.history(req.topic, req.since, req.limit, self.config.max_message_size, done)

    def deliver(self, topic: str, seq: int, frames: list[bytes | None]) -> int:
        """A numbered message from the hub: fan out its frame per encoding (None: no form in
        that encoding) to the local subscribers; returns how many got it."""
        backplane = self.backplane
        if backplane is not None and backplane.recovering:
            waiting = backplane.recovering.get(topic)
            if waiting:
                for rec in waiting:
                    if rec.added:
                        rec.buffered.append((seq, frames))
        delivered = 0
        for encoding, subs in enumerate(self.sublist.match(topic)):
            if not subs:
                continue
            frame = frames[encoding]
            if frame is None:
                self.stats.dropped["unencodable"] += len(subs)
                continue
            delivered += self._fan_out(subs, frame, topic)
        self.stats.delivered += delivered
        return delivered

    def _overflow(self, session: Session, topic: str, frame: bytes) -> int:
        """A delivery to a session over the mark: apply the topic's policy; 1 if the message is
        lost to this session (drop, disconnect), 0 if it is kept (conflate)."""
        policy = self.overflow.resolve(topic)
        if policy == CONFLATE:
            conflated = session.conflated
            if conflated is None:
                conflated = session.conflated = Conflated()
            frames = conflated.frames
            old = frames.get(topic)
            if old is not None:
                conflated.size -= len(old)
                session.dropped += 1
                self.stats.dropped["conflated"] += 1
            elif conflated.size + len(frame) > self.config.outbound_high_water:
                policy = DISCONNECT  # too many topics backed up to keep the newest of each
            if policy == CONFLATE:
                frames[topic] = frame
                conflated.size += len(frame)
                self._mark_slow(session, CONFLATE)
                return 0
        session.dropped += 1
        self._mark_slow(session, policy)
        return 1

    def _mark_slow(self, session: Session, policy: int) -> None:
        """Record that `policy` was applied to `session` in this episode over the mark: counted
        once per episode and policy; a disconnect lists the session in `over` once."""
        slow = session.slow
        if slow & policy:
            return
        if not slow and not session.since:
            session.since = self.now  # over the mark within one iteration: stamp it now
        session.slow = slow | policy
        self.stats.slow_consumers[NAMES[policy]] += 1
        if policy == DISCONNECT:
            self.over.append(session)

    def release(self, session: Session) -> None:
        """Queue a session's conflated frames once it is back under the mark (the caller flushes).

        Each is the newest of its topic and every older frame of that topic is ahead of it in
        `out`, so per-topic order holds. While a session holds conflated frames its `out` stays
        over the mark (this runs as soon as it is not), so the fan-out cannot queue a newer
        frame of a conflated topic ahead of the one held here."""
        conflated = session.conflated
        if conflated is None:
            return
        session.conflated = None
        out = session.out
        for frame in conflated.frames.values():
            out.append(frame)
        session.queued += conflated.size
