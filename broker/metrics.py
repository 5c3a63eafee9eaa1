"""Counters kept as plain ints on the hot path, exported through one custom prometheus collector.

The loop, router and connections increment attributes of one `Stats` object (an attribute add
costs tens of nanoseconds; `Counter.inc()` takes a lock). `/metrics` calls `render`, which reads
them into metric families at scrape time. Histograms are fixed power-of-two buckets indexed by
`int.bit_length()`, so recording one is an index and an add.
"""

from __future__ import annotations

import select
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker.errors import AUTH_FAILURE_REASONS, FORBIDDEN_OPS, Closed

# Events per epoll_wait: bucket i holds waits with n events where n.bit_length() == i,
# i.e. upper bounds 0, 1, 3, 7, ... 2**k - 1.
EVENTS_BUCKETS = 12
# Loop busy time per iteration in ns: bucket i holds ns.bit_length() == i; we export from 2**10 ns
# (1 us) to 2**30 ns (1.07 s) and fold the rest into the ends.
ITER_MIN_BIT, ITER_MAX_BIT = 10, 30

# Queue age at flush in us: bucket i holds us.bit_length() == i; exported from 2**7 us (128 us)
# to 2**26 us (67 s), the rest folded into the ends.
AGE_MIN_BIT, AGE_MAX_BIT = 7, 26

# "conflated": a frame replaced by a newer one of its topic in a backed-up connection's queue.
DROP_REASONS = ("slow_consumer", "conflated", "unencodable", "rate_limited")
OVERFLOW_POLICIES = ("disconnect", "drop", "conflate")  # broker.config.OVERFLOW_POLICIES
# Why a TLS handshake failed (broker/net/tls.py `failure_reason` picks one).
TLS_FAILURE_REASONS = ("plain_http", "protocol", "peer_alert", "timeout", "eof", "other")
REFUSE_REASONS = ("origin", "per_ip", "rate")  # broker.auth.perimeter.REASONS
# Why messages left the history (pubsub/history.py says when each applies).
HISTORY_EVICTION_REASONS = ("size", "ttl", "memory", "forgotten")
# The connections that lag most are exported by rank, not by identity: a `remote` or `user` label
# would make a series per connection (unbounded, churning). Who they are: GET /connections.
TOP_LAG_RANKS = 5
EVENT_KINDS = (
    ("in", select.EPOLLIN | select.EPOLLPRI),
    ("out", select.EPOLLOUT),
    ("hup", select.EPOLLHUP),
    ("rdhup", select.EPOLLRDHUP),
    ("err", select.EPOLLERR),
)


class Stats:
    """Every count the broker keeps. Plain attributes; the hot paths add to them directly."""

    def __init__(self) -> None:
        self.started = time.time()
        self.epoll_waits = 0
        self.event_masks: Counter[int] = Counter()  # epoll mask -> times seen; split at export
        self.events_per_wait = [0] * EVENTS_BUCKETS
        self.events_sum = 0
        self.iter_buckets = [0] * (ITER_MAX_BIT + 2)
        self.iter_ns_sum = 0
        self.accepted = 0
        self.closed: Counter[Closed] = Counter()
        self.published = 0
        self.delivered = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.bytes_received = 0
        self.bytes_sent = 0
        self.backpressure = 0
        self.sends = 0
        # Episodes of a connection over the high-water mark, by the policy applied (each policy
        # once per episode).
        self.slow_consumers = dict.fromkeys(OVERFLOW_POLICIES, 0)
        self.queue_age = [0] * (AGE_MAX_BIT + 2)  # flushes that emptied a buffer, by age
        self.queue_age_sum = 0.0
        # Flushes that left bytes unsent or timed a backlog's age; the others are timed in bulk
        # (server._end_of_iteration).
        self.timed_flushes = 0
        self.internal_errors = 0
        self.tls_handshakes = 0
        self.tls_failures = dict.fromkeys(TLS_FAILURE_REASONS, 0)
        self.auth_failures = dict.fromkeys(AUTH_FAILURE_REASONS, 0)
        self.forbidden = dict.fromkeys(FORBIDDEN_OPS, 0)
        self.handshakes_refused = dict.fromkeys(REFUSE_REASONS, 0)
        self.replayed = 0
        self.history_evictions = dict.fromkeys(HISTORY_EVICTION_REASONS, 0)
        # -- backplane (--workers, --redis): messages over the channel to the hub --
        self.backplane_sent = 0
        self.backplane_received = 0
        # The pubsub.backplane.Backplane when there is one: its series are exported only then.
        self.backplane: Any = None

    def record_wait(self, n: int) -> None:
        self.epoll_waits += 1
        self.events_per_wait[min(n.bit_length(), EVENTS_BUCKETS - 1)] += 1
        self.events_sum += n

    def record_queue_age(self, seconds: float, n: int = 1) -> None:
        """`n` flushes emptied buffers whose oldest frame had waited `seconds`."""
        self.queue_age[min(int(seconds * 1e6).bit_length(), AGE_MAX_BIT + 1)] += n
        self.queue_age_sum += seconds * n

    def record_iteration(self, ns: int) -> None:
        self.iter_buckets[min(ns.bit_length(), ITER_MAX_BIT + 1)] += 1
        self.iter_ns_sum += ns


