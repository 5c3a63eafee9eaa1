"""Messages that cross a process boundary: what the router shares with any hub (issue 10).

Theory of operation: with a backplane, this process does not number its own publishes. One place,
the hub, owns every topic's (epoch, seq) and history and routes each message to the processes that
have a matching subscriber, the origin included: local fan-out happens when the message comes back
(`Router.deliver`). The hub is the supervising parent with `--workers N` (broker/net/hub.py) or
Redis with `--redis URL`. Both transports subclass `Backplane`, which keeps what they share:

    interest     a refcount of the (pattern, encoding) pairs local sessions hold; the hub hears
                 of a pair on its first subscriber and of its end with its last (`send_interest`),
                 so it forwards a message only to processes that need it, in the encodings they
                 need, and each process gets it once whatever its subscriber count
    pending      requests awaiting the hub's answer (publish confirmations, positions, windows,
                 history), by request number. Bounded (`max_pending`): past it, or while the hub
                 is down, a request is refused at once with `unavailable` (HTTP 503), never held
                 until the hub returns; a hub lost with requests in flight fails them all with
                 `unavailable` (`went_down`), so nothing is lost silently
    recovery     a subscribe to a concrete topic is answered by the hub (its position, and with
                 `since` the frames to replay). Until then the session is not in the sublist: the
                 live messages of its topic are buffered in its `Recovery`; the answer queues the
                 ack, the replay, then the buffered messages with a seq after the hub's position,
                 and only then adds the session to the sublist. A message is therefore delivered
                 exactly once and in order, whether the transport's message channel is ordered
                 with its answers (the hub's socketpair: nothing buffered is newer) or not (Redis)

A transport implements the four `send_*` methods and calls `resolve`, `went_down` and the router's
`deliver`. Results handed to `resolve` (and so to the callbacks):

    publish      (epoch, seq, delivered)         delivered: subscribers queued, over all processes
    window       (epoch, seq, recovered, frames) frames: the replay in the asked encoding (None for
                                                 a message with no form in it)
    history      (epoch, seq, recovered, [(seq, data), ...])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from broker.errors import ErrorCode, RequestError
from broker.wire.messages import Since

Done = Callable[[Any], None]  # called once with the result or a RequestError

UNAVAILABLE = "the broker cannot reach its backplane; try again"


def unavailable(message: str = UNAVAILABLE) -> RequestError:
    return RequestError(ErrorCode.UNAVAILABLE, message)


class Recovery:
    """A subscribe to a concrete topic awaiting the hub's answer; live messages wait in
    `buffered` as (seq, frames) so none is lost or doubled when the answer comes."""

    __slots__ = ("added", "buffered", "cancelled", "req_id", "session", "since", "topic")

    def __init__(self, session: Any, topic: str, req_id: object, since: Since | None, added: bool):
        self.session = session
        self.topic = topic
        self.req_id = req_id
        self.since = since
        self.added = added  # False: the session already held it (no replay, no insert)
        self.buffered: list[tuple[int, Any]] = []
        self.cancelled = False


class Backplane:
    """The sans-IO half every transport shares; see the module docstring."""

    def __init__(self, max_pending: int = 65536) -> None:
        self.up = False
        self.max_pending = max_pending
        self.interest: dict[tuple[str, int], int] = {}
        self.pending: dict[int, Done] = {}
        self.recovering: dict[str, list[Recovery]] = {}
        self._numbers = itertools.count(1)
        # Counts for the metrics (broker_backplane_*).
        self.refused = 0  # requests refused with `unavailable`
        self.failed = 0  # requests in flight failed by a lost hub

    # -- what a transport implements ---------------------------------------------------------

    def send_interest(self, pattern: str, encoding: int, add: bool) -> None:
        raise NotImplementedError

    def send_publish(self, n: int, topic: str, data: Any, size: int) -> None:
        """n = 0: no confirmation wanted (the hub still numbers and routes it)."""
        raise NotImplementedError

    def send_window(self, n: int, topic: str, encoding: int, since: Since | None) -> None:
        raise NotImplementedError

    def send_history(
        self, n: int, topic: str, since: Since | None, limit: int, budget: int
    ) -> None:
        raise NotImplementedError

    def buffered_bytes(self) -> int:
        """Bytes queued to the hub and not yet written (a gauge)."""
        return 0

    def congested(self) -> bool:
        """True when the transport's outbound buffer is over its bound: refuse new requests."""
        return False

    def barrier(self, done: Done) -> None:
        """Call `done` once the hub has taken every interest change sent so far (the ack of a
        wildcard subscribe waits for it, so a publish made elsewhere after the ack reaches it).
        Here at once; the hub link waits for the hub's answer to a barrier message, the Redis
        transport for a PING's reply on its one connection."""
        done(None)

    # -- what the router calls ---------------------------------------------------------------

    def want(self, pattern: str, encoding: int) -> None:
        key = (pattern, encoding)
        count = self.interest.get(key, 0)
        self.interest[key] = count + 1
        if not count and self.up:
            self.send_interest(pattern, encoding, True)

    def unwant(self, pattern: str, encoding: int) -> None:
        key = (pattern, encoding)
        count = self.interest.get(key, 0)
        if count <= 1:
            self.interest.pop(key, None)
            if count and self.up:
                self.send_interest(pattern, encoding, False)
        else:
            self.interest[key] = count - 1

    def _number(self, done: Done | None) -> int:
        if not self.up or len(self.pending) >= self.max_pending or self.congested():
            self.refused += 1
            raise unavailable()
        if done is None:
            return 0
        n = next(self._numbers)
        self.pending[n] = done
        return n

    def publish(self, topic: str, data: Any, size: int, done: Done | None) -> None:
        """Hand a publish to the hub; RequestError(unavailable) at once if it cannot go."""
        self.send_publish(self._number(done), topic, data, size)

    def window(self, topic: str, encoding: int, since: Since | None, done: Done) -> None:
        self.send_window(self._number(done), topic, encoding, since)

    def history(self, topic: str, since: Since | None, limit: int, budget: int, done: Done) -> None:
        self.send_history(self._number(done), topic, since, limit, budget)

    # -- what the transport calls ------------------------------------------------------------

    def resolve(self, n: int, result: Any) -> None:
        done = self.pending.pop(n, None)
        if done is not None:
            done(result)

    def came_up(self) -> None:
        """The hub is reachable (again): tell it every pattern held here."""
        self.up = True
        for pattern, encoding in self.interest:
            self.send_interest(pattern, encoding, True)

    def went_down(self) -> None:
        """The hub is gone: every request in flight fails with `unavailable`."""
        self.up = False
        pending, self.pending = self.pending, {}
        self.failed += len(pending)
        for done in pending.values():
            done(unavailable("the backplane went away before answering"))
