"""Wiring: config -> loop, listener, router, HTTP API, metrics; the sweep, stats and shutdown.

One `Server` per process. Each loop iteration is: epoll_wait -> events dispatched to the listener
and connections -> signals -> due timers -> `_end_of_iteration` (slow-consumer policy, then one
flush per connection whose buffer became non-empty). Deadlines of connections are checked by
`_sweep`, which visits every connection once a second, in one step per SWEEP_CHUNK connections
spread over the second: one walk over 19,000 connections stalls the loop for milliseconds, and
every message in flight waits for it. An idle broker with few connections still wakes once a
second. Nothing per connection is scheduled.

Token expiry is the exception, because it must be punctual (close 4001 at `exp + leeway`, not up
to a second later): connections whose token expires are kept in one heap of (deadline, n, token,
grant), served by a single loop timer armed for the earliest entry. An entry is stale when its
connection closed (the loop token finds nothing) or re-authenticated (its grant is another
object): stale entries are skipped when they come up, and the heap is rebuilt without them when
they outnumber the connections, so churn cannot grow it without bound.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import json
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from broker import __version__, config, speedups
from broker.auth.perimeter import OriginListError, Perimeter, PerimeterError, client_key
from broker.auth.permissions import Grant
from broker.auth.tokens import AuthConfigError, TokenVerifier
from broker.config import Config
from broker.errors import Closed
from broker.metrics import TOP_LAG_RANKS, Stats, make_registry, render
from broker.net.connection import (
    CLOSED,
    CLOSING,
    HTTP,
    LINGER,
    OPEN,
    Connection,
    flush_all,
    write_through,
)
from broker.net.hub import HubLink
from broker.net.listener import Listener
from broker.net.loop import EventLoop, Timer
from broker.net.reads import ReadBuffer
from broker.net.redis import RedisConfigError, RedisLink
from broker.net.tls import TlsConnection, TlsSetupError, server_context
from broker.pubsub.http_api import HttpApi
from broker.pubsub.router import Router
from broker.pubsub.session import Session
from broker.wire.handshake import HttpRequest
from broker.wire.inbound import PING_FRAME

log = logging.getLogger("broker")

FD_RESERVE = 32  # descriptors kept for the listener, epoll, logs and /proc reads
SWEEP_INTERVAL = 1.0  # each connection's deadlines are checked this often
SWEEP_CHUNK = 2_000  # ... in one step per this many connections (~0.5 ms of Python each)
INTERNAL_ERROR_LOGS_PER_MINUTE = 10
MAX_EXPIRY_DELAY = 10 * 365 * 86400.0  # later than this is never, for the loop's timer
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 20, 10_000  # GET /connections and /topics ?limit=


def metrics_token(cfg: Config) -> str:
    """The --metrics-token, or the first line of --metrics-token-file; AuthConfigError."""
    if not cfg.metrics_token_file:
        return cfg.metrics_token
    try:
        with open(cfg.metrics_token_file, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"--metrics-token-file {cfg.metrics_token_file}: {exc}") from None
    if not token:
        raise AuthConfigError(f"--metrics-token-file {cfg.metrics_token_file} is empty")
    return token


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft
    return soft, hard


class Server:
    def __init__(
        self, cfg: Config, fd_limit: int, worker: tuple[int, socket.socket] | None = None
    ) -> None:
        self.config = cfg
        self.perimeter = Perimeter(
            cfg.allowed_origins, cfg.max_connections_per_ip, cfg.handshake_rate, cfg.handshake_burst
        )  # OriginListError for a bad --allowed-origins
        self.stats = Stats()
        self.fd_limit = fd_limit
        self.max_connections = cfg.max_connections or max(1, fd_limit - FD_RESERVE)
        # Loaded before listening so that a bad file fails the start; SIGHUP replaces it.
        self.tls_context: ssl.SSLContext | None = None
        if cfg.tls_cert:
            self.tls_context = server_context(cfg.tls_cert, cfg.tls_key)
        self.loop = EventLoop(self.stats, fd_limit, cfg.poller)
        self.reader = ReadBuffer(cfg.read_size)  # every connection's reads (net/reads.py)
        self._fd_ceiling_logged = False
        self.router = Router(cfg, self.stats, TokenVerifier.from_config(cfg))
        self.router.on_grant = self.schedule_expiry
        stats, loop = self.stats, self.loop
        self.router.write_through = lambda subs, frame: write_through(subs, frame, stats, loop.now)
        self.registry = make_registry(self.stats, self.gauges)
        self.api = HttpApi(
            self.router,
            lambda: render(self.registry),
            self.snapshot,
            metrics_token(cfg),
            views={"/connections": self.connection_list, "/topics": self.topic_list},
        )
        self._expiries: list[tuple[float, int, int, Grant]] = []
        self._expiry_seq = itertools.count()
        self._expiry_timer: Timer | None = None
        # --workers: this process is worker `index` of a supervisor (broker/supervisor.py).
        self.worker = None if worker is None else worker[0]
        self.upgrade_headers: tuple[tuple[bytes, bytes], ...] = ()
        if worker is not None:
            index, hub_sock = worker
            link = HubLink(hub_sock, self.loop, self.router, self.stats)
            link.render_metrics = lambda: render(self.registry)
            link.on_lost = self.shutdown
            self.router.backplane = self.stats.backplane = link
            self.api.metrics_source = link.gather_metrics
            link.render_stats = self.snapshot
            self.api.stats_source = link.gather_stats
            link.render_view = lambda path, params: self.api.views[path](params)
            link.render_topics = self._topic_figures
            self.api.view_source = lambda path, params, done: link.gather_view(
                path, {**params, "limit": str(_limit(params))}, done
            )
            # Which worker took a connection, for clients and tests that want to know.
            self.upgrade_headers = ((b"x-broker-worker", str(index).encode()),)
        # --redis: this node is one of a cluster sharing a Redis (broker/net/redis.py); with
        # --workers too, each worker talks to Redis itself.
        self.redis: RedisLink | None = None
        if cfg.redis:
            self.redis = RedisLink(cfg, self.loop, self.router, self.stats)
            self.redis.on_gap = self._gap
            self.router.backplane = self.stats.backplane = self.redis
        self.listener = Listener(
            self.loop, cfg.host, cfg.port, cfg.backlog, self.accept, reuse_port=worker is not None
        )
        if worker is not None:
            link.ready()  # listening: the supervisor stops treating an exit as a bad start
        self.connections = 0
        self.stopping = False
        self._error_log_times: list[float] = []
        self._rates: dict[str, Any] = {"published_per_s": 0.0, "delivered_per_s": 0.0}
        self._busiest: list[dict[str, Any]] = []
        # Publishes per topic in the last stats tick (at most router.TOPIC_RATES_MAX topics).
        self._topic_rates: tuple[dict[str, int], float] = ({}, 1.0)
        self._last_tick = (time.monotonic(), 0, 0)
        # Write coalescing under load (_end_of_iteration): a recv filled --read-size in this
        # iteration, and since when deliveries have been held back (0.0: they are not).
        self.busy = False
        self.held_since = 0.0
        self.loop.after_events.append(self._end_of_iteration)
        self.loop.on_signal = self._on_signal
        self._sweep_step = 0  # the next sweep step visits slots step, step + steps, ...
        self._sweep_steps = 1  # steps in this round (one round a second)
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- connections ---------------------------------------------------------------------------

    def accept(self, sock: socket.socket, host: str) -> None:
        self.stats.accepted += 1
        if self.connections >= self.max_connections or self.stopping:
            sock.close()
            self.stats.closed[Closed.MAX_CONNECTIONS] += 1
            return
        if sock.fileno() >= self.loop.fd_ceiling:
            self._over_fd_ceiling(sock)
            return
        sock.setblocking(False)
        # Nagle would hold back small frames waiting for ACKs; we coalesce writes ourselves.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        peer = client_key(host)
        if self.tls_context is None:
            Connection(sock, self, peer)
        else:
            TlsConnection(sock, self, self.tls_context, peer)

    def _over_fd_ceiling(self, sock: socket.socket) -> None:
        """--poller select cannot watch this fd (FD_SETSIZE): close it, count it, say so once."""
        fd = sock.fileno()
        sock.close()
        self.stats.closed[Closed.POLLER_FD_LIMIT] += 1
        if not self._fd_ceiling_logged:
            self._fd_ceiling_logged = True
            log.warning(
                "--poller %s cannot watch fd %d (select's FD_SETSIZE is %d): connections "
                "accepted on fds >= %d are closed at once and counted in "
                'broker_connections_closed_total{reason="poller_fd_limit"}; '
                "this message is logged once; --poller epoll (the default) has no such limit",
                self.loop.poller_name,
                fd,
                self.loop.fd_ceiling,
                self.loop.fd_ceiling,
            )

    def closed(self, conn: Connection, reason: Closed) -> None:
        """Every connection ends here once (abort), whatever the path that closed it."""
        self.connections -= 1
        self.stats.closed[reason] += 1
        if conn.counted:
            conn.counted = False
            self.perimeter.release(conn.peer)

    def admit(self, conn: Connection, req: HttpRequest) -> None:
        """The perimeter's checks on an upgrade, before its own: raises HandshakeError (via
        `PerimeterError`: 429, 503 or 403), counted by reason. An admitted connection counts
        against its address until `closed`."""
        perimeter = self.perimeter
        if perimeter.active:
            try:
                conn.counted = perimeter.admit(conn.peer, req.headers, self.loop.now)
            except PerimeterError as exc:
                self.stats.handshakes_refused[exc.reason] += 1
                raise

    def internal_error(self, conn: Connection, exc: BaseException) -> None:
        """A bug while serving `conn`: report it and close that connection with 1011."""
        self.report_bug(conn, exc)
        try:
            conn.close(Closed.INTERNAL_ERROR, "internal error")
        except Exception:
            conn.reason = Closed.INTERNAL_ERROR
            conn.abort(Closed.INTERNAL_ERROR)

    def report_bug(self, conn: Connection, exc: BaseException) -> None:
        """Count a bug and log it (at most INTERNAL_ERROR_LOGS_PER_MINUTE a minute)."""
        self.stats.internal_errors += 1
        now = time.monotonic()
        times = self._error_log_times = [t for t in self._error_log_times if now - t < 60]
        if len(times) < INTERNAL_ERROR_LOGS_PER_MINUTE:
            times.append(now)
            log.error("error serving connection fd=%d, closing it", conn.fd, exc_info=exc)

    # -- authentication ------------------------------------------------------------------------

    def authenticate(self, req: HttpRequest) -> Grant | None:
        """The upgrade's Grant (None when auth is off), else HandshakeError 401."""
        return self.api.authenticate(req, allow_query=True)

    def schedule_expiry(self, session: Session) -> None:
        """Close `session` with 4001 when its current grant's token expires (plus leeway)."""
        grant = session.grant
        if grant is None or grant.expires is None or not isinstance(session, Connection):
            return
        leeway = self.config.auth_leeway
        delay = grant.expires + leeway - time.time()
        if delay > MAX_EXPIRY_DELAY:
            return
        when = self.loop.now + max(0.0, delay)
        heap = self._expiries
        heapq.heappush(heap, (when, next(self._expiry_seq), session.token, grant))
        if len(heap) > 2 * self.connections + 1024:
            self._expiries = heap = [e for e in heap if self._expiry_live(e[2], e[3])]
            heapq.heapify(heap)
        timer = self._expiry_timer
        if timer is None or when < timer.when:
            if timer is not None:
                timer.cancel()
            self._expiry_timer = self.loop.call_later(when - self.loop.now, self._expire)

    def _expiry_live(self, token: int, grant: Grant) -> Connection | None:
        conn = self.loop.table.get(token)
        if isinstance(conn, Connection) and conn.grant is grant and conn.state != CLOSED:
            return conn
        return None

    def _expire(self) -> None:
        self._expiry_timer = None
        now = self.loop.now
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, token, grant = heapq.heappop(heap)
            conn = self._expiry_live(token, grant)
            if conn is not None and conn.state == OPEN:
                try:
                    conn.close(Closed.TOKEN_EXPIRED, "token expired")
                except Exception as exc:
                    self.internal_error(conn, exc)
        if heap:
            self._expiry_timer = self.loop.call_later(heap[0][0] - now, self._expire)

    def _gap(self, topic: str) -> None:
        """Redis lost what this node missed of `topic` during an outage: close the exact
        subscribers of `topic` (1012) so that they resubscribe and learn it through `since`."""
        for conn in self._connections():
            if conn.state == OPEN and conn.patterns and topic in conn.patterns:
                conn.close(Closed.BACKPLANE_GAP, "missed messages are gone; resubscribe")

    def _connections(self) -> list[Connection]:
        return [c for c in self.loop.table.slots if isinstance(c, Connection)]

    # -- once per iteration --------------------------------------------------------------------

    def _end_of_iteration(self) -> None:
        router = self.router
        router.now = self.loop.now
        if router.over:  # slow consumers whose policy is disconnect (counted by the router)
            over, router.over = router.over, []
            for session in over:
                if isinstance(session, Connection):
                    session.close(Closed.SLOW_CONSUMER, "slow consumer")
        dirty = router.dirty
        if dirty and not self._hold(router):
            router.dirty = []
            stats = self.stats
            timed = stats.timed_flushes
            flush_all(dirty, stats)
            # Every buffer here filled since the iteration began (or since deliveries were
            # held back); those the flush emptied (all but the few that timed themselves)
            # waited at most that long: one clock read times them all
            # (broker_queue_age_seconds), nothing per connection.
            at_once = len(dirty) - (stats.timed_flushes - timed)
            if at_once > 0:
                start = self.held_since or self.loop.now
                stats.record_queue_age(time.monotonic() - start, at_once)
            self.held_since = 0.0
            self.loop.no_wait = False
        self.busy = False
        if self.stopping and self.connections == 0:
            self.loop.stop()

    def lone_read(self) -> bool:
        """Is the read being handled the iteration's only input? It is when it is the loop's
        only event, did not fill --read-size and no deliveries are held back: then nothing
        else can queue output before the flush, and its deliveries may be written at once
        (router.handle_batch)."""
        return self.loop.ready == 1 and not self.busy and not self.held_since

    def _hold(self, router: Router) -> bool:
        """Hold this iteration's deliveries back, to be written with the next ones? Only while
        input waits (a recv filled --read-size): then the next iteration runs at once and its
        deliveries join these, so a subscriber of many topics gets one send for several
        messages instead of one each, and the loop spends its time routing instead of in
        `send` (W4 in docs/benchmarks.md). Never longer than --busy-flush-delay after the first
        held delivery, nor once a buffer is past half the high-water mark, nor while stopping.
        A light load never fills a read, so its deliveries go out in the iteration they came."""
        if not self.busy or router.urgent or self.stopping:
            router.urgent = False
            return False
        now = self.loop.now
        if not self.held_since:
            if self.config.busy_flush_delay <= 0:
                return False
            self.held_since = now
        elif now - self.held_since >= self.config.busy_flush_delay:
            return False
        self.loop.no_wait = True
        return True

    # -- timers --------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Deadlines and keepalive for one step's share of the connections: every `steps`-th
        slot of the table (fds are dense and low, so a stride shares them out evenly; the
        number of steps is fixed per round). History expiry and the stats tick once a round."""
        now = self.loop.now
        cfg = self.config
        ping_after = cfg.ping_interval
        give_up_after = cfg.ping_interval + cfg.ping_timeout
        step, steps = self._sweep_step, self._sweep_steps
        # filter(None, ...): the empty slots of the table are skipped in C.
        for conn in filter(None, self.loop.table.slots[step::steps]):
            if not isinstance(conn, Connection):
                continue
            try:
                state = conn.state
                if state == OPEN:
                    idle = now - conn.last_rx
                    if idle >= ping_after:
                        if idle >= give_up_after and conn.pinged:
                            conn.close(Closed.PING_TIMEOUT, "no pong")
                        elif not conn.pinged:
                            conn.pinged = True
                            conn.queue(PING_FRAME)
                elif state != CLOSED and now > conn.deadline:
                    if state == HTTP:
                        http = conn.http
                        idle_http = http is not None and http.idle
                        conn.abort(Closed.HTTP_DONE if idle_http else Closed.HANDSHAKE_TIMEOUT)
                    else:
                        conn.abort(conn.reason or Closed.CLIENT_GONE)
            except Exception as exc:
                self.internal_error(conn, exc)
        if step == steps - 1:  # the round is over
            self.router.streams.expire(now)
            self._tick_stats(now)
            step, steps = -1, 1 + self.connections // SWEEP_CHUNK
            self._sweep_steps = steps
        self._sweep_step = step + 1
        self.loop.call_later(SWEEP_INTERVAL / steps, self._sweep)

    def _tick_stats(self, now: float) -> None:
        last, published, delivered = self._last_tick
        elapsed = max(now - last, 1e-3)
        s = self.stats
        self._rates = {
            "published_per_s": (s.published - published) / elapsed,
            "delivered_per_s": (s.delivered - delivered) / elapsed,
        }
        counts, self.router.topic_counts = self.router.topic_counts, {}
        top = heapq.nlargest(10, counts.items(), key=lambda kv: kv[1])
        self._busiest = [{"topic": t, "per_s": n / elapsed} for t, n in top]
        self._topic_rates = (counts, elapsed)
        self._last_tick = (now, s.published, s.delivered)

    # -- introspection -------------------------------------------------------------------------

    def gauges(self) -> dict[str, float | list[float]]:
        """The live gauges of a scrape. One walk of the connection table gives the queued and
        conflated totals and the TOP_LAG_RANKS connections that lag most, ranked as GET
        /connections?sort=lag ranks them (ranks without a lagging connection read 0)."""
        streams = self.router.streams
        now = self.loop.now
        queued = conflated = 0
        lagging: list[Connection] = []
        for conn in self._connections():
            queued += conn.queued
            if conn.backlog:  # a paced replay waiting behind the socket (rare: summed here)
                queued += _replay_bytes(conn)
            if conn.conflated is not None:
                conflated += conn.conflated.size
            if conn.queued and conn.state in (OPEN, CLOSING):
                lagging.append(conn)
        lag = _CONNECTION_SORTS["lag"]
        held = self.held_since
        worst = heapq.nlargest(TOP_LAG_RANKS, lagging, key=lambda c: lag(c, now, held))
        missing = [0.0] * (TOP_LAG_RANKS - len(worst))
        return {
            "broker_history_topics": streams.topics,
            "broker_history_messages": streams.messages,
            "broker_history_bytes": streams.held_bytes,
            "broker_connections": self.connections,
            "broker_subscriptions": self.router.sublist.subscriptions,
            "broker_topics": self.router.sublist.patterns,
            "broker_outbound_queued_bytes": queued,
            "broker_conflated_bytes": conflated,
            "broker_top_lag_seconds": [_queue_age(c, now, held) for c in worst] + missing,
            "broker_top_lag_bytes": [float(c.queued) for c in worst] + missing,
            "broker_max_connections": self.max_connections,
            "broker_uptime_seconds": time.time() - self.stats.started,
        }

    def connection_list(self, params: Mapping[str, str]) -> dict[str, Any]:
        """GET /connections: the WebSocket connections that lag most (or are oldest, or lost the
        most), `limit` of them; ValueError for a bad parameter (400). One walk of the table."""
        sort = params.get("sort", "lag")
        key = _CONNECTION_SORTS.get(sort)
        if key is None:
            raise ValueError(f"sort must be one of {', '.join(_CONNECTION_SORTS)}")
        limit = _limit(params)
        now = self.loop.now
        conns = [c for c in self._connections() if c.state in (OPEN, CLOSING)]
        held = self.held_since
        top = heapq.nlargest(limit, conns, key=lambda c: key(c, now, held))
        wall = time.time()
        return {
            "total": len(conns),
            "sort": sort,
            "connections": [_describe(c, now, wall, held) for c in top],
        }

    def topic_list(self, params: Mapping[str, str]) -> dict[str, Any]:
        """GET /topics: the busiest topics of the last stats tick (sort=rate) or the patterns
        most subscribed (sort=subscribers); ValueError for a bad parameter (400)."""
        sort = params.get("sort", "rate")
        limit = _limit(params)
        counts, elapsed = self._topic_rates
        sublist = self.router.sublist
        if sort == "rate":
            top = heapq.nlargest(limit, counts.items(), key=lambda kv: kv[1])
            topics = [
                {"topic": t, "rate": n / elapsed, "subscribers": sublist.count(t)} for t, n in top
            ]
        elif sort == "subscribers":
            most = heapq.nlargest(limit, sublist.counts(), key=lambda pn: pn[1])
            topics = [
                {"topic": p, "rate": counts.get(p, 0) / elapsed, "subscribers": n} for p, n in most
            ]
        else:
            raise ValueError("sort must be one of rate, subscribers")
        return {"sort": sort, "interval_s": elapsed, "topics": topics}

    def _topic_figures(self, names: list[str], sort: str) -> dict[str, list[float]]:
        """[rate, subscribers] of each topic here (the second round of a host-wide /topics):
        as `topic_list` counts them, subscribers reached (sort=rate) or holding the pattern."""
        counts, elapsed = self._topic_rates
        sublist = self.router.sublist
        count = sublist.count if sort == "rate" else sublist.holders
        return {t: [counts.get(t, 0) / elapsed, count(t)] for t in names}

    def snapshot(self) -> dict[str, Any]:
        """The JSON behind GET /stats and the live page."""
        s = self.stats
        return {
            "connections": self.connections,
            "subscriptions": self.router.sublist.subscriptions,
            "topics": self.router.sublist.patterns,
            "published_total": s.published,
            "delivered_total": s.delivered,
            **self._rates,
            "busiest_topics": self._busiest,
            "uptime_s": time.time() - s.started,
            **({} if self.worker is None else {"worker": self.worker, "pid": os.getpid()}),
        }

    # -- shutdown ------------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.shutdown()
        elif signum == signal.SIGHUP:
            self.reload()

    def reload(self) -> None:
        """SIGHUP: reload what can change without a restart (the TLS certificate and key).

        New connections get the new context; open ones keep theirs (each SSLObject holds a
        reference to the context it was made from). A file that does not load keeps the old one.
        """
        cfg = self.config
        if self.tls_context is None:
            log.info("SIGHUP: nothing to reload (no --tls-cert)")
            return
        try:
            self.tls_context = server_context(cfg.tls_cert, cfg.tls_key)
        except TlsSetupError as exc:
            log.warning("SIGHUP: TLS certificate/key not reloaded, keeping the old ones: %s", exc)
            return
        log.info("SIGHUP: TLS certificate and key reloaded from %s", cfg.tls_cert)

    def shutdown(self) -> None:
        """Stop accepting, send 1001 to every client, drain within `shutdown_timeout`."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down: closing %d connections", self.connections)
        self.listener.close()
        for conn in self._connections():
            if conn.state == OPEN:
                conn.close(Closed.SHUTDOWN, "server shutting down", wait_for_peer=True)
            elif conn.state in (HTTP, LINGER):
                conn.abort(Closed.SHUTDOWN)
        self.loop.call_later(self.config.shutdown_timeout, self._force_stop)

    def _force_stop(self) -> None:
        for conn in self._connections():
            if conn.state != CLOSED:
                conn.abort(
                    Closed.SHUTDOWN if conn.state != CLOSING else conn.reason or Closed.SHUTDOWN
                )
        self.loop.stop()

    def run(self) -> None:
        self.loop.handle_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            self.loop.run()
        finally:
            self.listener.close()
            self.loop.close()