# name -> value, or name -> values by rank (exported with rank="1".."n").
Gauges = Callable[[], dict[str, float | list[float]]]


class BrokerCollector(Collector):
    """Reads `Stats` (and live gauges from the server) at scrape time."""

    def __init__(self, stats: Stats, gauges: Gauges) -> None:
        self.stats = stats
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield _counter("broker_epoll_wait", "epoll_wait calls", s.epoll_waits)
        kinds = CounterMetricFamily(
            "broker_epoll_events", "Ready events returned by epoll_wait, by kind", labels=["kind"]
        )
        totals = dict.fromkeys((k for k, _ in EVENT_KINDS), 0)
        for mask, count in s.event_masks.items():
            for kind, bits in EVENT_KINDS:
                if mask & bits:
                    totals[kind] += count
        for kind, value in totals.items():
            kinds.add_metric([kind], value)
        yield kinds
        yield _histogram(
            "broker_epoll_events_per_wait",
            "Ready events per epoll_wait call",
            [(str(2**i - 1), c) for i, c in enumerate(s.events_per_wait[:-1])],
            s.events_per_wait[-1],
            s.events_sum,
        )
        folded = [sum(s.iter_buckets[: ITER_MIN_BIT + 1]), *s.iter_buckets[ITER_MIN_BIT + 1 :]]
        yield _histogram(
            "broker_loop_iteration_seconds",
            "Busy time of one loop iteration (events, timers, flush), excluding the wait",
            [(repr(2 ** (ITER_MIN_BIT + i) / 1e9), c) for i, c in enumerate(folded[:-1])],
            folded[-1],
            s.iter_ns_sum / 1e9,
        )
        yield _counter("broker_connections_accepted", "Connections accepted", s.accepted)
        closed = CounterMetricFamily(
            "broker_connections_closed", "Connections closed, by reason", labels=["reason"]
        )
        for closed_reason in Closed:
            closed.add_metric([closed_reason.label], s.closed[closed_reason])
        yield closed
        yield _counter("broker_messages_published", "Messages published", s.published)
        yield _counter("broker_messages_delivered", "Messages queued to subscribers", s.delivered)
        dropped = CounterMetricFamily(
            "broker_messages_dropped", "Deliveries not made, by reason", labels=["reason"]
        )
        for drop_reason, count in s.dropped.items():
            dropped.add_metric([drop_reason], count)
        yield dropped
        yield _counter(
            "broker_messages_replayed", "Messages queued from history by recovery", s.replayed
        )
        evictions = CounterMetricFamily(
            "broker_history_evictions",
            "Messages removed from history, by reason",
            labels=["reason"],
        )
        for eviction_reason, count in s.history_evictions.items():
            evictions.add_metric([eviction_reason], count)
        yield evictions
        yield _counter("broker_bytes_received", "Bytes read from sockets", s.bytes_received)
        yield _counter("broker_bytes_sent", "Bytes written to sockets", s.bytes_sent)
        yield _counter(
            "broker_backpressure",
            "Sends that hit a full socket buffer and armed EPOLLOUT",
            s.backpressure,
        )
        yield _counter(
            "broker_socket_sends",
            "send() calls on client sockets; deliveries per send shows write coalescing",
            s.sends,
        )
        slow = CounterMetricFamily(
            "broker_slow_consumers",
            "Connections found over the outbound high-water mark, by the overflow policy applied",
            labels=["policy"],
        )
        for policy, count in s.slow_consumers.items():
            slow.add_metric([policy], count)
        yield slow
        ages = [sum(s.queue_age[: AGE_MIN_BIT + 1]), *s.queue_age[AGE_MIN_BIT + 1 :]]
        yield _histogram(
            "broker_queue_age_seconds",
            "Age of the oldest queued frame when a flush emptied a connection's buffer",
            [(repr(2 ** (AGE_MIN_BIT + i) / 1e6), c) for i, c in enumerate(ages[:-1])],
            ages[-1],
            s.queue_age_sum,
        )
        yield _counter(
            "broker_internal_errors", "Bugs caught while serving one connection", s.internal_errors
        )
        yield _counter("broker_tls_handshakes", "TLS handshakes completed", s.tls_handshakes)
        tls_failures = CounterMetricFamily(
            "broker_tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            labels=["reason"],
        )
        for tls_reason, count in s.tls_failures.items():
            tls_failures.add_metric([tls_reason], count)
        yield tls_failures
        failures = CounterMetricFamily(
            "broker_auth_failures",
            "Tokens refused (upgrade, auth op, HTTP), by reason",
            labels=["reason"],
        )
        for auth_reason, count in s.auth_failures.items():
            failures.add_metric([auth_reason], count)
        yield failures
        forbidden = CounterMetricFamily(
            "broker_forbidden",
            "Requests refused by the token's claims (WebSocket and HTTP), by operation",
            labels=["op"],
        )
        for op, count in s.forbidden.items():
            forbidden.add_metric([op], count)
        yield forbidden
        refused = CounterMetricFamily(
            "broker_handshakes_refused",
            "WebSocket upgrades refused at the perimeter, by reason",
            labels=["reason"],
        )
        for refuse_reason, count in s.handshakes_refused.items():
            refused.add_metric([refuse_reason], count)
        yield refused
        backplane = s.backplane
        if backplane is not None:
            yield GaugeMetricFamily(
                "broker_backplane_up",
                "1 while the backplane (hub or Redis) is reachable, else 0",
                value=1 if backplane.up else 0,
            )
            yield _counter(
                "broker_backplane_messages_sent", "Messages sent to the backplane", s.backplane_sent
            )
            yield _counter(
                "broker_backplane_messages_received",
                "Messages received from the backplane",
                s.backplane_received,
            )
            yield _counter(
                "broker_backplane_refused",
                "Requests refused with `unavailable` (backplane down or its buffer full)",
                backplane.refused,
            )
            yield _counter(
                "broker_backplane_failed",
                "Requests in flight failed with `unavailable` when the backplane went away",
                backplane.failed,
            )
            yield GaugeMetricFamily(
                "broker_backplane_buffered_bytes",
                "Bytes queued to the backplane, not yet written",
                value=backplane.buffered_bytes(),
            )
            yield GaugeMetricFamily(
                "broker_backplane_rtt_seconds",
                "Round trip of the last PING to the backplane (Redis; 0 for the workers' hub)",
                value=getattr(backplane, "rtt", 0.0),
            )
            yield _counter(
                "broker_backplane_reconnects",
                "Connections to the backplane lost or failed after it was first reached (Redis)",
                getattr(backplane, "reconnects", 0),
            )
            yield GaugeMetricFamily(
                "broker_backplane_pending",
                "Requests awaiting the backplane's answer",
                value=len(backplane.pending),
            )
        for name, gauge in self.gauges().items():
            if isinstance(gauge, list):
                ranked = GaugeMetricFamily(name, _GAUGE_HELP.get(name, name), labels=["rank"])
                for rank, ranked_value in enumerate(gauge, 1):
                    ranked.add_metric([str(rank)], ranked_value)
                yield ranked
            else:
                yield GaugeMetricFamily(name, _GAUGE_HELP.get(name, name), value=gauge)