def _limit(params: Mapping[str, str]) -> int:
    raw = params.get("limit", str(DEFAULT_LIST_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
    return int(raw)


def _queue_age(conn: Connection, now: float, held: float) -> float:
    """How long the oldest queued frame has waited, at most. `held` is when the server began
    holding deliveries back (0.0: it is not holding): a buffer that filled since then holds
    frames at most that old, though no flush has stamped its `since` yet."""
    since = conn.since or held
    return now - since if since and conn.queued else 0.0


_CONNECTION_SORTS: dict[str, Callable[[Connection, float, float], Any]] = {
    # How long the oldest queued frame has waited, then how much is queued.
    "lag": lambda c, now, held: (_queue_age(c, now, held), c.queued),
    "age": lambda c, now, held: now - c.connected,
    "dropped": lambda c, now, held: (c.dropped, c.queued),
}


def _replay_bytes(conn: Connection) -> int:
    """Bytes of a paced replay not yet written (router._queue_replay): history the client
    asked for, queued but not counted in `queued` (it is not lag)."""
    return sum(map(len, conn.backlog or ()))


def _describe(conn: Connection, now: float, wall: float, held: float) -> dict[str, Any]:
    grant = conn.grant
    conflated = conn.conflated
    return {
        "id": conn.token,
        "fd": conn.fd,
        "remote": conn.peer,
        "user": grant.sub if grant is not None else None,
        "connected_at": wall - (now - conn.connected),
        "connected_s": now - conn.connected,
        "encoding": conn.encoding.name.lower(),
        "subscriptions": len(conn.patterns or ()),
        "queued_bytes": conn.queued,
        "queued_frames": len(conn.out),
        "replay_bytes": _replay_bytes(conn) if conn.backlog else 0,
        "queue_age_s": _queue_age(conn, now, held),
        "conflated_topics": len(conflated.frames) if conflated is not None else 0,
        "dropped": conn.dropped,
        "slow": bool(conn.slow),
        "state": "open" if conn.state == OPEN else "closing",
    }


class _Tag(logging.Filter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_tag = self.process
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        tag = getattr(record, "process_tag", None)
        if tag:
            entry["process"] = tag
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(cfg: Config, process: str = "") -> None:
    """Logs to stderr; `process` (e.g. "worker 2") starts each line with --workers."""
    handler = logging.StreamHandler(sys.stderr)
    if cfg.log_format == "json":
        handler.setFormatter(_JsonFormatter())
        if process:
            handler.addFilter(_Tag(process))
    else:
        tag = f"[{process}] " if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config.parse(argv)
    before, after = raise_fd_limit()
    worker = None
    if "BROKER_WORKER_FD" in os.environ:  # started by a supervisor (--workers)
        index = int(os.environ["BROKER_WORKER_INDEX"])
        worker = (index, socket.socket(fileno=int(os.environ["BROKER_WORKER_FD"])))
        setup_logging(cfg, f"worker {index}")
    else:
        setup_logging(cfg, "supervisor" if cfg.workers != 1 else "")
    if worker is None and cfg.workers != 1:
        from broker.supervisor import Supervisor

        try:
            supervisor = Supervisor(cfg, argv, after)
        except OSError as exc:
            log.error("cannot bind %s:%d: %s", cfg.host, cfg.port, exc.strerror)  # noqa: TRY400
            return 1
        return supervisor.run()
    try:
        server = Server(cfg, after, worker)
    except TlsSetupError as exc:
        log.error("--tls-cert/--tls-key: %s", exc)  # noqa: TRY400
        return 1
    except AuthConfigError as exc:
        log.error("%s", exc)  # noqa: TRY400
        return 2
    except RedisConfigError as exc:
        log.error("%s", exc)  # noqa: TRY400
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc.strerror)  # noqa: TRY400
        return 1
    except OriginListError as exc:
        log.error("--allowed-origins: %s", exc)  # noqa: TRY400
        return 2
    host, port = server.listener.address
    scheme = "wss" if server.tls_context else "ws"
    log.info(
        "broker %s listening on %s:%d (%s://%s:%d/ws); open files limit %d (was %d), "
        "max connections %d; pid %d",
        __version__,
        host,
        port,
        scheme,
        host,
        port,
        after,
        before,
        server.max_connections,
        os.getpid(),
    )
    if cfg.poller != "epoll":
        log.warning(
            "--poller %s: for measuring the cost of polling only (broker-bench pollers); "
            "epoll is the production poller%s",
            cfg.poller,
            "; select serves no fd >= 1024" if cfg.poller == "select" else "",
        )
    built = speedups.status()
    if not all(built.values()):
        log.info(
            "C speedups off for %s (%s): the Python twins serve, slower (docs/design.md)",
            ", ".join(name for name, on in built.items() if not on),
            f"{speedups.DISABLE} is set" if speedups.disabled() else "not built",
        )
    if server.router.verifier is not None:
        log.info("authentication on: every connection needs a valid token (docs/security.md)")
    tune_gc()
    server.run()
    log.info("stopped")
    return 0


def tune_gc() -> None:
    """Collect garbage less often than CPython's default, which suits programs that make few
    objects.

    A busy broker makes and frees a message's objects (its entry in history, its frames) on
    every publish, and holds hundreds of thousands of long-lived ones (connections, retained
    messages). With the default first-generation threshold (700 allocations) the collector ran
    ~400 times in a 5 s W4 run and took ~3% of the CPU; at 10,000, ~30 times and ~1%
    (docs/benchmarks.md). What exists at start (modules, configuration) is frozen out of every
    collection. Reference cycles are rare here and still collected."""
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