_GAUGE_HELP = {
    "broker_connections": "Open client connections (HTTP and WebSocket)",
    "broker_subscriptions": "Subscriptions held, (pattern, connection) pairs",
    "broker_topics": "Distinct subscribed patterns",
    "broker_outbound_queued_bytes": "Bytes queued to clients, not yet accepted by the kernel",
    "broker_uptime_seconds": "Seconds since the broker started",
    "broker_history_topics": "Topics holding history",
    "broker_history_messages": "Messages held in history",
    "broker_history_bytes": "Bytes of history, as counted against --history-memory",
    "broker_max_connections": "The connection limit (--max-connections or the open-files limit)",
    "broker_conflated_bytes": "Bytes held as the newest frame per topic for backed-up connections",
    "broker_top_lag_seconds": "Age of the oldest queued frame of the connections that lag most, "
    "by rank (GET /connections?sort=lag says who); 0 when fewer lag",
    "broker_top_lag_bytes": "Bytes queued to the connections that lag most, by the same rank",
}


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _histogram(
    name: str, doc: str, buckets: list[tuple[str, int]], overflow: int, total: float
) -> HistogramMetricFamily:
    cumulative: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in buckets:
        running += count
        cumulative.append((bound, running))
    running += overflow
    cumulative.append(("+Inf", running))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=total)


def make_registry(stats: Stats, gauges: Gauges) -> CollectorRegistry:
    """Our collector plus prometheus-client's process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BrokerCollector(stats, gauges))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
